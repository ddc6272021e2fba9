"""The Open Inference Protocol over gRPC (service.doors.oip_grpc), called as Triton's users call it: with
``tritonclient.grpc``, and with raw messages where a client would never send what an attacker does. The app runs on
a fake engine in this process, its gRPC server on a loopback port; the blocking client runs in a worker thread."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
from google.protobuf import descriptor_pb2
from opentelemetry import trace
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from bench.processes import free_port
from model.synthetic import SPLITS, render
from service.doors import oip_grpc
from service.doors.oip_grpc import MESSAGES, PROTOCOL
from service.process import tracing
from tests.image_files import encode
from tests.service.doors.test_oip_rest import BUS
from tests.service.fakes import FakeEngine, app_client, fake_settings
from tests.service.server import metric_value, running_server

PNG = encode(np.full((40, 48, 3), 90, dtype=np.uint8))
SAMPLE = Path(oip_grpc.__file__).parents[1] / "static" / "sample.jpg"
INFER = "/inference.GRPCInferenceService/ModelInfer"


@contextlib.asynccontextmanager
async def grpc_app(engine: FakeEngine | None = None, **settings: object) -> AsyncIterator[tuple[object, str]]:
    """The app with its gRPC server on a free loopback port: yields (httpx client, ``host:port``)."""
    port = free_port()
    async with app_client(fake_settings(grpc_port=port, **settings), engine) as (client, _):
        yield client, f"127.0.0.1:{port}"


def run(scenario: Callable[[], object]) -> object:
    return asyncio.run(asyncio.wait_for(scenario(), 60))


def image_input(*files: bytes) -> triton.InferInput:
    tensor = triton.InferInput("IMAGE", [len(files)], "BYTES")
    tensor.set_data_from_numpy(np.array(files, dtype=np.object_))
    return tensor


def status_of(call: Callable[[], object]) -> str:
    """The gRPC status a tritonclient call failed with (``StatusCode.NOT_FOUND``)."""
    with pytest.raises(InferenceServerException) as raised:
        call()
    return raised.value.status()


def raw_infer(address: str, request: service_pb2.ModelInferRequest, timeout: float = 10) -> grpc.RpcError:
    """A ModelInfer call of a request built by hand, through tritonclient's own stub; the error it fails with."""
    with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as raised:
        service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=timeout)
    return raised.value


def request_of(*raw: bytes, shape: list[int] | None = None) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name="fake")
    request.inputs.add(name="IMAGE", datatype="BYTES", shape=shape or [1])
    request.raw_input_contents.extend(raw)
    return request


def prefixed(*files: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(file)) + file for file in files)


def test_every_call_answers_as_triton_does():
    async def scenario():
        async with grpc_app() as (_, address):

            def calls():
                client = triton.InferenceServerClient(address)
                metadata = client.get_model_metadata("fake")
                config = client.get_model_config("fake").config
                index = client.get_model_repository_index().models
                return (
                    client.is_server_live(),
                    client.is_server_ready(),
                    client.get_server_metadata(),
                    client.is_model_ready("fake"),
                    client.is_model_ready("fake", "0"),
                    client.is_model_ready("nope"),
                    metadata,
                    config,
                    [(model.name, model.version, model.state) for model in index],
                )

            return await asyncio.to_thread(calls)

    live, ready, server, model_ready, version_ready, unknown_ready, metadata, config, index = run(scenario)
    assert (live, ready, model_ready, version_ready, unknown_ready) == (True, True, True, True, False)
    assert server.name == "akconv-detector" and "binary_tensor_data" in server.extensions
    assert metadata.name == "fake" and list(metadata.versions) == ["0"] and metadata.platform == "pytorch"
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("IMAGE", "BYTES", [-1])]
    assert [t.name for t in metadata.outputs] == ["num_dets", "det_boxes", "det_scores", "det_classes"]
    assert config.name == "fake" and config.max_batch_size == 16
    (image,) = config.input
    assert (image.name, image.data_type, list(image.dims)) == ("IMAGE", model_config_pb2.TYPE_STRING, [1])
    assert image.HasField("reshape") and list(image.reshape.shape) == []
    assert [(o.name, list(o.dims)) for o in config.output] == [
        ("num_dets", [1]),
        ("det_boxes", [-1, 4]),
        ("det_scores", [-1]),
        ("det_classes", [-1]),
    ]
    assert index == [("fake", "0", "READY")]


