"""Connections that hold the server without finishing a request (issue 17, item 2), measured on loopback.

    python -m bench.connections idle --start "COMMAND" [--port 8000] [--connections 250] [--hold 75]
    python -m bench.connections files --start "COMMAND" [--port 8000] [--file-limit 1024] [--connections 1050]
        [--hold 45]

``idle``: half the connections send nothing, half send a request line and then one header byte a second; after
``hold`` seconds, how many the server has closed, how (408 answer or silently) and when.

``files``: the server runs with its file limit lowered to ``file-limit``; ``connections`` idle connections are held
for ``hold`` seconds while ``/healthz`` is asked once a second (2 s timeout); then the server's log is counted: lines,
lines that are not JSON, lines about running out of file descriptors.

``--start`` runs the target (e.g. ``--start ".venv/bin/python -m service --port 8000"``), waits for ``/healthz``,
and stops it afterwards; its output goes to a log file in a temporary directory.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import shlex
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from bench.processes import running_process

HOST = "127.0.0.1"


@contextlib.contextmanager
def started(command: str, port: int, log_path: Path, file_limit: int | None = None) -> Iterator[None]:
    """``command`` running (output to ``log_path``) until ``/healthz`` on ``port`` answers; stopped afterwards."""

    def limit_files() -> None:
        if file_limit is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (file_limit, file_limit))

    url = f"http://{HOST}:{port}/healthz"
    with running_process(shlex.split(command), log_path, url, 300, preexec_fn=limit_files):
        yield


async def hold_connection(port: int, trickle: bool, hold_s: float, started_at: float) -> dict[str, Any]:
    """One connection held for ``hold_s``: silent, or trickling a header byte a second. How it ended."""
    reader, writer = await asyncio.open_connection(HOST, port)
    if trickle:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: bench\r\n")
    deadline = started_at + hold_s
    outcome: dict[str, Any] = {"kind": "trickle" if trickle else "silent", "closed": False}
    try:
        while (left := deadline - time.monotonic()) > 0:
            try:
                data = await asyncio.wait_for(reader.read(65536), min(1.0, left))
            except TimeoutError:
                if trickle:
                    writer.write(b"X")
                continue
            rest = await asyncio.wait_for(reader.read(), 5) if data else b""
            answer = (data + rest).split(b"\r\n", 1)[0].decode("latin-1")
            outcome |= {"closed": True, "after_s": round(time.monotonic() - started_at, 2), "answer": answer}
            break
    except ConnectionError as error:
        outcome |= {"closed": True, "after_s": round(time.monotonic() - started_at, 2), "answer": type(error).__name__}
    writer.close()
    return outcome


async def measure_idle(port: int, connections: int, hold_s: float) -> dict[str, Any]:
    started_at = time.monotonic()
    outcomes = await asyncio.gather(
        *(hold_connection(port, index % 2 == 1, hold_s, started_at) for index in range(connections))
    )
    closed = [outcome for outcome in outcomes if outcome["closed"]]
    return {
        "connections": connections,
        "hold_s": hold_s,
        "still_open": connections - len(closed),
        "closed": len(closed),
        "answers": dict(Counter(f"{outcome['kind']}: {outcome['answer'] or 'closed silently'}" for outcome in closed)),
        "closed_after_s": [min(o["after_s"] for o in closed), max(o["after_s"] for o in closed)] if closed else None,
    }


async def measure_files(port: int, connections: int, hold_s: float) -> dict[str, Any]:
    opened = []
    refused = 0
    for _ in range(connections):
        try:
            opened.append(await asyncio.wait_for(asyncio.open_connection(HOST, port), 2))
        except (OSError, TimeoutError):
            refused += 1
    health = Counter()
    async with httpx.AsyncClient(timeout=2) as client:
        deadline = time.monotonic() + hold_s
        while time.monotonic() < deadline:
            try:
                health[str((await client.get(f"http://{HOST}:{port}/healthz")).status_code)] += 1
            except httpx.HTTPError as error:
                health[type(error).__name__] += 1
            await asyncio.sleep(1)
    for _, writer in opened:
        writer.close()
    return {"connections": len(opened), "connect_failures": refused, "hold_s": hold_s, "healthz": dict(health)}


def count_log(text: str) -> dict[str, int]:
    lines = text.splitlines()
    not_json = 0
    for line in lines:
        try:
            json.loads(line)
        except ValueError:
            not_json += 1
    return {
        "log_lines": len(lines),
        "log_bytes": len(text.encode()),
        "not_json": not_json,
        "about_file_descriptors": sum("file descriptors" in line or "out of system resource" in line for line in lines),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenario", choices=["idle", "files"])
    parser.add_argument("--start", required=True)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--connections", type=int)
    parser.add_argument("--hold", type=float)
    parser.add_argument("--file-limit", type=int, default=1024)
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # this client holds as many connections as asked
    with tempfile.TemporaryDirectory() as tmp:
        log_path = Path(tmp) / "server.log"
        if args.scenario == "idle":
            with started(args.start, args.port, log_path):
                result = asyncio.run(measure_idle(args.port, args.connections or 250, args.hold or 75))
        else:
            with started(args.start, args.port, log_path, args.file_limit):
                result = asyncio.run(measure_files(args.port, args.connections or 1050, args.hold or 45))
            result |= {"file_limit": args.file_limit} | count_log(log_path.read_text(errors="replace"))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
