"""A fake :class:`service.core.engine.EngineProtocol` and an in-process client for the app: no model, no sockets, no
subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator

import httpx
import torch
from fastapi import FastAPI

from model.checkpoint import ModelMetadata
from model.letterbox import Shape
from service.app import create_app
from service.core.batch_policy import Timings
from service.core.engine import detections_from_rows
from service.core.images import Letterbox
from service.core.models import EngineLoader
from service.process.settings import Settings
from service.schemas import Detection

NAMES = ["triangle", "star"]
INPUT_SIZE = 64
# One detection per image, whatever the image: a star over the model input's centre half, score 0.9.
ROW = (INPUT_SIZE / 4, INPUT_SIZE / 4, 3 * INPUT_SIZE / 4, 3 * INPUT_SIZE / 4, 0.9, 1.0)


class FakeEngine:
    """Honours :class:`service.core.engine.EngineProtocol`: every image gets :data:`ROW` (then zero rows). ``gate``
    holds each batch back until set; ``fail`` makes batches raise. ``entered`` counts batches started, ``batches``
    records the size of each batch run. ``name`` and ``version`` are the model's own."""

    names = NAMES
    input_size = INPUT_SIZE
    device = "cpu"
    dtype = "float32"
    akconv_layers = 0
    workers = 1
    parameters = 0
    checksum = "not applicable"

    def __init__(self, version: str = "0", name: str = "fake") -> None:
        self.name, self.version = name, version
        self.metadata = ModelMetadata(name, version, {}, NAMES, INPUT_SIZE, "ij")
        self.gate = threading.Event()
        self.gate.set()
        self.fail = False
        self.entered = 0
        self.batches: list[int] = []
        self.shapes: list[tuple[int, ...]] = []  # the input shapes of each batch run
        self.timings: Timings = {}
        self.runtime = {"requested": "eager", "shapes": {f"{INPUT_SIZE}x{INPUT_SIZE}": "eager"}, "accuracy": None}

    async def batch_started(self, timeout: float = 10) -> None:
        """Return once a batch has entered :meth:`infer` (where ``gate`` holds it); fail after ``timeout`` seconds."""
        async with asyncio.timeout(timeout):
            while not self.entered:
                await asyncio.sleep(0.01)

    def verify(self, shape: Shape) -> None:
        """Nothing to check: a fake's rows are well-formed (and its batch counters stay untouched)."""

    def warm_up(self, shapes: list[Shape], max_batch_size: int, rounds: int) -> Timings:
        """``timings`` as if measured, or nothing when ``rounds`` is 0."""
        return self.timings if rounds else {}

    def infer(self, images: list[torch.Tensor]) -> torch.Tensor:
        self.entered += 1
        self.gate.wait(30)
        self.batches.append(len(images))
        self.shapes.append(tuple({tuple(image.shape) for image in images}))
        if self.fail:
            raise RuntimeError("injected fault")
        rows = torch.zeros(len(images), 4, 6)  # (B, K, 6)
        rows[:, 0] = torch.tensor(ROW)
        return rows

    def detections(
        self, rows: torch.Tensor, geometry: Letterbox, conf: float, classes: set[int] | None, max_det: int
    ) -> list[Detection]:
        return detections_from_rows(rows, self.names, geometry, conf, classes, max_det)

    def gpu_memory(self) -> dict[str, int]:
        return {}


def fake_settings(**values: object) -> Settings:
    """Settings for an in-process app: the defaults, no warm-up, ``values`` over them."""
    return Settings(**{"warmup_rounds": 0, **values})


@contextlib.asynccontextmanager
async def app_client(
    settings: Settings | None = None,
    engine: FakeEngine | list[FakeEngine] | None = None,
    loader: EngineLoader | None = None,
) -> AsyncIterator[tuple[httpx.AsyncClient, FastAPI]]:
    """An app on :class:`FakeEngine` (or the fakes of its models, in order), its lifespan run, and an httpx client
    talking to it in-process. ``loader`` loads what the app loads later (swaps)."""
    engines = engine if isinstance(engine, list) else [engine or FakeEngine()]
    app = create_app(settings or fake_settings(), engines, loader)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as client:
            yield client, app
