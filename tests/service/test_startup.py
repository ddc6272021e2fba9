"""Start-up with a model file that cannot be used: one plain line naming the file, the kind's exit status."""

import json
import shutil
import subprocess
import sys

import pytest

from bench.processes import free_port
from model.checkpoint import DEFAULT_BUNDLE, METADATA_FILE, WEIGHTS_FILE
from service.__main__ import load_engines
from service.process.settings import Settings
from tests.service.server import REPO


def damaged_bundles(root):
    """Bundles broken the ways a user meets: kind -> (path, exit status, words of the message)."""
    cases = {}

    def copy(name):
        bundle = root / name
        shutil.copytree(DEFAULT_BUNDLE, bundle)
        return bundle

    flipped = copy("flipped")
    data = bytearray((flipped / WEIGHTS_FILE).read_bytes())
    data[-100] ^= 0xFF
    (flipped / WEIGHTS_FILE).write_bytes(bytes(data))
    cases["flipped byte"] = (flipped, 5, "does not match")
    truncated = copy("truncated")
    (truncated / WEIGHTS_FILE).write_bytes((truncated / WEIGHTS_FILE).read_bytes()[:4096])
    cases["truncated weights"] = (truncated, 5, "does not match")
    broken = copy("broken-json")
    (broken / METADATA_FILE).write_text("{")
    cases["broken model.json"] = (broken, 5, "is not valid JSON")
    poisoned = copy("poisoned")
    metadata = json.loads((poisoned / METADATA_FILE).read_text())
    metadata["config"]["activation"] = f"__import__('os').system('touch {root / 'marker'}') or nn.SiLU()"
    (poisoned / METADATA_FILE).write_text(json.dumps(metadata))
    cases["code in the config"] = (poisoned, 6, "'activation'")
    renamed = copy("classes")
    metadata = json.loads((renamed / METADATA_FILE).read_text())
    metadata["names"] = ["triangle", "star", "circle"]
    (renamed / METADATA_FILE).write_text(json.dumps(metadata))
    cases["class-count mismatch"] = (renamed, 7, "3 class names for a config with nc=2")
    cases["no such path"] = (root / "nothing", 4, "does not exist")
    cases["not a bundle"] = (root, 4, "is not a model bundle")
    return cases


def test_each_unusable_model_stops_the_start_with_one_line_and_its_status(tmp_path, capsys):
    for kind, (path, status, words) in damaged_bundles(tmp_path).items():
        with pytest.raises(SystemExit) as stopped:
            load_engines(Settings(model_path=path))
        line = capsys.readouterr().err
        assert stopped.value.code == status, kind
        assert line.count("\n") == 1 and str(path) in line and words in line, (kind, line)
    assert not (tmp_path / "marker").exists(), "the poisoned config ran code"


@pytest.mark.e2e
def test_the_server_process_prints_the_line_without_a_traceback(tmp_path):
    path, status, words = damaged_bundles(tmp_path)["code in the config"]
    started = subprocess.run(
        [sys.executable, "-m", "service", "--model-path", str(path), "--port", str(free_port())],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert started.returncode == status
    assert started.stderr.count("\n") == 1 and words in started.stderr and "Traceback" not in started.stderr
    assert not (tmp_path / "marker").exists()
