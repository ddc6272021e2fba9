"""Ahead-of-time compiled forwards of a :class:`~model.build.Detector`: OpenVINO IR or AOTInductor packages.

One artefact per input shape (H, W), with a dynamic batch dimension 1..``max_batch``: both compilers need a static
H × W here (AKConv's inference gather, ``embedding_bag``, computes its bag offsets from the input size, which
``torch.export`` cannot keep symbolic; OpenVINO's CPU plugin runs its ``EmbeddingBagOffsets`` only on static shapes,
so the OpenVINO graph reads the four corners with a ``Gather`` instead, see :func:`_gather_corners`).

Artefacts are built once (:func:`build`; ``python -m model compile``) into a cache directory, named by a key of
everything that changes them (:func:`artefact_key`: the fused weights' sha256, the shape and batch bound, the
backend and its version, torch's version), and loaded in seconds (:func:`load_runner`). :func:`compiled_detector`
puts the loaded ones in front of the eager detector: a shape or batch size with no artefact, an artefact that is
missing, fails to load or disagrees with eager on a probe batch, all run eager, with a log line saying why.

An AOTInductor package is native code (a shared library) and is loaded as such: a cache directory must be as
trusted as the Python installation. An OpenVINO IR is data (graph XML and weights), compiled by OpenVINO at load.
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
from typing import Literal

import numpy as np
import torch

from model.build import Detector

log = logging.getLogger(__name__)

Backend = Literal["openvino", "aoti"]
BACKENDS: tuple[Backend, ...] = ("openvino", "aoti")
Shape = tuple[int, int]  # (height, width) of the model input, pixels
Runner = Callable[[torch.Tensor], torch.Tensor]  # images float32 (B, 3, H, W) in [0, 1] -> rows (B, K, 6)

PROBE_TOLERANCE = 1e-3  # max |Δ| of the probe's top rows, compiled vs eager, for an artefact to be used
PROBE_TOP_ROWS = 20
CORNERS = 4  # reads per AKConv sample (model.akconv.corner_reads)


def backend_version(backend: Backend) -> str:
    """The version of the compiler behind ``backend`` (raises ImportError when it is not installed)."""
    if backend == "openvino":
        import openvino

        return openvino.get_version()
    return torch.__version__


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


def artefact_key(weights: str, backend: Backend, shape: Shape, max_batch: int) -> str:
    """File stem of an artefact: what it is, readable, then a hash of everything that changes it."""
    parts = [weights, backend, backend_version(backend), torch.__version__, f"{shape[0]}x{shape[1]}", str(max_batch)]
    if backend == "aoti":
        from torch._inductor.cpu_vec_isa import pick_vec_isa

        parts.append(str(pick_vec_isa()))  # the package's code is built for this ISA
    digest = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
    return f"{backend}-{shape[0]}x{shape[1]}-b{max_batch}-{digest}"


def artefact_path(cache_dir: Path, key: str, backend: Backend) -> Path:
    return cache_dir / (f"{key}.pt2" if backend == "aoti" else f"{key}.xml")


def artefact_file(detector: Detector, backend: Backend, shape: Shape, max_batch: int, cache_dir: Path) -> Path:
    """Where :func:`build` writes (and :func:`compiled_detector` looks for) this detector's artefact."""
    return artefact_path(cache_dir, artefact_key(weights_sha256(detector), backend, shape, max_batch), backend)


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


def _gather_corners(model: object) -> None:
    """Replace each ``EmbeddingBagOffsets`` of an OpenVINO model by Gather → × weight → sum over each bag of 4.

    OpenVINO's CPU plugin compiles ``EmbeddingBagOffsets`` for static shapes only; AKConv's bags always hold the
    four corner reads of one sample (``model.akconv.corner_reads``), so the bag sum is a reshape and a ReduceSum.
    """
    import openvino.opset13 as ops

    for node in model.get_ordered_ops():
        if not node.get_type_name().startswith("EmbeddingBagOffsets"):
            continue
        inputs = [source.get_source_output() for source in node.inputs()]
        table, index, weight = inputs[0], inputs[1], inputs[-1]  # (P, C), (M·4,), (M·4,)
        channels = table.get_partial_shape()[1].get_length()
        rows = ops.gather(table, index, ops.constant(np.int64(0)))  # (M·4, C)
        rows = ops.multiply(rows, ops.unsqueeze(weight, ops.constant(np.int64(1))))
        rows = ops.reshape(rows, ops.constant(np.array([-1, CORNERS, channels], dtype=np.int64)), False)  # (M, 4, C)
        node.output(0).replace(ops.reduce_sum(rows, ops.constant(np.int64(1)), False).output(0))  # (M, C)
    model.validate_nodes_and_infer_types()


def _write_openvino(program: torch.export.ExportedProgram, shape: Shape, max_batch: int, path: Path) -> None:
    import openvino

    model = openvino.convert_model(program.run_decompositions())
    _gather_corners(model)
    model.reshape({model.inputs[0]: openvino.PartialShape([openvino.Dimension(1, max_batch), 3, *shape])})
    openvino.save_model(model, str(path), compress_to_fp16=False)  # fp16 weights would move the rows by ~1e-2


