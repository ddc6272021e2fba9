"""model.compiled: compiled runners in front of the eager detector, and every way back to eager."""

import dataclasses
import importlib.util
import json
import logging
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from model import checkpoint, compiled, quantize
from model.build import build_model, fuse_for_inference
from model.checkpoint import DEFAULT_BUNDLE, load
from model.compiled import (
    ARTEFACTS,
    RUNTIMES,
    CompiledDetector,
    artefact_key,
    artefact_path,
    compiled_detector,
    top_rows_difference,
    weights_sha256,
)
from model.letterbox import common_shapes

# The smallest YOLOv10 with an AKConv layer: building and exporting it takes seconds, not minutes.
TINY = {
    "nc": 2,
    "backbone": [
        [-1, 1, "Conv", [8, 3, 2]],
        [-1, 1, "AKConv", [16, 3, 2]],
        [-1, 1, "Conv", [16, 3, 2]],
        [-1, 1, "Conv", [16, 3, 2]],
        [-1, 1, "Conv", [16, 3, 2]],
    ],
    "head": [[[2, 3, 4], 1, "v10Detect", ["nc"]]],
}
SHAPE = (64, 96)
HAS_OPENVINO = all(importlib.util.find_spec(package) for package in ("openvino", "nncf"))
needs_openvino = pytest.mark.skipif(not HAS_OPENVINO, reason="the openvino extra is not installed")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = build_model(TINY).eval()
    torch.nn.init.normal_(model.model[1].p_conv.weight, std=0.3)  # offsets that move the samples
    return fuse_for_inference(model).to(memory_format=torch.channels_last)


def path_of(detector, runtime: str, cache_dir: Path, max_batch: int = 8) -> Path:
    return artefact_path(weights_sha256(detector), SHAPE, max_batch, cache_dir, runtime)


def prepare(detector, cache_dir: Path, runtime: str = "aotinductor", max_batch: int = 8, **options):
    return compiled_detector(detector, [SHAPE], max_batch, cache_dir, runtime=runtime, threads=2, **options)


def with_runner(monkeypatch, runtime: str, runner) -> None:
    """Make ``runtime`` load ``runner`` for any artefact (its other steps unchanged)."""
    loads = dataclasses.replace(ARTEFACTS[runtime], load_runner=lambda path, threads, parallel: runner)
    monkeypatch.setitem(ARTEFACTS, runtime, loads)


def images(batch: int, shape: tuple[int, int] = SHAPE) -> torch.Tensor:
    generator = torch.Generator().manual_seed(batch)
    return torch.rand(batch, 3, *shape, generator=generator).contiguous(memory_format=torch.channels_last)


class Recorder:
    """A runner that records the shapes it ran and answers rows offset from eager's by ``offset``."""

    def __init__(self, eager, offset: float = 0.0) -> None:
        self.eager, self.offset, self.calls = eager, offset, []

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(batch.shape))
        return self.eager(batch) + self.offset


@torch.inference_mode()
def test_a_runner_takes_its_shape_up_to_the_batch_bound_and_eager_the_rest(tiny):
    runner = Recorder(tiny)
    detector = CompiledDetector(tiny, {SHAPE: runner}, max_batch=2)
    detector(images(2))
    detector(images(3))  # above the bound
    detector(images(1, (96, 64)))  # no runner for this shape
    assert runner.calls == [(2, 3, *SHAPE)]


