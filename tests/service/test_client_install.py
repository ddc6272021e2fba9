"""The client installs on its own, on every Python it supports: no server package (torch, FastAPI, gRPC,
OpenTelemetry...), and its CLI works against a running server; with the newest versions its ranges allow, and with the
lowest.

Each case makes a fresh virtual environment from that Python and installs the project's wheel (built here once) from
the package index, as a user would (`pip install akconv-detector`). A Python missing on this machine skips its cases,
saying so; in CI (``CI=true``) it fails them instead: CI machines have the same Pythons (pyenv) as the development
ones, and a skip there would hide that the client went untested on one.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.version import Version

from model.synthetic import SPLITS, render
from tests.image_files import encode
from tests.service.server import REPO, running_server

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# The Pythons the client supports and is tested on (README, "Python client and CLI"); pyproject's requires-python.
CLIENT_PYTHONS = ("3.11", "3.12", "3.13")
# The lowest versions are tried on the oldest and the newest Python: their wheels differ most (pydantic-core's).
LOWEST_ON = ("3.11", "3.13")
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def distribution(requirement: str) -> str:
    """The normalized distribution name of a requirement (``opentelemetry-api==1.45.2`` -> ``opentelemetry-api``)."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement).group()).lower()


def lower_bounds() -> dict[str, str]:
    """``name -> lowest version`` of the client's dependencies (pyproject's ``>=`` bounds)."""
    bounds = {distribution(r): re.search(r">=\s*([^,;\s]+)", r).group(1) for r in PROJECT["dependencies"]}
    assert len(bounds) == len(PROJECT["dependencies"]), "every client dependency has a lower bound"
    return bounds


@functools.cache
def find_python(version: str) -> str | None:
    """An interpreter of ``version`` (e.g. ``3.12``): on PATH, or one of pyenv's (whose shims on PATH answer only for
    the versions selected), checked by running it."""
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    candidates = [shutil.which(f"python{version}"), *sorted(map(str, pyenv.glob(f"{version}.*/bin/python{version}")))]
    for candidate in filter(None, candidates):
        answer = subprocess.run(
            [candidate, "-c", "import sys, venv, ensurepip; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        if answer.returncode == 0 and answer.stdout.strip() == version:
            return candidate
    return None


def python_or_skip(version: str) -> str:
    python = find_python(version)
    if python is None:
        message = f"no Python {version} with venv and ensurepip on this machine (PATH, or pyenv's versions)"
        if os.environ.get("CI") == "true":
            pytest.fail(message + "; CI machines have it")
        pytest.skip(message)
    return python


def test_requires_python_and_the_tested_pythons_agree():
    assert PROJECT["requires-python"] == f">={CLIENT_PYTHONS[0]}"
    assert set(LOWEST_ON) <= set(CLIENT_PYTHONS)
    assert sorted(lower_bounds()) == ["httpx", "pydantic", "tqdm"]
    assert all(re.search(r",\s*<\s*\d", requirement) for requirement in PROJECT["dependencies"]), "an upper bound each"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The project's wheel, built once from this checkout (without build isolation: a fresh build environment would
    download setuptools)."""
    wheels = tmp_path_factory.mktemp("wheels")
    build = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(wheels)]
    subprocess.run([*build, str(REPO)], check=True, capture_output=True, timeout=300)
    (built,) = wheels.glob("*.whl")
    return built


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for every case; and the image they send."""
    folder = tmp_path_factory.mktemp("server")
    image = folder / "sample.png"
    image.write_bytes(encode(render(SPLITS["test"], 320)[0]))
    with running_server(folder) as running:
        yield running.url, image


@pytest.mark.parametrize(
    ("version", "versions"),
    [*((v, "newest") for v in CLIENT_PYTHONS), *((v, "lowest") for v in LOWEST_ON)],
)
def test_a_fresh_virtualenv_gets_the_client_and_cli_only(version, versions, wheel, server, tmp_path):
    python = python_or_skip(version)
    venv = tmp_path / "venv"
    subprocess.run([python, "-m", "venv", str(venv)], check=True, timeout=120)
    venv_python = str(venv / "bin" / "python")
    pins = [f"{name}=={bound}" for name, bound in lower_bounds().items()] if versions == "lowest" else []
    install = subprocess.run(
        [venv_python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(wheel), *pins],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr[-2000:]

    listed = subprocess.run([venv_python, "-m", "pip", "list", "--format", "json"], capture_output=True, text=True)
    installed = {distribution(p["name"]): p["version"] for p in json.loads(listed.stdout)}
    server_only = {distribution(r) for r in PROJECT["optional-dependencies"]["server"]} - set(lower_bounds())
    server_only |= {"torch", "ultralytics", "fastapi", "uvicorn", "grpcio", "protobuf", "opentelemetry-api"}
    assert not server_only & set(installed), (
        f"server packages installed with the client: {server_only & set(installed)}"
    )
    if versions == "lowest":
        lowest = {name: Version(bound) for name, bound in lower_bounds().items()}
        assert {name: Version(installed[name]) for name in lowest} == lowest

    imported = subprocess.run(
        [venv_python, "-c", "import service.client, service.cli; print(service.client.__file__)"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert imported.returncode == 0, imported.stderr
    assert Path(imported.stdout.strip()).is_relative_to(venv), "the installed client, not this checkout's"
    url, image = server
    detected = subprocess.run(
        [str(venv / "bin" / "akconv-detect"), "--url", url, "--json", "--conf", "0", str(image)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert detected.returncode == 0, detected.stderr
    assert '"detections": [{' in detected.stdout, detected.stdout
