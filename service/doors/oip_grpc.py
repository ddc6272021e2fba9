"""The Open Inference Protocol (KServe v2) over gRPC, beside REST in the same process and over the same pipeline:
``inference.GRPCInferenceService`` as Triton and KServe serve it, for ``tritonclient.grpc`` and the tools built on
it. On when ``grpc_port`` is set (:func:`start_grpc_server`, from the app's lifespan).

The calls: ServerLive, ServerReady, ServerMetadata, ModelReady, ModelMetadata, ModelConfig (Triton's), ModelInfer,
RepositoryIndex and RepositoryModelLoad (a swap, as ``POST /v2/repository/models/NAME/load``). Any other call of
the service (streaming, statistics, shared memory) is answered ``UNIMPLEMENTED``.

ModelInfer takes what the REST route takes (:mod:`service.doors.oip`): input ``IMAGE``, ``BYTES`` ``[B]``, the
encoded files in ``raw_input_contents`` (each a 4-byte little-endian length and the file, as tritonclient sends
them) or in ``contents.bytes_contents``; parameters ``conf``, ``max_det``, ``classes``. It answers the four outputs
in ``raw_output_contents``. Its images go through the same admission budgets (a message's bytes are held twice:
the message and the files copied out of it), decode pool, batcher and metrics as ``/detect``'s, on a leased model
version. The client's gRPC deadline is honoured: a request's deadline is the earlier of it and
``request_timeout_s``; a client that cancels or whose deadline passes has its queued images dropped.

Limits: a message is at most ``max_upload_bytes`` (``RESOURCE_EXHAUSTED`` beyond, before it reaches the service),
metadata at most ``max_header_bytes``, at most ``max_connections`` connections (the one beyond is closed), and at
most ``max_inflight_requests`` calls run at once; the call beyond is answered ``RESOURCE_EXHAUSTED`` at once.

Errors: each :class:`~service.core.errors.ServiceError` becomes the status code of :data:`STATUS_CODES` (the REST
status's meaning) with its message as details, and trailing metadata ``error-code`` (the REST error code) and, for
a refusal to retry, ``retry-after``. Requests count in the service's metrics and access log under the endpoint
``/inference.GRPCInferenceService/CALL`` with the REST status of the same outcome, so alerts and dashboards read
both doors alike. With tracing on, each call is a server span continuing the caller's ``traceparent`` metadata, with
the pipeline's stage spans below it (:mod:`service.process.tracing`).

The messages are built from ``oip_grpc.proto`` (compiled to ``oip_grpc.binpb`` by ``make protos``) in a descriptor
pool of this module's own: a client's copy of package ``inference`` (tritonclient's) can be imported in the same
process.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message

from service.core.errors import BadRequest, ModelNotServed, NotReady, ServiceError
from service.core.models import ModelSlot, ServedVersion
from service.doors.dependencies import REQUEST_ID, ServiceState, check_api_key, ready_models, ready_pipeline
from service.doors.oip import (
    EXTENSIONS,
    INPUT,
    OUTPUTS,
    SERVER_NAME,
    InferRequest,
    bytes_elements,
    check_image_input,
    infer_request,
    output_tensors,
)
from service.doors.oip_rest import PLATFORM, SERVER_VERSION, check_version, detect_query
from service.doors.rest import admitted, each_image
from service.process import tracing
from service.process.logs import bind_request_id, log_access, unbind_request_id
from service.process.settings import Settings

log = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"
PROTOCOL = Path(__file__).with_name("oip_grpc.binpb")


def _message_classes() -> dict[str, type[Message]]:
    """The protocol's message classes by full name (``inference.ModelInferRequest``), from a pool of their own."""
    files = descriptor_pb2.FileDescriptorSet.FromString(PROTOCOL.read_bytes())
    pool = descriptor_pool.DescriptorPool()
    for file in files.file:
        pool.Add(file)
    return message_factory.GetMessageClassesForFiles([file.name for file in files.file], pool)


MESSAGES = _message_classes()


def message(name: str) -> type[Message]:
    """The class of message ``name`` of package ``inference`` (``ModelInferRequest``)."""
    return MESSAGES[f"inference.{name}"]


