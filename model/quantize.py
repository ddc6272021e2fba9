"""Int8 post-training quantization of the OpenVINO IR (NNCF), and the accuracy gate it must pass before serving.

:func:`build_int8` quantizes the float32 IR of one input shape (:mod:`model.openvino_ir`) with NNCF's post-training
quantization (``nncf.quantize``: min-max statistics of activations over calibration images, then fast bias
correction), preset ``MIXED`` (symmetric weights, asymmetric activations: SiLU's outputs are far from symmetric),
as ultralytics' own int8 OpenVINO export does.

Two parts stay float32 (:func:`float_scope`). **AKConv's sampling** (:func:`akconv_sampling`): the arithmetic from
the predicted offsets to the corner indices and bilinear weights, and the weighting of the corner reads. NNCF would
otherwise quantize the sample coordinates and weights to 256 levels, moving every sample by a fraction of a pixel:
on the bundled model at 384 that alone takes held-out mAP50-95 from 0.751 to 0.455; kept float32, int8 scores
0.750 (200 synthetic test images, 128 calibration images). **The head's decoding** (:func:`head_decoding`): the
DFL's softmax and expectation, the box arithmetic in input pixels and the class sigmoid, as ultralytics' export
keeps it (measured on its own it changes little here: 0.465 vs 0.455 without the AKConv part).

Calibration images are letterboxed to the shape as the service letterboxes a request (:func:`letterbox`: aspect
kept, centred, grey 114). For a model of :mod:`model.synthetic`'s classes (the bundled model) they are the synthetic
``train`` split's seeds, rendered at the shape's aspect; for any other model, a folder of the user's images
(:attr:`Calibration.images_dir`).

**The gate.** Before an int8 artefact may serve, its held-out mAP50-95 is measured against the float32 eager
detector's on the same images, letterboxed to the same shape, scored by :func:`model.evaluate.score`: the synthetic
``test`` split's seeds (never trained on) for the bundled classes, else a YOLO-format labelled folder
(:attr:`Calibration.held_out_dir`, ``images/`` and ``labels/``); without labelled held-out images a user's model is
refused int8 (:class:`NoCalibrationData`). A drop above :attr:`Calibration.max_map_drop` points (default 1.0, i.e.
0.01 mAP50-95) refuses it. The verdict is written in a JSON record beside the artefact (:func:`record_path`), tied to
the artefact's bytes by their sha256; :func:`refusal` is what the loader asks, and an artefact without a record, with
a record of other bytes or one that did not pass never serves (its shape runs eager).

The gate runs at each shape, not only the square one: every shape is its own static graph, calibrated on its own
letterboxed images, and the record it writes is about the artefact that will serve that shape. It costs about a
minute a shape for the bundled model at 384 on 2 cores (conversion, calibration, quantization, two passes over the
held-out images).

nncf (and openvino) are optional dependencies, imported only here and only when building; loading an int8 artefact
imports openvino alone, but needs nncf installed too: its version is part of the artefact's key. NNCF's logger is routed
to Python's logging at WARNING (it prints to stdout by default) and its telemetry is kept off by :mod:`model.offline`;
its progress bars (rich) still show while it calibrates.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps

from model.build import Detector
from model.checkpoint import METADATA_FILE, read_metadata
from model.evaluate import score
from model.letterbox import Shape, fitted_size, pad, unletterbox
from model.offline import errors_only
from model.openvino_ir import CORNERS_MARK, Runner, complete, move_into_place, require
from model.openvino_ir import compiler as ir_compiler
from model.openvino_ir import load_runner as load_ir_runner
from model.openvino_ir import save as save_ir
from model.synthetic import CLASS_NAMES, SPLITS, render

DEFAULT_MAX_MAP_DROP = 1.0  # mAP50-95 points (0.01 mAP50-95): the most an int8 artefact may lose
CALIBRATION_IMAGES = 128
HELD_OUT_IMAGES = 200
MIN_SCORE = 0.001  # rows scored below are not detections (model.evaluate's cut-off)
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
LAYOUT_OPS = frozenset({"Reshape", "Transpose", "Unsqueeze", "Squeeze", "Convert"})  # move values, compute none
FEATURE_OPS = frozenset({"Convolution", "GroupConvolution", "MatMul", "Swish"})  # where sampling's inputs come from
PRESET = "mixed"
FLOAT_PARTS = "AKConv sampling and head decoding"  # what float_scope keeps out of int8
RECIPE = 1  # the version of this module's quantization and gate, in the artefacts' key: raised when they change


class NoCalibrationData(ValueError):
    """Int8 was asked for a model whose calibration or labelled held-out images were not given."""


class ArtefactRefused(RuntimeError):
    """An int8 artefact that may not serve: no accuracy record, a record of other bytes, or a refused gate."""


@dataclass(frozen=True)
class Calibration:
    """Where int8's calibration and held-out images come from, and how much accuracy it may lose.

    Args:
        images_dir: a folder of images like those the model will see (any layout, labels not needed); None: the
            synthetic ``train`` split, for a model of :mod:`model.synthetic`'s classes only.
        held_out_dir: a YOLO-format folder, ``images/`` and ``labels/`` (``class cx cy w h`` normalised, one
            ``.txt`` per image, same relative path), never used in training or calibration; None: the synthetic
            ``test`` split, for a model of :mod:`model.synthetic`'s classes only.
        images: calibration images used (the first, in sorted order, of a folder).
        held_out_images: held-out images scored (the first, in sorted order, of a folder).
        max_map_drop: mAP50-95 points (fp32 eager minus int8) beyond which the artefact is refused; 1.0 = 0.01.
    """

    images_dir: Path | None = None
    held_out_dir: Path | None = None
    images: int = CALIBRATION_IMAGES
    held_out_images: int = HELD_OUT_IMAGES
    max_map_drop: float = DEFAULT_MAX_MAP_DROP


Sample = tuple[np.ndarray, np.ndarray | None]  # RGB uint8 (h, w, 3); truth (m, 5) [class, x1, y1, x2, y2] px or None


class Source(Protocol):
    """Images for calibration or the gate: a list of items, each loaded at an input shape."""

    def items(self) -> list[Any]: ...

    def sample(self, item: Any, shape: Shape) -> Sample: ...

    def describe(self) -> str: ...


@dataclass(frozen=True)
class SyntheticSeeds:
    """``count`` seeds of a :mod:`model.synthetic` split, each rendered at the input shape's size and aspect."""

    split: str
    count: int

    def items(self) -> list[int]:
        return list(range(SPLITS[self.split], SPLITS[self.split] + self.count))

    def sample(self, item: int, shape: Shape) -> Sample:
        return render(item, max(shape), aspect=shape[1] / shape[0])

    def describe(self) -> str:
        first = SPLITS[self.split]
        return f"synthetic {self.split} seeds {first}..{first + self.count - 1}"


