"""Compiled forwards of a :class:`~model.build.Detector`, one artefact per input shape, built once ahead of serving.

Four runtimes (:data:`RUNTIMES`), one setting away from each other (:func:`compiled_detector` ``runtime=``):

- ``eager``: the detector itself, nothing compiled;
- ``aotinductor``: an AOTInductor package (:func:`build_aoti`: ``torch.export``, then inductor's C++), loaded in a
  fraction of a second; rows within 3.1e-5 of eager;
- ``openvino``: the same export as an OpenVINO IR (:mod:`model.openvino_ir`), compiled by OpenVINO's CPU plugin at
  load (about a second); rows within 4.6e-5 of eager;
- ``int8``: that IR quantized to int8 by NNCF (:mod:`model.quantize`), served only once its held-out mAP50-95 is
  within a stated drop of eager's (its accuracy gate, recorded beside the artefact).

Measured against each other in ``bench/compiled.py``: on 2 AVX2 cores, bundled model at 384, AOTInductor takes
0.75–0.82 of eager's time, OpenVINO 1.18–1.39, int8 1.03–1.17 (model/README.md, "Compiled runtimes"). Building
takes seconds to minutes a shape, so it is done once, ahead of serving (``python -m model compile``), never at
start.

One artefact per input shape (H, W), with a dynamic batch dimension 1..``max_batch``: AKConv's inference gather
(``embedding_bag``) computes its bag offsets from the input size, which ``torch.export`` cannot keep symbolic, so
H × W are static. Artefacts live in a cache directory, named by a key of everything that changes them
(:func:`artefact_key`: the fused weights' sha256, the shape, the batch bound, and the runtime's compiler string:
torch's version and the CPU vector ISA for AOTInductor; openvino's and torch's versions and the conversion's for
OpenVINO; those and nncf's and the quantization recipe's for int8).
:func:`compiled_detector` puts the loaded ones in front of the eager detector: a shape or batch size with no
artefact, an artefact that fails to load, whose rows differ from eager's on a probe batch, or (int8) whose accuracy
gate did not pass, all run eager, with a log line saying why. Each runtime is one :class:`RuntimeArtefacts` in
:data:`ARTEFACTS`: its compiler string, file suffix, build and load; the path through them is the same for all.

openvino and nncf are optional (``pip install 'akconv-detector[openvino]'``): imported only when those runtimes
are used; without them those shapes run eager, with one log line naming the extra.

An AOTInductor package is native code (a shared library) and is loaded as such, and an IR is compiled into native
code by OpenVINO: the cache directory must be as trusted as the Python installation (written by whoever deploys the
service, never by a request or a model file).
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model import openvino_ir, quantize
from model.build import Detector
from model.openvino_ir import MissingExtra, Runner, Shape
from model.quantize import ArtefactRefused, Calibration, NoCalibrationData

log = logging.getLogger(__name__)

RUNTIMES = ("eager", "aotinductor", "openvino", "int8")
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "akconv-detector" / "compiled"
PROBE_TOLERANCE = 1e-3  # max |Δ| of the probe's rows, compiled vs eager, for an artefact to be used
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

    ``compiler`` names the compiler and its versions (e.g. :func:`aoti_compiler`); its first word starts the stem.
    """
    parts = [weights, compiler, f"{shape[0]}x{shape[1]}", str(max_batch)]
    digest = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
    return f"{compiler.split()[0]}-{shape[0]}x{shape[1]}-b{max_batch}-{digest}"


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


@dataclass(frozen=True)
class BuildInputs:
    """What a build may need besides the detector, its shape and batch bound: the weights' sha256 (the key of other
    artefacts it starts from), OpenVINO's threads and int8's data."""

    weights: str
    threads: int
    calibration: Calibration | None = None


