"""Swaps leave memory flat (service/core/models.py, ``release_memory``): a retired version's objects are freed once it
has stopped, and a real server's resident memory levels off over 30 swaps of a model under light traffic."""

from __future__ import annotations

import asyncio
import gc
import json
import threading
import time
import weakref
from collections import Counter
from pathlib import Path

import httpx
import pytest
import torch

from bench.processes import rss_bytes
from model.synthetic import render
from service.core.engine import Engine
from service.core.models import ModelSlot, ModelSource
from service.process.metrics import Metrics
from service.process.settings import Settings
from tests.deploy.model_versions import point, write_version
from tests.image_files import encode
from tests.service.server import running_server

SWAPS = 30  # the count: about 40 MB each, without levelling off, before the fix
SETTLED_AFTER = 5  # RSS after this swap is the reference: the first swaps still grow the allocator's arenas
RSS_TOLERANCE_BYTES = 100 * 2**20
TRAFFIC_INTERVAL_S = 0.25  # light traffic: one detection every quarter second, across the swaps
STOPPED_TIMEOUT_S = 60.0  # from a swap until its retired version logs that it stopped (its memory released)


def new_version(models: Path, name: str, number: int) -> str:
    """The bundled model as version ``{name}-{number}`` at ``models/name`` (a symlink repointed as in deploy/README.md);
    returns the version."""
    version = f"{name}-{number}"
    point(models / name, write_version(models, version))
    return version


@pytest.mark.slow
def test_retired_versions_are_freed_by_the_slot(tmp_path):
    """The real engine swapped 30 times while images are being detected, then loaded once more unchanged (as a
    SIGHUP does for every model), with CPython's automatic garbage collection off, so that only the slot can free
    what ultralytics' fused layers hold in reference cycles: once the retired versions have stopped, none of them is
    left, nor its engine, batcher or any layer of its model holding weights, nor the engine loaded only to be
    compared."""
    new_version(tmp_path, "alpha", 0)
    settings = Settings(models={"alpha": tmp_path / "alpha"}, warmup_rounds=0)
    loaded: list[weakref.ref] = []

    def load(source: ModelSource) -> Engine:
        engine = Engine(settings, source.path, settings.runtime_for(source.name))
        loaded.append(weakref.ref(engine))
        return engine

    slot = ModelSlot(ModelSource("alpha", tmp_path / "alpha"), load, settings, Metrics())
    gc.disable()
    try:
        retired, answered = asyncio.run(asyncio.wait_for(swapped_under_traffic(slot, tmp_path), 300))
        alive = [version for version, references in retired.items() if any(ref() is not None for ref in references)]
        engines_left = [ref() for ref in loaded if ref() is not None]
    finally:
        gc.enable()  # after the count: the next allocation could start a collection
    assert len(retired) == SWAPS and not slot.retiring
    assert alive == []
    assert len(loaded) == SWAPS + 2 and engines_left == [slot.live.engine]
    assert len(answered) > SWAPS // 2, "requests ran on most versions"


def weighted_layers(detector: torch.nn.Module) -> list[torch.nn.Module]:
    """The layers of ``detector`` holding tensors of their own: those that are the version's alone (an activation
    such as ultralytics' ``Conv.default_act`` is one object shared by every model in the process)."""
    return [
        layer
        for layer in detector.modules()
        if any(True for _ in layer.parameters(recurse=False)) or any(True for _ in layer.buffers(recurse=False))
    ]


async def detect(slot: ModelSlot, image: torch.Tensor, answered: Counter[str]) -> None:
    """One image through ``slot`` as a request sends it: the live version leased for the whole way."""
    with slot.lease() as served:
        await served.batcher.submit(image, time.monotonic() + 30)
        answered[served.version] += 1


