"""The client installs on its own: no torch, ultralytics or FastAPI, and its CLI works against a running server."""

import subprocess
import sys

import pytest

from model.synthetic import SPLITS, render
from tests.image_files import encode
from tests.service.server import REPO, running_server

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_a_fresh_virtualenv_gets_the_client_and_cli_only(tmp_path):
    wheels = tmp_path / "wheels"  # the project's wheel, built here once (a fresh build env would download setuptools)
    build = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(wheels)]
    subprocess.run([*build, str(REPO)], check=True, capture_output=True, timeout=300)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", *map(str, wheels.glob("*.whl"))],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr[-2000:]
    for server_only in ("torch", "ultralytics", "fastapi", "uvicorn"):
        found = subprocess.run([str(python), "-c", f"import {server_only}"], capture_output=True)
        assert found.returncode != 0, f"{server_only} was installed with the client"
    image = tmp_path / "sample.png"
    image.write_bytes(encode(render(SPLITS["test"], 320)[0]))
    with running_server(tmp_path) as server:
        detected = subprocess.run(
            [str(venv / "bin" / "akconv-detect"), "--url", server.url, "--json", "--conf", "0", str(image)],
            capture_output=True, text=True, timeout=120, cwd=tmp_path,
        )  # fmt: skip
    assert detected.returncode == 0, detected.stderr
    assert '"detections": [{' in detected.stdout
