"""An AOTInductor-compiled forward of a :class:`~model.build.Detector`, built once, loaded in a fraction of a second.

Measured against eager, ``torch.compile`` and OpenVINO in ``bench/compiled.py`` (see "Compiled model" in
bench/README.md): on 2 CPU cores, 21–26% less time per batch for the bundled model at 384 and 1–10% for the seed
recipe's model at 640, rows within 3.1e-5 of eager; compiling takes minutes, so it is done once, ahead of serving
(:func:`build`, ``python -m model compile``), never at start.

One package per input shape (H, W), with a dynamic batch dimension 1..``max_batch``: AKConv's inference gather
(``embedding_bag``) computes its bag offsets from the input size, which ``torch.export`` cannot keep symbolic, so
H × W are static. Packages live in a cache directory, named by a key of everything that changes them
(:func:`artefact_key`: the fused weights' sha256, the shape, the batch bound, torch's version and the CPU vector
ISA the code is built for). :func:`compiled_detector` puts the loaded ones in front of the eager detector: a shape
or batch size with no package, a package that fails to load or whose rows differ from eager's on a probe batch,
all run eager, with a log line saying why.

A package is native code (a shared library) and is loaded as such: the cache directory must be as trusted as the
Python installation (written by whoever deploys the service, never by a request or a model file).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from model.build import Detector

log = logging.getLogger(__name__)

Shape = tuple[int, int]  # (height, width) of the model input, pixels
Runner = Callable[[torch.Tensor], torch.Tensor]  # images float32 (B, 3, H, W) in [0, 1] -> rows (B, K, 6)

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "akconv-detector" / "compiled"
PROBE_TOLERANCE = 1e-3  # max |Δ| of the probe's rows, compiled vs eager, for a package to be used
PROBE_TOP_ROWS = 20


def weights_sha256(detector: Detector) -> str:
    """sha256 of the fused detector's tensors, names and dtypes: what the compiled graph bakes in as constants."""
    digest = hashlib.sha256()
    for name, tensor in detector.state_dict().items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    for layer in detector.modules():
        if hasattr(layer, "indexing"):  # AKConv's sampling geometry is code, not a tensor
            digest.update(str(layer.indexing).encode())
    return digest.hexdigest()


def aoti_compiler() -> str:
    """What an AOTInductor package depends on besides the model: torch's version and the CPU's vector ISA, as ATen
    detects it (inductor's own probe compiles a test program: 6 s at every start). A package built for AVX-512 and
    loaded on a CPU without it would die of an illegal instruction, so a cache moved to such a CPU misses instead."""
    return f"aoti torch {torch.__version__} isa {torch.backends.cpu.get_cpu_capability()}"


def artefact_key(weights: str, shape: Shape, max_batch: int, compiler: str) -> str:
    """File stem of an artefact: what it is, readable, then a hash of everything that changes it.

    ``compiler`` names the compiler and its versions (:func:`aoti_compiler`); its first word starts the stem.
    """
    parts = [weights, compiler, f"{shape[0]}x{shape[1]}", str(max_batch)]
    digest = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
    return f"{compiler.split()[0]}-{shape[0]}x{shape[1]}-b{max_batch}-{digest}"


def package_path(detector: Detector, shape: Shape, max_batch: int, cache_dir: Path) -> Path:
    """Where :func:`build` writes (and :func:`compiled_detector` looks for) this detector's package."""
    return cache_dir / f"{artefact_key(weights_sha256(detector), shape, max_batch, aoti_compiler())}.pt2"


@contextlib.contextmanager
def _head_recomputes_anchors(detector: Detector) -> Iterator[None]:
    """While exporting, the head builds its anchors in the graph (else it compares the batch size with a cached one).

    The head caches its anchors, strides and input shape as plain attributes; tracing would leave traced values
    there for the eager detector's next call, so they are put back afterwards.
    """
    head = detector.model.model[-1]
    saved = {name: getattr(head, name, None) for name in ("dynamic", "anchors", "strides", "shape")}
    head.dynamic = True
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(head, name, value)


def export(detector: Detector, shape: Shape, max_batch: int) -> torch.export.ExportedProgram:
    """``torch.export`` of ``detector`` (float32, CPU, eval) at input ``shape``, batch dynamic in 1..``max_batch``."""
    example = torch.rand(min(2, max_batch), 3, *shape).contiguous(memory_format=torch.channels_last)
    batch = torch.export.Dim("batch", min=1, max=max(max_batch, 2))
    with _head_recomputes_anchors(detector), torch.inference_mode(), warnings.catch_warnings():
        # The head's cached anchors are plain attributes, put back by _head_recomputes_anchors.
        warnings.filterwarnings("ignore", message="The tensor attributes .* were assigned during export")
        return torch.export.export(detector, (example,), dynamic_shapes={"images": {0: batch}})


