"""End-to-end tracing: the real service as a process on loopback, exporting over OTLP/HTTP to a real receiver in this
test (``tests/service/otlp_receiver.py``), configured only by the standard OTEL_* environment."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import httpx
import pytest

from tests.service.otlp_receiver import ReceivedSpan, otlp_receiver
from tests.service.server import running_server

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SAMPLE = (Path(__file__).resolve().parents[2] / "service" / "static" / "sample.jpg").read_bytes()
MODEL = "yolov10n-akconv"
CALLER_SPAN = "b7ad6b7169203331"
DETECT_TRACE, INFER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736", "5bf92f3577b34da6a3ce929d0e0e4737"
STAGES = {"admission", "read_body", "decode", "queue_wait", "forward", "postprocess"}
SERVER, INTERNAL = 2, 1  # opentelemetry.proto.trace.v1.Span.SpanKind


def traceparent(trace_id: str) -> str:
    return f"00-{trace_id}-{CALLER_SPAN}-01"


def of_trace(spans: list[ReceivedSpan], trace_id: str) -> dict[str, ReceivedSpan]:
    return {span.name: span for span in spans if span.trace_id == trace_id}


def both_requests_arrived(spans: list[ReceivedSpan]) -> bool:
    detect, infer = of_trace(spans, DETECT_TRACE), of_trace(spans, INFER_TRACE)
    return STAGES | {"POST /detect"} <= set(detect) and STAGES | {"POST /v2/models/{name}/infer"} <= set(infer)


def test_spans_of_detect_and_oip_infer_reach_an_otlp_receiver_in_the_callers_traces(tmp_path, monkeypatch):
    """The batch processor's delay is a minute: every span arrives by the flush at the end of the stop."""
    with otlp_receiver() as receiver:
        monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url)
        monkeypatch.setenv("OTEL_SERVICE_NAME", "detector-e2e")
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "60000")
        with running_server(tmp_path, "--max-batch-size", "2") as server:
            detect = httpx.post(
                server.url + "/detect", files={"file": ("sample.jpg", SAMPLE)},
                headers={"traceparent": traceparent(DETECT_TRACE), "tracestate": "caller=1"}, timeout=120,
            )  # fmt: skip
            image = {"name": "IMAGE", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(SAMPLE).decode()]}
            body = {"inputs": [image]}
            infer = httpx.post(
                f"{server.url}/v2/models/{MODEL}/infer", json=body,
                headers={"traceparent": traceparent(INFER_TRACE)}, timeout=120,
            )  # fmt: skip
            assert detect.status_code == 200, detect.text
            assert infer.status_code == 200, infer.text
            assert receiver.posts == 0  # nothing exported yet: the delay is a minute
            server.terminate()
        spans = receiver.wait_for(both_requests_arrived, timeout=30)

    for trace_id, route in ((DETECT_TRACE, "/detect"), (INFER_TRACE, "/v2/models/{name}/infer")):
        found = of_trace(spans, trace_id)
        request = found.pop(f"POST {route}")
        assert request.kind == SERVER and request.parent_span_id == CALLER_SPAN
        assert request.attributes["http.route"] == route and request.attributes["http.response.status_code"] == 200
        assert request.attributes["detector.status_code"] == 200 and request.attributes["detector.outcome"] == "ok"
        assert request.resource["service.name"] == "detector-e2e"
        assert all(span.kind == INTERNAL for span in found.values())
        assert {span.parent_span_id for span in found.values()} == {request.span_id}  # one chain, under the request
        queued, forward = found["queue_wait"], found["forward"]
        assert forward.links == [(trace_id, queued.span_id)]
        assert queued.attributes["detector.batch.span_id"] == forward.span_id
        for span in (queued, forward):
            assert span.attributes["detector.model.name"] == MODEL and span.attributes["detector.model.version"]
            assert span.attributes["detector.batch.size"] == 1
            assert span.attributes["detector.input.shape"] == found["decode"].attributes["detector.input.shape"]
        assert found["decode"].attributes["detector.image.width"] == 640  # the sample: 640 x 640
        assert len(found["decode"].attributes["detector.input.shape"]) == 3
    assert of_trace(spans, DETECT_TRACE)["POST /detect"].trace_state == "caller=1"
    assert "parse" in of_trace(spans, INFER_TRACE)

    lines = [json.loads(line) for line in server.log().splitlines()]
    (access,) = [line for line in lines if line.get("logger") == "service.access" and line.get("path") == "/detect"]
    assert access["request_id"] == detect.headers["x-request-id"]
    assert access["trace_id"] == DETECT_TRACE
    assert access["span_id"] == of_trace(spans, DETECT_TRACE)["POST /detect"].span_id


def test_a_collector_that_is_down_changes_no_answer(tmp_path, monkeypatch):
    """Spans to a closed port, exported every 50 ms: every request is answered as without tracing, and the server
    still stops promptly."""
    from bench.processes import free_port

    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    with running_server(tmp_path) as server:
        answers = [
            httpx.post(server.url + "/detect", files={"file": ("sample.jpg", SAMPLE)}, timeout=120) for _ in range(5)
        ]
        assert [answer.status_code for answer in answers] == [200] * 5
        assert all(answer.json()["detections"] for answer in answers)
        server.terminate(timeout=30)
    lines = [json.loads(line) for line in server.log().splitlines()]
    exporter_lines = [line for line in lines if line["logger"].startswith("opentelemetry")]
    messages = [line["message"] for line in exporter_lines]
    assert len(messages) == len(set(messages)), messages  # each failure logged once (a minute), not per retry