def test_infer_answers_what_detect_answers_for_the_same_images():
    other = encode(np.full((64, 96, 3), 30, dtype=np.uint8))

    async def scenario():
        async with grpc_app() as (client, address):
            rest = [(await client.post("/detect", files={"file": ("a.png", f)})).json() for f in (PNG, other)]

            def infer():
                result = triton.InferenceServerClient(address).infer(
                    "fake", [image_input(PNG, other)], parameters={"conf": 0.5, "max_det": 3}, request_id="r1"
                )
                return result, result.get_response()

            return rest, *(await asyncio.to_thread(infer))

    rest, result, response = run(scenario)
    assert (response.model_name, response.model_version, response.id) == ("fake", "0", "r1")
    assert result.as_numpy("num_dets").tolist() == [[len(answer["detections"])] for answer in rest]
    assert result.as_numpy("det_boxes").shape == (2, 3, 4)
    for index, answer in enumerate(rest):
        for slot, detection in enumerate(answer["detections"]):
            box = detection["box"]
            assert result.as_numpy("det_boxes")[index, slot] == pytest.approx(
                [box[k] for k in ("x1", "y1", "x2", "y2")]
            )
            assert result.as_numpy("det_scores")[index, slot] == pytest.approx(detection["confidence"])
            assert result.as_numpy("det_classes")[index, slot] == detection["class_id"]


def test_images_in_bytes_contents_and_requested_outputs():
    request = service_pb2.ModelInferRequest(model_name="fake", id="c")
    request.inputs.add(name="IMAGE", datatype="BYTES", shape=[2]).contents.bytes_contents.extend([PNG, PNG])
    request.outputs.add(name="det_scores")
    request.parameters["classes"].string_param = "star"

    async def scenario():
        async with grpc_app() as (_, address):

            def infer():
                with grpc.insecure_channel(address) as channel:
                    return service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)

            return await asyncio.to_thread(infer)

    response = run(scenario)
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [("det_scores", "FP32", [2, 100])]
    scores = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(2, 100)
    assert scores[:, 0].tolist() == pytest.approx([0.9, 0.9]) and not scores[:, 1:].any()


def test_errors_are_the_status_codes_of_the_rest_statuses():
    async def scenario():
        async with grpc_app(max_upload_bytes=64 * 1024, max_body_bytes=1024 * 1024) as (_, address):

            def calls():
                client = triton.InferenceServerClient(address)
                wrong = triton.InferInput("PIXELS", [1], "BYTES")
                wrong.set_data_from_numpy(np.array([PNG], dtype=np.object_))
                return {
                    "unknown model": status_of(lambda: client.infer("nope", [image_input(PNG)])),
                    "unknown version": status_of(lambda: client.infer("fake", [image_input(PNG)], model_version="7")),
                    "metadata of unknown": status_of(lambda: client.get_model_metadata("nope")),
                    "wrong input": status_of(lambda: client.infer("fake", [wrong])),
                    "not an image": status_of(lambda: client.infer("fake", [image_input(b"plain text")])),
                    "bad conf": status_of(lambda: client.infer("fake", [image_input(PNG)], parameters={"conf": 2.0})),
                    "too many images": status_of(lambda: client.infer("fake", [image_input(*[PNG] * 17)])),
                    "over the message limit": status_of(lambda: client.infer("fake", [image_input(b"x" * 70_000)])),
                    "unimplemented": status_of(lambda: client.get_inference_statistics("fake")),
                }

            return await asyncio.to_thread(calls)

    assert run(scenario) == {
        "unknown model": "StatusCode.NOT_FOUND",
        "unknown version": "StatusCode.NOT_FOUND",
        "metadata of unknown": "StatusCode.NOT_FOUND",
        "wrong input": "StatusCode.INVALID_ARGUMENT",
        "not an image": "StatusCode.INVALID_ARGUMENT",
        "bad conf": "StatusCode.INVALID_ARGUMENT",
        "too many images": "StatusCode.INVALID_ARGUMENT",
        "over the message limit": "StatusCode.RESOURCE_EXHAUSTED",
        "unimplemented": "StatusCode.UNIMPLEMENTED",
    }


