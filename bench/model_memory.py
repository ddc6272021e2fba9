"""Resident memory of one service process serving one, two or three models (``DETECTOR_MODELS``), after start-up
and after a few requests to each model: what one more model costs.

    python -m bench.model_memory [--bundle runs/bench/yolov10s-akconv-random]

Serves copies of the bundled model and, when ``--bundle`` is given, that bundle beside it (the seed recipe's
yolov10s-akconv at 640: ``make runs/bench/yolov10s-akconv-random/model.json``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import httpx

from bench.load import real_payloads
from bench.processes import free_port, rss_bytes, running_process

MIB = 1024 * 1024
# Not imported from model/: importing it imports ultralytics, which sets OMP_NUM_THREADS=1 for the servers started here.
DEFAULT_BUNDLE = Path(__file__).resolve().parents[1] / "model" / "weights" / "yolov10n-akconv"


def measure(models: dict[str, Path], requests: int, work: Path) -> tuple[float, float]:
    """RSS in MiB of a service serving ``models``: once ready, and after ``requests`` to each model."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "service", "--port", str(port), "--models", json.dumps(models, default=str)]
    photo = real_payloads()[0].body  # bus.jpg
    with running_process(command, work / f"server-{port}.log", url + "/readyz", 600) as process:
        ready = rss_bytes(process.pid) / MIB
        for name in models:
            for _ in range(requests):
                response = httpx.post(f"{url}/detect?model={name}", content=photo,
                                      headers={"content-type": "image/jpeg"}, timeout=120)  # fmt: skip
                response.raise_for_status()
        return ready, rss_bytes(process.pid) / MIB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, help="another bundle to serve beside the bundled model")
    parser.add_argument("--requests", type=int, default=5, help="requests to each model before the second reading")
    args = parser.parse_args()
    configurations = {
        "bundled": {"a": DEFAULT_BUNDLE},
        "bundled x2": {"a": DEFAULT_BUNDLE, "b": DEFAULT_BUNDLE},
        "bundled x3": {"a": DEFAULT_BUNDLE, "b": DEFAULT_BUNDLE, "c": DEFAULT_BUNDLE},
    }
    if args.bundle:
        configurations[args.bundle.name] = {"s": args.bundle}
        configurations[f"bundled + {args.bundle.name}"] = {"a": DEFAULT_BUNDLE, "s": args.bundle}
    print(f"| models | RSS ready (MiB) | RSS after {args.requests} requests each (MiB) |")
    print("|---|---|---|")
    with tempfile.TemporaryDirectory() as work:
        for label, models in configurations.items():
            ready, after = measure(models, args.requests, Path(work))
            print(f"| {label} | {ready:.0f} | {after:.0f} |", flush=True)


if __name__ == "__main__":
    main()