@torch.inference_mode()
def test_a_runner_that_fails_at_run_time_leaves_its_shape_to_eager_from_then_on(tiny, caplog):
    def broken(batch: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("device lost\nmore")

    detector = CompiledDetector(tiny, {SHAPE: broken}, max_batch=2)
    batch = images(1)
    torch.testing.assert_close(detector(batch), tiny(batch))
    assert detector.runners == {}
    assert "failed (RuntimeError: device lost); that shape runs eager from now on" in caplog.text


def test_the_key_changes_with_everything_baked_into_an_artefact(tiny):
    weights, compiler = compiled.weights_sha256(tiny), compiled.aoti_compiler()
    key = artefact_key(weights, SHAPE, 8, compiler)
    assert key.startswith("aoti-64x96-b8-")
    assert "isa" in compiler and torch.__version__ in compiler
    others = {
        artefact_key("0" * 64, SHAPE, 8, compiler),
        artefact_key(weights, (96, 64), 8, compiler),
        artefact_key(weights, SHAPE, 4, compiler),
        artefact_key(weights, SHAPE, 8, compiler.replace(torch.__version__, "2.99.0")),
    }
    assert key not in others and len(others) == 4
    other = fuse_for_inference(build_model(TINY).eval())  # other random weights
    assert compiled.weights_sha256(other) != weights


def test_the_runtimes_are_eager_and_one_artefact_kind_each():
    assert RUNTIMES == ("eager", "aotinductor", "openvino", "int8")
    assert set(ARTEFACTS) == set(RUNTIMES) - {"eager"}


def test_an_unknown_runtime_is_refused_with_the_known_ones(tiny, tmp_path):
    with pytest.raises(ValueError, match="eager, aotinductor, openvino, int8"):
        prepare(tiny, tmp_path, runtime="tensorrt")


def test_the_eager_runtime_loads_and_builds_nothing(tiny, tmp_path):
    prepared = prepare(tiny, tmp_path, runtime="eager", build_missing=True)
    assert prepared.status == {SHAPE: "eager: runtime eager"}
    assert prepared.detector.runners == {} and prepared.accuracy is None
    assert not any(tmp_path.iterdir())


@torch.inference_mode()
def test_without_a_package_every_shape_runs_eager_and_says_so(tiny, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="model.compiled"):
        prepared = prepare(tiny, tmp_path)
    assert prepared.status == {SHAPE: "eager: no package"}
    assert prepared.detector.runners == {}
    assert "no aotinductor package for 64x96" in caplog.text
    assert (
        f"python -m model compile MODEL --runtime aotinductor --size SIZE --shapes 64x96 --max-batch 8 "
        f"--cache-dir {tmp_path}" in caplog.text
    )
    assert torch.equal(prepared.detector(images(1)), tiny(images(1)))


def test_a_damaged_package_leaves_its_shape_eager(tiny, tmp_path, caplog):
    path_of(tiny, "aotinductor", tmp_path).write_text("not a package")
    with caplog.at_level(logging.WARNING, logger="model.compiled"):
        prepared = prepare(tiny, tmp_path)
    assert prepared.status[SHAPE].startswith("eager: ")
    assert prepared.detector.runners == {}
    assert "aotinductor 64x96 failed" in caplog.text


@pytest.mark.parametrize("runtime", ["aotinductor", pytest.param("openvino", marks=needs_openvino)])
def test_a_runner_that_disagrees_with_eager_is_not_used(tiny, tmp_path, monkeypatch, caplog, runtime):
    path_of(tiny, runtime, tmp_path).touch()
    with_runner(monkeypatch, runtime, Recorder(tiny, offset=0.01))
    with caplog.at_level(logging.WARNING, logger="model.compiled"):
        prepared = prepare(tiny, tmp_path, runtime)
    assert prepared.status == {SHAPE: "eager: probe differs by 1.0e-02"}
    assert f"{runtime} 64x96 probe differs by 1.0e-02" in caplog.text


def test_a_detector_that_is_not_float32_on_the_cpu_runs_eager(tiny, tmp_path, caplog):
    half = fuse_for_inference(build_model(TINY).eval()).half()
    with caplog.at_level(logging.WARNING, logger="model.compiled"):
        prepared = prepare(half, tmp_path, build_missing=True)
    assert prepared.status == {SHAPE: "eager: not cpu float32"}
    assert not any(tmp_path.iterdir()), "nothing is built"


@pytest.mark.parametrize(("runtime", "blocked"), [("openvino", "openvino"), ("int8", "openvino"), ("int8", "nncf")])
def test_without_the_openvino_extra_every_shape_runs_eager_with_one_line_naming_it(
    tiny, tmp_path, monkeypatch, caplog, runtime, blocked
):
    monkeypatch.setitem(sys.modules, blocked, None)  # import openvino / nncf fails, as when not installed
    shapes = [SHAPE, (96, 64)]
    with caplog.at_level(logging.WARNING, logger="model.compiled"):
        prepared = compiled_detector(tiny, shapes, 8, tmp_path, runtime=runtime, threads=2, build_missing=True)
    assert prepared.status == dict.fromkeys(shapes, "eager: openvino extra not installed")
    assert prepared.detector.runners == {}
    assert len(caplog.records) == 1
    assert f"{blocked} is not installed" in caplog.text
    assert "pip install 'akconv-detector[openvino]'" in caplog.text
    assert not tmp_path.exists() or not any(tmp_path.iterdir()), "nothing is built"


class Int8Artefact:
    """A stand-in int8 artefact (.xml and .bin bytes, no model) and its accuracy record, for the loader's checks."""

    def __init__(self, detector, cache_dir: Path) -> None:
        self.path = path_of(detector, "int8", cache_dir)
        self.path.write_text("<net/>")
        self.path.with_suffix(".bin").write_bytes(b"weights")

    def record(self, **fields) -> dict:
        record = {
            "artefact_sha256": quantize.artefact_sha256(self.path),
            "fp32_mAP50-95": 0.75,
            "int8_mAP50-95": 0.745,
            "drop_points": 0.5,
            "max_drop_points": 1.0,
            "passed": True,
        } | fields
        quantize.record_path(self.path).write_text(json.dumps(record))
        return record


class BoxesMoved:
    """An int8-like runner: eager's rows with every box moved by 2 px (the contract kept, the rows not eager's)."""

    def __init__(self, eager) -> None:
        self.eager = eager

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        rows = self.eager(batch).clone()
        rows[..., :4] += 2.0
        return rows


@needs_openvino
def test_an_int8_artefact_whose_gate_passed_serves_though_its_rows_differ_from_eager(tiny, tmp_path, monkeypatch):
    artefact = Int8Artefact(tiny, tmp_path)
    record = artefact.record()
    monkeypatch.setattr(quantize, "load_ir_runner", lambda path, threads, parallel: BoxesMoved(tiny))
    prepared = prepare(tiny, tmp_path, "int8")
    assert prepared.status == {SHAPE: "loaded"}
    assert prepared.accuracy == {"64x96": record}
    assert SHAPE in prepared.detector.runners


@needs_openvino
@pytest.mark.parametrize(
    ("record_fields", "status"),
    [
        (None, "eager: no accuracy record"),
        ({"passed": False, "drop_points": 2.5}, "eager: accuracy gate refused: mAP50-95 drop 2.5 > 1.0"),
        ({"artefact_sha256": "0" * 64}, "eager: accuracy record of other bytes"),
    ],
    ids=["missing", "failed", "other-bytes"],
)
def test_an_int8_artefact_without_a_passed_record_of_its_bytes_runs_eager(
    tiny, tmp_path, monkeypatch, caplog, record_fields, status
):
    artefact = Int8Artefact(tiny, tmp_path)
    record = artefact.record(**record_fields) if record_fields is not None else None
    monkeypatch.setattr(
        quantize, "load_ir_runner", lambda path, threads, parallel: pytest.fail("a refused artefact is loaded")
    )
    with caplog.at_level(logging.WARNING, logger="model.compiled"):
        prepared = prepare(tiny, tmp_path, "int8")
    assert prepared.status == {SHAPE: status}
    assert prepared.detector.runners == {}
    assert prepared.accuracy == ({"64x96": record} if record else {}), "a refused record is still shown"
    assert len(caplog.records) == 1
    assert f"int8 64x96 refused: {status.removeprefix('eager: ')}; that shape runs eager" in caplog.text


@needs_openvino
@pytest.mark.parametrize(
    ("column", "value", "status"),
    [
        (0, float("nan"), "eager: probe rows not finite"),
        (4, 1.5, "eager: probe rows break the contract (scores in [0, 1], known classes)"),
        (5, 7.0, "eager: probe rows break the contract (scores in [0, 1], known classes)"),
    ],
)
def test_int8_rows_must_keep_the_contract(tiny, tmp_path, monkeypatch, column, value, status):
    Int8Artefact(tiny, tmp_path).record()

    def broken(batch: torch.Tensor) -> torch.Tensor:
        rows = tiny(batch).clone()
        rows[:, 0, column] = value
        return rows

    monkeypatch.setattr(quantize, "load_ir_runner", lambda path, threads, parallel: broken)
    assert prepare(tiny, tmp_path, "int8").status == {SHAPE: status}


@needs_openvino
def test_building_int8_rebuilds_an_artefact_whose_gate_refused_it(tiny, tmp_path, monkeypatch):
    artefact = Int8Artefact(tiny, tmp_path)
    artefact.record(passed=False, drop_points=3.0)
    builds = []

    def build(eager, shape, max_batch, path, inputs):
        builds.append((shape, max_batch, inputs.calibration))
        Int8Artefact(eager, tmp_path).record()

    monkeypatch.setitem(ARTEFACTS, "int8", dataclasses.replace(ARTEFACTS["int8"], build=build))
    monkeypatch.setattr(quantize, "load_ir_runner", lambda path, threads, parallel: BoxesMoved(tiny))
    calibration = quantize.Calibration(max_map_drop=2.0)
    prepared = prepare(tiny, tmp_path, "int8", build_missing=True, calibration=calibration)
    assert builds == [(SHAPE, 8, calibration)]
    assert prepared.status == {SHAPE: "built"}
    assert prepare(tiny, tmp_path, "int8", build_missing=True).status == {SHAPE: "loaded"}, "a passed one is kept"


def test_top_rows_are_matched_whatever_their_order():
    reference = np.array([[[0, 0, 10, 10, 0.9, 1], [5, 5, 20, 20, 0.9, 0], [1, 1, 2, 2, 0.1, 0]]])
    swapped = reference[:, [1, 0, 2]].copy()
    assert top_rows_difference(swapped, reference) == 0.0
    moved = reference.copy()
    moved[0, 1, 0] += 0.5
    assert top_rows_difference(moved, reference) == pytest.approx(0.5)


def test_rows_tied_at_the_cut_off_are_compared_by_score_only():
    """Random weights score every anchor alike: which of them are kept is arbitrary, the scores are not."""
    reference = np.array([[[0, 0, 10, 10, 0.9, 1], [5, 5, 20, 20, 0.2, 0], [7, 7, 9, 9, 0.2, 1]]])
    other_anchor = reference.copy()
    other_anchor[0, 2, :4] = [50, 50, 60, 60]  # another of the tied rows was kept
    assert top_rows_difference(other_anchor, reference) == 0.0
    other_anchor[0, 2, 4] = 0.25
    assert top_rows_difference(other_anchor, reference) == pytest.approx(0.05)


@pytest.mark.slow
@torch.inference_mode()
def test_built_once_then_loaded_rows_match_eager_at_every_batch_size(tiny, tmp_path: Path):
    expected = {batch: tiny(images(batch)) for batch in (1, 3, 4)}
    built = prepare(tiny, tmp_path, max_batch=4, build_missing=True)
    assert built.status == {SHAPE: "built"}
    for batch, rows in expected.items():
        assert torch.allclose(tiny(images(batch)), rows), "exporting changed the eager detector"
    assert [path.name for path in tmp_path.iterdir()] == [path_of(tiny, "aotinductor", tmp_path, 4).name]
    loaded = prepare(tiny, tmp_path, max_batch=4)  # what a restart does: load, no build
    assert loaded.status == {SHAPE: "loaded"}
    for batch, rows in expected.items():
        out = loaded.detector(images(batch))
        assert out.shape == rows.shape
        assert top_rows_difference(out.numpy(), rows.numpy()) < 1e-3
    assert_callers_side_by_side_get_eager_rows(tiny, prepare(tiny, tmp_path, max_batch=4, parallel=2))


def assert_callers_side_by_side_get_eager_rows(eager, prepared) -> None:
    """Four threads, two at a time, call the detector loaded for two callers: each gets eager's rows."""
    assert prepared.status == {SHAPE: "loaded"}
    batches = [images(batch) for batch in (1, 2, 1, 2)]
    with torch.inference_mode():
        expected = [eager(batch) for batch in batches]
        with ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(prepared.detector, batches))
    for rows, reference in zip(answers, expected, strict=True):
        assert top_rows_difference(rows.numpy(), reference.numpy()) < 1e-3


