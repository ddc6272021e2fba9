"""The recipe user's server (bench.peers.recipe_user) on a seed-recipe checkpoint answers like the service's /detect."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from bench.load_rounds import REPO_ROOT, clean_environment
from bench.peers.recipe import SEED_FILE
from bench.processes import free_port, running_process
from service.schemas import DetectionOut, ImageSize

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.skipif(not SEED_FILE.exists(), reason=f"the recipe peer runs the seed's AKConv: {SEED_FILE} absent"),
]

BUS = Path(__import__("ultralytics").__file__).parent / "assets" / "bus.jpg"


def test_recipe_user_answers_detect_json_for_a_photo(tmp_path: Path) -> None:
    checkpoint = tmp_path / "best.pt"
    # In a child process: registering the recipe's AKConv changes ultralytics for the rest of the process.
    subprocess.run([sys.executable, "-m", "bench.seed_checkpoint", str(checkpoint)], check=True, cwd=REPO_ROOT)
    port = free_port()
    command = [sys.executable, "-m", "bench.peers.recipe_user", "--model", str(checkpoint), "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    with running_process(
        command, tmp_path / "server.log", f"{url}/health", 300, env=clean_environment(), cwd=REPO_ROOT
    ):
        response = httpx.post(f"{url}/detect", files={"file": ("bus.jpg", BUS.read_bytes(), "image/jpeg")}, timeout=120)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert set(answer) == {"image", "detections", "batch_size"}
    assert ImageSize.model_validate(answer["image"]) == ImageSize(width=810, height=1080)
    for detection in answer["detections"]:
        DetectionOut.model_validate(detection)
    assert answer["batch_size"] == 1
