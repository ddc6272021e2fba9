"""Peer 3: the server a user of the seed recipe writes — FastAPI, ``YOLO("best.pt").predict(img, imgsz=640)``.

    python -m bench.peers.recipe_user --model BEST.pt [--port 8003]

What the user has: ultralytics with the recipe's AKConv registered (the seed's module, see
:mod:`bench.peers.recipe`), a recipe checkpoint, and these few lines. One request at a time under a lock
(ultralytics' predictor is not thread-safe and FastAPI runs sync endpoints in a thread pool), no batching. Predict
runs with ultralytics' defaults — its own letterbox (the smallest multiple of 32 that holds the resized photo),
conf 0.25 — except ``nms=False``: ultralytics 8.4.190 predicts v10 models with the one-to-many head and NMS
unless told otherwise, and the NMS-free one-to-one head is what YOLOv10 is for and what the service answers from.

Threads, as the user gets them: importing ultralytics sets ``OMP_NUM_THREADS=1`` when it is unset, and its
``select_device`` sets torch to ``min(8, cpu_count - 1)`` threads on CPU (one on a 2-core machine). Nothing here
undoes that: it is what this server runs with.

``POST /detect`` takes the multipart field ``file`` and answers ``{"image", "detections", "batch_size"}`` shaped
like the service's; ``GET /health`` answers 200 once the model is loaded. Listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
from pathlib import Path
from typing import Annotated, Any

# Benchmark hygiene, not the user's code: ultralytics probes the network and writes its settings at import time
# unless told it is offline; neither changes the model or its threads.
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_CONFIG_DIR", str(Path(tempfile.gettempdir()) / "akconv-detector" / "recipe-user"))

import uvicorn  # noqa: E402
from fastapi import FastAPI, File, UploadFile  # noqa: E402
from ultralytics import YOLO  # noqa: E402

from bench.peers.answers import decode_rgb, detections_json  # noqa: E402
from bench.peers.recipe import register_recipe_akconv  # noqa: E402


def create_app(model_path: Path) -> FastAPI:
    register_recipe_akconv()
    model = YOLO(str(model_path))
    lock = threading.Lock()
    app = FastAPI(title="seed recipe user's server")

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/detect")
    def detect(file: Annotated[UploadFile, File()]) -> dict[str, Any]:
        image = decode_rgb(file.file.read())
        with lock:
            result = model.predict(image, imgsz=640, nms=False, verbose=False)[0]
        return {**detections_json(result), "batch_size": 1}

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a seed-recipe .pt (bench.seed_checkpoint)")
    parser.add_argument("--port", type=int, default=8003)
    args = parser.parse_args(argv)
    uvicorn.run(create_app(args.model), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