@needs_openvino
def test_an_openvino_model_loaded_for_two_callers_answers_both_at_once(tiny, tmp_path: Path):
    prepare(tiny, tmp_path, "openvino", max_batch=2, build_missing=True)
    assert_callers_side_by_side_get_eager_rows(tiny, prepare(tiny, tmp_path, "openvino", max_batch=2, parallel=2))


def test_the_compile_command_builds_the_served_shapes_or_those_given_and_fails_when_one_runs_eager(
    monkeypatch, tmp_path, capsys
):
    from model.__main__ import main

    calls = []

    def fake(eager, shapes, max_batch, cache_dir, *, runtime, threads, build_missing=False, calibration=None):
        calls.append((list(shapes), max_batch, cache_dir, build_missing))
        assert (runtime, calibration) == ("aotinductor", None) and threads >= 1
        status = {shape: "built" for shape in shapes}
        runners = {shape: eager for shape in shapes}
        if max_batch == 4:
            status[shapes[0]], runners = "eager: RuntimeError", {}
        return compiled.Prepared(CompiledDetector(eager, runners, max_batch), status, 1.0)

    monkeypatch.setattr(compiled, "compiled_detector", fake)
    main(["compile", "--cache-dir", str(tmp_path)])  # the bundled model at its input size, 384
    assert calls[-1] == (common_shapes(384), 8, tmp_path, True)  # what the service serves compiled at 384
    assert "384x384: built" in capsys.readouterr().out and len(common_shapes(384)) == 7
    with pytest.raises(SystemExit) as exit_info:
        main(["compile", "--shapes", "64x96,96x64", "--max-batch", "4", "--cache-dir", str(tmp_path)])
    assert exit_info.value.code == 1
    assert calls[-1][:2] == ([(64, 96), (96, 64)], 4)
    assert "64x96: eager: RuntimeError" in capsys.readouterr().out


