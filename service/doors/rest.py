"""HTTP routes: thin adapters from requests to :mod:`service.core.pipeline` and back; info, health, metrics."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import closing, contextmanager
from importlib import resources
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.requests import ClientDisconnect

from model.checkpoint import DEFAULT_BUNDLE
from service.core.admission import Ticket
from service.core.annotate import annotate, encode, negotiate
from service.core.errors import ClientGone, ImageRejected
from service.core.models import ModelSlot, ServedVersion
from service.core.pipeline import Pipeline, Upload
from service.doors.dependencies import ModelDep, PipelineDep, QueryDep, StateDep, require_api_key
from service.process.threads import thread_report
from service.schemas import (
    BatchDetectResponse,
    DetectResponse,
    ErrorResponse,
    Health,
    ImageError,
    ModelInfo,
)

T = TypeVar("T")
Item = TypeVar("Item")


ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 408, 413, 415, 422, 431, 500, 503, 504)}
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


@contextmanager
def admitted(pipeline: Pipeline, model: ModelSlot) -> Iterator[tuple[Ticket, ServedVersion]]:
    """A detection request's hold on the service while it is handled: its admission ticket (closed when it is
    answered), its place in ``detector_inflight_requests``, and the version of ``model`` it leases."""
    with closing(pipeline.admit()) as ticket, pipeline.metrics.inflight.track_inprogress(), model.lease() as served:
        yield ticket, served


async def body_images(
    request: Request, pipeline: Pipeline, ticket: Ticket, field_name: str, max_files: int
) -> list[Upload]:
    """The request's images (see :meth:`service.core.pipeline.Pipeline.read_images`)."""
    return await pipeline.read_images(
        ticket,
        body_chunks(request),
        request.headers.get("content-type", ""),
        declared_length(request),
        field_name,
        max_files,
        request.state.arrived,
    )


def declared_length(request: Request) -> int | None:
    """The body's ``Content-Length``, when it sent one."""
    declared = request.headers.get("content-length")
    return int(declared) if declared is not None and declared.isdigit() else None


async def body_chunks(request: Request) -> AsyncIterator[bytes]:
    """The body as it arrives; a client that hangs up mid-body is :class:`ClientGone`."""
    try:
        async for chunk in request.stream():
            yield chunk
    except ClientDisconnect:
        raise ClientGone("the client disconnected while sending its body") from None


async def each_image(images: Sequence[Item], detect_one: Callable[[Item], Awaitable[T]]) -> list[T]:
    """``detect_one`` of every image at once (each is batched with all other traffic), answers in order. The first
    failure cancels the images still waiting and is raised."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(detect_one(image)) for image in images]
    except ExceptionGroup as failed:
        raise failed.exceptions[0] from None  # the failure that cancelled the others
    return [task.result() for task in tasks]


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``; if the client disconnects first (or this request is cancelled), cancel it: its queued images
    are then skipped."""

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
    if task.cancelled() or not task.done():
        await asyncio.gather(task, return_exceptions=True)
        raise ClientGone("the client disconnected")
    return task.result()


@detect_router.post(
    "/detect", response_model=DetectResponse, responses=ERRORS, openapi_extra=IMAGE_BODY, summary="Detect objects"
)
async def detect(request: Request, pipeline: PipelineDep, model: ModelDep, query: QueryDep) -> DetectResponse:
    """Detect objects in one image: multipart field ``file``, or a raw body with an ``image/*`` content type."""
    with admitted(pipeline, model) as (ticket, served):
        (upload,) = await body_images(request, pipeline, ticket, "file", max_files=1)
        work = pipeline.detect(ticket, served, upload.data, query, request.state.request_id, request.state.arrived)
        response = (await cancel_on_disconnect(request, work)).response
        response.file = upload.name
        return response


@detect_router.post(
    "/detect/annotated",
    responses={200: {"content": {"image/jpeg": {}, "image/png": {}}}, **ERRORS},
    response_class=Response,
    openapi_extra=IMAGE_BODY,
    summary="Detect objects and draw them",
)
async def detect_annotated(request: Request, pipeline: PipelineDep, model: ModelDep, query: QueryDep) -> Response:
    """Same input and query as ``/detect``; answers the image with boxes, class names and confidences drawn
    (JPEG, or PNG when the ``Accept`` header prefers ``image/png``), at most 2,048 pixels on its longer side
    (larger images are drawn on a downscaled copy); ``X-Detections`` holds the count, ``X-Model-Version`` the
    version that found them."""
    media_type = negotiate(request.headers.get("accept"))
    with admitted(pipeline, model) as (ticket, served):
        (upload,) = await body_images(request, pipeline, ticket, "file", max_files=1)
        request_id, arrived = request.state.request_id, request.state.arrived
        work = pipeline.detect(ticket, served, upload.data, query, request_id, arrived, keep_pixels=True)
        result = await cancel_on_disconnect(request, work)
        image = result.response.image
        scale = max(result.pixels.shape[:2]) / max(image.width, image.height)  # the drawn copy may be smaller
        drawn = await asyncio.get_running_loop().run_in_executor(
            pipeline.decode_pool, lambda: encode(annotate(result.pixels, result.detections, scale), media_type)
        )
    headers = {"X-Detections": str(len(result.detections)), "X-Model-Version": served.version}
    return Response(drawn, media_type=media_type, headers=headers)