# The gRPC status of each REST status: the same meaning, as Triton and KServe map them. 503 (overloaded, queue
# full, not ready, shutting down) is UNAVAILABLE, the code gRPC clients' retry policies retry; a message over the
# size limit is RESOURCE_EXHAUSTED, as gRPC itself answers it.
STATUS_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    431: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    501: grpc.StatusCode.UNIMPLEMENTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
# Triton's model configuration datatypes of the protocol's datatypes.
CONFIG_TYPES = {"BYTES": "TYPE_STRING", "INT32": "TYPE_INT32", "FP32": "TYPE_FP32"}
# Calls anyone may make; the others need the API key when one is set (as over REST: health and server metadata).
OPEN_CALLS = frozenset({"ServerLive", "ServerReady", "ServerMetadata"})

Handler = Callable[[Message, "Call"], Awaitable[Message]]


class Call:
    """What a handler knows of its call: its request id, its metadata (lower-case keys, binary ``-bin`` entries
    left out), its arrival (``time.monotonic()``, moved earlier when the client's deadline is nearer than
    ``request_timeout_s``: the pipeline counts a request's deadline from its arrival)."""

    def __init__(self, context: grpc.aio.ServicerContext, settings: Settings) -> None:
        now = time.monotonic()
        self.metadata = {
            key.lower(): value for key, value in context.invocation_metadata() or () if not key.endswith("-bin")
        }
        given = self.metadata.get("x-request-id", "")
        self.request_id = given if REQUEST_ID.match(given) else uuid.uuid4().hex[:16]
        remaining = context.time_remaining()
        self.arrived = now if remaining is None else min(now, now + remaining - settings.request_timeout_s)