@dataclass(frozen=True)
class ImageFolder:
    """The first ``count`` images under ``root`` in sorted order; with ``labelled``, under ``root/images`` with
    their YOLO labels under ``root/labels`` (an image without a label file has no objects)."""

    root: Path
    count: int
    labelled: bool = False

    def items(self) -> list[Path]:
        images = self.root / "images" if self.labelled else self.root
        found = sorted(path for path in images.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES)
        return found[: self.count]

    def sample(self, item: Path, shape: Shape) -> Sample:
        with Image.open(item) as opened:
            pixels = np.asarray(ImageOps.exif_transpose(opened).convert("RGB"))
        if not self.labelled:
            return pixels, None
        label = (self.root / "labels" / item.relative_to(self.root / "images")).with_suffix(".txt")
        rows = np.loadtxt(label, ndmin=2, dtype=np.float64) if label.is_file() else np.zeros((0, 5))
        if rows.size == 0:  # an empty label file: a background image
            rows = np.zeros((0, 5))
        elif rows.shape[1] != 5:
            raise ValueError(f"{label}: YOLO box labels have 5 columns (class cx cy w h), not {rows.shape[1]}")
        height, width = pixels.shape[:2]
        centre_x, centre_y, box_w, box_h = (rows[:, 1:5] * [width, height, width, height]).T
        corners = np.stack([centre_x - box_w / 2, centre_y - box_h / 2, centre_x + box_w / 2, centre_y + box_h / 2])
        return pixels, np.column_stack([rows[:, 0], corners.T]).astype(np.float32).reshape(-1, 5)

    def describe(self) -> str:
        return f"{self.root}{'/images' if self.labelled else ''}"