@pytest.mark.parametrize(
    "request_",
    [
        request_of(struct.pack("<I", 0xFFFFFFFF) + PNG),  # a length far beyond the bytes sent
        request_of(prefixed(PNG) + b"\x01\x00"),  # bytes left after the last element
        request_of(prefixed(PNG, PNG), shape=[1]),  # more elements than the shape says
        request_of(prefixed(PNG), shape=[3]),  # fewer
        request_of(prefixed(PNG), prefixed(PNG)),  # two raw tensors for one input
        request_of(prefixed(PNG), shape=[2**40]),  # a count sized from nothing
        request_of(prefixed(PNG), shape=[-1]),
        request_of(prefixed(PNG), shape=[1, 1]),
        request_of(),  # no data at all
    ],
)
def test_hostile_bytes_lengths_and_shapes_are_invalid_argument(request_):
    async def scenario():
        async with grpc_app() as (client, address):
            error = await asyncio.to_thread(raw_infer, address, request_)
            return error, (await client.get("/healthz")).status_code

    error, health = run(scenario)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(error.trailing_metadata())["error-code"] == "bad_request"
    assert health == 200


def test_the_api_key_is_required_but_for_health_and_server_metadata():
    async def scenario():
        async with grpc_app(api_key="secret") as (_, address):

            def calls():
                client = triton.InferenceServerClient(address)
                keyed = {"x-api-key": "secret"}
                bearer = {"authorization": "Bearer secret"}
                return (
                    client.is_server_live() and client.is_server_ready() and bool(client.get_server_metadata().name),
                    status_of(lambda: client.infer("fake", [image_input(PNG)])),
                    status_of(lambda: client.get_model_metadata("fake", headers={"x-api-key": "wrong"})),
                    client.infer("fake", [image_input(PNG)], headers=keyed).as_numpy("num_dets").tolist(),
                    client.get_model_config("fake", headers=bearer).config.name,
                )

            return await asyncio.to_thread(calls)

    assert run(scenario) == (True, "StatusCode.UNAUTHENTICATED", "StatusCode.UNAUTHENTICATED", [[1]], "fake")


def test_a_full_queue_is_unavailable_with_retry_after_and_counted_as_a_503():
    engine = FakeEngine()
    engine.gate.clear()

    async def scenario():
        async with grpc_app(engine, max_batch_size=1, max_queue=1) as (client, address):
            channel = grpc.aio.insecure_channel(address)
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            running = asyncio.ensure_future(stub.ModelInfer(request_of(prefixed(PNG)), timeout=30))
            await engine.batch_started()
            queued = asyncio.ensure_future(stub.ModelInfer(request_of(prefixed(PNG)), timeout=30))
            while metric_value((await client.get("/metrics")).text, 'detector_queue_depth{model="fake"}') < 1:
                await asyncio.sleep(0.01)
            try:
                await stub.ModelInfer(request_of(prefixed(PNG)), timeout=30)
            except grpc.aio.AioRpcError as error:
                refused = error
            engine.gate.set()
            answered = [await running, await queued]
            await channel.close()
            return refused, answered, (await client.get("/metrics")).text

    refused, answered, metrics = run(scenario)
    assert refused.code() == grpc.StatusCode.UNAVAILABLE
    assert dict(refused.trailing_metadata()) == {"error-code": "queue_full", "retry-after": "1"}
    assert [list(response.outputs)[0].name for response in answered] == ["num_dets", "num_dets"]
    assert metric_value(metrics, f'detector_requests_total{{endpoint="{INFER}",status="503"}}') == 1
    assert metric_value(metrics, f'detector_requests_total{{endpoint="{INFER}",status="200"}}') == 2