class InferenceService:
    """The calls of ``inference.GRPCInferenceService`` over the app's state (its pipeline and models, once ready)."""

    def __init__(self, state: ServiceState) -> None:
        self.state = state
        self.settings = state.settings

    def handler(self) -> grpc.GenericRpcHandler:
        """The service's calls as gRPC's generic handler: each one observed, keyed and mapped (:meth:`_observed`)."""
        calls = {
            "ServerLive": self.server_live,
            "ServerReady": self.server_ready,
            "ServerMetadata": self.server_metadata,
            "ModelReady": self.model_ready,
            "ModelMetadata": self.model_metadata,
            "ModelConfig": self.model_config,
            "ModelInfer": self.model_infer,
            "RepositoryIndex": self.repository_index,
            "RepositoryModelLoad": self.repository_model_load,
        }
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                name: grpc.unary_unary_rpc_method_handler(
                    self._observed(name, call),
                    request_deserializer=message(f"{name}Request").FromString,
                    response_serializer=message(f"{name}Response").SerializeToString,
                )
                for name, call in calls.items()
            },
        )

    def _observed(self, name: str, call: Handler) -> Callable[[Message, grpc.aio.ServicerContext], Awaitable[Message]]:
        """``call`` with the API key checked (but for :data:`OPEN_CALLS`), its errors answered as gRPC statuses, and
        one count, duration and access-log line, as every REST request has."""
        endpoint = f"/{SERVICE}/{name}"
        metrics = self.state.metrics

        async def observed(request: Message, context: grpc.aio.ServicerContext) -> Message:
            details = Call(context, self.settings)
            failure: ServiceError | None = None
            status = 500
            logged = bind_request_id(details.request_id)
            attributes = {"rpc.system": "grpc", "rpc.method": name, "detector.request_id": details.request_id}
            with tracing.request_span(endpoint, details.metadata, attributes) as span:
                try:
                    if name not in OPEN_CALLS:
                        check_api_key(self.settings.api_key, details.metadata)
                    response = await call(request, details)
                    status = 200
                    return response
                except ServiceError as error:
                    failure, status = error, error.status
                    if error.rejection:
                        metrics.rejected.labels(error.rejection).inc()
                except asyncio.CancelledError:  # the client cancelled, or its deadline passed: gRPC cancels the call
                    status = 499
                    metrics.rejected.labels("client_gone").inc()
                    raise
                except Exception:
                    log.exception("unhandled error", extra={"endpoint": endpoint})
                finally:
                    tracing.set_outcome(span, status, failure.code if failure else None)
                    seconds = time.monotonic() - details.arrived
                    metrics.observe_request(endpoint, status, seconds)
                    log_access(details.request_id, "GRPC", endpoint, endpoint, status, seconds, context.peer())
                    unbind_request_id(logged)
            context.set_trailing_metadata(_error_metadata(failure))
            if failure is None:
                await context.abort(grpc.StatusCode.INTERNAL, "internal server error")
            await context.abort(STATUS_CODES.get(failure.status, grpc.StatusCode.INTERNAL), failure.message)

        return observed

    def _ready(self) -> tuple[Any, Any]:
        pipeline = ready_pipeline(self.state)
        return pipeline, ready_models(self.state, pipeline)

    def _served(self, name: str, version: str) -> tuple[ModelSlot, ServedVersion]:
        """The model ``name``'s slot and live version; a request that names a version must name the live one."""
        _, models = self._ready()
        slot = models.get(name)
        served = slot.live
        check_version(served, version or None)
        return slot, served

    async def server_live(self, request: Message, call: Call) -> Message:
        return message("ServerLiveResponse")(live=True)

    async def server_ready(self, request: Message, call: Call) -> Message:
        return message("ServerReadyResponse")(ready=self.state.ready and not self.state.draining)

    async def server_metadata(self, request: Message, call: Call) -> Message:
        return message("ServerMetadataResponse")(name=SERVER_NAME, version=SERVER_VERSION, extensions=EXTENSIONS)

    async def model_ready(self, request: Message, call: Call) -> Message:
        try:
            self._served(request.name, request.version)
        except (ModelNotServed, NotReady):
            return message("ModelReadyResponse")(ready=False)
        return message("ModelReadyResponse")(ready=True)

    async def model_metadata(self, request: Message, call: Call) -> Message:
        _, served = self._served(request.name, request.version)
        tensor = message("ModelMetadataResponse").TensorMetadata
        return message("ModelMetadataResponse")(
            name=served.name,
            versions=[served.version],
            platform=PLATFORM,
            inputs=[tensor(name=INPUT.name, datatype=INPUT.datatype, shape=INPUT.shape)],
            outputs=[tensor(name=spec.name, datatype=spec.datatype, shape=spec.shape) for spec in OUTPUTS],
        )

    async def model_config(self, request: Message, call: Call) -> Message:
        """Triton's configuration of the model, as tools that read one before calling expect: a model batching up
        to ``max_batch_files`` images a request, each image one ``BYTES`` element (dims ``[1]`` reshaped to
        ``[]``: a request sends shape ``[B]``), the outputs without their batch dimension, and the batcher's wait."""
        _, served = self._served(request.name, request.version)
        return message("ModelConfigResponse")(
            config=message("ModelConfig")(
                name=served.name,
                platform=PLATFORM,
                backend=PLATFORM,
                max_batch_size=self.settings.max_batch_files,
                input=[
                    message("ModelInput")(
                        name=INPUT.name,
                        data_type=CONFIG_TYPES[INPUT.datatype],
                        dims=[1],
                        reshape=message("ModelTensorReshape")(shape=[]),
                    )
                ],
                output=[
                    message("ModelOutput")(name=spec.name, data_type=CONFIG_TYPES[spec.datatype], dims=spec.shape[1:])
                    for spec in OUTPUTS
                ],
                dynamic_batching=message("ModelDynamicBatching")(
                    max_queue_delay_microseconds=round(self.settings.max_batch_wait_ms * 1000)
                ),
            )
        )

    async def model_infer(self, request: Message, call: Call) -> Message:
        pipeline, models = self._ready()
        slot = models.get(request.model_name)
        with admitted(pipeline, slot) as (ticket, served):
            check_version(served, request.model_version or None)
            ticket.hold_body(2 * request.ByteSize())  # the message, and the files copied out of it
            parse = functools.partial(infer_request_of, request, max_images=self.settings.max_batch_files)
            parsed = await pipeline.parse(parse, call.arrived)
            query = detect_query(parsed, served, self.settings.default_conf, self.settings.max_detections)

            async def detect_one(image: bytes) -> list:
                return (await pipeline.detect(ticket, served, image, query, call.request_id, call.arrived)).detections

            detections = await each_image(parsed.images, detect_one)
        return infer_response(served, parsed, detections, query.max_det)

    async def repository_index(self, request: Message, call: Call) -> Message:
        _, models = self._ready()
        index = message("RepositoryIndexResponse")
        return index(
            models=[index.ModelIndex(name=slot.name, version=slot.live.version, state="READY") for slot in models.slots]
        )

    async def repository_model_load(self, request: Message, call: Call) -> Message:
        """A swap, as over REST: only the model's configured path is read; ``config`` or ``file:`` parameters are
        refused."""
        _, models = self._ready()
        slot = models.get(request.model_name)
        if request.parameters:
            raise BadRequest(
                "this server loads a model only from its configured path; config and files parameters are refused"
            )
        await slot.reload()
        return message("RepositoryModelLoadResponse")()


