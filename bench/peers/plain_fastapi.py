"""Peer 1: a plain FastAPI endpoint, ``YOLO.predict`` per request, around the project's model (serving overhead).

    python -m bench.peers.plain_fastapi [--port 8001] [--model BUNDLE_DIR_OR_PT] [--imgsz 320] [--device cpu]
        [--half] [--rect]

One model, one request at a time under a lock (ultralytics' predictor is not thread-safe and FastAPI runs sync
endpoints in a thread pool), no batching. ``POST /detect`` takes the multipart field ``file`` and ``conf``, and
answers ``{"image", "detections", "batch_size"}`` shaped like the service's; ``GET /health`` answers 200 once the
model is loaded. Listens on 127.0.0.1 only. ``--model`` takes a ``.pt`` or a bundle (exported to a ``.pt`` once, see
:mod:`bench.peers.export_pt`). Same head and square letterbox as the service (see
:func:`bench.peers.yolo.predict_options`): on the same image the detections are the service's. It measures the
serving around the model; what a user of the seed recipe runs instead is :mod:`bench.peers.recipe_user`.
"""

from __future__ import annotations

import argparse
import threading
from pathlib import Path
from typing import Annotated, Any

import uvicorn
from fastapi import FastAPI, File, Query, UploadFile

from bench.peers.answers import decode_rgb, detections_json
from bench.peers.yolo import load_yolo, predict_options


def create_app(model_path: Path | None, imgsz: int | None, device: str | None, half: bool, rect: bool) -> FastAPI:
    yolo = load_yolo(model_path)
    options = predict_options(imgsz or yolo.overrides.get("imgsz", 640), device, half, rect)
    lock = threading.Lock()
    app = FastAPI(title="plain FastAPI + ultralytics peer")

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/detect")
    def detect(file: Annotated[UploadFile, File()], conf: Annotated[float, Query(ge=0, le=1)] = 0.25) -> dict[str, Any]:
        image = decode_rgb(file.file.read())
        with lock:
            result = yolo.predict(image, conf=conf, **options)[0]
        return {**detections_json(result), "batch_size": 1}

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--model", type=Path, default=None, help="bundle directory or .pt; default: bundled model")
    parser.add_argument("--imgsz", type=int, default=None, help="default: the checkpoint's")
    parser.add_argument("--device", default=None, help="ultralytics device (cpu, 0, ...); default: its choice")
    parser.add_argument("--half", action="store_true", help="fp16 (CUDA)")
    parser.add_argument("--rect", action="store_true", help="ultralytics' rectangular letterbox (default: square)")
    args = parser.parse_args(argv)
    app = create_app(args.model, args.imgsz, args.device, args.half, args.rect)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
