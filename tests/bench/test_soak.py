"""bench.soak: a short soak with its swap scenario against a real server."""

from __future__ import annotations

import asyncio
import json
import shutil

import pytest

from bench.load import synthetic_payloads
from bench.soak import MODEL_NAME, bad_payloads, soak
from model.checkpoint import DEFAULT_BUNDLE
from tests.service.server import running_server


@pytest.mark.e2e
@pytest.mark.slow
def test_a_short_soak_swaps_the_model_under_traffic_and_reports_each_swap(tmp_path) -> None:
    """Half a minute in three windows, a swap every 4 s: every answer is the payload's documented one, every swap is
    answered 200 and counted in the window it finished in."""
    bundle = tmp_path / "bundle"
    shutil.copytree(DEFAULT_BUNDLE, bundle)
    valid = synthetic_payloads(count=2, size=320)
    with running_server(tmp_path, "--models", json.dumps({MODEL_NAME: str(bundle)})) as server:
        report = asyncio.run(
            soak(server.url, server.process.pid, valid + bad_payloads(valid[0]), minutes=0.5, rate=2, window_s=10,
                 bundle=bundle, swap_interval_s=4)
        )  # fmt: skip
        swapped = server.log().count('"model swapped"')
    assert report["unexpected"] == {} and report["connection_errors"] == {}
    assert report["swaps"] >= 5 and report["failed_swaps"] == []
    assert sum(window["swaps"] for window in report["windows"]) == report["swaps"]
    assert swapped in (report["swaps"], report["swaps"] + 1)  # + the one the soak's end may have left in flight