def build_aoti(eager: Detector, shape: Shape, max_batch: int, path: Path, inputs: BuildInputs) -> None:
    """Export and compile ``eager`` for one input shape into the package ``path``.

    Written in a temporary directory beside it and moved into place, so a crash never leaves half a package under
    its final name. Takes minutes on a CPU (it runs a C++ compiler): at build time, not at start.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.stem}-") as scratch:
        staged = Path(scratch) / path.name
        torch._inductor.aoti_compile_and_package(export(eager, shape, max_batch), package_path=str(staged))
        os.replace(staged, path)


def load_aoti(path: Path, threads: int, parallel: int) -> Runner:
    """Load a package written by :func:`build_aoti` (a fraction of a second) for ``parallel`` callers at once; it
    runs on the calling thread's torch threads."""
    from torch._inductor.package import load_package  # torch's compiler: imported only by a runtime that needs it

    package = load_package(str(path), num_runners=parallel)

    def run(images: torch.Tensor) -> torch.Tensor:
        return package(images.contiguous(memory_format=torch.channels_last))

    return run


def build_openvino(eager: Detector, shape: Shape, max_batch: int, path: Path, inputs: BuildInputs) -> None:
    """Convert ``eager`` into the float32 IR ``path`` (:func:`model.openvino_ir.build`)."""
    openvino_ir.build(eager, shape, max_batch, path)


def build_int8(eager: Detector, shape: Shape, max_batch: int, path: Path, inputs: BuildInputs) -> None:
    """Quantize the float32 IR of the same shape (built first into the same directory when missing) and gate it
    (:func:`model.quantize.build_int8`); the artefact is written with its accuracy record, passed or not."""
    fp32_ir = artefact_path(inputs.weights, shape, max_batch, path.parent, "openvino")
    if not openvino_ir.complete(fp32_ir):
        build_openvino(eager, shape, max_batch, fp32_ir, inputs)
    quantize.build_int8(eager, shape, max_batch, fp32_ir, path, threads=inputs.threads, calibration=inputs.calibration)


@dataclass(frozen=True)
class RuntimeArtefacts:
    """How one runtime names, builds and loads its artefacts.

    Args:
        compiler: what its artefacts depend on besides the model (:func:`artefact_key`); raises
            :class:`~model.openvino_ir.MissingExtra` when the runtime's optional packages are not installed.
        suffix: the artefact's file suffix.
        build: writes the artefact of (eager, shape, max_batch) as the given path.
        load_runner: (path, threads, parallel) -> a runner for ``parallel`` callers at once; raises for an artefact
            that cannot or may not serve.
        probe_tolerance: max |Δ| of the probe's top rows vs eager; None: its rows are only checked for the contract
            (shape, finite, scores in [0, 1], known classes), its accuracy being gated at build (int8).
        ready: whether an artefact can serve without a build (default: the file exists).
        record: the accuracy record of an artefact, None when the runtime keeps none.
    """

    compiler: Callable[[], str]
    suffix: str
    build: Callable[[Detector, Shape, int, Path, BuildInputs], None]
    load_runner: Callable[[Path, int, int], Runner]
    probe_tolerance: float | None = PROBE_TOLERANCE
    ready: Callable[[Path], bool] = Path.exists
    record: Callable[[Path], dict[str, Any] | None] = field(default=lambda path: None)


ARTEFACTS: dict[str, RuntimeArtefacts] = {
    "aotinductor": RuntimeArtefacts(aoti_compiler, ".pt2", build_aoti, load_aoti),
    "openvino": RuntimeArtefacts(
        openvino_ir.compiler, ".xml", build_openvino, openvino_ir.load_runner, ready=openvino_ir.complete
    ),
    "int8": RuntimeArtefacts(
        quantize.compiler,
        ".xml",
        build_int8,
        quantize.load_runner,
        probe_tolerance=None,
        ready=quantize.ready,
        record=quantize.read_record,
    ),
}


def artefact_path(weights: str, shape: Shape, max_batch: int, cache_dir: Path, runtime: str) -> Path:
    """Where ``runtime``'s artefact of the detector whose :func:`weights_sha256` is ``weights`` lives in ``cache_dir``.

    Raises:
        MissingExtra: the runtime's optional packages are not installed.
    """
    artefacts = ARTEFACTS[runtime]
    return cache_dir / f"{artefact_key(weights, shape, max_batch, artefacts.compiler())}{artefacts.suffix}"


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


