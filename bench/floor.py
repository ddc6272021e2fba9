"""A lone request's latency against the batch-1 forward of the same model, measured in the same run (issue 29, part 2).

    python -m bench.floor --model runs/bench/yolov10s-akconv-seed-recipe.pt [--rounds 3] [--requests 40]
        [--variant passive] [--variant 'spin=GOMP_SPINCOUNT=100000'] [--c16-duration 15]

Up at once, each in a clean environment (``bench.load_rounds.clean_environment``): a forward process, which loads the
model as the service does (``service.core.engine.Engine``) and times ``Engine.infer`` of one letterboxed photo at a
time, with no OpenMP setting (what ``model(x)`` costs a user on an idle machine: the floor); and one service process per
``--variant`` (``NAME[@DIR][=VAR=VALUE,...]``: environment variables of that process, e.g. OpenMP's spin count; ``@DIR``
runs the service of another checkout, e.g. a ``git worktree`` of an older commit, for a before/after). Each round, for
every variant in turn (rotated each round), alone on the machine: the forward process times ``--requests`` forwards,
then the variant answers ``--requests`` requests one after the other on ``POST /detect`` and as many on ``POST
/v2/models/NAME/infer``, the photos of ``bench.load_rounds.photo_payloads`` in turn (five aspects, four model-input
shapes at 640; ``--photos real``: bus.jpg and zidane.jpg, two shapes). Reported per variant, route and round: p50, p90
and p99 in ms, and the p50 and p99 of each request's latency divided by the forward's median for the same photo measured
just before (the photos' shapes differ, and so do their forwards); for ``/detect``, the median of the service's own
``timings_ms`` (preprocess: header, decode and letterbox; queue: hand-off to the batcher's thread and back; inference:
``Engine.infer``; postprocess) and what is left of the client's latency outside them (HTTP, body read, thread hops, the
response); CPU milliseconds per request of the server process and of this client. With ``--c16-duration``, each variant
also serves a closed loop of 16 (throughput, p99), so that a latency win is not paid for in throughput.
Results: ``bench/results/floor-NAME.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.common import print_table, write_results
from bench.load import Payload, closed_loop, oip_payload, real_payloads
from bench.load_rounds import REPO_ROOT, START_TIMEOUT_S, clean_environment, photo_payloads
from bench.processes import free_port, running_process

STAGES = ("preprocess", "queue", "inference", "postprocess")


@dataclass(frozen=True)
class Variant:
    """A service process: its name, the environment variables it adds to the clean environment, and the checkout
    it runs from (``python -m service`` finds the package in its working directory first)."""

    name: str
    environment: dict[str, str]
    checkout: Path = REPO_ROOT

    @staticmethod
    def parse(text: str) -> Variant:
        label, _, assignments = text.partition("=")
        name, _, checkout = label.partition("@")
        pairs = [item.split("=", 1) for item in assignments.split(",") if item]
        if not name or any(len(pair) != 2 for pair in pairs) or (checkout and not Path(checkout).is_dir()):
            raise argparse.ArgumentTypeError(f"--variant NAME[@DIR][=VAR=VALUE,...]; got {text!r}")
        return Variant(name, dict(pairs), Path(checkout).resolve() if checkout else REPO_ROOT)


def forward_worker(model: str, photos: list[Payload]) -> None:
    """Serve the parent: for each line ``N`` on stdin, time ``N`` batch-1 forwards of ``photos`` in turn and print
    their milliseconds as one JSON line."""
    from service.core.engine import Engine
    from service.core.images import decode, letterbox
    from service.process.settings import Settings

    engine = Engine(Settings(model_path=model), Path(model), "eager")
    size = engine.input_size
    tensors = [letterbox(decode(photo.body, 10**9, fit=size), size)[0] for photo in photos]
    for tensor in tensors * 2:  # kernels and allocator pools of every shape, as the service's warm-up readies them
        engine.infer([tensor])
    print("ready", flush=True)
    for line in sys.stdin:
        timings = []
        for index in range(int(line)):
            started = time.perf_counter()
            engine.infer([tensors[index % len(tensors)]])
            timings.append((time.perf_counter() - started) * 1000)
        print(json.dumps(timings), flush=True)


def percentiles(values: list[float]) -> dict[str, float]:
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {"p50_ms": round(float(p50), 1), "p90_ms": round(float(p90), 1), "p99_ms": round(float(p99), 1)}


def process_cpu_ms(pid: int) -> float:
    """User + system CPU time of process ``pid`` (all its threads), ms, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")


