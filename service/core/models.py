"""The served models: each configured name's live version (engine, batch policy, batcher), leased to requests and
swapped for a new version without downtime.

A request leases the live version of its model (:meth:`ModelSlot.lease`) for its whole way: decoded at that
version's input size, queued on its batcher, its rows turned into detections by its engine. So it is answered by one
version, and says which, even when a swap happens meanwhile.

A swap (:meth:`ModelSlot.reload`: ``SIGHUP``, or ``POST /v2/repository/models/{name}/load``) reads the model's
configured file again in a worker thread while the live version serves, verifies it (a bundle's weights checksum at
load; one forward that must answer finite rows), warms it up and measures its batch policy, and then makes it live
in one assignment on the event loop. Requests that arrive after that lease the new version; the old one finishes
what it holds (its batcher drains once its last lease is returned), is dropped, and what it held goes back to the
operating system (:func:`release_memory`), so that swaps leave the process's memory flat. A failed load leaves the
live version serving and says why. Readiness never depends on a swap.

Each version has its own batcher and inference threads (the engine's ``workers``); versions and models share the
process's torch threads (:class:`service.core.engine.ForwardThreads`) and its admission budgets (docs/RELIABILITY.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from model.letterbox import common_shapes
from service.core.batch_policy import BatchPolicy
from service.core.batcher import BatchObserver, DynamicBatcher
from service.core.engine import EngineProtocol
from service.core.errors import ModelLoadFailed, ModelNotServed, shown
from service.process.metrics import Metrics
from service.process.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSource:
    """A model the settings name: its served name (None: the model's own name, with the single-model settings) and
    its file (None: the bundled model)."""

    name: str | None
    path: Path | None


def model_sources(settings: Settings) -> list[ModelSource]:
    """The models ``settings`` serve, the default first: ``models``, or the one ``model_path``."""
    if settings.models:
        return [ModelSource(name, path) for name, path in settings.models.items()]
    return [ModelSource(None, settings.model_path)]


EngineLoader = Callable[[ModelSource], EngineProtocol]  # runs in a worker thread; raises CheckpointError


# glibc's malloc_trim(pad): hands the free pages of every malloc arena back to the OS. None where the C library has
# none (musl, macOS): there freed memory stays with the process, as it would without this.
_MALLOC_TRIM: Callable[[int], int] | None = getattr(ctypes.CDLL(None), "malloc_trim", None)


def trim_allocator() -> None:
    """Give the free pages of the allocator's arenas back to the operating system (``malloc_trim(0)``); blocking,
    without the GIL (a worker thread). glibc keeps freed memory in its arenas (one per thread that allocated: the
    loader, the warm-up, each version's inference threads), which loading, checking and warming up a model leave
    fragmented: the bundled model served twice was 1,195 MiB resident once ready, 892 MiB with this at the end of
    the start."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def release_memory() -> None:
    """Free what retired versions left behind, then :func:`trim_allocator`.

    Called once a retired version has stopped and been dropped (or a version loaded again has turned out unchanged),
    in a worker thread: ~0.2 s on 2 CPU cores, most of it the collection, which holds the GIL. Without it, serving
    the bundled model twice and swapping one of them under light traffic, the resident memory was 1,692 MiB after the
    5th swap and 2,055 MiB after the 30th, and went on growing (``tests/service/core/test_swap_memory.py``); with it,
    954 and 991 MiB. ``MALLOC_ARENA_MAX=2`` instead levelled off near 1,700 MiB.

    The collection is needed because ultralytics' ``fuse()`` stores each fused layer's ``forward`` as a bound method
    of the layer (and a stopped batcher's cancelled task holds its frames): these reference cycles free a version's
    layers and weights only in a full collection, which CPython runs rarely in a process of ~400,000 long-lived
    objects (torch's), so retired versions piled up.
    """
    gc.collect()
    trim_allocator()


@dataclass
class BatchOutput:
    """What the batcher hands back for one image: its rows and the batch it ran in."""

    rows: torch.Tensor  # (K, 6), see service.core.engine
    batch_size: int
    inference_seconds: float


def batch_runner(engine: EngineProtocol) -> Callable[[list[torch.Tensor]], list[BatchOutput]]:
    """The batcher's ``run_batch``: one engine call for the batch, its rows split per image."""

    def run_batch(images: list[torch.Tensor]) -> list[BatchOutput]:
        started = time.monotonic()
        rows = engine.infer(images)  # (B, K, 6)
        seconds = time.monotonic() - started
        return [BatchOutput(rows[i], len(images), seconds) for i in range(len(images))]

    return run_batch


@dataclass(eq=False)
class ServedVersion:
    """One loaded version of a served model, with the batcher that runs it."""

    name: str  # the served name
    engine: EngineProtocol
    policy: BatchPolicy
    batcher: DynamicBatcher[torch.Tensor, BatchOutput]
    leases: int = 0  # requests holding it
    retired: bool = False  # a newer version is live: no new leases

    @property
    def version(self) -> str:
        return self.engine.version


@dataclass
class ModelSlot:
    """One served name: its configured file, its live version and the versions still finishing their requests."""

    source: ModelSource
    loader: EngineLoader
    settings: Settings
    metrics: Metrics
    name: str = ""  # known once the first version is loaded (the model's own, for an unnamed source)
    live: ServedVersion | None = None
    retiring: set[ServedVersion] = field(default_factory=set)
    _swapping: asyncio.Lock = field(default_factory=asyncio.Lock)
    _closing: set[asyncio.Task] = field(default_factory=set)

    async def start(self, engine: EngineProtocol | None) -> None:
        """Serve ``engine`` (already loaded), or the configured file loaded now. Raises what loading raises."""
        if engine is None:
            engine = await asyncio.to_thread(self.loader, self.source)
        self.name = self.source.name or engine.name
        self.live = await self._start_version(engine)
        self._publish(self.live)
        self.metrics.model_loads.labels(self.name, "loaded").inc()

    @contextmanager
    def lease(self) -> Iterator[ServedVersion]:
        """The live version, held until the block ends: it is not stopped before then, even if swapped out."""
        version = self.live
        assert version is not None, "leased before start"
        version.leases += 1
        try:
            yield version
        finally:
            version.leases -= 1
            if version.retired and not version.leases:
                self._close_later(version)

    async def reload(self) -> ServedVersion:
        """Load the configured file again and make it live, unless it is the version already live.

        Returns the live version afterwards. Raises :class:`ModelLoadFailed` (the live version keeps serving).
        """
        async with self._swapping:
            old = self.live
            assert old is not None, "reloaded before start"
            try:
                engine = await asyncio.to_thread(self.loader, self.source)
                if engine.version == old.version and engine.metadata.sha256() == old.engine.metadata.sha256():
                    log.info("model unchanged", extra={"model": self.name, "version": old.version})
                    self.metrics.model_loads.labels(self.name, "unchanged").inc()
                    del engine  # loaded only to be compared (a SIGHUP reloads every model): freed as a retired one
                    await asyncio.to_thread(release_memory)
                    return old
                version = await self._start_version(engine)
            except Exception as error:  # noqa: BLE001  (whatever went wrong, the live version keeps serving)
                self.metrics.model_loads.labels(self.name, "failed").inc()
                log.warning(
                    f"model {self.name}: the new version could not be loaded; {old.version} keeps serving: {error}",
                    extra={"model": self.name, "version": old.version, "path": str(self.source.path)},
                )
                raise ModelLoadFailed(
                    f"model {self.name!r}: the new version could not be loaded ({error}); "
                    f"version {old.version} keeps serving"
                ) from error
            self.live = version
            self._publish(version)
            self.metrics.model_loads.labels(self.name, "loaded").inc()
            old.retired = True
            self.retiring.add(old)
            if not old.leases:
                self._close_later(old)
            log.info("model swapped", extra={"model": self.name, "from": old.version, "version": version.version})
            return version

    @property
    def depth(self) -> int:
        """Images queued for this model, on every version still running."""
        return sum(version.batcher.depth for version in self._running())

    async def stop(self) -> None:
        """Answer everything queued (draining) and stop every version."""
        await asyncio.gather(*(version.batcher.stop(drain=True) for version in self._running()))
        await asyncio.gather(*self._closing, return_exceptions=True)

    def _running(self) -> list[ServedVersion]:
        """The live version and those still finishing their requests."""
        return [self.live, *self.retiring] if self.live else list(self.retiring)

    async def _start_version(self, engine: EngineProtocol) -> ServedVersion:
        """Check ``engine`` with one forward, measure its batch policy, start its batcher."""
        settings = self.settings
        shapes = common_shapes(engine.input_size)
        await asyncio.to_thread(engine.verify, shapes[0])
        timings = await asyncio.to_thread(engine.warm_up, shapes, settings.max_batch_size, settings.warmup_rounds)
        policy = BatchPolicy(settings.max_batch_size, timings)
        log.info("batch policy", extra={"model": self.name, "batch_policy": policy.describe()})
        batcher: DynamicBatcher[torch.Tensor, BatchOutput] = DynamicBatcher(
            run_batch=batch_runner(engine),
            max_batch_size=settings.max_batch_size,
            max_wait_s=settings.max_batch_wait_ms / 1000,
            max_queue=settings.max_queue,
            observer=self._observer(),
            group_key=lambda image: tuple(image.shape[1:]),  # (3, H, W) -> (H, W): a batch holds one input shape
            batch_sizes=policy.batch_sizes,
            workers=engine.workers,
        )
        batcher.start()
        return ServedVersion(self.name, engine, policy, batcher)

    def _observer(self) -> BatchObserver:
        metrics, name = self.metrics, self.name

        def batch(size: int, seconds: float) -> None:
            metrics.batch_size.labels(name).observe(size)
            metrics.inference_duration.labels(name).observe(seconds)

        return BatchObserver(
            queue_depth=lambda _: metrics.queue_depth.labels(name).set(self.depth),
            queue_wait=metrics.queue_wait.labels(name).observe,
            batch=batch,
        )

    def _publish(self, version: ServedVersion) -> None:
        """The live version in the metrics."""
        engine = version.engine
        self.metrics.queue_capacity.labels(self.name).set(self.settings.max_queue)
        self.metrics.queue_depth.labels(self.name).set(self.depth)
        self.metrics.model_info.labels(self.name).info(
            {"name": engine.name, "version": engine.version, "device": engine.device, "dtype": engine.dtype}
        )

    def _close_later(self, version: ServedVersion) -> None:
        """Stop a retired version once its queue is answered, in the background (:meth:`_close`)."""
        task = asyncio.get_running_loop().create_task(self._close(version))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close(self, version: ServedVersion) -> None:
        """Stop a retired version once its queue is answered, drop it (its engine with it) and release its memory;
        then log ``model version stopped``."""
        await version.batcher.stop(drain=True)
        self.retiring.discard(version)
        stopped = version.version
        del version  # this frame held the last reference: from here on the version is garbage
        await asyncio.to_thread(release_memory)
        log.info("model version stopped", extra={"model": self.name, "version": stopped})


@dataclass
class ModelRegistry:
    """Every served model, the default (the first configured) first."""

    slots: list[ModelSlot]
    _reloads: set[asyncio.Task] = field(default_factory=set)

    @classmethod
    def for_settings(cls, settings: Settings, metrics: Metrics, loader: EngineLoader) -> ModelRegistry:
        return cls([ModelSlot(source, loader, settings, metrics) for source in model_sources(settings)])

    async def start(self, engines: Sequence[EngineProtocol]) -> None:
        """Serve ``engines`` (already loaded, in the order of the slots); the slots without one load theirs. Then
        the memory their load, checks and warm-up freed goes back to the OS (:func:`trim_allocator`; nothing is
        retired yet, so nothing to collect)."""
        for index, slot in enumerate(self.slots):
            await slot.start(engines[index] if index < len(engines) else None)
        await asyncio.to_thread(trim_allocator)

    def get(self, name: str | None) -> ModelSlot:
        """The slot serving ``name`` (None: the default); :class:`ModelNotServed` when none does."""
        if name is None:
            return self.slots[0]
        for slot in self.slots:
            if slot.name == name:
                return slot
        raise ModelNotServed(f"no model named {shown(name)}; this server serves {', '.join(self.names)}")

    @property
    def names(self) -> list[str]:
        return [slot.name for slot in self.slots]

    async def reload_all(self) -> None:
        """Reload every model, one after the other; a model that fails keeps its live version (logged)."""
        for slot in self.slots:
            with contextlib.suppress(ModelLoadFailed):  # logged by reload; the other models still get their turn
                await slot.reload()

    def reload_all_soon(self) -> None:
        """:meth:`reload_all` in the background (``SIGHUP``); called on the event loop."""
        log.info("reloading every model", extra={"models": self.names})
        task = asyncio.get_running_loop().create_task(self.reload_all())
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    async def stop(self) -> None:
        for task in self._reloads:
            task.cancel()  # a version still loading is dropped; the live ones drain
        await asyncio.gather(*self._reloads, return_exceptions=True)
        await asyncio.gather(*(slot.stop() for slot in self.slots))
