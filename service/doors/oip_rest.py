"""The Open Inference Protocol (KServe v2, Triton's HTTP API) over REST, beside the service's own API: health,
metadata, inference (:mod:`service.doors.oip` is the wire format) and the model repository's load (a swap,
:mod:`service.core.models`).

Inference runs the way ``/detect/batch`` does (the same admission, decode, batcher, metrics), each image of the
request batched with all other traffic; one image that cannot be used fails the whole request, as a tensor has no
slot for an error. Errors are the protocol's ``{"error": message}`` (``service.app`` answers every ``/v2`` path
that way). Inference, metadata and the repository need the API key when one is set; health does not.
"""

from __future__ import annotations

import functools
import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from service.core.errors import BadRequest, ModelNotServed, NotReady, shown
from service.core.models import ServedVersion
from service.core.pipeline import DetectQuery
from service.doors.dependencies import ModelsDep, PipelineDep, StateDep, class_id, require_api_key
from service.doors.oip import (
    HEADER_LENGTH,
    InferRequest,
    check_content_encoding,
    infer_response,
    model_metadata,
    model_ready,
    parse_header_length,
    parse_infer_request,
    server_live,
    server_metadata,
    server_ready,
)
from service.doors.rest import admitted, body_chunks, cancel_on_disconnect, declared_length, each_image
from service.schemas import ProtocolError

PROTOCOL_ERRORS = {
    status: {"model": ProtocolError} for status in (400, 401, 404, 408, 413, 415, 422, 431, 500, 503, 504)
}
oip_router = APIRouter(prefix="/v2", tags=["open inference protocol"], responses=PROTOCOL_ERRORS)
keyed = [Depends(require_api_key)]

SERVER_VERSION = "0.1.0"  # the service's, as FastAPI's app reports it
PLATFORM = "pytorch"  # the framework that runs the models (eager PyTorch, not TorchScript)
MAX_LOAD_BODY = 64 * 1024  # a load request's body: its parameters, which this server refuses anyway
INFER_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"type": "object"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


@oip_router.get("", summary="Server metadata")
async def metadata() -> dict[str, Any]:
    return server_metadata(SERVER_VERSION)


@oip_router.get("/health/live", summary="Server live")
async def live() -> dict[str, bool]:
    return server_live(True)


@oip_router.get("/health/ready", summary="Server ready")
async def ready(state: StateDep) -> dict[str, bool]:
    if not state.ready or state.draining:
        raise NotReady("the models are not ready (warming up or draining)", {"Retry-After": "1"})
    return server_ready(True)


def check_version(served: ServedVersion, version: str | None) -> None:
    """A request that names a version (``/versions/{version}``) must name the live one."""
    if version is not None and version != served.version:
        raise ModelNotServed(
            f"model {served.name!r} has no version {shown(version)}; the live version is {served.version!r}"
        )


def live_version(request: Request, models: ModelsDep, name: str) -> ServedVersion:
    """The live version of model ``name`` (and the version the path names, if it names one)."""
    served = models.get(name).live
    check_version(served, request.path_params.get("version"))
    return served


LiveVersionDep = Annotated[ServedVersion, Depends(live_version)]


@oip_router.get("/models/{name}", dependencies=keyed, summary="Model metadata")
@oip_router.get("/models/{name}/versions/{version}", dependencies=keyed, summary="Model version metadata")
async def model(served: LiveVersionDep) -> dict[str, Any]:
    return model_metadata(served.name, [served.version], PLATFORM)


@oip_router.get("/models/{name}/ready", dependencies=keyed, summary="Model ready")
@oip_router.get("/models/{name}/versions/{version}/ready", dependencies=keyed, summary="Model version ready")
async def model_is_ready(served: LiveVersionDep) -> dict[str, Any]:
    return model_ready(served.name, True)


@oip_router.post("/models/{name}/infer", dependencies=keyed, openapi_extra=INFER_BODY, summary="Infer")
@oip_router.post(
    "/models/{name}/versions/{version}/infer",
    dependencies=keyed,
    openapi_extra=INFER_BODY,
    summary="Infer on a version",
)
async def infer(request: Request, name: str, pipeline: PipelineDep, models: ModelsDep) -> Response:
    """Detect objects in the images of input ``IMAGE`` (BYTES [B], encoded files): outputs ``num_dets``,
    ``det_boxes``, ``det_scores``, ``det_classes`` (:mod:`service.doors.oip`). Parameters ``conf``, ``max_det``,
    ``classes`` as ``/detect``'s query."""
    slot = models.get(name)
    header_length = parse_header_length(request.headers.get(HEADER_LENGTH))
    check_content_encoding(request.headers.get("content-encoding"))
    request_id, arrived = request.state.request_id, request.state.arrived
    with admitted(pipeline, slot) as (ticket, served):
        check_version(served, request.path_params.get("version"))
        # The images are copied out of the body: it is held twice.
        body = await pipeline.read_body(ticket, body_chunks(request), declared_length(request), arrived, copies=2)
        max_images = pipeline.settings.max_batch_files
        parsed = await pipeline.parse(
            functools.partial(parse_infer_request, body, header_length, max_images=max_images), arrived
        )
        query = detect_query(parsed, served, pipeline.settings.default_conf, pipeline.settings.max_detections)

        async def detect_one(image: bytes) -> list:
            return (await pipeline.detect(ticket, served, image, query, request_id, arrived)).detections

        detections = await cancel_on_disconnect(request, each_image(parsed.images, detect_one))
    content, headers = infer_response(served.name, served.version, parsed.id, detections, query.max_det, parsed.outputs)
    return Response(content, headers=headers)


def detect_query(parsed: InferRequest, served: ServedVersion, default_conf: float, max_detections: int) -> DetectQuery:
    """The request's parameters as ``/detect``'s query; class names resolve against the model that will run."""
    classes = None
    if parsed.classes is not None:
        classes = {class_id(token, served.engine.names) for token in parsed.classes}
    return DetectQuery(
        conf=default_conf if parsed.conf is None else parsed.conf,
        max_det=max_detections if parsed.max_det is None else parsed.max_det,
        classes=classes,
    )


@oip_router.post("/repository/models/{name}/load", dependencies=keyed, summary="Swap in a new version")
async def load_model(name: str, request: Request, models: ModelsDep) -> dict[str, str]:
    """Read the model's configured file again and make it live without downtime: verified and warmed up while the
    live version serves, then switched; requests in flight finish on the version they started on. A version that
    fails to load or verify is refused with 400 and the live version keeps serving. Only the configured path is
    read: a body's ``config`` or ``files`` parameters are refused."""
    slot = models.get(name)
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_LOAD_BODY:
            raise BadRequest(f"a load request's body is at most {MAX_LOAD_BODY} bytes")
    if body.strip():
        try:
            parameters = json.loads(body).get("parameters")
        except (ValueError, RecursionError, AttributeError):
            raise BadRequest("a load request's body must be a JSON object") from None
        if parameters:
            raise BadRequest(
                "this server loads a model only from its configured path; config and files parameters are refused"
            )
    live = await slot.reload()
    return {"model_name": slot.name, "model_version": live.version}


@oip_router.post("/repository/index", dependencies=keyed, summary="The served models")
async def repository_index(models: ModelsDep) -> list[dict[str, str]]:
    return [{"name": slot.name, "version": slot.live.version, "state": "READY"} for slot in models.slots]
