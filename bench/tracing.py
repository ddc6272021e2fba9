"""What tracing costs a request: the app in-process (httpx's ASGI transport, no sockets) on an engine that answers at
once, so that the HTTP layer, the pipeline and the batcher are all there is to measure; tracing off, on (spans made
and batched, the exporter dropping them) and on exporting over OTLP/HTTP to a receiver process, in alternating
rounds on one warm app.

    python -m bench.tracing [--rounds 6] [--requests 400] [--concurrency 4]

Also times, alone, the tracing helpers one request calls while tracing is off. Writes ``bench/results/tracing.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import statistics
import subprocess
import sys
import time
import timeit
from collections.abc import Iterator, Sequence

import httpx
import numpy as np
import torch
from PIL import Image

from bench.common import print_table, write_results
from bench.processes import free_port
from model.checkpoint import ModelMetadata
from service.app import create_app
from service.core.engine import detections_from_rows
from service.process import tracing
from service.process.settings import Settings

SIZE = 64
ROW = (16.0, 16.0, 48.0, 48.0, 0.9, 1.0)  # one detection per image
RECEIVER = """
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


class InstantEngine:
    """An engine that answers :data:`ROW` for every image at once (``service.core.engine.EngineProtocol``)."""

    name, version, names, input_size, device, dtype = "instant", "1", ["triangle", "star"], SIZE, "cpu", "float32"
    akconv_layers, parameters, checksum = 0, 0, "not applicable"
    workers = 1
    runtime = {"requested": "eager", "shapes": {f"{SIZE}x{SIZE}": "eager"}, "accuracy": None}
    metadata = ModelMetadata("instant", "1", {}, ["triangle", "star"], SIZE, "ij")

    def verify(self, shape: object) -> None:
        pass

    def warm_up(self, shapes: object, max_batch_size: int, rounds: int) -> dict:
        return {}

    def infer(self, images: list[torch.Tensor]) -> torch.Tensor:
        rows = torch.zeros(len(images), 4, 6)  # (B, K, 6)
        rows[:, 0] = torch.tensor(ROW)
        return rows

    def detections(self, rows, geometry, conf, classes, max_det):  # noqa: ANN001, ANN201
        return detections_from_rows(rows, self.names, geometry, conf, classes, max_det)

    def gpu_memory(self) -> dict[str, int]:
        return {}


class DropSpans:
    """A span exporter that drops what it is given: the cost of making and batching spans, without the export."""

    def export(self, spans: Sequence[object]) -> object:
        from opentelemetry.sdk.trace.export import SpanExportResult

        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


@contextlib.contextmanager
def receiver() -> Iterator[str]:
    """An OTLP/HTTP endpoint in a process of its own (as a collector would be), answering 200 to every export."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-c", RECEIVER, str(port)])
    try:
        for _ in range(100):
            with contextlib.suppress(httpx.HTTPError):
                httpx.post(f"http://127.0.0.1:{port}/v1/traces", content=b"")
                break
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)


def png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((48, 64, 3), 90, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def switch(mode: str, endpoint: str) -> None:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    tracing.uninstall()
    if mode == "on":
        tracing.install(BatchSpanProcessor(DropSpans()))
    elif mode == "otlp":
        tracing.install(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint + "/v1/traces")))


async def one_round(client: httpx.AsyncClient, image: bytes, requests: int, concurrency: int) -> float:
    """Requests per second of ``requests`` POST /detect, ``concurrency`` at a time, each with a traceparent."""
    headers = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    left = iter(range(requests))

    async def worker() -> None:
        for _ in left:
            response = await client.post("/detect", files={"file": ("a.png", image)}, headers=headers)
            assert response.status_code == 200, response.text

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return requests / (time.perf_counter() - started)


async def rounds(modes: list[str], count: int, requests: int, concurrency: int, endpoint: str) -> dict[str, list]:
    settings = Settings(warmup_rounds=0, max_batch_size=8)
    app = create_app(settings, [InstantEngine()])
    image, results = png(), {mode: [] for mode in modes}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench", timeout=60) as client:
            switch("off", endpoint)
            await one_round(client, image, requests // 4, concurrency)  # warm
            for index in range(count):
                for mode in modes if index % 2 == 0 else modes[::-1]:  # alternate the order too
                    switch(mode, endpoint)
                    results[mode].append(round(await one_round(client, image, requests, concurrency), 1))
                    tracing.flush(10)
    tracing.uninstall()
    return results


def off_path_microseconds() -> float:
    """The tracing calls of one /detect while off (middleware, stages, batcher, log line), in microseconds."""

    def one_request() -> None:
        with tracing.request_span("POST", tracing.http_carrier(()), {}) as span:
            for name in ("admission", "read_body", "decode", "postprocess"):
                with tracing.span(name):
                    pass
            queued = tracing.start_span("queue_wait", None)
            forward = tracing.start_batch("forward", (queued,))
            with tracing.using(queued):
                pass
            tracing.end_span(queued, batch=forward)
            tracing.bound(one_request, forward)
            tracing.in_current_context(one_request)
            tracing.end_span(forward)
            tracing.exemplar(), tracing.exemplar(), tracing.exemplar(), tracing.exemplar()
            tracing.log_fields()
            tracing.set_outcome(span, 200, http_route="/detect")

    tracing.uninstall()
    number = 100_000
    return min(timeit.repeat(one_request, number=number, repeat=5)) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    modes = ["off", "on", "otlp"]
    with receiver() as endpoint:
        results = asyncio.run(rounds(modes, args.rounds, args.requests, args.concurrency, endpoint))
    off_median = statistics.median(results["off"])
    rows = [
        {
            "tracing": mode,
            "requests_per_s_median": round(statistics.median(values), 1),
            "vs_off": f"{statistics.median(values) / off_median:.3f}",
            "rounds": " ".join(str(value) for value in values),
        }
        for mode, values in results.items()
    ]
    print_table(rows)
    helpers = round(off_path_microseconds(), 2)
    print(f"tracing helpers of one request while off: {helpers} µs")
    command = "python -m bench.tracing " + " ".join(sys.argv[1:])
    write_results("tracing", rows, command=command.strip(), off_path_us=helpers, concurrency=args.concurrency)


if __name__ == "__main__":
    main()
