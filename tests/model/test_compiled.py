"""model.compiled: compiled runners in front of the eager detector, and every way back to eager."""

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from model import compiled
from model.build import build_model, fuse_for_inference
from model.compiled import CompiledDetector, artefact_key, compiled_detector, package_path, top_rows_difference

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


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = build_model(TINY).eval()
    torch.nn.init.normal_(model.model[1].p_conv.weight, std=0.3)  # offsets that move the samples
    return fuse_for_inference(model).to(memory_format=torch.channels_last)


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


def test_the_key_changes_with_everything_baked_into_a_package(tiny):
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


@torch.inference_mode()
def test_without_a_package_every_shape_runs_eager_and_says_so(tiny, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="model.compiled"):
        prepared = compiled_detector(tiny, [SHAPE], 8, tmp_path)
    assert prepared.status == {SHAPE: "eager: no package"}
    assert prepared.detector.runners == {}
    assert "no package for 64x96" in caplog.text
    assert (
        f"python -m model compile MODEL --size SIZE --shapes 64x96 --max-batch 8 --cache-dir {tmp_path}" in caplog.text
    )
    assert torch.equal(prepared.detector(images(1)), tiny(images(1)))


def test_a_damaged_package_leaves_its_shape_eager(tiny, tmp_path, caplog):
    package_path(tiny, SHAPE, 8, tmp_path).write_text("not a package")
    with caplog.at_level(logging.WARNING, logger="model.compiled"):
        prepared = compiled_detector(tiny, [SHAPE], 8, tmp_path)
    assert prepared.status[SHAPE].startswith("eager: ")
    assert prepared.detector.runners == {}
    assert "64x96 failed" in caplog.text


def test_a_runner_that_disagrees_with_eager_is_not_used(tiny, tmp_path, monkeypatch, caplog):
    package_path(tiny, SHAPE, 8, tmp_path).touch()
    monkeypatch.setattr(compiled, "load_runner", lambda path: Recorder(tiny, offset=0.01))
    with caplog.at_level(logging.WARNING, logger="model.compiled"):
        prepared = compiled_detector(tiny, [SHAPE], 8, tmp_path)
    assert prepared.status == {SHAPE: "eager: probe differs by 1.0e-02"}
    assert "differs from eager by 1.0e-02" in caplog.text


def test_a_detector_that_is_not_float32_on_the_cpu_runs_eager(tiny, tmp_path, caplog):
    half = fuse_for_inference(build_model(TINY).eval()).half()
    with caplog.at_level(logging.WARNING, logger="model.compiled"):
        prepared = compiled_detector(half, [SHAPE], 8, tmp_path, build_missing=True)
    assert prepared.status == {SHAPE: "eager: not cpu float32"}
    assert not any(tmp_path.iterdir()), "nothing is built"


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
    built = compiled_detector(tiny, [SHAPE], 4, tmp_path, build_missing=True)
    assert built.status == {SHAPE: "built"}
    for batch, rows in expected.items():
        assert torch.allclose(tiny(images(batch)), rows), "exporting changed the eager detector"
    assert [path.name for path in tmp_path.iterdir()] == [package_path(tiny, SHAPE, 4, tmp_path).name]
    loaded = compiled_detector(tiny, [SHAPE], 4, tmp_path)  # what a restart does: load, no build
    assert loaded.status == {SHAPE: "loaded"}
    for batch, rows in expected.items():
        out = loaded.detector(images(batch))
        assert out.shape == rows.shape
        assert top_rows_difference(out.numpy(), rows.numpy()) < 1e-3


def test_the_compile_command_builds_the_shapes_it_is_given_and_fails_when_one_runs_eager(monkeypatch, tmp_path, capsys):
    from model.__main__ import main

    calls = []

    def fake(eager, shapes, max_batch, cache_dir, *, build_missing=False):
        calls.append((list(shapes), max_batch, cache_dir, build_missing))
        status = {shape: "built" for shape in shapes}
        runners = {shape: eager for shape in shapes}
        if max_batch == 4:
            status[shapes[0]], runners = "eager: RuntimeError", {}
        return compiled.Prepared(CompiledDetector(eager, runners, max_batch), status, 1.0)

    monkeypatch.setattr(compiled, "compiled_detector", fake)
    main(["compile", "--cache-dir", str(tmp_path)])  # the bundled model at its input size, 384
    assert calls[-1] == ([(384, 384)], 8, tmp_path, True)  # the square; the service's other shapes by --shapes
    assert "384x384: built" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["compile", "--shapes", "64x96,96x64", "--max-batch", "4", "--cache-dir", str(tmp_path)])
    assert exit_info.value.code == 1
    assert calls[-1][:2] == ([(64, 96), (96, 64)], 4)
    assert "64x96: eager: RuntimeError" in capsys.readouterr().out
