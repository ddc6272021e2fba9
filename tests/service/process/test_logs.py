"""Every line on stderr is JSON, whoever writes it, and nothing plain reaches stdout. Each case runs in a process of
its own, since ``configure_logging`` takes over the process's stderr."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest

from tests.service.server import REPO, running_server

BUS = Path(importlib.util.find_spec("ultralytics").origin).parent / "assets" / "bus.jpg"

NOISY_PROCESS = textwrap.dedent(
    """
    import io, logging, os, warnings
    import numpy as np
    from PIL import Image
    from service.process.logs import configure_logging

    configure_logging("info")
    logging.getLogger("service").info("ours", extra={"request_id": "abc"})
    warnings.warn("a plain Python warning")

    Image.MAX_IMAGE_PIXELS = 1000  # a 40x40 PNG is then a possible decompression bomb: PIL warns
    png = io.BytesIO()
    Image.new("RGB", (40, 40)).save(png, format="PNG")
    Image.open(png).load()
    Image.MAX_IMAGE_PIXELS = None

    tiff = io.BytesIO()  # an LZW TIFF with its strip damaged: libtiff prints its error on file descriptor 2
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tiff, format="TIFF", compression="tiff_lzw")
    damaged = bytearray(tiff.getvalue())
    damaged[8:60] = bytes(byte ^ 0x55 for byte in damaged[8:60])
    try:
        Image.open(io.BytesIO(bytes(damaged))).load()
    except OSError:
        pass

    os.write(2, b"a raw line from C\\n")
    """
)


def test_every_line_on_stderr_is_json():
    result = subprocess.run(
        [sys.executable, "-c", NOISY_PROCESS], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stderr.splitlines()]  # fails on any line that is not JSON
    by_logger = {}
    for record in records:
        by_logger.setdefault(record["logger"], []).append(record["message"])
    assert by_logger["service"] == ["ours"] and records[0]["request_id"] == "abc"
    warnings = " ".join(by_logger["py.warnings"])
    assert "a plain Python warning" in warnings and "DecompressionBombWarning" in warnings
    assert any("Using code not yet in table" in message for message in by_logger["stderr"])  # libtiff
    assert "a raw line from C" in by_logger["stderr"]


def test_a_crash_traceback_still_reaches_stderr():
    """Python's own report of a crash goes out directly (plain), so the forwarding thread cannot lose it."""
    crash = "from service.process.logs import configure_logging\nconfigure_logging('info')\nraise SystemError('boom')\n"
    result = subprocess.run([sys.executable, "-c", crash], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 1 and "SystemError: boom" in result.stderr


def test_ultralytics_logs_become_json_lines_at_the_configured_level():
    """Ultralytics' own logger prints plain text on stdout; once logging is configured (after ultralytics is
    imported, as in the server), its records are JSON lines on stderr, filtered by the server's level."""
    ultralytics_logs = textwrap.dedent(
        """
        import model
        from service.process.logs import configure_logging
        from ultralytics.utils import LOGGER

        configure_logging("warning")
        LOGGER.info("a model summary")
        LOGGER.warning("a warning")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "YOLO_VERBOSE"}
    result = subprocess.run(
        [sys.executable, "-c", ultralytics_logs], capture_output=True, text=True, cwd=REPO, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    records = [json.loads(line) for line in result.stderr.splitlines()]
    assert [(r["logger"], r["level"], r["message"]) for r in records] == [("ultralytics", "warning", "a warning")]


@pytest.mark.e2e
@pytest.mark.slow
def test_the_server_writes_only_json_lines_from_start_to_stop(tmp_path, monkeypatch):
    """A fresh temp dir, as in a new container (ultralytics then creates its settings file): every line on stdout
    and stderr, from the start to the end of a SIGTERM, is a JSON object."""
    fresh_tmp = tmp_path / "tmp"
    fresh_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(fresh_tmp))  # the server's temp dir (model/offline.py's settings go there)
    monkeypatch.delenv("YOLO_VERBOSE", raising=False)
    with running_server(tmp_path) as server:
        response = httpx.post(server.url + "/detect", files={"file": ("bus.jpg", BUS.read_bytes())}, timeout=60)
        assert response.status_code == 200, response.text
        server.terminate()
    lines = server.log().splitlines()  # stdout and stderr, interleaved as written
    records = [json.loads(line) for line in lines]  # fails on any line that is not JSON
    assert all(isinstance(record, dict) for record in records), lines
    messages = [record["message"] for record in records]
    assert "ready" in messages and "stopped" in messages, messages
    assert (fresh_tmp / "akconv-detector" / "ultralytics" / "Ultralytics" / "settings.json").is_file()
