"""Overload and faults against the real server with a fault-injecting engine (see fault_server.py): a flood,
clients hanging up while queued, and a batch whose inference raises."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import Counter

import httpx
import pytest

from tests.reliability.corpus import encode, sample
from tests.reliability.fault_server import POISON, SLOW, SLOW_SECONDS, marker_png
from tests.service.server import metric_value

pytestmark = pytest.mark.e2e  # against real server processes on loopback

IMAGE = encode(sample(seed=5), "JPEG", quality=90)
QUEUE_BOUND = 16  # corpus.SERVER_FLAGS
QUEUE_WAITS = 'detector_queue_wait_seconds_count{model="yolov10n-akconv"}'  # the bundled model, under its own name


def metrics(client: httpx.Client) -> str:
    return client.get("/metrics").text


def images_computed(text: str) -> float:
    """Images that went through the model so far (the sum of the batch-size histogram)."""
    return metric_value(text, 'detector_batch_size_sum{model="yolov10n-akconv"}')


def median_latency_s(client: httpx.Client, requests: int = 5) -> float:
    samples = []
    for _ in range(requests):
        started = time.monotonic()
        assert client.post("/detect", files={"file": ("a.jpg", IMAGE, "image/jpeg")}).status_code == 200
        samples.append(time.monotonic() - started)
    return statistics.median(samples)


async def post_many(url: str, bodies: list[bytes], timeout: float = 60) -> list[httpx.Response | Exception]:
    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        sends = (client.post("/detect", files={"file": ("a", body, "image/jpeg")}) for body in bodies)
        return await asyncio.gather(*sends, return_exceptions=True)


def test_flood_is_refused_at_the_bound_and_everything_accepted_is_answered(server, client, record):
    before = median_latency_s(client)
    flood = 8 * QUEUE_BOUND
    started = time.monotonic()
    responses = asyncio.run(post_many(server.url, [IMAGE] * flood))
    flood_seconds = time.monotonic() - started
    errors = [r for r in responses if isinstance(r, Exception)]
    assert not errors, errors[:3]
    statuses = Counter(r.status_code for r in responses)
    assert set(statuses) <= {200, 503}, statuses
    assert statuses[200] >= QUEUE_BOUND and statuses[503] > 0, statuses
    for refused in (r for r in responses if r.status_code == 503):
        assert refused.json()["error"]["code"] == "queue_full"
        assert int(refused.headers["retry-after"]) >= 1
    assert metric_value(metrics(client), 'detector_queue_depth{model="yolov10n-akconv"}') == 0
    after = median_latency_s(client)
    record(
        "flood",
        concurrent_requests=flood,
        queue_bound=QUEUE_BOUND,
        answered_200=statuses[200],
        refused_503=statuses[503],
        other=flood - statuses[200] - statuses[503],
        seconds=round(flood_seconds, 1),
        median_latency_before_ms=round(before * 1000),
        median_latency_after_ms=round(after * 1000),
    )
    assert after <= 2 * before + 0.25, f"latency did not recover: {before:.3f} s before, {after:.3f} s after"


def test_clients_gone_while_queued_are_skipped(server, client, record):
    """While slow batches hold every inference worker, five clients queue and hang up: none of their images is
    computed, each is counted as client_gone, and a patient client behind them is answered."""
    before = metrics(client)
    workers = client.get("/v1/model").json()["workers"]

    async def scenario() -> tuple[list[httpx.Response], list, httpx.Response]:
        slow = []
        for held in range(1, workers + 1):  # one at a time, so that each slow image is a batch of its own
            slow.append(asyncio.ensure_future(post_many(server.url, [marker_png(SLOW)])))
            for _ in range(200):  # until it has left the queue for a worker (10 s at most)
                if (
                    metric_value(await asyncio.to_thread(metrics, client), QUEUE_WAITS)
                    >= metric_value(before, QUEUE_WAITS) + held
                ):
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("a slow image never reached a worker")
        impatient = await post_many(server.url, [IMAGE] * 5, timeout=SLOW_SECONDS / 3)
        patient = await post_many(server.url, [IMAGE])
        return [(await answer)[0] for answer in slow], impatient, patient[0]

    slow, impatient, patient = asyncio.run(scenario())
    assert all(answer.status_code == 200 for answer in slow) and patient.status_code == 200, patient.text
    assert all(isinstance(outcome, httpx.TimeoutException) for outcome in impatient), impatient
    time.sleep(0.2)  # the server notices the last disconnect
    after = metrics(client)
    gone = 'detector_rejected_total{reason="client_gone"}'
    assert metric_value(after, gone) - metric_value(before, gone) == 5
    assert images_computed(after) - images_computed(before) == workers + 1  # the slow images and the patient one
    record("client_gone", hung_up=5, computed_of_them=0, others_answered=workers + 1)


def test_a_failing_batch_fails_only_its_requests(server, client, record):
    """The poisoned image's batch answers 500 with a JSON error; the next batches succeed; readiness stays."""
    poisoned = client.post("/detect", files={"file": ("p.png", marker_png(POISON), "image/png")})
    assert poisoned.status_code == 500
    assert poisoned.json()["error"] == {"code": "inference_failed", "message": "inference failed: RuntimeError"}
    assert client.get("/readyz").status_code == 200
    after = asyncio.run(post_many(server.url, [IMAGE] * 8))
    assert [r.status_code for r in after] == [200] * 8
    record("poisoned_batch", failed=1, next_requests=8, next_answered_200=8, ready_after=True)