def test_the_compile_command_refuses_int8_for_a_model_without_held_out_data(monkeypatch, capsys):
    from model.__main__ import main

    user_model = SimpleNamespace(model=build_model(TINY).eval(), metadata=SimpleNamespace(input_size=64, name="tiny"))
    monkeypatch.setattr(checkpoint, "load", lambda path: user_model)
    monkeypatch.setattr(compiled, "compiled_detector", lambda *args, **kwargs: pytest.fail("nothing is built"))
    with pytest.raises(SystemExit) as exit_info:
        main(["compile", "tiny.pt", "--runtime", "int8"])
    assert exit_info.value.code == 2
    assert "int8 needs labelled held-out images" in capsys.readouterr().err


def test_the_compile_command_prints_int8_accuracy_and_records_it_in_the_bundle(monkeypatch, tmp_path, capsys):
    from model.__main__ import main

    bundle, pictures = tmp_path / "bundle", tmp_path / "pictures"
    shutil.copytree(DEFAULT_BUNDLE, bundle)
    pictures.mkdir()
    Image.new("RGB", (32, 32)).save(pictures / "a.png")
    record = {
        "fp32_mAP50-95": 0.75,
        "int8_mAP50-95": 0.747,
        "drop_points": 0.3,
        "max_drop_points": 0.5,
        "passed": True,
        "held_out": {"source": "synthetic test seeds 2000000..2000199", "images": 200, "boxes": 859},
        "calibration": {"source": str(pictures), "images": 1},
    }
    calls = []

    def fake(eager, shapes, max_batch, cache_dir, *, runtime, threads, build_missing=False, calibration=None):
        calls.append((runtime, calibration))
        detector = CompiledDetector(eager, {(384, 384): eager}, max_batch)
        return compiled.Prepared(detector, {(384, 384): "built"}, 1.0, accuracy={"384x384": record})

    monkeypatch.setattr(compiled, "compiled_detector", fake)
    main(
        [
            "compile",
            str(bundle),
            "--runtime",
            "int8",
            "--calibration",
            str(pictures),
            "--max-map-drop",
            "0.5",
            "--shapes",
            "384x384",
        ]
    )
    assert calls == [("int8", quantize.Calibration(images_dir=pictures, max_map_drop=0.5))]
    out = capsys.readouterr().out
    assert "384x384: built" in out
    assert "384x384: int8 gate passed: mAP50-95 fp32 0.75, int8 0.747, drop 0.3 points (limit 0.5)" in out
    loaded = load(bundle)
    assert loaded.metadata.provenance["int8"] == {"384x384": record}
    assert loaded.checksum == "verified"
