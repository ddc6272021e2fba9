"""Peer 2: LitServe with its dynamic batching around the same ultralytics model.

    python -m bench.peers.litserve_server [--port 8002] [--model BUNDLE_DIR_OR_PT] [--imgsz 320]
        [--max-batch-size 8] [--batch-timeout-ms 5] [--conf 0.25] [--accelerator auto] [--half] [--rect]
    python -m bench.peers.litserve_server --recipe --model BEST.pt [--port 8004]

LitServe forms batches of up to ``max_batch_size`` requests, waiting at most ``batch_timeout`` for one to fill
(the same two knobs as the service's ``max_batch_size`` and ``max_batch_wait_ms``), in one inference worker
process; the batch goes to ``YOLO.predict`` as a list of images. ``POST /detect`` takes the multipart field
``file`` and answers ``{"image", "detections", "batch_size"}`` shaped like the service's; ``conf`` is fixed per
server (LitServe hands ``decode_request`` the form, not the query). ``GET /health`` answers 200 once the worker is
ready. Listens on 127.0.0.1 only. Model, head and letterbox as in :mod:`bench.peers.plain_fastapi`.

``--recipe`` serves what a user of the seed recipe has instead: a recipe checkpoint (``bench.seed_checkpoint``) with
the seed's AKConv registered the recipe's way (:mod:`bench.peers.recipe`), predicted with ultralytics' rectangular
letterbox, as :mod:`bench.peers.recipe_user` does (ultralytics keeps it square when a batch mixes photo shapes).
On CPU, ultralytics' ``select_device`` sets torch to ``min(8, cpu_count - 1)`` threads in either mode.
"""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path
from typing import Any

import litserve as ls

from bench.peers.answers import decode_rgb, detections_json
from bench.peers.recipe import register_recipe_akconv
from bench.peers.yolo import load_yolo, predict_options


class UltralyticsAPI(ls.LitAPI):
    def __init__(
        self,
        model_path: Path | None,
        imgsz: int | None,
        conf: float,
        half: bool,
        rect: bool,
        recipe: bool,
        max_batch_size: int,
        batch_timeout_s: float,
    ) -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout_s, api_path="/detect")
        self.model_path, self.imgsz, self.conf, self.half, self.rect = model_path, imgsz, conf, half, rect
        self.recipe = recipe

    def setup(self, device: str) -> None:
        if self.recipe:
            register_recipe_akconv()
        self.yolo = load_yolo(self.model_path)
        imgsz = self.imgsz or self.yolo.overrides.get("imgsz", 640)
        self.options = predict_options(imgsz, device, self.half, self.rect)

    def decode_request(self, request):  # no annotation: LitServe then passes the parsed form (a typed one is a query)
        return decode_rgb(request["file"].file.read())  # "file" is an UploadFile

    def batch(self, inputs: list[Any]) -> list[Any]:
        return inputs  # ultralytics takes a list of images as one batch

    def predict(self, images: Any) -> Any:
        batch = images if isinstance(images, list) else [images]  # LitServe passes one image when max_batch_size is 1
        results = self.yolo.predict(batch, conf=self.conf, **self.options)
        outputs = [{**detections_json(result), "batch_size": len(batch)} for result in results]
        return outputs if isinstance(images, list) else outputs[0]

    def unbatch(self, outputs: list[Any]) -> list[Any]:
        return outputs

    def encode_response(self, output: Any) -> Any:
        return output


_MAIN_PID = os.getpid()


def _stop_gracefully(signum: int, frame: object) -> None:
    if os.getpid() != _MAIN_PID:  # LitServe forks its HTTP server process, which inherits this handler
        raise SystemExit(0)
    raise KeyboardInterrupt  # LitServer.run() stops its worker processes only on KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8002)
    parser.add_argument("--model", type=Path, default=None, help="bundle directory or .pt; default: bundled model")
    parser.add_argument("--imgsz", type=int, default=None, help="default: the checkpoint's")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--batch-timeout-ms", type=float, default=5.0)
    parser.add_argument("--conf", type=float, default=0.25)
    parser.add_argument("--accelerator", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--half", action="store_true", help="fp16 (CUDA)")
    parser.add_argument("--rect", action="store_true", help="ultralytics' rectangular letterbox (default: square)")
    parser.add_argument("--recipe", action="store_true", help="--model is a seed-recipe .pt; implies --rect")
    args = parser.parse_args(argv)
    if args.recipe and (args.model is None or args.model.suffix != ".pt"):
        parser.error("--recipe needs --model BEST.pt, a seed-recipe checkpoint (python -m bench.seed_checkpoint)")
    rect = args.rect or args.recipe
    api = UltralyticsAPI(
        args.model,
        args.imgsz,
        args.conf,
        args.half,
        rect,
        args.recipe,
        args.max_batch_size,
        args.batch_timeout_ms / 1000,
    )
    signal.signal(signal.SIGTERM, _stop_gracefully)  # without it, SIGTERM orphans the worker processes
    server = ls.LitServer(api, accelerator=args.accelerator, workers_per_device=1)
    server.run(host="127.0.0.1", port=args.port, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main()
