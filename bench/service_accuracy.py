"""Accuracy of a served model on held-out synthetic samples sent through the service as JPEG files.

    python -m bench.service_accuracy [--model BUNDLE_OR_PT] [--sizes 640,1280] [--aspects 1,16:9] [--count 100]
                                     [--dedupe IOU]

Each held-out sample (``model.synthetic``'s ``test`` split, never trained on) is rendered with its longer side at
each size and each aspect (width:height), encoded as a JPEG file (quality 90) and posted to ``/detect`` of the real
service in this process (decode, letterbox, batcher, model, post-processing; eight requests in flight, so batches
form). mAP50 and mAP50-95 as in ``python -m model evaluate``, from the answers at ``conf=0.001`` and ``max_det=300``;
precision and recall at IoU 0.5 from those at confidence 0.25 or more (the service's default ``conf``).
``--dedupe IOU`` sends ``/detect``'s ``dedupe`` parameter: one box where boxes overlap above that IoU.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from model.evaluate import score
from model.synthetic import SPLITS, render
from service.app import create_app
from service.process.settings import Settings

IN_FLIGHT = 8
JPEG_QUALITY = 90


def jpeg(pixels: np.ndarray) -> bytes:
    """An RGB uint8 array (H, W, 3) as the bytes of a JPEG file."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def rows(answer: dict) -> np.ndarray:
    """A ``/detect`` answer's detections as (n, 6) float32 rows ``[x1, y1, x2, y2, score, class]``, image pixels."""
    found = [[*d["box"].values(), d["confidence"], d["class_id"]] for d in answer["detections"]]
    return np.array(found, dtype=np.float32).reshape(-1, 6)


async def served_detections(
    client: httpx.AsyncClient, seeds: range, size: int, aspect: float, dedupe: float | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(detections (n, 6), truth (m, 5))`` per seed, rendered at ``size`` and ``aspect`` and posted as JPEG (with
    ``/detect``'s ``dedupe`` IoU when given)."""
    params = {"conf": 0.001, "max_det": 300} | ({} if dedupe is None else {"dedupe": dedupe})
    gate = asyncio.Semaphore(IN_FLIGHT)

    async def one(seed: int) -> tuple[np.ndarray, np.ndarray]:
        pixels, truth = render(seed, size, aspect)
        async with gate:
            response = await client.post(
                "/detect",
                files={"file": (f"{seed}.jpg", jpeg(pixels), "image/jpeg")},
                params=params,
            )
        response.raise_for_status()
        return rows(response.json()), truth

    return list(await asyncio.gather(*(one(seed) for seed in seeds)))


async def measure(
    settings: Settings, sizes: list[int], aspects: list[float], seeds: range, dedupe: float | None = None
) -> list[dict[str, float | int | str]]:
    """One row of :func:`model.evaluate.score` per (size, aspect), from the service built from ``settings`` (no API
    key), asking for ``dedupe`` when given."""
    app = create_app(settings)
    transport = httpx.ASGITransport(app=app)
    report = []
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://bench", timeout=300) as client,
    ):
        model = (await client.get("/v1/model")).json()
        for size in sizes:
            for aspect in aspects:
                results = await served_detections(client, seeds, size, aspect, dedupe)
                name = f"{model['name']} {model['version']}"
                row = {"model": name, "size": size, "aspect": round(aspect, 4), "dedupe": dedupe}
                report.append({**row, "images": len(seeds), "first_seed": seeds.start, **score(results)})
    return report


def _aspect(text: str) -> float:
    width, _, height = text.partition(":")
    return float(width) / float(height or 1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="bundle or .pt (default: the bundled model)")
    parser.add_argument("--sizes", default="640,1280", help="longer sides to render at, pixels")
    parser.add_argument("--aspects", default="1", help="width:height of the rendered images, e.g. 1,16:9,3:4")
    parser.add_argument("--count", type=int, default=100, help="held-out samples per size and aspect")
    parser.add_argument("--first-seed", type=int, default=SPLITS["test"])
    parser.add_argument("--dedupe", type=float, help="/detect's dedupe IoU (default: not sent)")
    parser.add_argument("--out", type=Path, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    settings = Settings(model_path=args.model, device="cpu", warmup_rounds=0, max_detections=300)
    seeds = range(args.first_seed, args.first_seed + args.count)
    sizes = [int(size) for size in args.sizes.split(",")]
    aspects = [_aspect(aspect) for aspect in args.aspects.split(",")]
    report = asyncio.run(measure(settings, sizes, aspects, seeds, args.dedupe))
    print("\n".join(json.dumps(row) for row in report))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
