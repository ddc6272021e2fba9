"""HTTP load generator for the service and its peers: closed loop at fixed concurrency, open loop at fixed rates.

    python -m bench.load --url http://127.0.0.1:8000 [--concurrency 1,4,16,64] [--rates 5,10,20]
        [--duration 20] [--max-requests N] [--path /detect] [--name service] [--payloads real|synthetic|all]
        [--arrivals poisson|uniform] [--start "COMMAND"] [--ready-path /readyz]

Closed loop: ``concurrency`` clients, each sending its next request as soon as the previous one is answered, until
``duration`` has passed or ``max-requests`` were sent. Open loop: requests arrive at ``rate`` per second (Poisson or
evenly spaced) whatever the server's state, for ``duration``; latency counts from the scheduled arrival, so a
client falling behind is charged to the latency rather than hidden (no coordinated omission).

Each run reports requests, throughput of expected answers (req/s), p50/p90/p95/p99 latency of those answers,
answers by status and connection errors by type, and, where the target exports ``/metrics`` (the service does, peers
do not), the delta of its ``detector_batch_size`` histogram over the run. Payloads are POSTed as multipart field
``file`` (pre-encoded once, so the client spends little CPU): the photos ultralytics ships (``bus.jpg``,
``zidane.jpg``) and/or synthetic test samples of :mod:`model.synthetic` as JPEG. Loopback targets only.
:func:`oip_payload` turns a photo into an Open Inference Protocol request instead (``POST /v2/models/NAME/infer``,
the binary tensor data extension, as tritonclient sends it), for the service's ``/v2`` door and Triton alike.

``--start`` runs the target itself (e.g. ``--start ".venv/bin/python -m service --port 8000"``), waits for
``--ready-path`` to answer 200, and stops it (SIGTERM to its process group) afterwards.

Importable: :class:`Payload`, :func:`oip_payload`, :func:`closed_loop`, :func:`open_loop`, :class:`RunResult`,
:func:`serving`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import io
import itertools
import json
import random
import shlex
import struct
import subprocess
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx
import numpy as np
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from bench.common import print_table, write_results
from bench.processes import running_process

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
BATCH_SIZE_METRIC = "detector_batch_size"  # service/process/metrics.py
REAL_IMAGES = ("bus.jpg", "zidane.jpg")  # shipped in ultralytics/assets
SYNTHETIC_FIRST_SEED = 2_000_000  # model.synthetic's held-out test split


def require_loopback(url: str) -> None:
    """Refuse any target but this machine: the generator is for benchmarks, not for loading other hosts."""
    host = urlsplit(url).hostname
    if host not in LOOPBACK_HOSTS:
        raise ValueError(f"only loopback targets are allowed ({', '.join(sorted(LOOPBACK_HOSTS))}), got {host!r}")


@dataclass(frozen=True)
class Payload:
    """One request body and what the server should answer to it.

    ``field`` names the multipart field the bytes go in; ``None`` sends them as the raw body with ``content_type``
    and ``headers``.
    """

    name: str
    body: bytes
    content_type: str = "image/jpeg"
    field: str | None = "file"
    expected_statuses: frozenset[int] = frozenset({200})
    headers: tuple[tuple[str, str], ...] = ()  # more headers of a raw body (the OIP header length)

    @cached_property
    def encoded(self) -> tuple[bytes, dict[str, str]]:
        """(body, headers), encoded once: multipart encoding per request would cost the client CPU it shares."""
        if self.field is None:
            return self.body, {"content-type": self.content_type, **dict(self.headers)}
        boundary = uuid.uuid4().hex
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{self.field}"; filename="{self.name}"\r\n'
            f"Content-Type: {self.content_type}\r\n\r\n"
        ).encode()
        body = head + self.body + f"\r\n--{boundary}--\r\n".encode()
        return body, {"content-type": f"multipart/form-data; boundary={boundary}"}


OIP_OUTPUTS = ("num_dets", "det_boxes", "det_scores", "det_classes")  # service/doors/oip.py's, in its order


def oip_payload(image: Payload, shape: Sequence[int] = (1,)) -> Payload:
    """``image``'s file as an Open Inference Protocol request, as tritonclient's HTTP client sends it with
    ``binary_data=True``: one input ``IMAGE`` (``BYTES`` of ``shape``, one element: a 4-byte little-endian length, then
    the file) after the JSON header (``Inference-Header-Content-Length``), the four outputs asked for as binary.

    ``shape`` is ``[1]`` for the service (its input is ``[B]``) and ``[1, 1]`` for a Triton model that batches (the
    batch dimension, then the declared ``[1]``): the header differs by those characters, the data not at all.
    """
    data = struct.pack("<I", len(image.body)) + image.body
    header = {
        "inputs": [
            {"name": "IMAGE", "datatype": "BYTES", "shape": list(shape), "parameters": {"binary_data_size": len(data)}}
        ],
        "outputs": [{"name": name, "parameters": {"binary_data": True}} for name in OIP_OUTPUTS],
    }
    head = json.dumps(header, separators=(",", ":")).encode()
    return Payload(
        image.name,
        head + data,
        content_type="application/octet-stream",
        field=None,
        expected_statuses=image.expected_statuses,
        headers=(("Inference-Header-Content-Length", str(len(head))),),
    )


def jpeg_bytes(image: np.ndarray, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def real_payloads() -> list[Payload]:
    """The photos ultralytics ships, found without importing ultralytics (its import is heavy and has side effects)."""
    spec = importlib.util.find_spec("ultralytics")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("ultralytics is not installed; use --payloads synthetic")
    assets = Path(spec.submodule_search_locations[0]) / "assets"
    return [Payload(name, (assets / name).read_bytes()) for name in REAL_IMAGES]


def synthetic_payloads(count: int = 8, size: int = 640) -> list[Payload]:
    """``count`` held-out samples of :func:`model.synthetic.render` as JPEG (needs the ``train`` extra)."""
    from model.synthetic import render

    seeds = range(SYNTHETIC_FIRST_SEED, SYNTHETIC_FIRST_SEED + count)
    return [Payload(f"synthetic-{seed}.jpg", jpeg_bytes(render(seed, size)[0])) for seed in seeds]


@dataclass(frozen=True)
class Histogram:
    """A Prometheus histogram at one scrape: cumulative count per upper bound, total count, sum of observations."""

    buckets: dict[float, float]
    count: float
    total: float

    def minus(self, earlier: Histogram) -> Histogram:
        return Histogram(
            {bound: n - earlier.buckets.get(bound, 0.0) for bound, n in self.buckets.items()},
            self.count - earlier.count,
            self.total - earlier.total,
        )

    def bins(self) -> dict[str, int]:
        """Observations per bin, labelled by the integer range it covers ("1", "2", "3-4", "5-8", ..., ">64")."""
        bins, lower, below = {}, 1, 0.0
        for bound in sorted(self.buckets):
            cumulative = self.buckets[bound]
            upper = int(bound) if bound != float("inf") else None
            label = f">{lower - 1}" if upper is None else str(upper) if upper == lower else f"{lower}-{upper}"
            if cumulative - below:
                bins[label] = round(cumulative - below)
            below = cumulative
            lower = (upper or lower) + 1
        return bins

    def mean(self) -> float | None:
        return self.total / self.count if self.count else None


async def scrape_histogram(client: httpx.AsyncClient, metrics_url: str, name: str) -> Histogram | None:
    """The histogram ``name`` from a Prometheus endpoint, summed over its label sets; ``None`` when there is no such
    endpoint or metric."""
    try:
        response = await client.get(metrics_url)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    for family in text_string_to_metric_families(response.text):
        if family.name != name or family.type != "histogram":
            continue
        buckets, count, total = {}, 0.0, 0.0
        for sample in family.samples:  # summed over the served models (label "model")
            if sample.name == f"{name}_bucket":
                le = float(sample.labels["le"])
                buckets[le] = buckets.get(le, 0.0) + sample.value
            elif sample.name == f"{name}_count":
                count += sample.value
            elif sample.name == f"{name}_sum":
                total += sample.value
        return Histogram(buckets, count, total)
    return None


@dataclass
class RunResult:
    """What one run saw. Latencies are those of answers with an expected status, in milliseconds."""

    mode: Literal["closed", "open"]
    level: float  # concurrency (closed loop) or offered rate in requests/s (open loop)
    elapsed_s: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)  # every answer, by HTTP status
    unexpected: Counter[str] = field(default_factory=Counter)  # "payload name:status" outside its expected statuses
    connection_errors: Counter[str] = field(default_factory=Counter)  # no answer, by exception type
    batch_sizes: Histogram | None = None  # the server's detector_batch_size delta over the run, when it exports it

    @property
    def requests(self) -> int:
        return self.statuses.total() + self.connection_errors.total()

    def record(self, payload: Payload, status: int, latency_ms: float) -> None:
        self.statuses[status] += 1
        if status in payload.expected_statuses:
            self.latencies_ms.append(latency_ms)
        else:
            self.unexpected[f"{payload.name}:{status}"] += 1

    def summary(self) -> dict[str, Any]:
        """JSON-ready figures; ``ok`` and ``throughput_rps`` count answers with an expected status."""
        latencies = np.asarray(self.latencies_ms)
        percentiles = np.percentile(latencies, [50, 90, 95, 99]).round(1).tolist() if len(latencies) else [None] * 4
        batches = self.batch_sizes
        return {
            "mode": self.mode,
            "level": self.level,
            "requests": self.requests,
            "ok": len(latencies),
            "elapsed_s": round(self.elapsed_s, 3),
            "throughput_rps": round(len(latencies) / self.elapsed_s, 2) if self.elapsed_s else 0.0,
            **dict(zip(("p50_ms", "p90_ms", "p95_ms", "p99_ms"), percentiles, strict=True)),
            "statuses": {str(status): n for status, n in sorted(self.statuses.items())},
            "unexpected": dict(self.unexpected),
            "connection_errors": dict(self.connection_errors),
            "batch_sizes": None
            if batches is None
            else {"batches": round(batches.count), "mean": batches.mean(), "bins": batches.bins()},
        }


def metrics_url_for(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}/metrics"


async def _send(client: httpx.AsyncClient, url: str, payload: Payload, result: RunResult, started: float) -> None:
    body, headers = payload.encoded
    try:
        response = await client.post(url, content=body, headers=headers)
    except httpx.HTTPError as error:  # connect/read errors and timeouts: no answer at all
        result.connection_errors[type(error).__name__] += 1
        return
    result.record(payload, response.status_code, (time.perf_counter() - started) * 1000)


@contextlib.asynccontextmanager
async def _measured(result: RunResult, url: str, connections: int, timeout_s: float, metrics: bool):
    """A client sized for the run; times the run and takes the batch-size histogram delta around it."""
    require_loopback(url)
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(limits=limits, timeout=timeout_s) as client:
        metrics_url = metrics_url_for(url)
        before = await scrape_histogram(client, metrics_url, BATCH_SIZE_METRIC) if metrics else None
        started = time.perf_counter()
        yield client
        result.elapsed_s = time.perf_counter() - started
        after = await scrape_histogram(client, metrics_url, BATCH_SIZE_METRIC) if before else None
        result.batch_sizes = after.minus(before) if after and before else None


async def closed_loop(
    url: str,
    payloads: Sequence[Payload],
    concurrency: int,
    duration_s: float,
    max_requests: int | None = None,
    *,
    timeout_s: float = 60.0,
    metrics: bool = True,
) -> RunResult:
    """``concurrency`` clients back to back until ``duration_s`` has passed or ``max_requests`` were sent.

    Requests cycle through ``payloads`` in order. Requests in flight at the deadline are waited for and counted.
    """
    result = RunResult("closed", concurrency)
    sequence = itertools.count()
    async with _measured(result, url, concurrency, timeout_s, metrics) as client:
        deadline = time.perf_counter() + duration_s

        async def client_loop() -> None:
            while time.perf_counter() < deadline:
                index = next(sequence)
                if max_requests is not None and index >= max_requests:
                    return
                await _send(client, url, payloads[index % len(payloads)], result, time.perf_counter())

        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    return result


async def open_loop(
    url: str,
    payloads: Sequence[Payload],
    rate: float,
    duration_s: float,
    *,
    arrivals: Literal["poisson", "uniform"] = "poisson",
    seed: int = 0,
    max_connections: int = 512,
    timeout_s: float = 60.0,
    metrics: bool = True,
) -> RunResult:
    """Requests arriving at ``rate`` per second for ``duration_s``, whether earlier ones were answered or not.

    Latency counts from each request's scheduled arrival. Beyond ``max_connections`` requests in flight, new ones
    wait in the client's pool (and that wait is in their latency). Requests in flight at the end are waited for.
    """
    if rate <= 0:
        raise ValueError(f"rate must be > 0 requests/s, got {rate}")
    result = RunResult("open", rate)
    rng = random.Random(seed)
    async with _measured(result, url, max_connections, timeout_s, metrics) as client:
        start = time.perf_counter()
        offset, in_flight = 0.0, []
        for index in itertools.count():
            offset += rng.expovariate(rate) if arrivals == "poisson" else 1 / rate
            if offset >= duration_s:
                break
            arrival = start + offset
            await asyncio.sleep(max(0.0, arrival - time.perf_counter()))
            payload = payloads[index % len(payloads)]
            in_flight.append(asyncio.create_task(_send(client, url, payload, result, arrival)))
        await asyncio.gather(*in_flight)
    return result


async def warm_up(url: str, payloads: Sequence[Payload], rounds: int = 1, timeout_s: float = 120.0) -> None:
    """Send every payload ``rounds`` times, unrecorded, so first-request costs stay out of the first run."""
    require_loopback(url)
    async with httpx.AsyncClient(timeout=timeout_s) as client:
        for payload in list(payloads) * rounds:
            body, headers = payload.encoded
            await client.post(url, content=body, headers=headers)


@contextlib.contextmanager
def serving(
    command: str, base_url: str, ready_path: str = "/readyz", timeout_s: float = 300.0
) -> Iterator[subprocess.Popen]:
    """Run ``command`` until the block ends; yields the process once it is ready. Its output goes to a temporary
    log file, quoted in the error if it fails to start; see :func:`bench.processes.running_process`."""
    require_loopback(base_url)
    log_path = Path(tempfile.mkstemp(prefix="bench-load-", suffix=".log")[1])
    with running_process(shlex.split(command), log_path, base_url + ready_path, timeout_s) as process:
        yield process


def _table_row(summary: dict[str, Any]) -> dict[str, object]:
    errors = {**summary["statuses"], **{f"conn {k}": v for k, v in summary["connection_errors"].items()}}
    errors.pop("200", None)
    batches = summary["batch_sizes"]
    return {
        "mode": summary["mode"],
        "level": summary["level"],
        "requests": summary["requests"],
        "req/s": summary["throughput_rps"],
        "p50 ms": summary["p50_ms"],
        "p95 ms": summary["p95_ms"],
        "p99 ms": summary["p99_ms"],
        "errors": " ".join(f"{k}:{v}" for k, v in errors.items()) or "-",
        "unexpected": sum(summary["unexpected"].values()),
        "batch sizes": "-"
        if batches is None
        else f"mean {batches['mean'] or 0:.2f}; " + " ".join(f"{k}:{v}" for k, v in batches["bins"].items()),
    }


def _progress(summary: dict[str, Any]) -> dict[str, Any]:
    print(
        f"{summary['mode']} {summary['level']}: {summary['requests']} requests, {summary['throughput_rps']} req/s, "
        f"p50 {summary['p50_ms']} ms, p99 {summary['p99_ms']} ms",
        flush=True,
    )
    return summary


def _numbers(text: str) -> list[float]:
    return [float(value) for value in text.split(",") if value.strip()]


async def run_all(args: argparse.Namespace, payloads: list[Payload]) -> list[dict[str, Any]]:
    url = args.url.rstrip("/") + args.path
    await warm_up(url, payloads)
    summaries = []
    for concurrency in _numbers(args.concurrency):
        result = await closed_loop(url, payloads, int(concurrency), args.duration, args.max_requests)
        summaries.append(_progress(result.summary()))
        await asyncio.sleep(args.pause)
    for rate in _numbers(args.rates):
        result = await open_loop(url, payloads, rate, args.duration, arrivals=args.arrivals)
        summaries.append(_progress(result.summary()))
        await asyncio.sleep(args.pause)
    return summaries


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="base URL, loopback only")
    parser.add_argument("--path", default="/detect", help="endpoint path (query allowed: /detect?conf=0.25)")
    parser.add_argument("--name", default="service", help="results go to bench/results/load-NAME.json")
    parser.add_argument("--concurrency", default="1,4,16,64", help="closed-loop levels; '' for none")
    parser.add_argument("--rates", default="", help="open-loop rates in requests/s, e.g. 5,10,20; '' for none")
    parser.add_argument("--arrivals", choices=["poisson", "uniform"], default="poisson")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per run")
    parser.add_argument("--max-requests", type=int, default=None, help="closed loop: stop a run after this many")
    parser.add_argument("--payloads", choices=["real", "synthetic", "all"], default="real")
    parser.add_argument("--synthetic-count", type=int, default=8)
    parser.add_argument("--synthetic-size", type=int, default=640)
    parser.add_argument("--pause", type=float, default=1.0, help="seconds between runs, for queues to drain")
    parser.add_argument("--start", default=None, help="command that starts the target; stopped at the end")
    parser.add_argument("--ready-path", default="/readyz", help="with --start: 200 here means ready")
    args = parser.parse_args(argv)
    try:
        require_loopback(args.url)
    except ValueError as error:
        parser.error(str(error))

    payloads = real_payloads() if args.payloads in ("real", "all") else []
    if args.payloads in ("synthetic", "all"):
        payloads += synthetic_payloads(args.synthetic_count, args.synthetic_size)
    with serving(args.start, args.url.rstrip("/"), args.ready_path) if args.start else contextlib.nullcontext():
        summaries = asyncio.run(run_all(args, payloads))
    print()
    print_table([_table_row(summary) for summary in summaries])
    path = write_results(
        f"load-{args.name}",
        summaries,
        url=args.url,
        path=args.path,
        payloads=[payload.name for payload in payloads],
        duration_s=args.duration,
        max_requests=args.max_requests,
        arrivals=args.arrivals,
        target_command=args.start,
    )
    print(path)


if __name__ == "__main__":
    main()
