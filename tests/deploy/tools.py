"""Real tools the deployment tests run; each must be installed (``make test`` and ``.ci/run`` install them)."""

import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
VENV_BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    """Path of ``name`` on PATH or in the venv; fails with how to install it."""
    found = shutil.which(name) or shutil.which(name, path=str(VENV_BIN))
    assert found, f"{name} is not installed: run `make system-deps` (Debian: nginx, prometheus, docker-compose)"
    return found
