"""The model on its device: loaded once, fused, warmed up; runs one batch; turns raw rows into detections.

Knows nothing of HTTP or queues. :class:`EngineProtocol` is the contract the rest of the service holds an engine to
(tests run the HTTP layer against a fake that honours it); :class:`Engine` is the real one. Rows are
:class:`model.Detector`'s: images (B, 3, H, W) in [0, 1], H and W multiples of 32 (one shape per batch) ->
(B, K, 6) rows ``[x1, y1, x2, y2, score, class]`` in input pixels, from the one-to-one head, sorted by score, no
NMS.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from model import Detector, akconv_layers, fuse_for_inference, load, sharing_weights
from model.checkpoint import ModelMetadata
from model.compiled import DEFAULT_CACHE_DIR, CompiledDetector, compiled_detector
from model.letterbox import Shape, common_shapes
from service.core.batch_policy import Timings, measure
from service.core.images import Letterbox, unletterbox_boxes
from service.process.settings import Runtime, Settings
from service.schemas import Detection

log = logging.getLogger(__name__)


class EngineProtocol(Protocol):
    """What the service needs of a model engine.

    ``infer`` runs in the batcher's worker threads (:attr:`workers` of them); everything else is called from the
    event loop.
    """

    @property
    def name(self) -> str: ...

    @property
    def version(self) -> str: ...

    @property
    def metadata(self) -> ModelMetadata: ...

    @property
    def checksum(self) -> str:
        """The model file's checksum status: ``verified``, ``not recorded`` or ``not applicable``."""

    @property
    def names(self) -> list[str]:
        """Class names, indexed by class id."""

    @property
    def input_size(self) -> int:
        """Side S of the square an image is fitted into, pixels (its input is at most S × S)."""

    @property
    def device(self) -> str:
        """Where inference runs: ``cpu``, ``cuda:0``."""

    @property
    def dtype(self) -> str:
        """``float32`` or ``float16``."""

    @property
    def akconv_layers(self) -> int: ...

    @property
    def workers(self) -> int:
        """Batches the engine runs at once, each from its own thread (``infer`` is safe to call concurrently)."""

    @property
    def runtime(self) -> dict[str, Any]:
        """How the model runs: ``requested`` (the ``runtime`` setting for it), per input shape what runs it
        (``shapes``: ``loaded``, ``built`` or ``eager: <why>``), and for int8 the accuracy gate's records
        (``accuracy``, by shape; None otherwise)."""

    @property
    def parameters(self) -> int: ...

    def verify(self, shape: Shape) -> None:
        """One forward of a grey image of ``shape`` (height, width); raises :class:`ModelCheckFailed` unless it
        answers finite rows (1, K, 6). Run on every load, before the model serves."""

    def warm_up(self, shapes: list[Shape], max_batch_size: int, rounds: int) -> Timings:
        """Before traffic: time the forward of each input shape (height, width) at batch sizes up to
        ``max_batch_size`` (:func:`service.core.batch_policy.measure`). Returns its timings; nothing is run when
        ``rounds`` is 0."""

    def infer(self, images: list[torch.Tensor]) -> torch.Tensor:
        """Args: images, each uint8 (3, H, W), all of one shape. Returns: float32 CPU tensor (B, K, 6), rows as in
        the module docstring."""

    def detections(
        self, rows: torch.Tensor, geometry: Letterbox, conf: float, classes: set[int] | None, max_det: int
    ) -> list[Detection]:
        """Rows (K, 6) of one image -> detections in its original pixels, filtered and capped."""

    def gpu_memory(self) -> dict[str, int]:
        """Device memory in bytes by kind (empty on CPU)."""


class ModelCheckFailed(Exception):
    """A loaded model's first forward did not answer what the service relies on."""


def check_rows(rows: torch.Tensor, batch_size: int) -> None:
    """Raise :class:`ModelCheckFailed` unless ``rows`` are finite, shaped (batch_size, K, 6)."""
    if rows.ndim != 3 or rows.shape[0] != batch_size or rows.shape[2] != 6:
        raise ModelCheckFailed(f"the model answered rows of shape {tuple(rows.shape)}, not ({batch_size}, K, 6)")
    if not torch.isfinite(rows).all():
        raise ModelCheckFailed("the model answered rows that are not finite (NaN or infinity)")


def grey_images(shape: Shape, batch_size: int) -> list[torch.Tensor]:
    """``batch_size`` letterbox-grey uint8 images (3, H, W) of ``shape``: what warm-up and checks run."""
    return [torch.full((3, *shape), 114, dtype=torch.uint8)] * batch_size


