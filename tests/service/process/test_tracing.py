"""Tracing (service/process/tracing.py): set-up from the OTEL_* environment, the request span continuing the caller's
trace, the stage and batch spans of the pipeline (in-process, on the fake engine), log fields, exemplars, and that
off (the default) it creates nothing and changes no answer."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from bench.processes import free_port
from service.process import tracing
from service.process.logs import JsonFormatter, bind_request_id, unbind_request_id
from tests.image_files import encode
from tests.service.fakes import FakeEngine, app_client, fake_settings
from tests.service.otlp_receiver import otlp_receiver
from tests.service.server import REPO

PNG = encode(np.full((48, 64, 3), 90, dtype=np.uint8))
CALLER_TRACE = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN = "b7ad6b7169203331"
TRACEPARENT = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
OTLP = {"OTEL_TRACES_EXPORTER": "otlp"}
STAGES = {"admission", "read_body", "decode", "queue_wait", "forward", "postprocess"}


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 60))


def hex_id(number: int, digits: int) -> str:
    return format(number, f"0{digits}x")


@pytest.fixture(autouse=True)
def tracing_off_after():
    yield
    tracing.uninstall()


@pytest.fixture
def spans() -> InMemorySpanExporter:
    """Tracing on, every span kept in memory as it ends."""
    exporter = InMemorySpanExporter()
    tracing.install(SimpleSpanProcessor(exporter))
    return exporter


def format_record(message: str, **extra: object) -> dict:
    record = logging.LogRecord("service.test", logging.INFO, __file__, 1, message, None, None)
    record.__dict__.update(extra)
    return json.loads(JsonFormatter().format(record))


# --- set-up from the environment ----------------------------------------------------------------------------------


def test_off_by_default_no_provider_and_nothing_global():
    assert tracing.setup({}) is False
    assert not tracing.enabled() and tracing.provider() is None
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)  # the API's no-op: never set
    with tracing.span("decode") as span:
        assert span is trace.INVALID_SPAN and not span.is_recording()
    assert tracing.start_span("queue_wait") is None and tracing.start_batch("forward", [None]) is None
    assert tracing.log_fields() == {} and tracing.exemplar() is None
    assert tracing.http_carrier([(b"traceparent", TRACEPARENT.encode())]) == {}


@pytest.mark.parametrize(
    "environ",
    [
        {"OTEL_TRACES_EXPORTER": "none"},
        {**OTLP, "OTEL_SDK_DISABLED": "true"},
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"},  # an endpoint alone: off, with a warning
    ],
)
def test_these_environments_leave_tracing_off(environ):
    assert tracing.setup(environ) is False and tracing.provider() is None


def test_otlp_installs_a_batch_processor_exporting_over_http_to_the_endpoint():
    assert tracing.setup({**OTLP, "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/", "OTEL_SERVICE_NAME": "d"})
    assert tracing.enabled()
    processor = tracing._processor
    assert isinstance(processor, BatchSpanProcessor)
    exporter = processor._batch_processor._exporter
    assert isinstance(exporter, OTLPSpanExporter) and exporter._endpoint == "http://collector:4318/v1/traces"
    assert tracing.provider().resource.attributes["service.name"] == "d"


def test_the_traces_endpoint_is_taken_as_it_is():
    environ = {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://c:4318/custom", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x"}
    assert tracing.configured_endpoint(environ) == "https://c:4318/custom"
    assert tracing.configured_endpoint({}) == "http://localhost:4318/v1/traces"


def test_the_service_name_defaults_to_the_services(monkeypatch):
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    attributes = tracing.resource({}).attributes
    assert attributes["service.name"] == "akconv-detector" and attributes["service.version"]
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "service.name=from-attributes")
    assert tracing.resource({}).attributes["service.name"] == "from-attributes"


@pytest.mark.parametrize(
    ("environ", "description"),
    [
        ({}, "ParentBased{root:AlwaysOnSampler"),
        ({"OTEL_TRACES_SAMPLER": "always_off"}, "AlwaysOffSampler"),
        ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.25"}, "TraceIdRatioBased{0.25}"),
        ({"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.5"}, "{0.5}"),
    ],
)
def test_the_sampler_is_the_environments(environ, description):
    assert description in tracing.configured_sampler(environ).get_description()


def test_a_sampler_that_drops_everything_records_nothing_but_the_caller_trace_goes_on():
    tracing.setup({**OTLP, "OTEL_TRACES_SAMPLER": "always_off", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"})
    with tracing.request_span("GET /", {"traceparent": TRACEPARENT}, {}) as span:
        assert not span.is_recording()
        assert tracing.log_fields()["trace_id"] == CALLER_TRACE  # logs still correlate with the caller
        assert tracing.exemplar() is None  # not sampled: no exemplar to point at a trace that is not kept


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER"),
        ({**OTLP, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "OTEL_EXPORTER_OTLP_PROTOCOL"),
        ({**OTLP, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/json"}, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"),
        ({"OTEL_TRACES_SAMPLER": "sometimes"}, "OTEL_TRACES_SAMPLER"),
        ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "2"}, "OTEL_TRACES_SAMPLER_ARG"),
        ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "half"}, "OTEL_TRACES_SAMPLER_ARG"),
        ({**OTLP, "OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4318"}, "OTEL_EXPORTER_OTLP_ENDPOINT"),
        ({**OTLP, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:99999"}, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
        ({**OTLP, "OTEL_EXPORTER_OTLP_TIMEOUT": "ten"}, "OTEL_EXPORTER_OTLP_TIMEOUT"),
        ({"OTEL_SDK_DISABLED": "yes"}, "OTEL_SDK_DISABLED"),
    ],
)
def test_a_value_that_cannot_be_used_is_refused_naming_its_variable(environ, named):
    with pytest.raises(tracing.TracingConfigError, match=named):
        tracing.setup(environ)
    assert not tracing.enabled()


def test_batch_processor_settings_that_disagree_are_refused(monkeypatch):
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "0")
    with pytest.raises(tracing.TracingConfigError, match="OTEL_BSP"):
        tracing.setup({**OTLP, "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"})


@pytest.mark.e2e
@pytest.mark.slow
def test_a_bad_otel_value_stops_the_server_with_one_plain_line():
    result = subprocess.run(
        [sys.executable, "-m", "service", "--port", str(free_port()), "--warmup-rounds", "0"],
        env={**os.environ, "OTEL_TRACES_EXPORTER": "otlp", "OTEL_TRACES_SAMPLER": "sometimes"},
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("akconv-serve: bad setting: OTEL_TRACES_SAMPLER:")


# --- the request span and its stages ------------------------------------------------------------------------------


def test_the_request_span_continues_the_callers_trace_and_tracestate(spans):
    carrier = {"traceparent": TRACEPARENT, "tracestate": "vendor=abc"}
    with tracing.request_span("ModelInfer", carrier, {"detector.request_id": "r1"}) as span:
        with tracing.span("decode"):
            pass
        tracing.set_outcome(span, 503, "queue_full")
    decode, request = spans.get_finished_spans()
    assert request.kind == trace.SpanKind.SERVER and request.name == "ModelInfer"
    assert hex_id(request.context.trace_id, 32) == CALLER_TRACE
    assert hex_id(request.parent.span_id, 16) == CALLER_SPAN and request.parent.is_remote
    assert request.context.trace_state.get("vendor") == "abc"
    assert request.attributes["detector.status_code"] == 503 and request.attributes["detector.outcome"] == "queue_full"
    assert request.status.status_code == trace.StatusCode.ERROR
    assert decode.parent.span_id == request.context.span_id and decode.context.trace_id == request.context.trace_id


def test_without_a_traceparent_the_request_span_starts_a_trace(spans):
    with tracing.request_span("GET", {}, {}) as span:
        tracing.set_outcome(span, 404, "not_found", http_route="unmatched")
    (request,) = spans.get_finished_spans()
    assert request.parent is None and request.name == "GET unmatched"
    assert request.status.status_code == trace.StatusCode.UNSET  # a client's error is not the server's


def test_a_stage_that_raises_is_failed_with_the_errors_code(spans):
    class Refused(Exception):
        code = "overloaded"

    with pytest.raises(Refused), tracing.span("admission"):
        raise Refused
    (stage,) = spans.get_finished_spans()
    assert stage.status.status_code == trace.StatusCode.ERROR and stage.attributes["detector.outcome"] == "overloaded"


def test_work_on_another_thread_runs_in_the_callers_span(spans):
    seen = []
    with tracing.span("decode") as span:
        worker = threading.Thread(target=tracing.in_current_context(lambda: seen.append(trace.get_current_span())))
        worker.start()
        worker.join()
    assert seen == [span]


def test_detect_is_one_server_span_with_its_stages_in_the_callers_trace(spans):
    async def scenario():
        async with app_client() as (client, _):
            return await client.post("/detect", files={"file": ("a.png", PNG)}, headers={"traceparent": TRACEPARENT})

    response = run(scenario())
    assert response.status_code == 200
    finished = {span.name: span for span in spans.get_finished_spans()}
    request = finished.pop("POST /detect")
    assert request.kind == trace.SpanKind.SERVER and hex_id(request.parent.span_id, 16) == CALLER_SPAN
    assert request.attributes["http.route"] == "/detect" and request.attributes["http.response.status_code"] == 200
    assert request.attributes["detector.request_id"] == response.headers["x-request-id"]
    assert set(finished) == STAGES
    assert {hex_id(span.context.trace_id, 32) for span in finished.values()} == {CALLER_TRACE}
    assert {span.parent.span_id for span in finished.values()} == {request.context.span_id}
    queued, forward = finished["queue_wait"], finished["forward"]
    assert [link.context.span_id for link in forward.links] == [queued.context.span_id]
    assert queued.attributes["detector.batch.span_id"] == hex_id(forward.context.span_id, 16)
    for span in (queued, forward):
        assert span.attributes["detector.model.name"] == "fake" and span.attributes["detector.model.version"] == "0"
        assert span.attributes["detector.batch.size"] == 1
        assert tuple(span.attributes["detector.input.shape"]) == (3, 64, 64)
    assert finished["decode"].attributes["detector.image.width"] == 64
    assert finished["postprocess"].attributes["detector.detections"] == 1


def test_a_batch_is_one_forward_span_linked_to_each_of_its_requests(spans):
    """Two requests of two traces in one batch of two: one ``forward`` span, in the first's trace, linked to both
    queue_wait spans; each queue_wait names it."""
    callers = [f"00-{trace_id}-{CALLER_SPAN}-01" for trace_id in ("1" * 32, "2" * 32)]

    async def scenario():
        settings = fake_settings(max_batch_size=2, max_batch_wait_ms=1000)
        async with app_client(settings) as (client, _):
            post = [
                client.post("/detect", files={"file": ("a.png", PNG)}, headers={"traceparent": caller})
                for caller in callers
            ]
            return await asyncio.gather(*post)

    assert [response.json()["batch_size"] for response in run(scenario())] == [2, 2]
    finished = spans.get_finished_spans()
    (forward,) = [span for span in finished if span.name == "forward"]
    queued = [span for span in finished if span.name == "queue_wait"]
    assert len(queued) == 2 and forward.attributes["detector.batch.size"] == 2
    assert {link.context.span_id for link in forward.links} == {span.context.span_id for span in queued}
    assert {span.attributes["detector.batch.span_id"] for span in queued} == {hex_id(forward.context.span_id, 16)}
    assert hex_id(forward.context.trace_id, 32) in ("1" * 32, "2" * 32)


def test_the_oip_route_goes_through_the_same_spans(spans):
    body = {"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(PNG).decode()]}]}

    async def scenario():
        async with app_client() as (client, _):
            return await client.post("/v2/models/fake/infer", json=body, headers={"traceparent": TRACEPARENT})

    assert run(scenario()).status_code == 200
    finished = spans.get_finished_spans()
    names = {span.name for span in finished}
    assert {"POST /v2/models/{name}/infer", "parse"} | STAGES <= names
    assert {hex_id(span.context.trace_id, 32) for span in finished} == {CALLER_TRACE}


def test_an_error_answer_names_its_code_on_the_request_span(spans):
    async def scenario():
        async with app_client() as (client, _):
            return await client.post("/detect", content=PNG[:60], headers={"content-type": "image/png"})

    assert run(scenario()).status_code == 422
    finished = {span.name: span for span in spans.get_finished_spans()}
    request = finished["POST /detect"]
    assert request.attributes["detector.outcome"] == "undecodable_image"
    assert request.attributes["detector.status_code"] == 422
    assert finished["decode"].attributes["detector.outcome"] == "undecodable_image"
    assert finished["decode"].status.status_code == trace.StatusCode.ERROR


# --- logs and exemplars -------------------------------------------------------------------------------------------


def test_log_lines_carry_the_request_id_and_the_trace_and_span_ids(spans):
    token = bind_request_id("req-1")
    try:
        with tracing.request_span("GET", {"traceparent": TRACEPARENT}, {}) as span:
            entry = format_record("inside")
        outside = format_record("outside")
    finally:
        unbind_request_id(token)
    assert entry["request_id"] == "req-1" and entry["trace_id"] == CALLER_TRACE
    assert entry["span_id"] == hex_id(span.get_span_context().span_id, 16)
    assert "trace_id" not in outside and outside["request_id"] == "req-1"
    assert "request_id" not in format_record("after")
    assert format_record("named", request_id="own")["request_id"] == "own"


class Lines(logging.Handler):
    """Formats each record as the process's handler does: when it is logged, in the context it is logged in."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(JsonFormatter())
        self.entries: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.entries.append(json.loads(self.format(record)))


