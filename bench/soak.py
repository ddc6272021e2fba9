"""Soak: a real server under mixed valid and invalid traffic at moderate load for a long time (default 10 min).

    python -m bench.soak [--minutes 10] [--rate 4] [--window 60] [--flags "--max-batch-size 8"]

Starts ``python -m service`` on a free loopback port, then drives it with an open loop (Poisson arrivals) in
windows of ``--window`` seconds. Traffic cycles through valid photos and synthetic samples (200 expected) and bad
inputs (truncated JPEG 422, random bytes 415, text as image/png 415, wrong multipart field 400). After each window
it records the window's p99 latency and the server's resident memory (RSS).

Reports unexpected answers (any status outside a payload's documented one, expected 0), connection errors
(expected 0), RSS growth from the first window to the last, and p99 drift (last window's p99 over the first's).
Writes ``bench/results/soak.json``; exits 1 when an unexpected answer or a connection error was seen.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
from collections import Counter

import numpy as np

from bench.common import print_table, write_results
from bench.load import Payload, open_loop, real_payloads, serving, synthetic_payloads, warm_up
from bench.processes import free_port, rss_bytes


def bad_payloads(valid: Payload) -> list[Payload]:
    return [
        Payload("truncated.jpg", valid.body[: len(valid.body) // 2], expected_statuses=frozenset({422})),
        Payload("random.jpg", np.random.default_rng(0).bytes(8192), expected_statuses=frozenset({415})),
        Payload("text.png", b"not an image\n", "image/png", field=None, expected_statuses=frozenset({415})),
        Payload("wrong-field.jpg", valid.body, field="image", expected_statuses=frozenset({400})),
    ]


async def soak(url: str, pid: int, payloads: list[Payload], minutes: float, rate: float, window_s: float) -> dict:
    await warm_up(url, payloads[:2])
    windows, unexpected, connection_errors, statuses = [], Counter(), Counter(), Counter()
    for index in range(max(1, round(minutes * 60 / window_s))):
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
                "rss_mib": round(rss_bytes(pid) / 2**20, 1),
                "unexpected": sum(result.unexpected.values()),
            }
        )
        print(windows[-1], flush=True)
    first, last = windows[0], windows[-1]
    return {
        "requests": sum(w["requests"] for w in windows),
        "statuses": {str(status): n for status, n in sorted(statuses.items())},
        "unexpected": dict(unexpected),
        "connection_errors": dict(connection_errors),
        "rss_growth_mib": round(last["rss_mib"] - first["rss_mib"], 1),
        "p99_drift": round(last["p99_ms"] / first["p99_ms"], 2) if first["p99_ms"] else None,
        "windows": windows,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=4.0, help="requests/s offered (moderate: below capacity)")
    parser.add_argument("--window", type=float, default=60.0, help="seconds per reporting window")
    parser.add_argument("--flags", default="", help="extra flags for python -m service")
    args = parser.parse_args(argv)

    valid = real_payloads() + synthetic_payloads(count=4, size=640)
    payloads = valid + bad_payloads(valid[0])
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = f"{shlex.quote(sys.executable)} -m service --host 127.0.0.1 --port {port} {args.flags}"
    with serving(command, base) as process:
        report = asyncio.run(soak(base + "/detect", process.pid, payloads, args.minutes, args.rate, args.window))
    print_table(report["windows"])
    summary = {key: value for key, value in report.items() if key != "windows"}
    print(summary)
    path = write_results("soak", report["windows"], **summary, minutes=args.minutes, rate=args.rate)
    print(path)
    if report["unexpected"] or report["connection_errors"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