def probe(runner: Runner, eager: Detector, shape: Shape, tolerance: float | None) -> str | None:
    """Why ``runner`` may not stand in for ``eager`` at ``shape``, or None: on a fixed random batch of 2, its rows
    must have eager's shape and be finite, and differ from eager's by at most ``tolerance``
    (:func:`top_rows_difference`). With ``tolerance`` None (int8, whose rows differ from eager's by design and
    whose accuracy is gated at build) they must only keep the contract: scores in [0, 1], known classes."""
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, *shape, generator=generator).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        rows, reference = runner(images).numpy(), eager(images).numpy()
    if rows.shape != reference.shape:
        return f"probe rows {rows.shape} where eager gives {reference.shape}"
    if not np.isfinite(rows).all():
        return "probe rows not finite"
    if tolerance is None:
        classes = eager.model.model[-1].nc
        scores, labels = rows[..., 4], rows[..., 5]
        if not ((scores >= 0) & (scores <= 1)).all() or not np.isin(labels, np.arange(classes)).all():
            return "probe rows break the contract (scores in [0, 1], known classes)"
        return None
    difference = top_rows_difference(rows, reference)
    if not difference <= tolerance:
        return f"probe differs by {difference:.1e}"
    return None


class CompiledDetector:
    """The eager detector with compiled runners in front of it, by input shape.

    Called like :class:`~model.build.Detector` (images float32 (B, 3, H, W) in [0, 1] -> rows (B, K, 6)); a
    batch whose shape has no runner, or larger than ``max_batch``, runs eager. As many callers at once as the runners
    were loaded for (:func:`compiled_detector`'s ``parallel``: the engine's worker threads).
    """

    def __init__(self, eager: Detector, runners: dict[Shape, Runner], max_batch: int) -> None:
        self.eager = eager
        self.runners = runners
        self.max_batch = max_batch

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        shape = tuple(images.shape[2:])
        runner = self.runners.get(shape)
        if runner is None or images.shape[0] > self.max_batch:
            return self.eager(images)
        try:
            return runner(images)
        except Exception as error:  # a compiled runtime failing at run time: this shape runs eager from now on
            self.runners.pop(shape, None)  # another caller may have failed on it at the same time
            log.warning(
                "compiled model: %dx%d failed (%s); that shape runs eager from now on", *shape, _first_line(error)
            )
            return self.eager(images)


@dataclass
class Prepared:
    """What :func:`compiled_detector` did.

    Args:
        detector: the eager detector with the runners that loaded in front of it.
        status: by shape: ``loaded``, ``built``, or ``eager: <why>``.
        seconds: how long it took (builds included).
        accuracy: int8 only, by ``"HxW"``: the accuracy record of each shape's artefact that has one, passed or not
            (:func:`model.quantize.build_int8`: fp32 and int8 mAP50-95, drop, limit, images, calibration, passed);
            None for the other runtimes.
    """

    detector: CompiledDetector
    status: dict[Shape, str]
    seconds: float
    accuracy: dict[str, dict[str, Any]] | None = None


