"""Admission at the door, measured on a real server: the cases of issue 17 that live in memory and time.

    python -m bench.admission [--stalled 400] [--decode-flood 60] [--multipart 150] [--flags "..."]

Starts ``python -m service`` (the bundled model, default settings unless ``--flags``) on a free loopback port, with
its temp directory pointed at an empty folder, then runs, one after the other:

- ``stalled``: N clients each declare a body of ``max_upload_bytes``, send 95 % of it and stall (until all N are
  in place). Counts those answered 503 before they sent a byte of body, and the server's RSS before, at the peak
  and after the clients leave.
- ``decode flood``: M concurrent valid PNGs of 1 × 39,999,999 px (slow to decode), and 0.5 s later one small
  JPEG: the small request's status and seconds, the flood's statuses.
- ``multipart``: K concurrent multipart uploads of 9.3 MiB (random bytes, so 415 once parsed): statuses, the
  server's peak RSS and the most bytes its temp directory held.

Writes ``bench/results/admission.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import shlex
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from bench.common import write_results
from bench.processes import free_port, rss_bytes, running_process

MIB = 2**20


def rss_mib(pid: int) -> float:
    return round(rss_bytes(pid) / MIB, 1)


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


async def stalled_uploads(host: str, port: int, pid: int, clients: int, body_bytes: int) -> dict:
    """``clients`` connections declare ``body_bytes``; each sends 95 % of it unless answered first, then stalls."""
    head = (
        f"POST /detect HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/jpeg\r\nContent-Length: {body_bytes}\r\n\r\n"
    ).encode()
    part = b"\xff\xd8" + b"x" * (body_bytes * 95 // 100 - 2)
    all_in_place = asyncio.Event()
    outcomes: Counter = Counter()

    async def client() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(head)
            await writer.drain()
            try:
                answer = await asyncio.wait_for(reader.read(64), timeout=2)
            except TimeoutError:
                answer = b""
            if answer:
                outcomes[f"answered {answer.split(b' ')[1].decode()} before the body"] += 1
                return
            writer.write(part)
            await writer.drain()
            outcomes["sent 95 % and stalled"] += 1
            await all_in_place.wait()
        except OSError as error:
            outcomes[f"connection error {type(error).__name__}"] += 1
        finally:
            writer.close()

    before = rss_mib(pid)
    tasks = [asyncio.ensure_future(client()) for _ in range(clients)]
    started = time.monotonic()
    while sum(outcomes.values()) < clients and time.monotonic() - started < 120:
        await asyncio.sleep(0.2)
    peak = rss_mib(pid)
    all_in_place.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.sleep(2)
    return {
        "case": "stalled",
        "clients": clients,
        "declared_bytes": body_bytes,
        "outcomes": dict(outcomes),
        "rss_mib_before": before,
        "rss_mib_all_stalled": peak,
        "rss_mib_after": rss_mib(pid),
    }


def outcome(answer: httpx.Response | BaseException) -> str:
    """``200``, ``STATUS error_code``, or the exception's name for a request that got no answer."""
    if not isinstance(answer, httpx.Response):
        return type(answer).__name__
    return "200" if answer.status_code == 200 else f"{answer.status_code} {answer.json()['error']['code']}"


def thin_png(height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (1, height), (90, 120, 150)).save(buffer, format="PNG")
    return buffer.getvalue()


def small_jpeg() -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


async def decode_flood(url: str, images: int) -> dict:
    """``images`` slow-to-decode PNGs at once, and a small request 0.5 s later."""
    thin = thin_png(39_999_999)
    limits = httpx.Limits(max_connections=images + 1, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        flood = [
            asyncio.ensure_future(client.post("/detect", content=thin, headers={"content-type": "image/png"}))
            for _ in range(images)
        ]
        await asyncio.sleep(0.5)
        started = time.monotonic()
        small = await client.post("/detect", content=small_jpeg(), headers={"content-type": "image/jpeg"})
        small_seconds = time.monotonic() - started
        flood_started = time.monotonic()
        answers = await asyncio.gather(*flood, return_exceptions=True)
        flood_seconds = time.monotonic() - flood_started + small_seconds + 0.5
    return {
        "case": "decode flood",
        "images": images,
        "png_bytes": len(thin),
        "flood_statuses": dict(Counter(map(outcome, answers))),
        "flood_seconds": round(flood_seconds, 1),
        "small_request_status": small.status_code,
        "small_request_seconds": round(small_seconds, 2),
    }


async def multipart_uploads(url: str, pid: int, temp_dir: Path, uploads: int, file_bytes: int) -> dict:
    """``uploads`` concurrent multipart bodies of ``file_bytes`` random bytes each (one body, sent by all)."""
    boundary = "bench-admission"
    data = np.random.default_rng(0).bytes(file_bytes)
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    headers = {"content-type": f"multipart/form-data; boundary={boundary}"}
    peak_rss, peak_spool, done = rss_mib(pid), 0, asyncio.Event()

    async def watch() -> None:
        nonlocal peak_rss, peak_spool
        while not done.is_set():
            peak_rss, peak_spool = max(peak_rss, rss_mib(pid)), max(peak_spool, folder_bytes(temp_dir))
            await asyncio.sleep(0.05)

    before = rss_mib(pid)
    watcher = asyncio.ensure_future(watch())
    limits = httpx.Limits(max_connections=uploads, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        answers = await asyncio.gather(
            *(client.post("/detect", content=body, headers=headers) for _ in range(uploads)), return_exceptions=True
        )
    done.set()
    await watcher
    return {
        "case": "multipart",
        "uploads": uploads,
        "body_bytes": len(body),
        "statuses": dict(Counter(map(outcome, answers))),
        "rss_mib_before": before,
        "rss_mib_peak": peak_rss,
        "temp_dir_peak_bytes": peak_spool,
    }


async def measure(url: str, pid: int, temp_dir: Path, args: argparse.Namespace) -> list[dict]:
    host, port = url.removeprefix("http://").split(":")
    rows = [await stalled_uploads(host, int(port), pid, args.stalled, args.upload_bytes)]
    print(rows[-1], flush=True)
    rows.append(await decode_flood(url, args.decode_flood))
    print(rows[-1], flush=True)
    rows.append(await multipart_uploads(url, pid, temp_dir, args.multipart, int(9.3 * MIB)))
    print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.admission", description=__doc__)
    parser.add_argument("--stalled", type=int, default=400)
    parser.add_argument("--upload-bytes", type=int, default=10 * MIB, help="declared by each stalled client")
    parser.add_argument("--decode-flood", type=int, default=60)
    parser.add_argument("--multipart", type=int, default=150)
    parser.add_argument("--flags", default="", help="more flags for python -m service")
    args = parser.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="bench-admission-") as folder:
        temp_dir = Path(folder) / "tmp"
        temp_dir.mkdir()
        command = [sys.executable, "-m", "service", "--port", str(port), *shlex.split(args.flags)]
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("DETECTOR_")}, "TMPDIR": str(temp_dir)}
        with running_process(command, Path(folder) / "server.log", url + "/readyz", 300, env=env) as process:
            rows = asyncio.run(measure(url, process.pid, temp_dir, args))
    path = write_results("admission", rows, command=shlex.join(["python", "-m", "bench.admission", *sys.argv[1:]]))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