def infer_request_of(request: Message, *, max_images: int) -> InferRequest:
    """The checked request in a ``ModelInferRequest``; run on the parse thread (it copies the files out).

    Raises:
        BadRequest: what the request gets wrong (as over REST).
    """
    if len(request.inputs) != 1:
        raise BadRequest(f"the request must have one input, {INPUT.name}, not {len(request.inputs)}")
    tensor = request.inputs[0]
    count = check_image_input(tensor.name, tensor.datatype, list(tensor.shape), max_images)
    contents = tensor.contents.bytes_contents
    if request.raw_input_contents:
        if contents:
            raise BadRequest(f"input {INPUT.name} has both contents and raw_input_contents: send one")
        if len(request.raw_input_contents) != 1:
            raise BadRequest(f"raw_input_contents holds {len(request.raw_input_contents)} tensors; the model has one")
        images = bytes_elements(memoryview(request.raw_input_contents[0]), count)
    else:
        if len(contents) != count:
            raise BadRequest(f"input {INPUT.name} has shape [{count}], but its contents hold {len(contents)} elements")
        images = list(contents)
    outputs = [{"name": output.name} for output in request.outputs] or None
    parameters = {name: _parameter(value) for name, value in request.parameters.items()}
    return infer_request(request.id or None, images, parameters, outputs, binary_default=True)


def infer_response(served: ServedVersion, parsed: InferRequest, detections: list, max_det: int) -> Message:
    """The ``ModelInferResponse``: the requested outputs' little-endian data in ``raw_output_contents``."""
    response = message("ModelInferResponse")
    tensors = output_tensors(detections, max_det, parsed.outputs)
    return response(
        model_name=served.name,
        model_version=served.version,
        id=parsed.id or "",
        outputs=[
            response.InferOutputTensor(name=output.name, datatype=datatype, shape=array.shape)
            for output, datatype, array in tensors
        ],
        raw_output_contents=[array.tobytes() for _, _, array in tensors],
    )


def _parameter(value: Message) -> Any:
    """An ``InferParameter``'s value as JSON would carry it (a bool, an integer, a string or a number)."""
    choice = value.WhichOneof("parameter_choice")
    if choice is None:
        raise BadRequest("a parameter has no value")
    return getattr(value, choice)


def _error_metadata(failure: ServiceError | None) -> tuple[tuple[str, str], ...]:
    if failure is None:
        return (("error-code", "internal_error"),)
    retry = failure.headers.get("Retry-After")
    return (("error-code", failure.code),) + ((("retry-after", retry),) if retry else ())


def server_options(settings: Settings) -> list[tuple[str, Any]]:
    """The gRPC server's limits (module docstring). ``so_reuseport`` is off so that a taken port fails start-up
    rather than sharing it with another process."""
    return [
        ("grpc.max_receive_message_length", settings.max_upload_bytes),
        ("grpc.max_metadata_size", settings.max_header_bytes),
        ("grpc.absolute_max_metadata_size", settings.max_header_bytes),
        ("grpc.max_allowed_incoming_connections", settings.max_connections),
        # Above the calls that may run, so that the call beyond them reaches the server and is refused at once
        # (RESOURCE_EXHAUSTED) rather than waiting in the client for a stream; still bounded per connection.
        ("grpc.max_concurrent_streams", 2 * settings.max_inflight_requests),
        ("grpc.so_reuseport", 0),
    ]


async def start_grpc_server(state: ServiceState) -> grpc.aio.Server:
    """The gRPC server of ``state``'s service, listening on ``grpc_port`` of ``host`` on the running event loop.
    Stop it with ``await server.stop(grace)`` before the models stop."""
    settings = state.settings
    server = grpc.aio.server(options=server_options(settings), maximum_concurrent_rpcs=settings.max_inflight_requests)
    server.add_generic_rpc_handlers((InferenceService(state).handler(),))
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    server.add_insecure_port(f"{host}:{settings.grpc_port}")
    await server.start()
    log.info("grpc listening", extra={"port": settings.grpc_port, "service": SERVICE})
    return server