def test_the_access_log_line_has_the_request_and_trace_ids(spans):
    async def scenario():
        async with app_client() as (client, _):
            return await client.get("/healthz", headers={"traceparent": TRACEPARENT})

    lines, access = Lines(), logging.getLogger("service.access")
    access.addHandler(lines)
    level = access.level
    access.setLevel(logging.INFO)
    try:
        response = run(scenario())
    finally:
        access.removeHandler(lines)
        access.setLevel(level)
    (entry,) = lines.entries
    (request,) = spans.get_finished_spans()
    assert entry["request_id"] == response.headers["x-request-id"] and entry["trace_id"] == CALLER_TRACE
    assert entry["span_id"] == hex_id(request.context.span_id, 16)


def test_latency_histograms_carry_exemplars_when_scraped_as_openmetrics(spans):
    async def scenario():
        async with app_client() as (client, _):
            await client.post("/detect", files={"file": ("a.png", PNG)}, headers={"traceparent": TRACEPARENT})
            open_metrics = await client.get("/metrics", headers={"accept": "application/openmetrics-text"})
            plain = await client.get("/metrics")
            return open_metrics, plain

    open_metrics, plain = run(scenario())
    assert open_metrics.headers["content-type"].startswith("application/openmetrics-text")
    exemplars = [line for line in open_metrics.text.splitlines() if f'trace_id="{CALLER_TRACE}"' in line]
    for histogram in ("request_duration", "queue_wait", "preprocess_duration", "inference_duration"):
        assert any(line.startswith(f"detector_{histogram}_seconds_bucket") for line in exemplars), histogram
    assert open_metrics.text.rstrip().endswith("# EOF")
    assert plain.headers["content-type"].startswith("text/plain") and "trace_id" not in plain.text


