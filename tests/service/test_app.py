"""The app's wiring: request metrics and their labels, clients that hang up, the end of the drain window."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import re
import socket
import uuid
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest

from service.app import create_app
from tests.image_files import encode
from tests.service.fakes import FakeEngine, app_client, fake_settings
from tests.service.server import metric_value, serving_in_thread

PNG = encode(np.full((48, 64, 3), 90, dtype=np.uint8))


def test_endpoint_labels_are_route_templates_or_unmatched():
    """The issue's CORS case, scaled: preflights to random paths became one label each; now they share one."""
    settings = fake_settings(cors_origins=["https://app.example"])
    preflight = {"origin": "https://app.example", "access-control-request-method": "POST"}

    async def scenario():
        async with app_client(settings) as (client, _):
            for _ in range(50):
                await client.options(f"/{uuid.uuid4().hex}", headers=preflight)
                await client.get(f"/{uuid.uuid4().hex}")
            await client.options("/detect", headers=preflight)
            await client.post("/detect", files={"file": ("a.png", PNG)})
            return (await client.get("/metrics")).text

    text = asyncio.run(asyncio.wait_for(scenario(), 60))
    labels = set(re.findall(r'^detector_requests_total\{endpoint="([^"]*)"', text, re.MULTILINE))
    assert labels == {"/detect", "unmatched"}
    assert metric_value(text, 'detector_requests_total{endpoint="unmatched",status="404"}') == 50
    assert metric_value(text, 'detector_requests_total{endpoint="/detect",status="200"}') == 2  # preflight + post


def wait_for(url: str, series: str, value: float) -> str:
    """/metrics once ``series`` has reached ``value`` (10 s at most)."""
    for _ in range(200):
        text = httpx.get(url + "/metrics").text
        if series in text and metric_value(text, series) >= value:
            return text
        asyncio.run(asyncio.sleep(0.05))
    raise AssertionError(f"{series} never reached {value}")


@pytest.mark.e2e
def test_clients_that_hang_up_are_client_gone_not_server_errors(caplog):
    """Over real sockets: one client hangs up after sending while its image is held at the engine, one in the
    middle of its body. Both are 499 ``client_gone`` in the request metrics and the access log; no 5xx, no
    traceback, no ERROR line."""
    engine = FakeEngine()
    app = create_app(fake_settings(), [engine])
    caplog.set_level(logging.INFO)
    with serving_in_thread(app) as (url, _):
        address = urlparse(url)
        engine.gate.clear()
        body = b"--b\r\nContent-Disposition: form-data; name=file; filename=a.png\r\n\r\n" + PNG + b"\r\n--b--\r\n"
        head = (
            "POST /detect HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            "Content-Length: {}\r\n\r\n"
        )
        gone = 'detector_requests_total{endpoint="/detect",status="499"}'
        try:
            with socket.create_connection((address.hostname, address.port)) as sent_all:
                sent_all.sendall(head.format(len(body)).encode() + body)
                while not engine.entered:
                    asyncio.run(asyncio.sleep(0.01))
            wait_for(url, gone, 1)
            with socket.create_connection((address.hostname, address.port)) as mid_body:
                mid_body.sendall(head.format(len(body)).encode() + body[:100])
                wait_for(url, 'detector_admission_in_use{budget="body_bytes"}', 1)
            text = wait_for(url, gone, 2)
        finally:
            engine.gate.set()
    assert metric_value(text, 'detector_rejected_total{reason="client_gone"}') == 2
    assert not re.search(r'status="5\d\d"', text)
    access = [r for r in caplog.records if r.name == "service.access" and r.path == "/detect"]
    assert [r.status for r in access] == [499, 499]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.e2e
def test_requests_unanswered_at_the_end_of_the_drain_window_get_json_503(caplog):
    """uvicorn cancels what still runs when its graceful-shutdown window ends; such a request is answered JSON 503
    ``shutting_down`` (before: uvicorn's plain-text 500)."""
    engine = FakeEngine()
    app = create_app(fake_settings(), [engine])
    with (
        serving_in_thread(app, timeout_graceful_shutdown=1) as (url, server),
        concurrent.futures.ThreadPoolExecutor(1) as pool,
    ):
        engine.gate.clear()
        pending = pool.submit(httpx.post, url + "/detect", files={"file": ("a.png", PNG)}, timeout=30)
        while not engine.entered:
            asyncio.run(asyncio.sleep(0.01))
        server.should_exit = True
        response = pending.result(30)
        engine.gate.set()
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "shutting_down"
    assert "Exception in ASGI application" not in caplog.text


