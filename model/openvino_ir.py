"""A :class:`~model.build.Detector` as an OpenVINO IR, and the runner that serves it on OpenVINO's CPU plugin.

The IR is converted from the same ``torch.export`` as the AOTInductor package (:func:`model.compiled.export`: one
input shape, batch dynamic in 1..``max_batch``), through ``openvino.convert_model``. OpenVINO's CPU plugin compiles
``EmbeddingBagOffsets`` (AKConv's inference gather) for static shapes only, so :func:`gather_corners` rewrites it
into Gather → × weight → ReduceSum, which takes a dynamic batch. The TorchScript-trace conversion runs but returns
wrong rows (bench/README.md, "Compiled model"), so it is not used. Measured against eager and AOTInductor in
``bench/compiled.py``.

openvino is an optional dependency (``pip install 'akconv-detector[openvino]'``, with nncf for int8): it is
imported only inside the functions that need it; :func:`require` raises :class:`MissingExtra` when it is absent.
Its usage telemetry is kept off by :mod:`model.offline`.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.build import Detector
from model.letterbox import Shape

Runner = Callable[[torch.Tensor], torch.Tensor]  # images float32 (B, 3, H, W) in [0, 1] -> rows (B, K, 6)

EXTRA = "openvino"  # the optional dependencies' extra in pyproject.toml: openvino and nncf
CORNERS = 4  # reads per AKConv sample (model.akconv.corner_reads)
CORNERS_MARK = "akconv_corners"  # in the names of the ops gather_corners writes
CONVERSION = 2  # the version of this module's conversion, in the artefacts' key: raised when what it writes changes


class MissingExtra(ImportError):
    """An optional package a runtime needs is not installed; the message says what to install."""


def require(package: str) -> str:
    """The installed version of ``package``, without importing it.

    Raises:
        MissingExtra: it is not installed (or cannot be imported: ``sys.modules`` holds None for it).
    """
    try:
        spec = importlib.util.find_spec(package)
    except ValueError:  # sys.modules[package] is None: imports of it are blocked
        spec = None
    if spec is None:
        raise MissingExtra(
            f"{package} is not installed; the openvino and int8 runtimes need the optional packages openvino and nncf: "
            f"pip install 'akconv-detector[{EXTRA}]'"
        )
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:  # importable, but not installed by pip (no version to key on)
        raise MissingExtra(
            f"{package} is importable but not installed as a package: pip install 'akconv-detector[{EXTRA}]'"
        ) from None


def compiler() -> str:
    """What an IR depends on besides the model: the converter's and torch's versions (``torch.export``'s graph) and
    :data:`CONVERSION`. No CPU ISA: an IR is compiled for the CPU it runs on when it is loaded."""
    return f"openvino {require('openvino')} torch {torch.__version__} conversion {CONVERSION}"


def gather_corners(ov_model: Any) -> None:
    """Replace each ``EmbeddingBagOffsets`` of an OpenVINO model by Gather → × weight → sum over each bag of 4.

    OpenVINO's CPU plugin compiles ``EmbeddingBagOffsets`` (AKConv's inference gather) for static shapes only; the
    bags always hold the four corner reads of one sample (``model.akconv.corner_reads``), so the bag sum is a
    reshape and a ReduceSum, which take a dynamic batch. The new ops are named ``<bag>/akconv_corners/<part>``
    (:data:`CORNERS_MARK`; parts ``gather``, ``weight``, ``weighted``, ``bags``, ``sum``), so that int8 quantization
    can find AKConv's sampling (``model.quantize.float_scope``).
    """
    import openvino.opset13 as ops

    for node in ov_model.get_ordered_ops():
        if not node.get_type_name().startswith("EmbeddingBagOffsets"):
            continue
        inputs = [source.get_source_output() for source in node.inputs()]
        table, index, weight = inputs[0], inputs[1], inputs[-1]  # (P, C), (M·4,), (M·4,)
        channels = table.get_partial_shape()[1].get_length()
        rows = ops.gather(table, index, ops.constant(np.int64(0)))  # (M·4, C)
        column = ops.unsqueeze(weight, ops.constant(np.int64(1)))  # (M·4, 1)
        weighted = ops.multiply(rows, column)
        bags = ops.reshape(weighted, ops.constant(np.array([-1, CORNERS, channels], dtype=np.int64)), False)
        total = ops.reduce_sum(bags, ops.constant(np.int64(1)), False)  # (M, C)
        for part, op in {"gather": rows, "weight": column, "weighted": weighted, "bags": bags, "sum": total}.items():
            op.set_friendly_name(f"{node.get_friendly_name()}/{CORNERS_MARK}/{part}")
        node.output(0).replace(total.output(0))
    ov_model.validate_nodes_and_infer_types()


def convert(eager: Detector, shape: Shape, max_batch: int) -> Any:
    """``eager`` (float32, CPU, eval) as an ``openvino.Model`` at input ``shape``, batch 1..``max_batch``."""
    import openvino

    from model.compiled import export  # here: model.compiled imports this module

    ov_model = openvino.convert_model(export(eager, shape, max_batch).run_decompositions())
    gather_corners(ov_model)
    ov_model.reshape({ov_model.inputs[0]: openvino.PartialShape([openvino.Dimension(1, max_batch), 3, *shape])})
    return ov_model


def save(ov_model: Any, path: Path) -> None:
    """Write ``ov_model`` as ``path`` (.xml) and its weights beside it (.bin), float32 weights.

    Written in a temporary directory beside them and moved into place, weights first: a crash never leaves an
    .xml without its weights under the final name.
    """
    import openvino

    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.stem}-") as scratch:
        staged = Path(scratch) / path.name
        openvino.save_model(ov_model, str(staged), compress_to_fp16=False)  # fp16 weights would move rows by ~1e-2
        move_into_place(staged, path)


def move_into_place(staged: Path, path: Path) -> None:
    """Move an IR written as ``staged`` (.xml and .bin) to ``path``, weights first."""
    os.replace(staged.with_suffix(".bin"), path.with_suffix(".bin"))
    os.replace(staged, path)


def build(eager: Detector, shape: Shape, max_batch: int, path: Path) -> None:
    """Convert ``eager`` at ``shape`` (batch 1..``max_batch``) and write the IR as ``path``; seconds to a minute."""
    save(convert(eager, shape, max_batch), path)


def complete(path: Path) -> bool:
    """Whether the IR ``path`` is there with its weights (.bin)."""
    return path.exists() and path.with_suffix(".bin").exists()


def load_runner(path: Path, threads: int, parallel: int) -> Runner:
    """Read and compile the IR at ``path`` for OpenVINO's CPU plugin (about a second), for ``parallel`` callers at once.

    ``threads``: OpenVINO's inference threads (its own pool, apart from torch's), split among ``parallel`` streams:
    one stream with all of them when there is one caller (latency), else one stream per caller (throughput). Each
    calling thread gets its own infer request. Float32 precision even on CPUs with bf16 (the default there): rows stay
    those of eager for a float32 IR, and an int8 IR runs its float parts as they ran when its accuracy was measured.
    """
    import openvino

    config = {
        "INFERENCE_NUM_THREADS": threads,
        "PERFORMANCE_HINT": "LATENCY" if parallel == 1 else "THROUGHPUT",
        "NUM_STREAMS": parallel,
        "INFERENCE_PRECISION_HINT": "f32",
    }
    core = openvino.Core()
    compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
    requests = threading.local()

    def run(images: torch.Tensor) -> torch.Tensor:
        if not hasattr(requests, "request"):
            requests.request = compiled.create_infer_request()
        outputs = requests.request.infer({0: images.contiguous().numpy()})
        return torch.from_numpy(outputs[0].copy())  # its buffer is reused

    return run
