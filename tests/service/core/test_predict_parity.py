"""The service answers what ultralytics' predict answers on the same seed-recipe checkpoint and photo, within 1 px:
same rectangular letterbox, same boxes mapped back. The photos are real ones shipped inside ultralytics."""

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import ultralytics

from service.app import create_app
from service.process.settings import Settings

REPO = Path(__file__).resolve().parents[3]
PHOTOS = [Path(ultralytics.__file__).parent / "assets" / name for name in ("bus.jpg", "zidane.jpg")]  # 3:4, 16:9
IMAGE_SIZE = 320  # the seed's loop AKConv (what ultralytics runs here) is slow: a small input keeps the test short
CONF = 0.0  # a random-weight model scores low: compare its top detections whatever their score
TOP = 20


@pytest.fixture(scope="module")
def ultralytics_rows(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("seed")
    subprocess.run([sys.executable, "-m", "tests.model.seed_recipe", str(out_dir)], cwd=REPO, check=True)
    out = out_dir / "predict.json"
    command = [sys.executable, "-m", "tests.service.ultralytics_predict", str(out_dir / "model.pt"), str(out)]
    subprocess.run([*command, *map(str, PHOTOS), "--imgsz", str(IMAGE_SIZE), "--conf", str(CONF)], cwd=REPO, check=True)
    return out_dir / "model.pt", {
        Path(photo).name: np.array(rows) for photo, rows in json.loads(out.read_text()).items()
    }


def service_rows(model_path: Path) -> dict[str, np.ndarray]:
    settings = Settings(model_path=model_path, device="cpu", input_size=IMAGE_SIZE, warmup_rounds=0, max_detections=300)

    async def scenario():
        app = create_app(settings)  # the real engine
        async with app.router.lifespan_context(app), in_process_client(app) as client:
            answers = {}
            for photo in PHOTOS:
                response = await client.post(
                    "/detect", files={"file": (photo.name, photo.read_bytes())}, params={"conf": CONF, "max_det": 300}
                )
                answers[photo.name] = response.json()["detections"]
            return answers

    answers = asyncio.run(asyncio.wait_for(scenario(), 300))
    return {
        name: np.array([[*d["box"].values(), d["confidence"], d["class_id"]] for d in detections])
        for name, detections in answers.items()
    }


def in_process_client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=300)


def unmatched(top: np.ndarray, among: np.ndarray) -> list[list[float]]:
    """Rows of ``top`` with no row of ``among`` of the same class, a score within 1e-3 and every coordinate within
    1 px (scores of a random model nearly tie, so the order may differ between the two)."""
    return [
        row.tolist()
        for row in top
        if not (
            (among[:, 5] == row[5])
            & (np.abs(among[:, 4] - row[4]) <= 1e-3)
            & (np.abs(among[:, :4] - row[:4]).max(1) <= 1)
        ).any()
    ]


@pytest.mark.slow
def test_boxes_match_ultralytics_predict_on_the_same_seed_checkpoint_within_one_pixel(ultralytics_rows):
    model_path, expected = ultralytics_rows
    served = service_rows(model_path)
    for name in expected:
        assert len(expected[name]) and len(served[name]), name
        assert unmatched(expected[name][:TOP], served[name]) == [], f"{name}: ultralytics' boxes the service lacks"
        assert unmatched(served[name][:TOP], expected[name]) == [], f"{name}: the service's boxes ultralytics lacks"