@dataclass(frozen=True)
class DataPlan:
    """The calibration and held-out images of one model, resolved from a :class:`Calibration`."""

    calibration: Source
    held_out: Source


def class_names(detector: Detector) -> list[str]:
    names = getattr(detector.model, "names", None) or {}
    return [str(names[index]) for index in sorted(names)] if isinstance(names, dict) else [str(n) for n in names]


def plan(names: Sequence[str], calibration: Calibration) -> DataPlan:
    """The images int8 is calibrated and gated on, for a model with class ``names``.

    Raises:
        NoCalibrationData: a model not of the synthetic classes without ``images_dir`` or ``held_out_dir``; or a
            folder that holds no images.
    """
    synthetic = tuple(names) == CLASS_NAMES
    if calibration.held_out_dir is not None:
        held_out: Source = ImageFolder(calibration.held_out_dir, calibration.held_out_images, labelled=True)
    elif synthetic:
        held_out = SyntheticSeeds("test", calibration.held_out_images)
    else:
        raise NoCalibrationData(
            "int8 needs labelled held-out images to measure what quantization costs before it may serve: give "
            "--held-out DIR (YOLO format: DIR/images and DIR/labels, images not used in training); without them "
            "use the openvino or aotinductor runtime"
        )
    if calibration.images_dir is not None:
        images: Source = ImageFolder(calibration.images_dir, calibration.images)
    elif synthetic:
        images = SyntheticSeeds("train", calibration.images)
    else:
        raise NoCalibrationData(
            "int8 needs calibration images like those the model will serve (a few hundred, labels not needed): give "
            "--calibration DIR (not the held-out images)"
        )
    for source, what in ((images, "calibration"), (held_out, "held-out")):
        if isinstance(source, ImageFolder) and not source.items():
            where = source.root / "images" if source.labelled else source.root
            raise NoCalibrationData(f"the {what} folder {where} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    if isinstance(held_out, ImageFolder) and not (held_out.root / "labels").is_dir():
        raise NoCalibrationData(f"the held-out folder {held_out.root} has no labels/ beside images/ (YOLO format)")
    return DataPlan(images, held_out)


def letterbox(image: np.ndarray, shape: Shape) -> tuple[np.ndarray, float, tuple[int, int]]:
    """Fit an RGB uint8 image (h, w, 3) into ``shape`` as the service does (:mod:`model.letterbox`): resized keeping
    its aspect (bilinear), centred, padded with grey.

    Returns:
        (pixels (3, H, W) uint8, scale, (left, top) padding in pixels), to map boxes back with :func:`unletterbox`.
    """
    height, width = image.shape[:2]
    scale = min(shape[0] / height, shape[1] / width)
    new_w, new_h = fitted_size(width, height, scale)
    if (new_h, new_w) != (height, width):
        image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    pixels, left, top = pad(image, shape)
    return pixels, scale, (left, top)


def model_input(pixels: Sequence[np.ndarray]) -> torch.Tensor:
    """Letterboxed uint8 (3, H, W) images -> float32 (B, 3, H, W) in [0, 1], channels-last, as the engine runs."""
    return (torch.from_numpy(np.stack(pixels)).float() / 255).contiguous(memory_format=torch.channels_last)


def held_out_scores(
    forwards: dict[str, Runner], source: Source, shape: Shape, batch: int
) -> dict[str, dict[str, float | int]]:
    """:func:`model.evaluate.score` of each forward on ``source``'s images letterboxed to ``shape``, ``batch`` at a
    time; every forward sees the same batches. Rows below :data:`MIN_SCORE` are dropped, boxes mapped back."""
    results: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {name: [] for name in forwards}
    items = source.items()
    for start in range(0, len(items), batch):
        samples = [source.sample(item, shape) for item in items[start : start + batch]]
        fitted = [letterbox(image, shape) for image, _ in samples]
        images = model_input([pixels for pixels, _, _ in fitted])
        for name, forward in forwards.items():
            with torch.inference_mode():
                rows = forward(images).numpy()
            for output, (image, truth), (_, scale, padding) in zip(rows, samples, fitted, strict=True):
                detections = output[output[:, 4] > MIN_SCORE].copy()
                detections[:, :4] = unletterbox(detections[:, :4], scale, padding, image.shape[:2])
                results[name].append((detections, truth))
    return {name: score(pairs) for name, pairs in results.items()}


@functools.cache
def _nncf() -> Any:
    """nncf, imported with its logger routed to Python's logging at WARNING (it prints INFO to stdout)."""
    require("nncf")
    import nncf
    from nncf.common.logging.logger import nncf_logger

    for handler in list(nncf_logger.handlers):
        nncf_logger.removeHandler(handler)
    nncf_logger.propagate = True
    nncf_logger.setLevel(logging.WARNING)
    return nncf


def compiler() -> str:
    """What an int8 artefact depends on besides the model: the float32 IR's (:func:`model.openvino_ir.compiler`),
    nncf's version and :data:`RECIPE`."""
    return f"int8 {ir_compiler()} nncf {require('nncf')} recipe {RECIPE}"


def _descendants(starts: list[Any]) -> set[str]:
    """Friendly names of ``starts`` and of every op downstream of them."""
    seen: set[str] = set()
    stack = list(starts)
    while stack:
        node = stack.pop()
        if node.get_friendly_name() in seen:
            continue
        seen.add(node.get_friendly_name())
        stack += [target.get_node() for output in node.outputs() for target in output.get_target_inputs()]
    return seen


def _reads_a_dfl(softmax: Any) -> bool:
    """Whether ``softmax`` feeds (through layout ops only) a convolution of one output channel: the DFL, whose
    fixed weights 0..reg_max-1 take the expectation of each side's distance distribution."""
    stack = [target.get_node() for target in softmax.output(0).get_target_inputs()]
    while stack:
        node = stack.pop()
        if node.get_type_name() in LAYOUT_OPS:
            stack += [target.get_node() for output in node.outputs() for target in output.get_target_inputs()]
        elif node.get_type_name() == "Convolution":
            weight = node.input_value(1).get_partial_shape()
            return weight.is_static and weight[0].get_length() == 1
    return False


def head_decoding(ov_model: Any) -> set[str]:
    """Friendly names of the head's decoding ops: everything downstream of the class sigmoid and of the DFL's
    softmax (distances, anchors, strides, box corners, top-k)."""
    starts = [
        node
        for node in ov_model.get_ordered_ops()
        if node.get_type_name() == "Sigmoid" or (node.get_type_name() == "Softmax" and _reads_a_dfl(node))
    ]
    return _descendants(starts)


def _is_bias(node: Any) -> bool:
    return node.get_type_name() == "Add" and node.input_value(0).get_node().get_type_name() in FEATURE_OPS


def akconv_sampling(ov_model: Any) -> set[str]:
    """Friendly names of AKConv's sampling ops: the corner reads' weighting and sum (``gather_corners``), and all
    that computes their indices and bilinear weights from the offsets (sample coordinates, floor, clamp, border
    factors), back to the offset convolution's output, exclusive."""
    marked = [node for node in ov_model.get_ordered_ops() if f"/{CORNERS_MARK}/" in node.get_friendly_name()]
    names = {node.get_friendly_name() for node in marked}
    stack = [node.input_value(1).get_node() for node in marked if node.get_friendly_name().endswith("/gather")]
    stack += [node.input_value(0).get_node() for node in marked if node.get_friendly_name().endswith("/weight")]
    while stack:
        node = stack.pop()
        kind = node.get_type_name()
        if node.get_friendly_name() in names or kind in FEATURE_OPS or kind in ("Constant", "Parameter", "ShapeOf"):
            continue
        if _is_bias(node):
            continue
        names.add(node.get_friendly_name())
        stack += [source.get_node() for source in node.input_values()]
    return names


def float_scope(ov_model: Any) -> list[str]:
    """Friendly names of the ops int8 quantization leaves in float32: :func:`head_decoding` and
    :func:`akconv_sampling`, where an 8-bit step moves box corners or sample positions by pixels."""
    return sorted(head_decoding(ov_model) | akconv_sampling(ov_model))


def quantize_ir(fp32_ir: Path, source: Source, shape: Shape) -> Any:
    """NNCF post-training int8 quantization of the IR at ``fp32_ir``, calibrated on ``source`` at ``shape``."""
    import openvino

    nncf = _nncf()
    ov_model = openvino.Core().read_model(str(fp32_ir))
    items = source.items()

    def calibration_input(item: Any) -> np.ndarray:
        return model_input([letterbox(source.sample(item, shape)[0], shape)[0]]).contiguous().numpy()  # (1, 3, H, W)

    with errors_only("torch.utils.cpp_extension"):  # "No CUDA runtime is found", as nncf imports it on the way
        return nncf.quantize(
            ov_model,
            nncf.Dataset(items, calibration_input),
            preset=nncf.QuantizationPreset.MIXED,
            subset_size=len(items),
            ignored_scope=nncf.IgnoredScope(names=float_scope(ov_model), validate=False),
        )


def artefact_sha256(path: Path) -> str:
    """sha256 of an IR: its .xml, then its .bin."""
    digest = hashlib.sha256(path.read_bytes())
    digest.update(path.with_suffix(".bin").read_bytes())
    return digest.hexdigest()


def record_path(artefact: Path) -> Path:
    """The accuracy record written beside an int8 artefact: ``<stem>.accuracy.json``."""
    return artefact.with_suffix(".accuracy.json")


def read_record(artefact: Path) -> dict[str, Any] | None:
    """The accuracy record of ``artefact``; None when there is none or it is not a JSON object."""
    try:
        record = json.loads(record_path(artefact).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def refusal(artefact: Path, record: dict[str, Any] | None) -> str | None:
    """Why the int8 ``artefact`` may not serve, in a few words, or None when its ``record`` is of its bytes and
    passed."""
    if record is None:
        return "no accuracy record"
    if record.get("artefact_sha256") != artefact_sha256(artefact):
        return "accuracy record of other bytes"
    if record.get("passed") is not True:
        return f"accuracy gate refused: mAP50-95 drop {record.get('drop_points')} > {record.get('max_drop_points')}"
    return None


def ready(artefact: Path) -> bool:
    """Whether ``artefact`` exists with a record of its bytes that passed: it can serve without a build."""
    return complete(artefact) and not refusal(artefact, read_record(artefact))


def load_runner(artefact: Path, threads: int, parallel: int) -> Runner:
    """The OpenVINO runner of an int8 ``artefact`` whose accuracy gate passed (:func:`refusal`).

    Raises:
        ArtefactRefused: it has no accuracy record, a record of other bytes, or one that did not pass.
    """
    reason = refusal(artefact, read_record(artefact))
    if reason:
        raise ArtefactRefused(reason)
    return load_ir_runner(artefact, threads, parallel)


def _write_json(path: Path, content: dict[str, Any]) -> None:
    """Write ``content`` as ``path`` atomically (a temporary file beside it, renamed), readable by all (0644)."""
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}-", delete=False) as staged:
        staged.write(json.dumps(content, indent=2) + "\n")
    os.chmod(staged.name, 0o644)
    os.replace(staged.name, path)


def verdict(fp32: dict[str, Any], int8: dict[str, Any], max_map_drop: float) -> dict[str, Any]:
    """The gate: int8 passes when its mAP50-95 is at most ``max_map_drop`` points (hundredths) below fp32's.

    ``fp32`` and ``int8``: :func:`model.evaluate.score` of each on the same held-out images. Returns the record's
    verdict fields: both mAP50-95 and mAP50, the drop in points (negative when int8 scores higher), the limit and
    ``passed``.
    """
    drop = round((fp32["mAP50-95"] - int8["mAP50-95"]) * 100, 2)
    return {
        "fp32_mAP50-95": fp32["mAP50-95"],
        "int8_mAP50-95": int8["mAP50-95"],
        "drop_points": drop,
        "max_drop_points": max_map_drop,
        "passed": bool(drop <= max_map_drop),
        "fp32_mAP50": fp32["mAP50"],
        "int8_mAP50": int8["mAP50"],
    }


def build_int8(
    eager: Detector,
    shape: Shape,
    max_batch: int,
    fp32_ir: Path,
    path: Path,
    *,
    threads: int,
    calibration: Calibration | None = None,
) -> dict[str, Any]:
    """Quantize the float32 IR ``fp32_ir`` of ``eager`` at ``shape``, gate it, write it as ``path`` with its record.

    The artefact is written even when the gate refuses it (with a record that says so, and why): the loader never
    serves it, and the record shows what was measured.

    Returns:
        The accuracy record (also in :func:`record_path`).

    Raises:
        NoCalibrationData: see :func:`plan`; MissingExtra: nncf or openvino is not installed.
    """
    calibration = calibration or Calibration()
    data = plan(class_names(eager), calibration)
    quantized = quantize_ir(fp32_ir, data.calibration, shape)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.stem}-gate-") as scratch:
        staged = Path(scratch) / path.name
        save_ir(quantized, staged)
        scores = held_out_scores(
            {"fp32": eager, "int8": load_ir_runner(staged, threads, 1)}, data.held_out, shape, min(max_batch, 8)
        )
        record = {
            "artefact": path.name,
            "artefact_sha256": artefact_sha256(staged),
            "shape": f"{shape[0]}x{shape[1]}",
            "max_batch": max_batch,
            **verdict(scores["fp32"], scores["int8"], calibration.max_map_drop),
            "held_out": {
                "source": data.held_out.describe(),
                "images": len(data.held_out.items()),
                "boxes": scores["fp32"]["ground_truth_boxes"],
            },
            "calibration": {"source": data.calibration.describe(), "images": len(data.calibration.items())},
            "quantization": f"nncf {require('nncf')} post-training, preset {PRESET}, {FLOAT_PARTS} float32",
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }
        record_path(path).unlink(missing_ok=True)  # an old record never vouches for the new bytes
        move_into_place(staged, path)
    _write_json(record_path(path), record)
    return record


def record_in_bundle(bundle: Path, records: dict[str, dict[str, Any]]) -> None:
    """Add int8 accuracy ``records`` (by ``"HxW"``) to ``provenance["int8"]`` of the bundle's ``model.json``.

    Only ``model.json`` is rewritten (atomically): the weights file, and so the bundle's checksum, are untouched.
    """
    path = bundle / METADATA_FILE
    raw = json.loads(path.read_text())
    provenance = raw.setdefault("provenance", {})
    kept = provenance.get("int8") if isinstance(provenance.get("int8"), dict) else {}
    provenance["int8"] = kept | records
    _write_json(path, raw)
    read_metadata(bundle)  # what load() checks still passes


def describe(record: dict[str, Any]) -> str:
    """One line for people: the verdict and the numbers behind it."""
    verdict = "passed" if record.get("passed") else "refused"
    return (
        f"int8 gate {verdict}: mAP50-95 fp32 {record['fp32_mAP50-95']}, int8 {record['int8_mAP50-95']}, drop "
        f"{record['drop_points']} points (limit {record['max_drop_points']}) on {record['held_out']['images']} "
        f"held-out images ({record['held_out']['source']}); calibrated on {record['calibration']['images']} "
        f"({record['calibration']['source']})"
    )