def test_the_clients_deadline_is_honoured_and_its_queued_image_dropped():
    engine = FakeEngine()
    engine.gate.clear()

    async def scenario():
        async with grpc_app(engine, max_batch_size=1) as (client, address):
            channel = grpc.aio.insecure_channel(address)
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            holding = asyncio.ensure_future(stub.ModelInfer(request_of(prefixed(PNG)), timeout=30))
            await engine.batch_started()
            started = time.monotonic()
            try:
                await stub.ModelInfer(request_of(prefixed(PNG)), timeout=0.5)
            except grpc.aio.AioRpcError as error:
                late = error
            waited = time.monotonic() - started
            engine.gate.set()
            await holding
            await channel.close()
            await asyncio.sleep(0.2)  # the dropped image's batch would have run by now
            return late, waited, (await client.get("/metrics")).text

    late, waited, metrics = run(scenario)
    assert late.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert waited < 5
    assert engine.batches == [1]  # only the request that held the engine ran: the late one's image was dropped
    assert metric_value(metrics, f'detector_requests_total{{endpoint="{INFER}",status="200"}}') == 1


def test_calls_beyond_the_in_flight_bound_are_refused_at_once():
    engine = FakeEngine()
    engine.gate.clear()

    async def scenario():
        async with grpc_app(engine, max_inflight_requests=2, max_batch_size=1) as (client, address):
            channel = grpc.aio.insecure_channel(address)
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            held = [asyncio.ensure_future(stub.ModelInfer(request_of(prefixed(PNG)), timeout=30)) for _ in range(2)]
            await engine.batch_started()
            started = time.monotonic()
            extra = await asyncio.gather(
                *(stub.ModelInfer(request_of(prefixed(PNG)), timeout=10) for _ in range(20)), return_exceptions=True
            )
            refused_in = time.monotonic() - started
            health = (await client.get("/healthz")).status_code
            engine.gate.set()
            answered = await asyncio.gather(*held)
            await channel.close()
            return extra, refused_in, health, answered

    extra, refused_in, health, answered = run(scenario)
    # gRPC's own bound (RESOURCE_EXHAUSTED) or the admission budget's (UNAVAILABLE, as a 503): never a wait
    assert {error.code() for error in extra} <= {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE}
    assert len(extra) == 20 and refused_in < 5
    assert health == 200 and len(answered) == 2


def test_a_load_swaps_in_the_configured_version_and_refuses_parameters():
    engine, new = FakeEngine(), FakeEngine(version="1")

    async def scenario():
        port = free_port()
        settings = fake_settings(grpc_port=port)
        async with app_client(settings, engine, lambda source: new):
            address = f"127.0.0.1:{port}"

            def calls():
                client = triton.InferenceServerClient(address)
                refused = status_of(lambda: client.load_model("fake", config='{"backend": "python"}'))
                client.load_model("fake")
                return refused, client.get_model_metadata("fake").versions

            return await asyncio.to_thread(calls)

    refused, versions = run(scenario)
    assert refused == "StatusCode.INVALID_ARGUMENT" and list(versions) == ["1"]


def test_the_messages_are_tritons_on_the_wire():
    """Every field this server declares has the number, type and label of Triton's own definition, so each side
    reads what the other writes."""
    theirs = {**service_pb2.DESCRIPTOR.message_types_by_name, **model_config_pb2.DESCRIPTOR.message_types_by_name}

    def fields(descriptor) -> dict[str, tuple]:
        found = {}
        for field in descriptor.fields:
            kind = field.message_type.name if field.message_type else field.enum_type.name if field.enum_type else ""
            found[field.name] = (field.number, field.type, field.is_repeated, kind)
        for nested in descriptor.nested_types:
            found.update({f"{nested.name}.{name}": value for name, value in fields(nested).items()})
        return found

    for full_name, cls in MESSAGES.items():
        name = full_name.removeprefix("inference.")
        if "." in name:
            continue  # nested: compared with its parent
        ours = fields(cls.DESCRIPTOR)
        assert ours.items() <= fields(theirs[name]).items(), name
    service = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    ours = descriptor_pb2.FileDescriptorSet.FromString(PROTOCOL.read_bytes()).file[0].service[0]
    for method in ours.method:
        assert service.methods_by_name[method.name].input_type.name == method.input_type.removeprefix(".inference.")


def test_the_compiled_descriptor_is_the_proto(tmp_path: Path):
    """``make protos`` was run after the last change of oip_grpc.proto."""
    proto = Path(oip_grpc.__file__).with_name("oip_grpc.proto")
    compiled = tmp_path / "compiled.binpb"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{proto.parent}",
            f"--descriptor_set_out={compiled}",
            proto.name,
        ],
        check=True,
    )
    assert compiled.read_bytes() == PROTOCOL.read_bytes()


