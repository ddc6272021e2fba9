"""The real engine's options that the fake engine cannot stand in for."""

from __future__ import annotations

import logging

import pytest

from model.letterbox import common_shapes
from service.core.engine import Engine
from service.process.settings import Settings


@pytest.mark.parametrize("runtime", ["aotinductor", "openvino", "int8"])
def test_a_runtime_without_artefacts_runs_eager_and_says_which_shapes(runtime, tmp_path, caplog):
    """A runtime whose folder holds no artefact for this model leaves every shape eager, with a warning per shape,
    the engine answers as before, and its runtime description says so."""
    with caplog.at_level(logging.INFO):
        engine = Engine(Settings(runtime=runtime, compiled_dir=tmp_path), None, runtime)
    engine.verify((384, 384))
    assert "384x384" in caplog.text and "python -m model compile" in caplog.text
    assert engine.detector.runners == {}
    compiled = next(record for record in caplog.records if record.getMessage() == "compiled model")
    assert all(state.startswith("eager") for state in compiled.shapes.values())
    assert engine.runtime["requested"] == runtime and engine.runtime["shapes"] == compiled.shapes


def test_eager_describes_every_served_shape():
    engine = Engine(Settings(), None, "eager")
    assert engine.runtime == {
        "requested": "eager",
        "shapes": {f"{height}x{width}": "eager" for height, width in common_shapes(engine.input_size)},
        "accuracy": None,
    }