REFUSALS = {  # the status of a refusal whose message is long (the log line has it); ArtefactRefused's is short
    NoCalibrationData: "no calibration or held-out data",
    MissingExtra: f"{openvino_ir.EXTRA} extra not installed",
}


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def compiled_detector(
    eager: Detector,
    shapes: Sequence[Shape],
    max_batch: int,
    cache_dir: Path,
    *,
    runtime: str,
    threads: int,
    parallel: int = 1,
    build_missing: bool = False,
    calibration: Calibration | None = None,
) -> Prepared:
    """Load (with ``build_missing``, first build) ``runtime``'s artefact of each shape and probe it against ``eager``.

    Args:
        eager: the fused detector, float32 on the CPU (anything else runs eager).
        shapes: input shapes (H, W) to serve compiled; batches of other shapes run eager.
        max_batch: the artefacts' batch bound (the service's ``max_batch_size``); larger batches run eager.
        cache_dir: where artefacts are read from (and built into).
        runtime: one of :data:`RUNTIMES`; ``eager`` loads nothing.
        threads: OpenVINO's inference threads (eager and AOTInductor run on torch's, set apart).
        parallel: how many callers may run the detector at once (the engine's worker threads).
        build_missing: build the artefacts that are missing (int8: or have no passed accuracy record).
        calibration: int8's calibration and held-out data and its accuracy limit (default: :class:`Calibration`,
            the synthetic splits, for models of the synthetic classes).

    Never raises for the compiler's sake: a detector that is not float32 on the CPU, a runtime whose optional
    packages are not installed, an artefact that is missing, fails to build or load, whose probe rows differ from
    eager's (:func:`probe`), or (int8) whose accuracy gate did not pass, leaves that shape to eager, with a warning
    naming the shape and the reason (one for all shapes when the packages are missing).

    Raises:
        ValueError: ``runtime`` is not one of :data:`RUNTIMES`.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime {runtime!r} is not one of {', '.join(RUNTIMES)}")
    started = time.perf_counter()
    runners: dict[Shape, Runner] = {}
    status: dict[Shape, str] = {}
    accuracy: dict[str, dict[str, Any]] | None = {} if runtime == "int8" else None

    def prepared() -> Prepared:
        return Prepared(CompiledDetector(eager, runners, max_batch), status, time.perf_counter() - started, accuracy)

    if runtime == "eager":
        status.update(dict.fromkeys(shapes, "eager: runtime eager"))
        return prepared()
    parameter = next(eager.parameters())
    if parameter.device.type != "cpu" or parameter.dtype != torch.float32:
        log.warning(
            "compiled model: artefacts are built for float32 on the CPU, not %s on %s; running eager",
            parameter.dtype,
            parameter.device,
        )
        status.update(dict.fromkeys(shapes, "eager: not cpu float32"))
        return prepared()
    artefacts = ARTEFACTS[runtime]
    try:
        compiler = artefacts.compiler()
    except MissingExtra as error:
        log.warning("compiled model: %s; every shape runs eager", error)
        status.update(dict.fromkeys(shapes, f"eager: {openvino_ir.EXTRA} extra not installed"))
        return prepared()
    weights = weights_sha256(eager)
    for shape in shapes:
        name = f"{shape[0]}x{shape[1]}"
        path = cache_dir / f"{artefact_key(weights, shape, max_batch, compiler)}{artefacts.suffix}"
        try:
            state = "loaded"
            # Only a build asks whether the artefact is ready (int8: hashes its bytes against its record); loading
            # checks the same again, so serving asks once.
            if build_missing and not artefacts.ready(path):
                cache_dir.mkdir(parents=True, exist_ok=True)
                artefacts.build(eager, shape, max_batch, path, BuildInputs(weights, threads, calibration))
                state = "built"
            elif not path.exists():
                status[shape] = "eager: no package"
                log.warning(
                    "compiled model: no %s package for %s (batch <= %d) in %s; that shape runs eager (build it: "
                    "python -m model compile MODEL --runtime %s --size SIZE --shapes %s --max-batch %d "
                    "--cache-dir %s)",
                    runtime,
                    name,
                    max_batch,
                    cache_dir,
                    runtime,
                    name,
                    max_batch,
                    cache_dir,
                )
                continue
            record = artefacts.record(path)
            if accuracy is not None and record is not None:
                accuracy[name] = record
            runner = artefacts.load_runner(path, threads, parallel)
            reason = probe(runner, eager, shape, artefacts.probe_tolerance)
        except (ArtefactRefused, NoCalibrationData, MissingExtra) as refused:  # a reason to say, not a failure
            status[shape] = f"eager: {REFUSALS.get(type(refused)) or refused}"
            log.warning("compiled model: %s %s refused: %s; that shape runs eager (%s)", runtime, name, refused, path)
            continue
        except Exception as error:  # a compiler fails in many ways; the shape runs eager, and the log says why
            status[shape] = f"eager: {type(error).__name__}"
            log.warning("compiled model: %s %s failed (%s); that shape runs eager", runtime, name, _first_line(error))
            continue
        if reason is not None:
            status[shape] = f"eager: {reason}"
            log.warning("compiled model: %s %s %s; that shape runs eager", runtime, name, reason)
            continue
        runners[shape] = runner
        status[shape] = state
    return prepared()
