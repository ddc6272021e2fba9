"""Every line on stderr is JSON, whoever writes it. Each case runs in a process of its own, since
``configure_logging`` takes over the process's stderr."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from tests.service.server import REPO

NOISY_PROCESS = textwrap.dedent(
    """
    import io, logging, os, warnings
    import numpy as np
    from PIL import Image
    from service.logs import configure_logging

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
    crash = "from service.logs import configure_logging\nconfigure_logging('info')\nraise SystemError('boom')\n"
    result = subprocess.run([sys.executable, "-c", crash], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 1 and "SystemError: boom" in result.stderr