def own_cpu_ms() -> float:
    times = os.times()
    return (times.user + times.system) * 1000


def sequential(client: httpx.Client, url: str, payloads: list[Payload], count: int) -> tuple[list[float], list[dict]]:
    """``count`` requests one after the other: client latencies (ms) and, where answered, the service's
    ``timings_ms``."""
    latencies, timings = [], []
    for index in range(count):
        body, headers = payloads[index % len(payloads)].encoded
        started = time.perf_counter()
        response = client.post(url, content=body, headers=headers)
        latencies.append((time.perf_counter() - started) * 1000)
        response.raise_for_status()
        if url.endswith("/detect"):
            timings.append(response.json()["timings_ms"])
        else:
            response.read()
    return latencies, timings


def per_photo_medians(timings: list[float], photos: int) -> list[float]:
    """The median of each photo's timings, the photos having been sent in turn."""
    return [statistics.median(timings[index::photos]) for index in range(photos)]


def relative(latencies: list[float], forward_ms: list[float]) -> list[float]:
    """Each latency over the forward's median of its photo (the photos were sent in turn)."""
    return [latency / forward_ms[index % len(forward_ms)] for index, latency in enumerate(latencies)]


def relative_p99(latencies: list[float], forward_ms: list[float]) -> float:
    """The p99 of :func:`relative`: of the forward's own timings, the floor's tail."""
    return round(float(np.percentile(relative(latencies, forward_ms), 99)), 2)


def c1_row(
    round_: int, variant: str, route: str, latencies: list[float], forward_ms: list[float], cpu: dict[str, float]
) -> dict[str, Any]:
    """Latency percentiles, and those of latency / the forward's median of the same photo (``forward_ms``)."""
    p50, p99 = np.percentile(relative(latencies, forward_ms), [50, 99])
    return {
        "round": round_,
        "variant": variant,
        "route": route,
        **percentiles(latencies),
        "p50_x_forward": round(float(p50), 2),
        "p99_x_forward": round(float(p99), 2),
        **cpu,
    }


