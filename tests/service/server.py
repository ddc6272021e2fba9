"""Real server processes on loopback for end-to-end tests."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from bench.processes import free_port, running_process

REPO = Path(__file__).resolve().parents[2]


@dataclass
class ServerProcess:
    process: subprocess.Popen
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text()

    def terminate(self, timeout: float = 60) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)


@contextlib.contextmanager
def running_server(
    tmp_dir: Path, *flags: str, ready_timeout: float = 180, entry: str = "service"
) -> Iterator[ServerProcess]:
    """``python -m <entry>`` (the service, or a test build of it) on 127.0.0.1 with ``flags``; yields once /readyz
    answers 200; stops it afterwards."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_dir / f"server-{port}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DETECTOR_")}
    command = [sys.executable, "-m", entry, "--host", "127.0.0.1", "--port", str(port), "--warmup-rounds", "0"]
    with running_process([*command, *flags], log_path, url + "/readyz", ready_timeout, cwd=REPO, env=env) as process:
        yield ServerProcess(process, url, log_path)


@contextlib.contextmanager
def serving_in_thread(app: FastAPI, **options: object) -> Iterator[tuple[str, uvicorn.Server]]:
    """``app`` (e.g. on a fake engine) under a real uvicorn on 127.0.0.1, in a thread of this process; yields its
    URL and the server once it listens, stops it afterwards. ``options``: more ``uvicorn.Config`` arguments. For the
    cases that live in sockets, without a model to load."""
    config = uvicorn.Config(
        app, host="127.0.0.1", port=free_port(), log_config=None, access_log=False, http="h11", **options
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    for _ in range(600):  # 60 s at most
        if server.started or not thread.is_alive():
            break
        time.sleep(0.1)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{config.port}", server
    finally:
        server.should_exit = True
        thread.join(60)


def metric_value(text: str, series: str) -> float:
    """The value of ``series`` (a metric name with its labels, exactly as exported) in Prometheus text."""
    match = re.search(rf"^{re.escape(series)} (\S+)$", text, re.MULTILINE)
    assert match, f"{series} not exported"
    return float(match.group(1))