async def swapped_under_traffic(slot: ModelSlot, models: Path) -> tuple[dict[str, list[weakref.ref]], Counter[str]]:
    """Start ``slot``, swap it :data:`SWAPS` times while images are detected, reload it once with nothing new, stop
    it (its retired versions stop first). Returns weak references to each retired version's objects by version, and
    the images answered by version."""
    await slot.start(None)
    image = torch.full((3, 384, 384), 114, dtype=torch.uint8)
    answered: Counter[str] = Counter()
    stop = asyncio.Event()

    async def traffic() -> None:
        while not stop.is_set():
            await detect(slot, image, answered)
            await asyncio.sleep(0.01)

    sender = asyncio.create_task(traffic())
    retired: dict[str, list[weakref.ref]] = {}
    try:
        for number in range(1, SWAPS + 1):
            live = slot.live
            retired[live.version] = [weakref.ref(obj) for obj in (live, live.engine, live.batcher)]
            retired[live.version] += [weakref.ref(layer) for layer in weighted_layers(live.engine.detector)]
            del live
            new_version(models, "alpha", number)
            await slot.reload()
            await asyncio.sleep(0.05)  # a request or two on the new version
        assert await slot.reload() is slot.live  # nothing new at the path: loaded, compared, dropped
    finally:
        stop.set()
        await sender
        await slot.stop()
    return retired, answered


def settled_rss(pid: int, seconds: float = 0.5) -> int:
    """The least resident memory of ``pid`` sampled over ``seconds``: what a request in flight briefly adds is left
    out."""
    samples = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        samples.append(rss_bytes(pid))
        time.sleep(0.05)
    return min(samples)


@pytest.mark.e2e
@pytest.mark.slow
def test_thirty_swaps_under_light_traffic_leave_the_servers_memory_flat(tmp_path):
    """A real server serving the bundled model twice (alpha and beta, ``--models`` as ``DETECTOR_MODELS`` sets it),
    with its default warm-up (the batch policy measured at each swap), swaps alpha 30 times through
    ``POST /v2/repository/models/alpha/load`` while both models are asked for detections. Every request is answered
    200 and RSS after the 30th swap is within 100 MiB of RSS after the 5th."""
    for name in ("alpha", "beta"):
        new_version(tmp_path, name, 0)
    models = json.dumps({name: str(tmp_path / name) for name in ("alpha", "beta")})
    image = encode(render(12, 320)[0])
    statuses: Counter[int | str] = Counter()
    stop = threading.Event()
    rss_after: dict[int, int] = {}
    # The defaults but a batch of at most 4: the warm-up at each swap then takes ~2 s rather than ~6 s on 2 cores.
    flags = ("--models", models, "--warmup-rounds", "1", "--max-batch-size", "4")
    with running_server(tmp_path, *flags) as server:

        def traffic() -> None:
            with httpx.Client(base_url=server.url, timeout=60) as client:
                while not stop.wait(TRAFFIC_INTERVAL_S):
                    name = "beta" if sum(statuses.values()) % 2 else "alpha"
                    try:
                        answer = client.post("/detect", params={"model": name}, files={"file": ("a.png", image)})
                        statuses[answer.status_code] += 1
                    except httpx.HTTPError as error:
                        statuses[type(error).__name__] += 1

        sender = threading.Thread(target=traffic, name="traffic")
        sender.start()
        try:
            for number in range(1, SWAPS + 1):
                version = new_version(tmp_path, "alpha", number)
                answer = httpx.post(server.url + "/v2/repository/models/alpha/load", timeout=120)
                assert answer.status_code == 200 and answer.json()["model_version"] == version, answer.text
                deadline = time.monotonic() + STOPPED_TIMEOUT_S
                while server.log().count('"model version stopped"') < number:
                    assert time.monotonic() < deadline, f"alpha-{number - 1} did not stop"
                    time.sleep(0.1)
                rss_after[number] = settled_rss(server.process.pid)
        finally:
            stop.set()
            sender.join(60)
    growth = rss_after[SWAPS] - rss_after[SETTLED_AFTER]
    assert set(statuses) == {200}, statuses
    series = ", ".join(f"{number}: {rss / 2**20:.0f}" for number, rss in rss_after.items())
    assert growth <= RSS_TOLERANCE_BYTES, f"+{growth / 2**20:.0f} MiB; RSS (MiB) after each swap: {series}"