def build(detector: Detector, shape: Shape, max_batch: int, cache_dir: Path) -> Path:
    """Export and compile ``detector`` for one input shape into ``cache_dir``; returns the package's path.

    Written in a temporary directory beside it and moved into place, so a crash never leaves half a package under
    its final name. Takes minutes on a CPU (it runs a C++ compiler): at build time, not at start.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = package_path(detector, shape, max_batch, cache_dir)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=f".{path.stem}-") as scratch:
        staged = Path(scratch) / path.name
        torch._inductor.aoti_compile_and_package(export(detector, shape, max_batch), package_path=str(staged))
        os.replace(staged, path)
    return path


def load_runner(path: Path) -> Runner:
    """Load a package written by :func:`build` (a fraction of a second)."""
    package = torch._inductor.aoti_load_package(str(path))

    def run(images: torch.Tensor) -> torch.Tensor:
        return package(images.contiguous(memory_format=torch.channels_last))

    return run


def top_rows_difference(
    rows: np.ndarray, reference: np.ndarray, top: int = PROBE_TOP_ROWS, tie: float = PROBE_TOLERANCE
) -> float:
    """Max |Δ| between two outputs (B, K, 6): of their sorted scores, and of the reference's ``top`` rows of each
    image vs their nearest rows in ``rows``.

    Rows come sorted by score, so near-equal scores may swap places between runtimes; matching each reference row
    to its nearest row makes the comparison blind to that order. Only rows scored above the reference's K-th score
    by more than ``tie`` are matched: which of several rows tied at the cut-off make the K kept is arbitrary (a model
    with random weights scores every anchor alike), and those rows are compared by their scores only.
    """
    difference = float(np.abs(np.sort(rows[..., 4], axis=-1) - np.sort(reference[..., 4], axis=-1)).max())
    for image_rows, image_reference in zip(rows, reference, strict=True):
        kept = image_reference[image_reference[:, 4] > image_reference[:, 4].min() + tie][:top]  # (≤ top, 6)
        if len(kept):
            distance = np.abs(kept[:, None, :] - image_rows[None, :, :]).max(axis=-1)  # (≤ top, K)
            difference = max(difference, float(distance.min(axis=1).max()))
    return difference


def probe(runner: Runner, eager: Detector, shape: Shape) -> float:
    """:func:`top_rows_difference` of ``runner`` vs ``eager`` on a fixed random batch of 2 at ``shape``."""
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, *shape, generator=generator).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        return top_rows_difference(runner(images).numpy(), eager(images).numpy())


class CompiledDetector:
    """The eager detector with compiled runners in front of it, by input shape.

    Called like :class:`~model.build.Detector` (images float32 (B, 3, H, W) in [0, 1] -> rows (B, K, 6)); a
    batch whose shape has no runner, or larger than ``max_batch``, runs eager. One caller at a time (the engine's
    worker thread).
    """

    def __init__(self, eager: Detector, runners: dict[Shape, Runner], max_batch: int) -> None:
        self.eager = eager
        self.runners = runners
        self.max_batch = max_batch

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        runner = self.runners.get(tuple(images.shape[2:]))
        if runner is None or images.shape[0] > self.max_batch:
            return self.eager(images)
        return runner(images)


@dataclass
class Prepared:
    """What :func:`compiled_detector` did for each shape: ``loaded``, ``built``, or why it runs eager; and how long
    it took."""

    detector: CompiledDetector
    status: dict[Shape, str]
    seconds: float


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def compiled_detector(
    eager: Detector, shapes: Sequence[Shape], max_batch: int, cache_dir: Path, *, build_missing: bool = False
) -> Prepared:
    """Load (with ``build_missing``, first build) the package of each shape and probe it against ``eager``.

    Never raises for the compiler's sake: a detector that is not float32 on the CPU, a package that is missing,
    fails to build or load, or whose probe rows differ from eager's by more than :data:`PROBE_TOLERANCE`, leaves
    that shape to eager, with a warning naming the shape and the reason.
    """
    started = time.perf_counter()
    runners: dict[Shape, Runner] = {}
    status: dict[Shape, str] = {}
    parameter = next(eager.parameters())
    if parameter.device.type != "cpu" or parameter.dtype != torch.float32:
        log.warning(
            "compiled model: packages are built for float32 on the CPU, not %s on %s; running eager",
            parameter.dtype,
            parameter.device,
        )
        return Prepared(CompiledDetector(eager, {}, max_batch), dict.fromkeys(shapes, "eager: not cpu float32"), 0.0)
    for shape in shapes:
        name = f"{shape[0]}x{shape[1]}"
        try:
            path = package_path(eager, shape, max_batch, cache_dir)
            state = "loaded"
            if not path.exists():
                if not build_missing:
                    status[shape] = "eager: no package"
                    log.warning(
                        "compiled model: no package for %s (batch <= %d) in %s; that shape runs eager (build it: "
                        "python -m model compile MODEL --size SIZE --shapes %s --max-batch %d --cache-dir %s)",
                        name,
                        max_batch,
                        cache_dir,
                        name,
                        max_batch,
                        cache_dir,
                    )
                    continue
                build(eager, shape, max_batch, cache_dir)
                state = "built"
            runner = load_runner(path)
            difference = probe(runner, eager, shape)
        except Exception as error:  # a compiler fails in many ways; the shape runs eager, and the log says why
            status[shape] = f"eager: {type(error).__name__}"
            log.warning("compiled model: %s failed (%s); that shape runs eager", name, _first_line(error))
            continue
        if not difference <= PROBE_TOLERANCE:
            status[shape] = f"eager: probe differs by {difference:.1e}"
            log.warning(
                "compiled model: %s differs from eager by %.1e (> %.0e); that shape runs eager",
                name,
                difference,
                PROBE_TOLERANCE,
            )
            continue
        runners[shape] = runner
        status[shape] = state
    return Prepared(CompiledDetector(eager, runners, max_batch), status, time.perf_counter() - started)
