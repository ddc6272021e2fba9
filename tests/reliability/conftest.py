"""One fault-injecting server for the whole reliability suite, and a record of the figures it measures.

The figures go to ``runs/artifacts/reliability.json``; ``docs/RELIABILITY.md`` quotes them.
"""

from __future__ import annotations

import json

import httpx
import pytest

from tests.reliability.corpus import SERVER_FLAGS
from tests.service.server import REPO, ServerProcess, running_server

FIGURES = REPO / "runs" / "artifacts" / "reliability.json"


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> ServerProcess:
    with running_server(
        tmp_path_factory.mktemp("reliability"), *SERVER_FLAGS, entry="tests.reliability.fault_server"
    ) as running:
        yield running


@pytest.fixture
def client(server) -> httpx.Client:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


@pytest.fixture(scope="session")
def record():
    """``record(name, **figures)``: keep a test's measured figures for docs/RELIABILITY.md."""
    figures: dict[str, dict] = {}
    yield lambda name, **values: figures.__setitem__(name, values)
    FIGURES.parent.mkdir(parents=True, exist_ok=True)
    FIGURES.write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")
