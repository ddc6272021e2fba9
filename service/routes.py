"""HTTP routes: detection, model and config info, health, metrics. No batching or model logic lives here."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from importlib import resources
from typing import Any, TypeVar

import numpy as np
import torch
from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from service.annotate import annotate, encode, negotiate
from service.config import Settings
from service.dependencies import DetectQuery, QueryDep, ReadyDep, ServiceState, StateDep, require_api_key
from service.engine import Detection
from service.errors import (
    BadRequest,
    ClientGone,
    ImageRejected,
    PayloadTooLarge,
    RequestTimeout,
    UnsupportedMediaType,
)
from service.images import Letterbox, decode, letterbox
from service.schemas import (
    BatchDetectResponse,
    DetectResponse,
    ErrorResponse,
    Health,
    ImageError,
    ModelInfo,
)

T = TypeVar("T")


ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 408, 413, 415, 422, 431, 500, 503, 504)}
BINARY = {"type": "string", "format": "binary"}


def _request_body(content: dict[str, Any]) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": content}}


def _multipart(field: str, schema: dict[str, Any]) -> dict[str, Any]:
    form = {"type": "object", "properties": {field: schema}, "required": [field]}
    return {"multipart/form-data": {"schema": form}}


IMAGE_BODY = _request_body({**_multipart("file", BINARY), "image/*": {"schema": BINARY}})
BATCH_BODY = _request_body(_multipart("files", {"type": "array", "items": BINARY}))

detect_router = APIRouter(dependencies=[Depends(require_api_key)], tags=["detection"])
ops_router = APIRouter(tags=["operations"])


async def read_body(request: Request, limit: int, deadline: float) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes, and with 408 when it
    has not fully arrived by ``deadline`` (a ``time.monotonic()`` value): a stalled upload holds no slot forever."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the body is {declared} bytes, more than the limit of {limit}")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(max(deadline - time.monotonic(), 0)):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"the body exceeds the limit of {limit} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeout(f"the body did not arrive within the request timeout ({size} bytes received)") from None
    return b"".join(chunks)


async def uploaded_images(request: Request, settings: Settings, field_name: str, max_files: int) -> list[bytes]:
    """Images of a multipart ``field_name`` field, or the raw body when its content type is ``image/*``; the body
    is read within the upload limit and the request's deadline (see :func:`read_body`)."""
    deadline = request.state.arrived + settings.request_timeout_s
    body = await read_body(request, settings.max_upload_bytes, deadline)
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("image/"):
        return [body]
    if not content_type.startswith("multipart/form-data"):
        raise UnsupportedMediaType(
            f"send multipart/form-data with a '{field_name}' field, or a raw body with an image/* content type"
        )

    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=max_files, max_fields=max_files)
    except MultiPartException as error:
        raise BadRequest(f"malformed multipart body: {error.message}") from None
    try:
        files = [value for value in form.getlist(field_name) if isinstance(value, UploadFile)]
        if not files:
            raise BadRequest(f"multipart field '{field_name}' with an image file is required")
        return [await upload.read() for upload in files]
    finally:
        await form.close()


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``; if the client disconnects first, cancel it (queued images are then skipped)."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise ClientGone("the client disconnected")
    return task.result()


@dataclass
class Prepared:
    tensor: torch.Tensor  # (3, S, S) uint8, the letterboxed model input
    geometry: Letterbox
    seconds: float
    pixels: np.ndarray | None  # (H, W, 3) the decoded image, kept only when it will be drawn on


def _preprocess(data: bytes, max_pixels: int, size: int, keep_pixels: bool) -> Prepared:
    started = time.monotonic()
    image = decode(data, max_pixels, fit=None if keep_pixels else size)  # drawing needs the full resolution
    tensor, geometry = letterbox(image, size)
    return Prepared(tensor, geometry, time.monotonic() - started, image.pixels if keep_pixels else None)


@dataclass
class ImageResult:
    response: DetectResponse
    detections: list[Detection]
    pixels: np.ndarray | None


async def detect_image(
    state: ServiceState, data: bytes, query: DetectQuery, request_id: str, arrived: float, keep_pixels: bool = False
) -> ImageResult:
    """One image through the pipeline: decode (thread pool), batch queue, inference, boxes back to its pixels.

    ``arrived`` is the request's ``time.monotonic()`` arrival; its deadline is ``request_timeout_s`` later.
    The decoded pixels are kept (``keep_pixels``) only for drawing: a queued request otherwise holds just the
    model input.
    """
    settings, engine, metrics = state.settings, state.engine, state.metrics
    loop = asyncio.get_running_loop()
    prepared = await loop.run_in_executor(
        state.decode_pool, _preprocess, data, settings.max_image_pixels, engine.input_size, keep_pixels
    )
    tensor, geometry, preprocess_s = prepared.tensor, prepared.geometry, prepared.seconds
    metrics.preprocess_duration.observe(preprocess_s)
    submitted = time.monotonic()
    output = await state.batcher.submit(tensor, deadline=arrived + settings.request_timeout_s)
    finished = time.monotonic()
    detections = engine.detections(output.rows, geometry, query.conf, query.classes, query.max_det)
    for detection in detections:
        metrics.detections.labels(detection.class_name).inc()
    done = time.monotonic()
    response = DetectResponse(
        request_id=request_id,
        model={"name": engine.name, "version": engine.version},
        image={"width": geometry.width, "height": geometry.height},
        detections=[
            {
                "class_id": d.class_id,
                "class_name": d.class_name,
                "confidence": d.confidence,
                "box": dict(zip(("x1", "y1", "x2", "y2"), d.box, strict=True)),
            }
            for d in detections
        ],
        timings_ms={
            "queue": round(max(finished - submitted - output.inference_seconds, 0) * 1000, 2),
            "preprocess": round(preprocess_s * 1000, 2),
            "inference": round(output.inference_seconds * 1000, 2),
            "postprocess": round((done - finished) * 1000, 2),
            "total": round((done - arrived) * 1000, 2),
        },
        batch_size=output.batch_size,
    )
    return ImageResult(response, detections, prepared.pixels)


@detect_router.post(
    "/detect", response_model=DetectResponse, responses=ERRORS, openapi_extra=IMAGE_BODY, summary="Detect objects"
)
async def detect(request: Request, state: ReadyDep, query: QueryDep) -> DetectResponse:
    """Detect objects in one image: multipart field ``file``, or a raw body with an ``image/*`` content type."""
    arrived = request.state.arrived
    (image,) = await uploaded_images(request, state.settings, "file", max_files=1)
    with state.metrics.inflight.track_inprogress():
        work = detect_image(state, image, query, request.state.request_id, arrived)
        return (await cancel_on_disconnect(request, work)).response


@detect_router.post(
    "/detect/annotated",
    responses={200: {"content": {"image/jpeg": {}, "image/png": {}}}, **ERRORS},
    response_class=Response,
    openapi_extra=IMAGE_BODY,
    summary="Detect objects and draw them",
)
async def detect_annotated(request: Request, state: ReadyDep, query: QueryDep) -> Response:
    """Same input and query as ``/detect``; answers the image with boxes, class names and confidences drawn
    (JPEG, or PNG when the ``Accept`` header prefers ``image/png``); ``X-Detections`` holds the count."""
    arrived = request.state.arrived
    (image,) = await uploaded_images(request, state.settings, "file", max_files=1)
    media_type = negotiate(request.headers.get("accept"))
    with state.metrics.inflight.track_inprogress():
        work = detect_image(state, image, query, request.state.request_id, arrived, keep_pixels=True)
        result = await cancel_on_disconnect(request, work)
    drawn = await asyncio.get_running_loop().run_in_executor(
        state.decode_pool, lambda: encode(annotate(result.pixels, result.detections), media_type)
    )
    return Response(drawn, media_type=media_type, headers={"X-Detections": str(len(result.detections))})


@detect_router.post(
    "/detect/batch", response_model=BatchDetectResponse, responses=ERRORS, openapi_extra=BATCH_BODY,
    summary="Detect objects in several images",
)  # fmt: skip
async def detect_batch(request: Request, state: ReadyDep, query: QueryDep) -> BatchDetectResponse:
    """Several images (multipart field ``files``), answered in order; each is batched with all other traffic.

    A file that cannot be used (:class:`ImageRejected`) gets its error in its own slot. Any other failure (queue
    full, deadline, inference) fails the whole request and cancels the images still waiting.
    """
    arrived = request.state.arrived
    images = await uploaded_images(request, state.settings, "files", max_files=state.settings.max_batch_files)
    request_id = request.state.request_id

    async def one_image(image: bytes) -> DetectResponse | ImageError:
        try:
            return (await detect_image(state, image, query, request_id, arrived)).response
        except ImageRejected as error:
            state.metrics.rejected.labels(error.rejection).inc()
            return ImageError(status=error.status, error={"code": error.code, "message": error.message})

    async def all_images() -> list[DetectResponse | ImageError]:
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(one_image(image)) for image in images]
        except ExceptionGroup as failed:
            raise failed.exceptions[0] from None  # the failure that cancelled the others
        return [task.result() for task in tasks]

    with state.metrics.inflight.track_inprogress():
        results = await cancel_on_disconnect(request, all_images())
    return BatchDetectResponse(request_id=request_id, results=results)


PAGE = (resources.files("service") / "static" / "index.html").read_text()


@ops_router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page() -> HTMLResponse:
    """A self-contained page to try the detector in a browser (no CDN, works offline)."""
    return HTMLResponse(PAGE)


@ops_router.get("/healthz", response_model=Health, summary="Liveness")
async def healthz() -> Health:
    return Health(status="ok")


@ops_router.get("/readyz", response_model=Health, responses={503: {"model": ErrorResponse}}, summary="Readiness")
async def readyz(state: ReadyDep) -> Health:
    return Health(status="ready")


@ops_router.get("/v1/model", response_model=ModelInfo, dependencies=[Depends(require_api_key)])
async def model_info(state: ReadyDep) -> ModelInfo:
    engine = state.engine
    return ModelInfo(
        name=engine.name,
        version=engine.version,
        classes=engine.names,
        input_size=engine.input_size,
        device=str(engine.device),
        dtype=str(engine.dtype).removeprefix("torch."),
        akconv_layers=engine.akconv_layers,
        akconv_indexing=engine.metadata.akconv_indexing,
        parameters=engine.parameters,
        weights_sha256=engine.metadata.weights_sha256 or engine.metadata.provenance.get("source", {}).get("sha256"),
        checksum=engine.checksum,
        provenance=engine.metadata.provenance,
    )


@ops_router.get("/v1/config", dependencies=[Depends(require_api_key)], summary="Effective settings, secrets masked")
async def config(state: StateDep) -> JSONResponse:
    return JSONResponse(state.settings.public())


@ops_router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}}, 401: {"model": ErrorResponse}},
    summary="Prometheus metrics",
)
async def metrics(request: Request, state: StateDep) -> Response:
    """Open like the probes, unless ``metrics_require_key`` puts it behind the API key."""
    if state.settings.metrics_require_key:
        require_api_key(request, state)
    if state.engine is not None:
        for kind, value in state.engine.gpu_memory().items():
            state.metrics.gpu_memory.labels(kind).set(value)
    state.metrics.queue_depth.set(state.batcher.depth if state.batcher else 0)
    body, content_type = state.metrics.render()
    return Response(body, media_type=content_type)