def build(detector: Detector, backend: Backend, shape: Shape, max_batch: int, cache_dir: Path) -> Path:
    """Export and compile ``detector`` for one input shape into ``cache_dir``; returns the artefact's path.

    Written into a temporary directory beside it and moved into place, so a crash never leaves half an artefact
    under its final name. Takes tens of seconds to minutes on a CPU (an AOTInductor build runs a C++ compiler).
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = artefact_file(detector, backend, shape, max_batch, cache_dir)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=f".{path.stem}-") as scratch:
        staged = Path(scratch) / path.name
        program = export(detector, shape, max_batch)
        if backend == "openvino":
            _write_openvino(program, shape, max_batch, staged)
            os.replace(staged.with_suffix(".bin"), path.with_suffix(".bin"))  # weights first: the .xml names them
        else:
            torch._inductor.aoti_compile_and_package(program, package_path=str(staged))
        os.replace(staged, path)
    return path


def load_runner(path: Path, backend: Backend, threads: int | None = None) -> Runner:
    """Load an artefact written by :func:`build`. Not thread-safe: one caller at a time (the engine's worker)."""
    if backend == "openvino":
        import openvino

        core = openvino.Core()
        config = {
            "INFERENCE_NUM_THREADS": threads or torch.get_num_threads(),
            "PERFORMANCE_HINT": "LATENCY",  # one stream: one batch at a time, all threads on it
            "INFERENCE_PRECISION_HINT": "f32",  # else bf16 on CPUs that have it
        }
        request = core.compile_model(core.read_model(str(path)), "CPU", config).create_infer_request()

        def run_openvino(images: torch.Tensor) -> torch.Tensor:
            outputs = request.infer({0: images.contiguous().numpy()})
            return torch.from_numpy(outputs[0].copy())  # the request reuses its output buffer

        return run_openvino
    package = torch._inductor.aoti_load_package(str(path))

    def run_aoti(images: torch.Tensor) -> torch.Tensor:
        return package(images.contiguous(memory_format=torch.channels_last))

    return run_aoti


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
    batch whose shape has no runner, or larger than ``max_batch``, runs eager.
    """

    def __init__(self, eager: Detector, runners: dict[Shape, Runner], max_batch: int, backend: Backend) -> None:
        self.eager = eager
        self.runners = runners
        self.max_batch = max_batch
        self.backend = backend

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        runner = self.runners.get(tuple(images.shape[2:]))
        if runner is None or images.shape[0] > self.max_batch:
            return self.eager(images)
        return runner(images)


@dataclass
class Prepared:
    """What :func:`compiled_detector` did for each shape: ``loaded``, ``built``, or why it runs eager."""

    detector: CompiledDetector
    status: dict[Shape, str]
    seconds: float


def compiled_detector(
    eager: Detector,
    backend: Backend,
    shapes: Sequence[Shape],
    max_batch: int,
    cache_dir: Path,
    *,
    build_missing: bool = False,
    threads: int | None = None,
) -> Prepared:
    """Load (and with ``build_missing``, first build) the artefact of each shape, probe it against ``eager``.

    Never raises for a compiler's sake: a backend that is not installed, an artefact that is missing, fails to build
    or load, or whose probe rows differ from eager's by more than :data:`PROBE_TOLERANCE`, leaves that shape to
    eager, with a warning naming the shape and the reason.
    """
    started = time.perf_counter()
    runners: dict[Shape, Runner] = {}
    status: dict[Shape, str] = {}
    try:
        backend_version(backend)
    except ImportError as error:
        log.warning("compiled model: %s is not installed (%s); running eager", backend, error)
        return Prepared(
            CompiledDetector(eager, {}, max_batch, backend), dict.fromkeys(shapes, "eager: not installed"), 0.0
        )
    for shape in shapes:
        path = artefact_file(eager, backend, shape, max_batch, cache_dir)
        try:
            built = False
            if not path.exists():
                if not build_missing:
                    status[shape] = "eager: no artefact"
                    log.warning(
                        "compiled model: no %s artefact for %sx%s in %s; that shape runs eager (build it "
                        "with python -m model compile)",
                        backend,
                        *shape,
                        cache_dir,
                    )
                    continue
                build(eager, backend, shape, max_batch, cache_dir)
                built = True
            runner = load_runner(path, backend, threads)
            difference = probe(runner, eager, shape)
        except Exception as error:  # a compiler can fail in many ways; the shape runs eager, and says why
            status[shape] = f"eager: {type(error).__name__}"
            log.warning(
                "compiled model: %s for %sx%s failed (%s: %s); that shape runs eager",
                backend,
                *shape,
                type(error).__name__,
                str(error).splitlines()[0] if str(error) else "",
            )
            continue
        if not difference <= PROBE_TOLERANCE:
            status[shape] = f"eager: probe differs by {difference:.1e}"
            log.warning(
                "compiled model: %s for %sx%s differs from eager by %.1e (> %.0e); that shape runs eager",
                backend,
                *shape,
                difference,
                PROBE_TOLERANCE,
            )
            continue
        runners[shape] = runner
        status[shape] = "built" if built else "loaded"
    seconds = time.perf_counter() - started
    return Prepared(CompiledDetector(eager, runners, max_batch, backend), status, seconds)
