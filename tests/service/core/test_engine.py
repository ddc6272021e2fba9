"""The real engine's options that the fake engine cannot stand in for."""

from __future__ import annotations

import logging

from service.core.engine import Engine
from service.process.settings import Settings


def test_a_compiled_dir_without_packages_runs_eager_and_says_which_shapes(tmp_path, caplog):
    """Opt-in compiled model (``compiled_dir``): a folder without packages for this model leaves every shape eager,
    with a warning per shape, and the engine answers as before."""
    with caplog.at_level(logging.INFO):
        engine = Engine(Settings(compiled_dir=tmp_path), None)
    engine.verify((384, 384))
    assert "no package for 384x384" in caplog.text and "python -m model compile" in caplog.text
    assert engine.detector.runners == {}
    compiled = next(record for record in caplog.records if record.getMessage() == "compiled model")
    assert set(compiled.shapes.values()) == {"eager: no package"}
