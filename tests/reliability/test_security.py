"""Security promises that need the real server or a real process: CORS off by default, pickled code never runs."""

from __future__ import annotations

import subprocess
import sys

import torch

from tests.service.server import REPO


def test_cors_is_off_unless_configured(client):
    headers = {"origin": "https://anywhere.example", "access-control-request-method": "POST"}
    assert "access-control-allow-origin" not in client.options("/detect", headers=headers).headers
    assert "access-control-allow-origin" not in client.get("/healthz", headers={"origin": "https://a.example"}).headers


def test_a_malicious_checkpoint_is_refused_and_runs_nothing(tmp_path):
    """A .pt whose pickle would run a shell command: the server refuses to start and the command never ran."""
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (subprocess.call, (["touch", str(marker)],))

    evil = tmp_path / "evil.pt"
    torch.save({"model": Exploit()}, evil)
    started = subprocess.run(
        [sys.executable, "-m", "service", "--model-path", str(evil), "--port", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert started.returncode == 6, started.stderr[-2000:]  # RefusedModel
    assert "which is not on the allow-list" in started.stderr and started.stderr.count("\n") == 1
    assert not marker.exists()