@pytest.mark.e2e
def test_a_nul_in_the_query_is_answered_json_400_over_a_socket():
    """``classes=%00`` used to drop the connection."""
    with serving_in_thread(create_app(fake_settings(), [FakeEngine()])) as (url, _):
        address = urlparse(url)
        with socket.create_connection((address.hostname, address.port), timeout=30) as sock:
            head = "POST /detect?classes=%00 HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            sock.sendall(f"{head}Content-Length: {len(PNG)}\r\n\r\n".encode() + PNG)
            answer = b""
            while b'"code":"bad_request"' not in answer and (more := sock.recv(65536)):
                answer += more
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert b"content-type: application/json" in answer


def test_a_batch_holds_images_of_one_input_shape_and_runs_only_the_policys_sizes():
    """Square, landscape and portrait photos queue together while a batch runs; each later batch is one shape, and
    for the measured shapes (batch 2 loses on the square, wins on 2:1) only winning sizes run."""
    engine = FakeEngine()
    engine.timings = {(64, 64): {1: 0.1, 2: 0.25}, (32, 64): {1: 0.1, 2: 0.15}}
    square, landscape, portrait = (
        encode(np.full(shape, 90, dtype=np.uint8)) for shape in [(64, 64, 3), (20, 40, 3), (40, 20, 3)]
    )

    async def scenario():
        async with app_client(fake_settings(warmup_rounds=1, max_batch_size=4), engine) as (client, app):
            engine.gate.clear()
            first = asyncio.ensure_future(client.post("/detect", files={"file": ("a.png", square)}))
            await engine.batch_started()
            images = [square, landscape, portrait, landscape, square, portrait]
            queued = [
                asyncio.ensure_future(client.post("/detect", files={"file": ("a.png", image)})) for image in images
            ]
            while app.state.service.models.get(None).depth < len(images):
                await asyncio.sleep(0.01)
            engine.gate.set()
            responses = await asyncio.gather(first, *queued)
            info = (await client.get("/v1/model")).json()
            return responses, info

    responses, info = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert all(response.status_code == 200 for response in responses)
    assert all(len(shapes) == 1 for shapes in engine.shapes), engine.shapes
    batches = list(zip(engine.shapes, engine.batches, strict=True))
    assert ((3, 64, 64),) in engine.shapes and ((3, 32, 64),) in engine.shapes and ((3, 64, 32),) in engine.shapes, (
        engine.shapes
    )
    assert all(size == 1 for shapes, size in batches if shapes == ((3, 64, 64),)), "batch 2 loses on the square"
    assert [size for shapes, size in batches if shapes == ((3, 32, 64),)] == [2], "and wins on 2:1"
    policy = info["batch_policy"]
    assert policy["source"] == "measured" and policy["max_batch_size"] == 4
    assert {(s["height"], s["width"]): s["batch_sizes"] for s in policy["shapes"]} == {(64, 64): [1], (32, 64): [1, 2]}


def test_without_warm_up_rounds_the_configured_batch_sizes_run_and_v1_model_says_so():
    async def scenario():
        async with app_client(fake_settings(max_batch_size=4)) as (client, _):
            return (await client.get("/v1/model")).json()["batch_policy"]

    policy = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert policy["source"] == "configured" and "not measured" in policy["note"] and policy["max_batch_size"] == 4


def test_a_huge_path_and_request_id_are_logged_short(caplog):
    """The access log's ``path`` is the client's: cut to 100 characters; an ``X-Request-ID`` that is not 1-64 safe
    characters is replaced by the service's own id."""
    caplog.set_level(logging.INFO)

    async def scenario():
        async with app_client() as (client, _):
            return await client.get("/" + "n" * 20_000, headers={"x-request-id": "r" * 10_000})

    response = asyncio.run(scenario())
    assert response.status_code == 404 and len(response.json()["error"]["message"]) < 100
    (access,) = [r for r in caplog.records if r.name == "service.access"]
    assert access.path == "/" + "n" * 96 + "..." and access.endpoint == "unmatched"
    assert access.request_id == response.headers["x-request-id"] and len(access.request_id) <= 64


def test_each_model_loads_on_its_own_runtime(monkeypatch):
    """``load_engine`` (start-up and every swap) hands each model the runtime the settings give it by name."""
    from service import app as app_module
    from service.core.models import ModelSource

    built = []
    monkeypatch.setattr(app_module, "Engine", lambda settings, path, runtime: built.append((path, runtime)))
    settings = fake_settings(models={"a": "a.pt", "b": "b.pt"}, runtime={"a": "int8"})
    for name in ("a", "b"):
        app_module.load_engine(settings, ModelSource(name, Path(f"{name}.pt")))
    assert built == [(Path("a.pt"), "int8"), (Path("b.pt"), "eager")]
