"""The generated bad-input corpus against a real server: every case gets its documented status and JSON error,
never a 500 and never a dropped connection, and the server's memory stays bounded across repeated passes."""

from __future__ import annotations

import socket
import time
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest
from PIL import Image

from bench.processes import rss_bytes
from tests.reliability.corpus import REQUEST_TIMEOUT_S, Case, corpus, encode, sample, send

pytestmark = pytest.mark.e2e  # against real server processes on loopback

LEAKS = ("Traceback", 'File "', "site-packages", ".py", "/work", "/home", "/usr")


def check_answer(response: httpx.Response, case: Case) -> None:
    assert response.status_code == case.status, f"{case.name}: {response.status_code} {response.text[:300]}"
    assert response.headers["content-type"].startswith("application/json"), case.name
    body = response.json()
    if case.code is None:
        return
    assert body["error"]["code"] == case.code, f"{case.name}: {body}"
    message = body["error"]["message"]
    assert message and not any(leak in message for leak in LEAKS), f"{case.name} leaks internals: {message}"


@pytest.mark.parametrize("case", corpus(), ids=lambda case: case.name)
def test_corpus_case_gets_its_documented_answer(client, case):
    check_answer(send(client, case), case)


def test_memory_stays_bounded_over_the_corpus(server, client, record):
    """Three passes over the whole corpus after a first one: resident memory may not keep growing."""
    passes = 4
    rss = []
    for _ in range(passes):
        for case in corpus():
            check_answer(send(client, case), case)
        rss.append(rss_bytes(server.process.pid))
    growth = rss[-1] - rss[0]
    record("corpus_memory", cases=len(corpus()), passes=passes, rss_mib=[round(r / 2**20, 1) for r in rss])
    assert growth < 64 * 2**20, f"RSS grew {growth / 2**20:.1f} MiB over {passes - 1} passes: {rss}"


def test_exif_rotated_jpeg_answers_in_the_upright_frame(client):
    """The same picture stored sideways with an EXIF orientation tag finds the same boxes as the upright one."""
    upright = sample(seed=11)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display": stored counter-clockwise
    sideways = Image.fromarray(np.rot90(np.asarray(upright)).copy())

    def boxes(data: bytes) -> np.ndarray:
        response = client.post("/detect", files={"file": ("a.jpg", data, "image/jpeg")})
        assert response.status_code == 200, response.text
        body = response.json()
        assert (body["image"]["width"], body["image"]["height"]) == upright.size
        return np.array([[d["box"][k] for k in ("x1", "y1", "x2", "y2")] for d in body["detections"]])

    expected = boxes(encode(upright, "JPEG", quality=95))
    rotated = boxes(encode(sideways, "JPEG", quality=95, exif=exif))
    assert len(expected) > 0 and rotated.shape == expected.shape
    assert np.abs(np.sort(rotated, axis=0) - np.sort(expected, axis=0)).max() < 4  # px; JPEG re-encoding jitter


def test_stalled_upload_is_answered_408_at_the_deadline(server, record):
    """A client that declares a body and stops sending it gets 408 when the request timeout passes; its
    connection and slot are freed rather than held forever (slowloris)."""
    url = urlparse(server.url)
    with socket.create_connection((url.hostname, url.port), timeout=REQUEST_TIMEOUT_S + 10) as sock:
        started = time.monotonic()
        sock.sendall(b"POST /detect HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 100000\r\n\r\n")
        sock.sendall(b"\xff\xd8" + b"x" * 1000)
        answer = sock.recv(65536)
        seconds = time.monotonic() - started
        while b'"code":"request_timeout"' not in answer and (more := sock.recv(65536)):
            answer += more
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), answer[:300]
    assert b'"code":"request_timeout"' in answer
    record("stalled_upload", answered_after_s=round(seconds, 1), request_timeout_s=REQUEST_TIMEOUT_S)
    assert REQUEST_TIMEOUT_S - 1 < seconds < REQUEST_TIMEOUT_S + 5


def test_oversized_headers_are_refused(client):
    """Headers beyond ``max_header_bytes`` (16 KiB by default) get 431 with a JSON error; the server stays up."""
    response = client.get("/healthz", headers={"X-Big": "a" * 32 * 1024})
    assert response.status_code == 431
    assert response.json()["error"]["code"] == "headers_too_large"
    assert client.get("/healthz").status_code == 200


def test_openapi_documents_every_error_status(client):
    """The statuses the corpus produces on /detect are those the schema promises."""
    responses = client.get("/openapi.json").json()["paths"]["/detect"]["post"]["responses"]
    statuses = {case.status for case in corpus() if case.path == "/detect" and case.method == "POST"}
    assert {str(status) for status in statuses} <= set(responses)
