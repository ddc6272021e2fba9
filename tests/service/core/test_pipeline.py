"""One image's way without HTTP: the pipeline on a fake engine, driven with plain asyncio."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from service.core import pipeline as pipeline_module
from service.core.admission import Admission
from service.core.errors import DeadlineExceeded
from service.core.models import ModelSlot, ModelSource
from service.core.pipeline import (
    PARSE_THREADS,
    DetectQuery,
    Pipeline,
    Upload,
    multipart_files,
    one_box_per_place,
)
from service.process.metrics import Metrics
from service.process.settings import Settings
from service.schemas import Detection
from tests.image_files import encode
from tests.service.fakes import FakeEngine, fake_settings

QUERY = DetectQuery(conf=0.25, max_det=100, classes=None)


@dataclass
class Served:
    """A pipeline and the one model it serves."""

    pipeline: Pipeline
    model: ModelSlot

    @property
    def admission(self) -> Admission:
        return self.pipeline.admission


@contextlib.asynccontextmanager
async def running_pipeline(settings: Settings) -> AsyncIterator[Served]:
    """A pipeline with one served model on a :class:`FakeEngine`."""
    metrics = Metrics()
    model = ModelSlot(ModelSource(None, None), lambda source: FakeEngine(), settings, metrics)
    await model.start(FakeEngine())
    admission = Admission(settings.max_inflight_requests, settings.max_body_bytes, settings.max_decode_pixels)
    with (
        ThreadPoolExecutor(settings.decode_threads) as decode_pool,
        ThreadPoolExecutor(PARSE_THREADS, thread_name_prefix="parse") as parse_pool,
    ):
        try:
            yield Served(Pipeline(settings, metrics, decode_pool, admission, parse_pool), model)
        finally:
            await model.stop()


async def detect(served: Served, data: bytes):
    ticket = served.pipeline.admit()
    try:
        with served.model.lease() as version:
            return await served.pipeline.detect(ticket, version, data, QUERY, "r", time.monotonic())
    finally:
        ticket.close()


def test_one_image_through_the_pipeline():
    async def scenario():
        async with running_pipeline(fake_settings()) as pipeline:
            result = await detect(pipeline, encode(np.zeros((48, 64, 3), np.uint8)))
            return result, pipeline.admission

    result, admission = asyncio.run(scenario())
    assert result.response.image.width == 64 and [d.class_name for d in result.detections] == ["star"]
    assert result.pixels is None, "only a drawing request keeps the decoded pixels"
    assert [budget.in_use for budget in admission.budgets] == [0, 0, 0]


def test_small_images_keep_a_decode_thread_while_large_ones_flood(monkeypatch):
    """Two decode threads; large images may hold only one of them. While two large images are held (one decoding,
    one waiting for the large lane), a small image is decoded and answered."""
    large = encode(np.random.default_rng(0).integers(0, 256, (90, 100, 3), dtype=np.uint8))  # 9,000 px: large
    finish = threading.Event()
    prepare = pipeline_module.prepare

    def slow_for_large(data, *args):
        if data == large:
            finish.wait(30)
        return prepare(data, *args)

    monkeypatch.setattr(pipeline_module, "prepare", slow_for_large)
    settings = fake_settings(decode_threads=2, max_image_pixels=10000)

    async def scenario():
        async with running_pipeline(settings) as pipeline:
            flood = [asyncio.ensure_future(detect(pipeline, large)) for _ in range(2)]
            while pipeline.admission.decode_pixels.in_use < 18000:
                await asyncio.sleep(0.01)
            small = await detect(pipeline, encode(np.zeros((20, 20, 3), np.uint8)))
            large_still_held = not any(task.done() for task in flood)
            finish.set()
            return small, large_still_held, await asyncio.gather(*flood)

    small, large_still_held, flood = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert small.response.image.width == 20 and large_still_held
    assert [result.response.image.width for result in flood] == [100, 100]


def test_image_headers_are_read_on_the_parse_thread(monkeypatch):
    """Pillow reads a header in Python, marker by marker (10 MB of empty JPEG comments: 6 s): never on the loop."""
    threads = []
    read_header = pipeline_module.read_header

    def recording(*args):
        threads.append(threading.current_thread().name)
        return read_header(*args)

    monkeypatch.setattr(pipeline_module, "read_header", recording)

    async def scenario():
        async with running_pipeline(fake_settings()) as pipeline:
            return await detect(pipeline, encode(np.zeros((48, 64, 3), np.uint8)))

    assert asyncio.run(scenario()).response.image.width == 64
    assert len(threads) == 1 and threads[0].startswith("parse"), threads


def test_waiting_for_the_parse_thread_ends_at_the_deadline():
    """A request whose parsing waits behind another's (the one thread busy) is answered 504 at its deadline."""
    release = threading.Event()
    settings = fake_settings(request_timeout_s=0.3)

    async def scenario():
        async with running_pipeline(settings) as served:
            busy = served.pipeline.parse_pool.submit(release.wait, 30)
            started = time.monotonic()
            try:
                await served.pipeline.parse(lambda: "parsed", started)
            except DeadlineExceeded as error:
                return error, time.monotonic() - started
            finally:
                release.set()
                busy.result()

    error, waited = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert error.status == 504 and "parsed" in error.message and 0.2 < waited < 2


def test_multipart_files_are_parsed_in_memory_never_spooled_to_disk(monkeypatch):
    """The issue's 150 multipart uploads spooled 658 MiB to /tmp (an emptyDir of 256 MiB in Kubernetes): a file
    part larger than Starlette's 1 MiB spool threshold now stays in memory."""

    def no_disk(*args, **kwargs):
        raise AssertionError("a multipart part was spooled to disk")

    monkeypatch.setattr(tempfile, "TemporaryFile", no_disk)
    data = np.random.default_rng(0).bytes(3 * 2**20)
    body = b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n\r\n' + data + b"\r\n--b--\r\n"
    files = asyncio.run(multipart_files(body, "multipart/form-data; boundary=b", "file", max_files=1))
    assert files == [Upload("a.jpg", data)]


def test_one_box_per_place_keeps_the_most_confident_of_overlapping_boxes_of_any_class():
    star = Detection(1, "star", 0.9, (0.0, 0.0, 10.0, 10.0))
    same_place_triangle = Detection(0, "triangle", 0.8, (1.0, 0.0, 10.0, 10.0))  # IoU 0.9 with the star
    same_place_star = Detection(1, "star", 0.7, (0.0, 1.0, 10.0, 10.0))  # IoU 0.9: the same class, still one object
    neighbour = Detection(1, "star", 0.65, (0.0, 6.0, 10.0, 16.0))  # IoU 0.25 with the star: another object
    elsewhere = Detection(0, "triangle", 0.6, (20.0, 20.0, 30.0, 30.0))
    detections = [star, same_place_triangle, same_place_star, neighbour, elsewhere]
    assert one_box_per_place(detections, 0.7) == [star, neighbour, elsewhere]
    assert one_box_per_place(detections, 0.95) == detections
    half_over = [star, Detection(1, "star", 0.5, (5.0, 0.0, 15.0, 10.0))]  # IoU 50 / 150
    assert one_box_per_place(half_over, 1 / 3) == half_over and one_box_per_place(half_over, 0.33) == [star]
    empty = Detection(0, "triangle", 0.5, (3.0, 3.0, 3.0, 3.0))
    assert one_box_per_place([empty, empty], 0.5) == [empty, empty]  # two empty boxes do not overlap
