"""Ultralytics imported quietly: its import-time messages (the settings file it creates) are dropped, what it logs
afterwards (training progress) is not. OpenVINO's and NNCF's telemetry stays off."""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from model.offline import errors_only

REPO = Path(__file__).resolve().parents[2]


def test_errors_only_drops_records_below_error_for_the_block(caplog):
    logger = logging.getLogger("tests.model.offline")
    with caplog.at_level(logging.INFO):
        with errors_only(logger.name):
            logger.info("dropped")
            logger.warning("dropped too")
            logger.error("kept")
        logger.info("kept after the block")
    assert [record.getMessage() for record in caplog.records] == ["kept", "kept after the block"]


def test_importing_ultralytics_into_a_new_temp_dir_prints_nothing(tmp_path):
    """A fresh temp dir, as in a new container: ultralytics creates its settings file there, and says so only
    when not imported through ``model``; its logger still prints once imported."""
    after_import = "import model\nfrom ultralytics.utils import LOGGER\nLOGGER.info('after the import')\n"
    env = {k: v for k, v in os.environ.items() if k != "YOLO_VERBOSE"} | {"TMPDIR": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-c", after_import], capture_output=True, text=True, cwd=REPO, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert (result.stdout, result.stderr) == ("after the import\n", "")
    assert (tmp_path / "akconv-detector" / "ultralytics" / "Ultralytics" / "settings.json").is_file()


@pytest.mark.skipif(
    not all(importlib.util.find_spec(package) for package in ("openvino", "nncf")),
    reason="the openvino extra is not installed",
)
def test_openvino_and_nncf_telemetry_stays_off_and_out_of_the_home_directory(tmp_path):
    """Without ``model.offline``, converting a model creates ``~/intel`` (a client id for Google Analytics) and nncf
    sets up its telemetry; imported through ``model``, both get their stubs."""
    convert_and_quantize_imports = (
        "import model, torch, openvino\n"
        "openvino.convert_model(torch.export.export(torch.nn.Linear(2, 2), (torch.zeros(1, 2),)))\n"
        "from model.quantize import _nncf\n"
        "_nncf()\n"
        "from nncf.telemetry import wrapper\n"
        "from openvino.tools.ovc import telemetry_utils\n"
        "print(type(wrapper.telemetry).__name__, telemetry_utils.tm.__name__)\n"
    )
    env = os.environ | {"HOME": str(tmp_path), "TMPDIR": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-c", convert_and_quantize_imports],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert (result.stdout, result.stderr) == ("MagicMock openvino.tools.ovc.telemetry_stub\n", "")
    assert not (tmp_path / "intel").exists()