def detections_from_rows(
    rows: torch.Tensor,
    names: list[str],
    geometry: Letterbox,
    conf: float,
    classes: set[int] | None,
    max_det: int,
) -> list[Detection]:
    """Rows (K, 6) of one image, sorted by score -> detections in its original pixels, filtered and capped."""
    rows_np = rows.numpy()
    keep = rows_np[:, 4] >= conf
    if classes is not None:
        keep &= np.isin(rows_np[:, 5].astype(int), list(classes))
    rows_np = rows_np[keep][:max_det]
    boxes = unletterbox_boxes(rows_np[:, :4].astype(np.float64), geometry)
    return [
        Detection(int(c), names[int(c)], round(float(s), 4), tuple(round(float(v), 1) for v in box))
        for box, s, c in zip(boxes, rows_np[:, 4], rows_np[:, 5], strict=True)
    ]


def compiled(
    detector: Detector, shapes: list[Shape], settings: Settings, runtime: Runtime, threads: int, workers: int
) -> tuple[CompiledDetector, dict[str, Any]]:
    """``detector`` with the ``runtime``'s artefacts of ``shapes`` from ``settings.compiled_dir`` in front of it
    (``model/compiled.py``), ready for ``workers`` callers at once on ``threads`` in all, and the
    :attr:`EngineProtocol.runtime` description; a shape without a usable artefact runs eager, with a warning saying
    why."""
    prepared = compiled_detector(
        detector,
        shapes,
        settings.max_batch_size,
        settings.compiled_dir or DEFAULT_CACHE_DIR,
        runtime=runtime,
        threads=threads,
        parallel=workers,
    )
    status = {f"{height}x{width}": state for (height, width), state in prepared.status.items()}
    log.info("compiled model", extra={"runtime": runtime, "shapes": status, "seconds": round(prepared.seconds, 1)})
    return prepared.detector, {"requested": runtime, "shapes": status, "accuracy": prepared.accuracy}


class ForwardThreads:
    """The model's CPU threads shared among the forwards running at once, in every engine of the process.

    A forward that runs alone gets all the threads: a lone request's latency. While others run, each forward that
    starts gets its share (at least one), and they run side by side. On a CPU, two threads do not run one forward
    twice as fast as one does, so two forwards on one thread each serve more images than one forward at a time on
    both: on the 2-core VM, 1.12–1.28× at concurrency 16 (bench/README.md, "Forwards side by side"). Torch's thread
    count is per thread (OpenMP's), so each worker thread sets its own before its forward.
    """

    def __init__(self) -> None:
        # Torch's threads as the process started with them, read where this is made (at import, on the main
        # thread): a thread started later takes the count some other thread set last, a worker's share perhaps.
        self.process_threads = torch.get_num_threads()
        self._running = 0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def share(self, threads: int) -> Iterator[int]:
        """Run a forward of a model given ``threads`` in all: sets the calling thread's torch threads to its share
        (``threads`` over the forwards running, this one included) and yields it."""
        with self.alongside(1):
            share = max(1, threads // self._running)
            if torch.get_num_threads() != share:
                torch.set_num_threads(share)
            yield share

    @contextlib.contextmanager
    def alongside(self, forwards: int) -> Iterator[None]:
        """Count ``forwards`` more as running while inside: forwards started meanwhile get the share they would get
        beside them (warm-up times batches as they run under load)."""
        with self._lock:
            self._running += forwards
        try:
            yield
        finally:
            with self._lock:
                self._running -= forwards


FORWARD_THREADS = ForwardThreads()
# On a CPU, two forwards side by side by default: measured on 2 cores (bench/README.md, "Forwards side by side").
# On a GPU one at a time: its batches are large, and two would only contend for one device.
DEFAULT_CPU_WORKERS = 2


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name} was asked for but CUDA is not available; use --device cpu or auto")
    return device