@detect_router.post(
    "/detect/batch", response_model=BatchDetectResponse, responses=ERRORS, openapi_extra=BATCH_BODY,
    summary="Detect objects in several images",
)  # fmt: skip
async def detect_batch(
    request: Request, pipeline: PipelineDep, model: ModelDep, query: QueryDep
) -> BatchDetectResponse:
    """Several images (multipart field ``files``), answered in order; each is batched with all other traffic.

    A file that cannot be used (:class:`ImageRejected`) gets its error in its own slot. Any other failure (queue
    full, deadline, inference) fails the whole request and cancels the images still waiting.
    """
    request_id, arrived = request.state.request_id, request.state.arrived

    async def one_image(ticket: Ticket, served: ServedVersion, upload: Upload) -> DetectResponse | ImageError:
        try:
            response = (await pipeline.detect(ticket, served, upload.data, query, request_id, arrived)).response
        except ImageRejected as error:
            pipeline.metrics.rejected.labels(error.rejection).inc()
            error_body = {"code": error.code, "message": error.message}
            return ImageError(status=error.status, error=error_body, file=upload.name)
        response.file = upload.name
        return response

    with admitted(pipeline, model) as (ticket, served):
        images = await body_images(request, pipeline, ticket, "files", max_files=pipeline.settings.max_batch_files)
        work = each_image(images, lambda upload: one_image(ticket, served, upload))
        results = await cancel_on_disconnect(request, work)
    return BatchDetectResponse(request_id=request_id, results=results)


STATIC = resources.files("service") / "static"
PAGE = (STATIC / "index.html").read_text()
FAVICON = (STATIC / "favicon.ico").read_bytes()
SAMPLE = (STATIC / "sample.jpg").read_bytes()  # model.synthetic.render(3_000_003, 640): 2 triangles, 4 stars


@ops_router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page() -> HTMLResponse:
    """A self-contained page to try the detector in a browser (no CDN, works offline)."""
    return HTMLResponse(PAGE)


@ops_router.get("/favicon.ico", include_in_schema=False)
async def favicon() -> Response:
    return Response(FAVICON, media_type="image/x-icon", headers={"Cache-Control": "public, max-age=86400"})


@ops_router.get("/sample.jpg", include_in_schema=False)
async def sample() -> Response:
    """A synthetic sample of what the bundled model knows (the page's "Try a sample")."""
    return Response(SAMPLE, media_type="image/jpeg", headers={"Cache-Control": "public, max-age=86400"})


@ops_router.get("/healthz", response_model=Health, summary="Liveness")
async def healthz() -> Health:
    return Health(status="ok")


@ops_router.get("/readyz", response_model=Health, responses={503: {"model": ErrorResponse}}, summary="Readiness")
async def readyz(pipeline: PipelineDep) -> Health:
    return Health(status="ready")


@ops_router.get("/v1/model", response_model=ModelInfo, responses=ERRORS, dependencies=[Depends(require_api_key)])
async def model_info(model: ModelDep) -> ModelInfo:
    """The live version of a served model (``?model=NAME``; default: the first)."""
    live = model.live
    engine = live.engine
    return ModelInfo(
        name=model.name,
        version=engine.version,
        description=engine.metadata.summary(),
        classes=engine.names,
        input_size=engine.input_size,
        device=engine.device,
        dtype=engine.dtype,
        akconv_layers=engine.akconv_layers,
        akconv_indexing=engine.metadata.akconv_indexing,
        parameters=engine.parameters,
        weights_sha256=engine.metadata.sha256(),
        checksum=engine.checksum,
        provenance=engine.metadata.provenance,
        runtime=engine.runtime,
        batch_policy=live.policy.describe(),
        workers=engine.workers,
    )


@ops_router.get("/v1/config", dependencies=[Depends(require_api_key)], summary="Effective settings, secrets masked")
async def config(state: StateDep) -> JSONResponse:
    values = state.settings.public()
    if not values["models"]:
        values["model_path"] = values["model_path"] or str(DEFAULT_BUNDLE)  # the model in use, not "null"
    values["threads"] = thread_report(state.settings.decode_threads)
    return JSONResponse(values)


@ops_router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}}, 401: {"model": ErrorResponse}},
    summary="Prometheus metrics",
)
async def metrics(request: Request, state: StateDep) -> Response:
    """Open like the probes, unless ``metrics_require_key`` puts it behind the API key. OpenMetrics, with trace
    exemplars, when ``Accept`` asks for ``application/openmetrics-text``."""
    if state.settings.metrics_require_key:
        require_api_key(request, state)
    if state.models is not None:
        for kind, value in state.models.get(None).live.engine.gpu_memory().items():  # the process's, on any engine
            state.metrics.gpu_memory.labels(kind).set(value)
        for slot in state.models.slots:
            state.metrics.queue_depth.labels(slot.name).set(slot.depth)
    body, content_type = state.metrics.render(request.headers.get("accept"))
    return Response(body, media_type=content_type)
