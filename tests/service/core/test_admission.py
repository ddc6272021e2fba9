"""Admission budgets: alone, through the app in-process on a fake engine, and at a real socket for stalled uploads."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from urllib.parse import urlparse

import numpy as np
import pytest

from service.app import create_app
from service.core import pipeline as pipeline_module
from service.core.admission import Admission
from service.core.errors import Overloaded
from tests.image_files import encode
from tests.service.fakes import FakeEngine, app_client, fake_settings
from tests.service.server import metric_value, serving_in_thread

PNG = encode(np.full((48, 64, 3), 90, dtype=np.uint8))  # 3,072 px
NOISE = encode(np.random.default_rng(0).integers(0, 256, (30, 30, 3), dtype=np.uint8))  # about 2,800 bytes


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 60))


def png(width: int, height: int) -> bytes:
    return encode(np.full((height, width, 3), 30, dtype=np.uint8))


def budget_gauges(text: str, budget: str) -> tuple[float, float]:
    """(in use, capacity) of ``budget`` in a /metrics text."""
    return (
        metric_value(text, f'detector_admission_in_use{{budget="{budget}"}}'),
        metric_value(text, f'detector_admission_capacity{{budget="{budget}"}}'),
    )


def assert_overloaded(response) -> None:
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "overloaded"
    assert response.headers["retry-after"] == "1"


class TestBudgets:
    def test_what_does_not_fit_is_refused_and_closing_gives_everything_back(self):
        seen = {}
        admission = Admission(2, 100, 50, observe=seen.__setitem__)
        ticket = admission.admit()
        ticket.hold_body(60)
        kept = ticket.reserve_pixels(30, held_by_request=True)
        with pytest.raises(Overloaded, match="body_bytes budget"):
            ticket.hold_body(41)
        with pytest.raises(Overloaded, match="decode_pixels budget"):
            ticket.reserve_pixels(21, held_by_request=False)
        other = admission.admit()
        with pytest.raises(Overloaded, match="requests budget") as refused:
            admission.admit()
        assert refused.value.headers == {"Retry-After": "1"}
        kept.release()  # the decode is over; the request still holds the pixels it keeps for drawing
        assert seen == {"requests": 2, "body_bytes": 60, "decode_pixels": 30}
        ticket.close()
        ticket.close()
        other.close()
        assert seen == {"requests": 0, "body_bytes": 0, "decode_pixels": 0}

    def test_a_reservation_outlives_its_request_until_its_decode_is_done(self):
        admission = Admission(1, 100, 50)
        ticket = admission.admit()
        decoding = ticket.reserve_pixels(40, held_by_request=False)
        ticket.close()
        assert admission.decode_pixels.in_use == 40
        decoding.release()
        assert admission.decode_pixels.in_use == 0


def test_requests_in_flight_beyond_the_budget_are_refused_at_once():
    engine = FakeEngine()

    async def scenario():
        async with app_client(fake_settings(max_inflight_requests=1), engine) as (client, _):
            engine.gate.clear()
            held = asyncio.ensure_future(client.post("/detect", files={"file": ("a.png", PNG)}))
            await engine.batch_started()
            refused = await client.post("/detect", files={"file": ("b.png", PNG)})
            during = (await client.get("/metrics")).text
            engine.gate.set()
            return await held, refused, during, (await client.get("/metrics")).text

    held, refused, during, after = run(scenario())
    assert held.status_code == 200
    assert_overloaded(refused)
    assert budget_gauges(during, "requests") == (1, 1)
    assert budget_gauges(after, "requests") == (0, 1)
    assert metric_value(after, 'detector_rejected_total{reason="overloaded"}') == 1


def test_declared_bodies_are_reserved_before_they_are_read_and_multipart_counts_twice():
    """A held request has its body reserved (a multipart one twice); one whose declared length does not fit next
    to it is refused before a byte of its body is read."""
    engine = FakeEngine()
    settings = fake_settings(max_upload_bytes=4096, max_body_bytes=8192, max_image_pixels=4000)
    unread = asyncio.Event()

    async def never_read():
        unread.set()  # only reached if the server reads the body
        yield b"x" * 3000

    async def scenario():
        async with app_client(settings, engine) as (client, _):
            engine.gate.clear()
            held = asyncio.ensure_future(client.post("/detect", files={"file": ("a.png", NOISE)}))
            await engine.batch_started()
            during = (await client.get("/metrics")).text
            headers = {"content-type": "image/png", "content-length": "3000"}
            refused = await client.post("/detect", content=never_read(), headers=headers)
            engine.gate.set()
            return await held, refused, during

    held, refused, during = run(scenario())
    assert held.status_code == 200
    multipart_length = int(held.request.headers["content-length"])
    assert budget_gauges(during, "body_bytes") == (2 * multipart_length, 8192)
    assert 8192 - 2 * multipart_length < 3000, "the test's second body must not fit"
    assert_overloaded(refused)
    assert not unread.is_set()


def test_chunked_bodies_are_counted_as_they_arrive():
    settings = fake_settings(max_upload_bytes=4096, max_body_bytes=8192)
    release = asyncio.Event()

    async def stalled(size: int):
        yield b"x" * size
        await release.wait()

    async def body_bytes_in_use(client) -> float:
        return budget_gauges((await client.get("/metrics")).text, "body_bytes")[0]

    async def scenario():
        async with app_client(settings) as (client, _):
            holder = asyncio.ensure_future(
                client.post("/detect", content=stalled(4000), headers={"content-type": "image/png"})
            )
            while await body_bytes_in_use(client) < 4000:
                await asyncio.sleep(0.01)
            second = asyncio.ensure_future(
                client.post("/detect", content=stalled(4000), headers={"content-type": "image/png"})
            )
            while await body_bytes_in_use(client) < 8000:
                await asyncio.sleep(0.01)
            refused = await client.post("/detect", content=stalled(1000), headers={"content-type": "image/png"})
            release.set()
            return refused, await holder, await second

    refused, *stalled_ones = run(scenario())
    assert_overloaded(refused)
    assert [r.json()["error"]["code"] for r in stalled_ones] == ["unsupported_media_type"] * 2  # read, then judged


def test_decode_pixels_beyond_the_budget_are_refused_and_a_request_keeps_its_drawn_pixels():
    engine = FakeEngine()
    settings = fake_settings(max_image_pixels=9000, max_decode_pixels=10000)

    async def scenario():
        async with app_client(settings, engine) as (client, _):
            engine.gate.clear()
            drawing = asyncio.ensure_future(client.post("/detect/annotated", files={"file": ("a.png", PNG)}))
            await engine.batch_started()
            during = (await client.get("/metrics")).text
            refused = await client.post("/detect", files={"file": ("b.png", png(100, 90))})
            engine.gate.set()
            drawn = await drawing
            return during, refused, drawn, (await client.get("/metrics")).text

    during, refused, drawn, after = run(scenario())
    assert budget_gauges(during, "decode_pixels") == (64 * 48, 10000)
    assert_overloaded(refused)
    assert drawn.status_code == 200
    assert budget_gauges(after, "decode_pixels") == (0, 10000)


def test_waiting_for_a_decode_thread_ends_at_the_deadline(monkeypatch):
    """The issue's decode flood, scaled: one decode thread held by a slow image; a second large image does not fit
    the pixel budget and is refused at once; a small one is admitted, waits for the thread and gets 504 at its
    deadline while the slow decode is still running (before, it waited for the whole backlog). The slow image's own
    deadline covers its decoding too; its pixels stay reserved until its decode thread is done."""
    decoding, finish = threading.Event(), threading.Event()
    prepare = pipeline_module.prepare

    def slow_prepare(data, *args):
        if data == large:
            decoding.set()
            finish.wait(30)
        return prepare(data, *args)

    monkeypatch.setattr(pipeline_module, "prepare", slow_prepare)
    settings = fake_settings(decode_threads=1, max_image_pixels=10000, max_decode_pixels=12000, request_timeout_s=1)
    large = encode(np.random.default_rng(0).integers(0, 256, (90, 100, 3), dtype=np.uint8))  # 9,000 px

    async def scenario():
        async with app_client(settings) as (client, _):
            slow = asyncio.ensure_future(client.post("/detect", files={"file": ("a.png", large)}))
            while not decoding.is_set():
                await asyncio.sleep(0.01)
            refused = await client.post("/detect", files={"file": ("b.png", large)})
            small = await client.post("/detect", files={"file": ("c.png", png(20, 20))})
            still_decoding = not finish.is_set()
            slow = await slow  # its own deadline passes while it decodes
            held = budget_gauges((await client.get("/metrics")).text, "decode_pixels")[0]
            finish.set()
            while budget_gauges((await client.get("/metrics")).text, "decode_pixels")[0]:
                await asyncio.sleep(0.01)
            return refused, small, still_decoding, slow, held

    refused, small, still_decoding, slow, held = run(scenario())
    assert_overloaded(refused)
    assert small.status_code == 504 and small.json()["error"]["code"] == "deadline_exceeded", small.text
    assert "decoded" in small.json()["error"]["message"] and still_decoding
    assert slow.status_code == 504
    assert held == 9000, "a decode still running holds its pixels after its request is answered, until it ends"


@pytest.mark.e2e
def test_stalled_uploads_are_refused_at_the_door_over_real_sockets():
    """The issue's stalled uploads, scaled: clients declare the upload limit, send part of it and stall. Those
    that fit the body budget are held (and time out later); the next one is answered 503 before it sends a byte of
    body, so stalled uploads cannot hold more memory than the budget."""
    limit, budget = 1024 * 1024, 4 * 1024 * 1024
    settings = fake_settings(max_upload_bytes=limit, max_body_bytes=budget, request_timeout_s=30)
    app = create_app(settings, [FakeEngine()])
    head = f"POST /detect HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: {limit}\r\n\r\n".encode()
    with serving_in_thread(app) as (url, _):
        address = urlparse(url)
        admission = app.state.service.pipeline.admission
        stalled = []
        try:
            for _ in range(budget // limit):
                sock = socket.create_connection((address.hostname, address.port), timeout=30)
                sock.sendall(head + b"\x89PNG" + b"x" * (limit // 2))
                stalled.append(sock)
            for _ in range(300):  # until the server has admitted them all (30 s at most)
                if admission.body_bytes.in_use == budget:
                    break
                time.sleep(0.1)
            with socket.create_connection((address.hostname, address.port), timeout=30) as refused:
                refused.sendall(head)
                answer = b""
                while b'"code":"overloaded"' not in answer and (more := refused.recv(65536)):
                    answer += more
            held = admission.body_bytes.in_use
        finally:
            for sock in stalled:
                sock.close()
    assert answer.startswith(b"HTTP/1.1 503 "), answer[:200]
    assert b"retry-after: 1" in answer.lower()
    assert held == budget
