"""Real server processes on loopback for end-to-end tests."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


def wait_for_http(url: str, process: subprocess.Popen, log_path: Path, timeout: float) -> None:
    """Poll ``url`` until it answers 200; fail with the process's log if it exits or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode}:\n{log_path.read_text()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} not ready after {timeout} s:\n{log_path.read_text()}")
        time.sleep(0.2)


@contextlib.contextmanager
def running_process(
    command: list[str], log_path: Path, ready_url: str, timeout: float, **popen: object
) -> Iterator[subprocess.Popen]:
    """Start ``command`` (output to ``log_path``), yield once ``ready_url`` answers 200, SIGTERM it afterwards."""
    with log_path.open("w") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, **popen)
    try:
        wait_for_http(ready_url, process, log_path, timeout)
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()


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


def metric_value(text: str, series: str) -> float:
    """The value of ``series`` (a metric name with its labels, exactly as exported) in Prometheus text."""
    match = re.search(rf"^{re.escape(series)} (\S+)$", text, re.MULTILINE)
    assert match, f"{series} not exported"
    return float(match.group(1))