class Engine:
    """The :class:`EngineProtocol` of a model file: ``model.load``, fused, on the device (channels-last, fp16 on
    CUDA)."""

    def __init__(self, settings: Settings, path: Path | None, runtime: Runtime) -> None:
        """The model at ``path`` (None: the bundled model) as ``settings`` say to run it, on ``runtime`` (the
        setting's value for this model: :meth:`Settings.runtime_for`).

        Raises: ``model.checkpoint.CheckpointError`` (one of its kinds) when the model file cannot be used.
        """
        if settings.intra_op_threads:
            torch.set_num_threads(settings.intra_op_threads)
        # The model's threads in all, shared by its forwards at once. Not the calling thread's count: a swap loads
        # in a worker thread, whose count may be a running forward's share.
        self.threads = settings.intra_op_threads or FORWARD_THREADS.process_threads
        self._threads_local = threading.local()
        loaded = load(path)
        self.metadata = loaded.metadata
        self.checksum = loaded.checksum  # "verified", "not recorded" (format 1 bundle) or "not applicable" (.pt)
        self.names = list(loaded.metadata.names)
        self.torch_device = resolve_device(settings.device)
        half = settings.half if settings.half is not None else self.torch_device.type == "cuda"
        self.torch_dtype = torch.float16 if half else torch.float32
        self.workers = settings.inference_workers or (
            1 if self.torch_device.type == "cuda" else min(DEFAULT_CPU_WORKERS, self.threads)
        )
        self.input_size = settings.input_size or loaded.metadata.input_size
        self.akconv_layers = len(akconv_layers(loaded.model))
        self.parameters = sum(p.numel() for p in loaded.model.parameters())
        self.detector: Detector | CompiledDetector = fuse_for_inference(loaded.model).to(
            self.torch_device, self.torch_dtype
        )
        self.detector = self.detector.to(memory_format=torch.channels_last)
        shapes = common_shapes(self.input_size)
        self.runtime: dict[str, Any] = {
            "requested": runtime,
            "shapes": {f"{height}x{width}": "eager" for height, width in shapes},
            "accuracy": None,
        }
        if runtime != "eager":
            self.detector, self.runtime = compiled(self.detector, shapes, settings, runtime, self.threads, self.workers)

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def version(self) -> str:
        return self.metadata.version

    @property
    def device(self) -> str:
        return str(self.torch_device)

    @property
    def dtype(self) -> str:
        return str(self.torch_dtype).removeprefix("torch.")

    def verify(self, shape: Shape) -> None:
        check_rows(self.infer(grey_images(shape, 1)), 1)

    def warm_up(self, shapes: list[Shape], max_batch_size: int, rounds: int) -> Timings:
        """Time grey images of each shape at each batch size, which also readies kernels and allocator pools.

        Each forward runs on the threads it gets under load, beside the other workers' forwards: batches form only
        when requests queue, and then every worker is busy, so that is the cost the policy should weigh. (On the
        2-core VM this did not change the mean batch measurably: bench/README.md, "Forwards side by side".)"""

        def forward(shape: Shape, batch_size: int) -> None:
            self.infer(grey_images(shape, batch_size))

        with FORWARD_THREADS.alongside(self.workers - 1):
            return measure(forward, shapes, max_batch_size, rounds)

    @torch.inference_mode()
    def infer(self, images: list[torch.Tensor]) -> torch.Tensor:
        """Args: images, each uint8 (3, H, W), all of one shape. Returns: float32 CPU tensor (B, K, 6), see the
        module docstring."""
        batch = torch.stack(images)  # (B, 3, H, W) uint8
        if self.torch_device.type == "cuda":
            batch = batch.pin_memory().to(self.torch_device, non_blocking=True)
        with FORWARD_THREADS.share(self.threads):
            batch = batch.to(self.torch_dtype).div_(255).contiguous(memory_format=torch.channels_last)
            return self._thread_detector()(batch).float().cpu()

    def _thread_detector(self) -> Detector | CompiledDetector:
        """The calling thread's copy of :attr:`detector`, made at its first forward: the same weights, its own
        modules (:func:`model.sharing_weights` says why)."""
        detector = getattr(self._threads_local, "detector", None)
        if detector is None:
            eager = self.detector.eager if isinstance(self.detector, CompiledDetector) else self.detector
            detector = self._threads_local.detector = sharing_weights(self.detector, eager)
        return detector

    def detections(
        self, rows: torch.Tensor, geometry: Letterbox, conf: float, classes: set[int] | None, max_det: int
    ) -> list[Detection]:
        return detections_from_rows(rows, self.names, geometry, conf, classes, max_det)

    def gpu_memory(self) -> dict[str, int]:
        """CUDA memory in bytes by kind (empty on CPU)."""
        if self.torch_device.type != "cuda":
            return {}
        return {
            "allocated": torch.cuda.memory_allocated(self.torch_device),
            "reserved": torch.cuda.memory_reserved(self.torch_device),
        }