def stage_row(
    round_: int, variant: str, latencies: list[float], timings: list[dict], forward_ms: list[float]
) -> dict[str, Any]:
    """Median of each of the service's stages and of the client's latency outside them, for ``/detect``, and the
    median of its inference / the forward's median of the same photo (``forward_ms``)."""
    stages = {stage: statistics.median(t[stage] for t in timings) for stage in STAGES}
    outside = statistics.median(
        latency - sum(t[stage] for stage in STAGES) for latency, t in zip(latencies, timings, strict=True)
    )
    return {
        "round": round_,
        "variant": variant,
        **{f"{stage}_ms": round(value, 1) for stage, value in stages.items()},
        "outside_ms": round(outside, 1),
        "inference_x_forward": round(
            statistics.median(t["inference"] / forward_ms[index % len(forward_ms)] for index, t in enumerate(timings)),
            2,
        ),
        "server_total_ms": round(statistics.median(t["total"] for t in timings), 1),
        "client_ms": round(statistics.median(latencies), 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="bundle or .pt the forward process and every service load")
    parser.add_argument("--variant", type=Variant.parse, action="append", help="a service process (default: service)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=40, help="forwards, and requests per route, per round")
    parser.add_argument("--c16-duration", type=float, default=0.0, help="seconds of concurrency 16 per variant/round")
    parser.add_argument("--photos", choices=("five", "real"), default="five", help="real: bus.jpg and zidane.jpg")
    parser.add_argument("--name", default="s640")
    parser.add_argument("--forward-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    photos = photo_payloads() if args.photos == "five" else real_payloads()
    if args.forward_worker:
        forward_worker(args.model, photos)
        return
    variants = args.variant or [Variant("service", {})]
    logs = Path(tempfile.mkdtemp(prefix="floor-"))
    rows, stage_rows, c16_rows, forwards = [], [], [], []
    model = str(Path(args.model).resolve())
    with contextlib.ExitStack() as running:
        servers = {}
        for variant in variants:
            port = free_port()
            command = [sys.executable, "-m", "service", "--model-path", model, "--port", str(port)]
            print(f"starting {variant.name} {variant.environment} (log {logs / variant.name}.log)", flush=True)
            process = running.enter_context(
                running_process(
                    command,
                    logs / f"{variant.name}.log",
                    f"http://127.0.0.1:{port}/readyz",
                    START_TIMEOUT_S,
                    env={**clean_environment(), **variant.environment},
                    cwd=variant.checkout,
                )
            )
            servers[variant.name] = (f"http://127.0.0.1:{port}", process.pid)
        worker = running.enter_context(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "bench.floor",
                    "--model",
                    model,
                    "--photos",
                    args.photos,
                    "--forward-worker",
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env=clean_environment(),
                cwd=REPO_ROOT,
            )
        )
        if worker.stdout.readline().strip() != "ready":
            raise RuntimeError("the forward process did not start")
        client = running.enter_context(httpx.Client(timeout=60))
        routes = {}
        for name, (base, _) in servers.items():
            model_name = client.post(base + "/v2/repository/index").json()[0]["name"]
            routes[name] = {
                "detect": (base + "/detect", photos),
                "oip": (f"{base}/v2/models/{model_name}/infer", [oip_payload(photo) for photo in photos]),
            }
            for url, payloads in routes[name].values():
                sequential(client, url, payloads, 2 * len(payloads))
        for round_ in range(args.rounds):
            order = variants[round_ % len(variants) :] + variants[: round_ % len(variants)]
            for variant in order:
                base, pid = servers[variant.name]
                worker.stdin.write(f"{args.requests}\n")
                worker.stdin.flush()
                forward = json.loads(worker.stdout.readline())
                forward_ms = per_photo_medians(forward, len(photos))
                forwards.append(
                    {
                        "round": round_,
                        "before": variant.name,
                        **percentiles(forward),
                        "p99_x_median": relative_p99(forward, forward_ms),
                        **{f"{photo.name}_ms": round(ms, 1) for photo, ms in zip(photos, forward_ms, strict=True)},
                    }
                )
                print(" ".join(f"{key}={value}" for key, value in forwards[-1].items()), flush=True)
                for route, (url, payloads) in routes[variant.name].items():
                    server_cpu, client_cpu = process_cpu_ms(pid), own_cpu_ms()
                    latencies, timings = sequential(client, url, payloads, args.requests)
                    cpu = {
                        "server_cpu_ms": round((process_cpu_ms(pid) - server_cpu) / args.requests, 1),
                        "client_cpu_ms": round((own_cpu_ms() - client_cpu) / args.requests, 1),
                    }
                    rows.append(c1_row(round_, variant.name, route, latencies, forward_ms, cpu))
                    print(" ".join(f"{key}={value}" for key, value in rows[-1].items()), flush=True)
                    if timings:
                        stage_rows.append(stage_row(round_, variant.name, latencies, timings, forward_ms))
                if args.c16_duration:
                    result = asyncio.run(closed_loop(base + "/detect", photos, 16, args.c16_duration))
                    summary = result.summary()
                    c16_rows.append(
                        {
                            "round": round_,
                            "variant": variant.name,
                            "throughput_rps": summary["throughput_rps"],
                            "p99_ms": summary["p99_ms"],
                            "failed": summary["requests"] - summary["ok"],
                        }
                    )
                    print(" ".join(f"{key}={value}" for key, value in c16_rows[-1].items()), flush=True)
                    time.sleep(1)
        worker.stdin.close()
    for table in (forwards, rows, stage_rows, c16_rows):
        if table:
            print()
            print_table(table)
    path = write_results(
        f"floor-{args.name}",
        rows,
        forward=forwards,
        stages=stage_rows,
        c16=c16_rows,
        variants={variant.name: {**variant.environment, "checkout": str(variant.checkout)} for variant in variants},
        model=args.model,
        requests=args.requests,
        payloads=[photo.name for photo in photos],
        load_average=os.getloadavg(),
    )
    print(path)


if __name__ == "__main__":
    main()