# --- an exporter that fails; off ----------------------------------------------------------------------------------


def test_spans_reach_a_real_otlp_receiver_in_process(monkeypatch):
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    with otlp_receiver() as receiver:
        tracing.setup({**OTLP, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_SERVICE_NAME": "unit"})
        with tracing.request_span("GET", {"traceparent": TRACEPARENT}, {}):
            pass
        tracing.flush()
        (span,) = receiver.wait_for(lambda spans: len(spans) == 1, timeout=10)
    assert span.trace_id == CALLER_TRACE and span.parent_span_id == CALLER_SPAN
    assert span.resource["service.name"] == "unit"


def test_an_unreachable_collector_fails_no_request_and_delays_no_stop(monkeypatch):
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "10")  # export (and fail) all the time
    closed = f"http://127.0.0.1:{free_port()}"
    tracing.setup({**OTLP, "OTEL_EXPORTER_OTLP_ENDPOINT": closed, "OTEL_EXPORTER_OTLP_TIMEOUT": "2"})

    async def scenario():
        async with app_client() as (client, _):
            started = time.monotonic()
            answers = [await client.post("/detect", files={"file": ("a.png", PNG)}) for _ in range(20)]
            return answers, time.monotonic() - started

    answers, seconds = run(scenario())
    assert [answer.status_code for answer in answers] == [200] * 20
    assert seconds < 10, seconds
    started = time.monotonic()
    tracing.shutdown()
    assert time.monotonic() - started < tracing.FLUSH_TIMEOUT_S + 1


def test_off_nothing_is_created_and_answers_are_unchanged(monkeypatch):
    created = []
    monkeypatch.setattr(tracing.TracerProvider, "__init__", lambda *a, **k: created.append(a))

    async def scenario():
        async with app_client(engine=FakeEngine()) as (client, _):
            plain = await client.post("/detect", files={"file": ("a.png", PNG)})
            traced = await client.post("/detect", files={"file": ("a.png", PNG)}, headers={"traceparent": TRACEPARENT})
            return plain, traced

    plain, traced = run(scenario())
    assert not tracing.enabled() and created == []
    for answer in (plain, traced):
        assert answer.status_code == 200 and "traceparent" not in answer.headers
    strip = lambda body: {k: v for k, v in body.items() if k not in ("request_id", "timings_ms")}  # noqa: E731
    assert strip(plain.json()) == strip(traced.json())
    assert set(plain.headers) == set(traced.headers)
