"""Soak: a real server under mixed valid and invalid traffic at moderate load for a long time (default 10 min),
optionally swapping its model every ``--swap-interval`` seconds.

    python -m bench.soak [--minutes 10] [--rate 4] [--window 60] [--swap-interval 60] [--flags "--max-batch-size 8"]

Starts ``python -m service`` on a free loopback port, serving a copy of the bundled model (named ``soak``), then
drives it with an open loop (Poisson arrivals) in windows of ``--window`` seconds. Traffic cycles through valid
photos and synthetic samples (200 expected) and bad inputs (truncated JPEG 422, random bytes 415, text as image/png
415, wrong multipart field 400). With ``--swap-interval``, every that many seconds the copy gets a new version in
its ``model.json`` (the weights stay) and ``POST /v2/repository/models/soak/load`` swaps it in under the traffic,
as an operator who retrains often would (each swap verifies, warms up and measures the new version). After each
window it records the window's p99 latency, the swaps done in it and the server's resident memory (RSS).

Reports unexpected answers (any status outside a payload's documented one, expected 0), connection errors
(expected 0), failed swaps (any answer but 200, expected 0), RSS growth from the first window to the last (swaps
must leave it flat), and p99 drift (last window's p99 over the first's). Writes ``bench/results/soak.json``; exits 1
when an unexpected answer, a connection error or a failed swap was seen.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import shlex
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

from bench.common import print_table, write_results
from bench.load import Payload, open_loop, real_payloads, serving, synthetic_payloads, warm_up
from bench.processes import free_port, rss_bytes
from model.checkpoint import DEFAULT_BUNDLE, METADATA_FILE

MODEL_NAME = "soak"  # the served name of the soak's copy of the bundled model


def bad_payloads(valid: Payload) -> list[Payload]:
    return [
        Payload("truncated.jpg", valid.body[: len(valid.body) // 2], expected_statuses=frozenset({422})),
        Payload("random.jpg", np.random.default_rng(0).bytes(8192), expected_statuses=frozenset({415})),
        Payload("text.png", b"not an image\n", "image/png", field=None, expected_statuses=frozenset({415})),
        Payload("wrong-field.jpg", valid.body, field="image", expected_statuses=frozenset({400})),
    ]


def write_version(bundle: Path, version: str) -> None:
    """Give the model in ``bundle`` a new ``version`` in its ``model.json``; its weights (all the checksum covers)
    stay, so the next load swaps in the same model as a new version."""
    metadata_file = bundle / METADATA_FILE
    metadata = json.loads(metadata_file.read_text())
    metadata["version"] = version
    metadata_file.write_text(json.dumps(metadata, indent=2))


async def swap_every(base_url: str, bundle: Path, interval_s: float, swaps: list[dict]) -> None:
    """Until cancelled: every ``interval_s`` seconds, the first after half of it, a new version of ``bundle``
    swapped in; each swap's version, status (or client error) and seconds are appended to ``swaps``.

    Half an interval off: with windows as long as the interval, each window's RSS is read between two swaps, not
    while a new version is loading beside the live one."""
    start = time.monotonic()
    async with httpx.AsyncClient(base_url=base_url, timeout=300) as client:
        for number in itertools.count(1):
            await asyncio.sleep(max(0.0, start + (number - 0.5) * interval_s - time.monotonic()))
            version = f"soak-{number}"
            write_version(bundle, version)
            started = time.perf_counter()
            try:
                status: int | str = (await client.post(f"/v2/repository/models/{MODEL_NAME}/load")).status_code
            except httpx.HTTPError as error:
                status = type(error).__name__
            swaps.append({"version": version, "status": status, "seconds": round(time.perf_counter() - started, 2)})


async def soak(
    base_url: str,
    pid: int,
    payloads: list[Payload],
    minutes: float,
    rate: float,
    window_s: float,
    bundle: Path,
    swap_interval_s: float | None,
) -> dict:
    """Windows of traffic on ``base_url``'s ``/detect`` while (with ``swap_interval_s``) ``bundle``, the served
    model, is swapped; returns the report (module docstring)."""
    url = base_url + "/detect"
    await warm_up(url, payloads[:2])
    windows, unexpected, connection_errors, statuses = [], Counter(), Counter(), Counter()
    swaps: list[dict] = []
    swapper = asyncio.create_task(swap_every(base_url, bundle, swap_interval_s, swaps)) if swap_interval_s else None
    try:
        for index in range(max(1, round(minutes * 60 / window_s))):
            swaps_before = len(swaps)
            result = await open_loop(url, payloads, rate, window_s, seed=index, metrics=False)
            summary = result.summary()
            unexpected.update(result.unexpected)
            connection_errors.update(result.connection_errors)
            statuses.update(result.statuses)
            windows.append(
                {
                    "window": index + 1,
                    "requests": summary["requests"],
                    "p50_ms": summary["p50_ms"],
                    "p99_ms": summary["p99_ms"],
                    "swaps": len(swaps) - swaps_before,
                    "rss_mib": round(rss_bytes(pid) / 2**20, 1),
                    "unexpected": sum(result.unexpected.values()),
                }
            )
            print(windows[-1], flush=True)
    finally:
        if swapper is not None:
            swapper.cancel()
            await asyncio.gather(swapper, return_exceptions=True)
    first, last = windows[0], windows[-1]
    return {
        "requests": sum(w["requests"] for w in windows),
        "statuses": {str(status): n for status, n in sorted(statuses.items())},
        "unexpected": dict(unexpected),
        "connection_errors": dict(connection_errors),
        "swaps": len(swaps),
        "failed_swaps": [swap for swap in swaps if swap["status"] != 200],
        "swap_seconds_max": max((swap["seconds"] for swap in swaps), default=None),
        "rss_growth_mib": round(last["rss_mib"] - first["rss_mib"], 1),
        "p99_drift": round(last["p99_ms"] / first["p99_ms"], 2) if first["p99_ms"] else None,
        "windows": windows,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=4.0, help="requests/s offered (moderate: below capacity)")
    parser.add_argument("--window", type=float, default=60.0, help="seconds per reporting window")
    parser.add_argument(
        "--swap-interval", type=float, default=None, help="seconds between swaps of the served model (default: none)"
    )
    parser.add_argument("--flags", default="", help="extra flags for python -m service")
    args = parser.parse_args(argv)
    if args.swap_interval is not None and args.swap_interval <= 0:
        parser.error(f"--swap-interval must be > 0 seconds, got {args.swap_interval}")

    valid = real_payloads() + synthetic_payloads(count=4, size=640)
    payloads = valid + bad_payloads(valid[0])
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="soak-") as folder:
        bundle = Path(folder) / "bundle"
        shutil.copytree(DEFAULT_BUNDLE, bundle)
        models = shlex.quote(json.dumps({MODEL_NAME: str(bundle)}))
        command = f"{shlex.quote(sys.executable)} -m service --host 127.0.0.1 --port {port} --models {models}"
        with serving(f"{command} {args.flags}", base) as process:
            report = asyncio.run(
                soak(base, process.pid, payloads, args.minutes, args.rate, args.window, bundle, args.swap_interval)
            )
    print_table(report["windows"])
    summary = {key: value for key, value in report.items() if key != "windows"}
    print(summary)
    path = write_results(
        "soak", report["windows"], **summary, minutes=args.minutes, rate=args.rate, swap_interval=args.swap_interval
    )
    print(path)
    if report["unexpected"] or report["connection_errors"] or report["failed_swaps"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