def test_connections_beyond_max_connections_are_closed():
    async def scenario():
        async with grpc_app(max_connections=1) as (_, address):

            def calls():
                own = [("grpc.use_local_subchannel_pool", 1)]  # two connections: channels otherwise share one
                with grpc.insecure_channel(address, own) as first, grpc.insecure_channel(address, own) as second:
                    ready = service_pb2.ServerReadyRequest()
                    answered = service_pb2_grpc.GRPCInferenceServiceStub(first).ServerReady(ready, timeout=10).ready
                    with pytest.raises(grpc.RpcError) as refused:
                        service_pb2_grpc.GRPCInferenceServiceStub(second).ServerReady(ready, timeout=5)
                    again = service_pb2_grpc.GRPCInferenceServiceStub(first).ServerReady(ready, timeout=10).ready
                    return answered, refused.value.code(), again

            return await asyncio.to_thread(calls)

    answered, refused, again = run(scenario)
    assert answered and again
    assert refused == grpc.StatusCode.UNAVAILABLE


@pytest.mark.e2e
@pytest.mark.slow
def test_a_real_server_answers_grpc_with_the_detections_of_detect(tmp_path):
    """The bundled model in a real process with ``--grpc-port``: tritonclient.grpc's detections for the sample photo,
    a held-out synthetic image and a real photo are /detect's, box for box."""
    files = [SAMPLE.read_bytes(), encode(render(SPLITS["test"], 320)[0], "JPEG"), BUS.read_bytes()]
    grpc_port = free_port()
    with running_server(tmp_path, "--grpc-port", str(grpc_port)) as server:
        rest = [httpx.post(f"{server.url}/detect?conf=0.05", files={"file": file}, timeout=60).json() for file in files]
        client = triton.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        name = client.get_model_repository_index().models[0].name
        result = client.infer(name, [image_input(*files)], parameters={"conf": 0.05}, client_timeout=60)
    assert "grpc listening" in server.log()
    counts = result.as_numpy("num_dets")[:, 0].tolist()
    assert counts == [len(answer["detections"]) for answer in rest] and all(counts[:2])
    for index, answer in enumerate(rest):
        boxes = [[d["box"][k] for k in ("x1", "y1", "x2", "y2")] for d in answer["detections"]]
        assert result.as_numpy("det_boxes")[index, : counts[index]] == pytest.approx(np.array(boxes), abs=1e-3)
        assert result.as_numpy("det_classes")[index, : counts[index]].tolist() == [
            d["class_id"] for d in answer["detections"]
        ]


def test_a_call_is_a_server_span_in_the_callers_trace_with_the_pipelines_stages():
    caller_trace, caller_span = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    exporter = InMemorySpanExporter()
    tracing.install(SimpleSpanProcessor(exporter))
    try:

        async def scenario():
            async with grpc_app() as (_, address):
                client = triton.InferenceServerClient(address)
                traceparent = {"traceparent": f"00-{caller_trace}-{caller_span}-01", "x-request-id": "grpc-1"}
                infer = functools.partial(client.infer, "fake", [image_input(PNG)], headers=traceparent)
                await asyncio.to_thread(infer)
                refused = functools.partial(client.infer, "nope", [image_input(PNG)], headers=traceparent)
                await asyncio.to_thread(status_of, refused)

        run(scenario)
    finally:
        tracing.uninstall()
    finished = exporter.get_finished_spans()
    served, refused = [span for span in finished if span.name == INFER]
    assert served.kind == trace.SpanKind.SERVER and format(served.parent.span_id, "016x") == caller_span
    assert served.attributes["rpc.system"] == "grpc" and served.attributes["detector.request_id"] == "grpc-1"
    assert served.attributes["detector.status_code"] == 200
    assert refused.attributes["detector.outcome"] == "model_not_found"
    stages = [span for span in finished if span.parent is not None and span.parent.span_id == served.context.span_id]
    assert {"admission", "parse", "decode", "queue_wait", "postprocess"} <= {span.name for span in stages}
    assert {format(span.context.trace_id, "032x") for span in finished} == {caller_trace}
