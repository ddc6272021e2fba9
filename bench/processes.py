"""Server processes on loopback, for the benchmarks and the end-to-end tests alike: a free port, a process
started and waited for until it answers, stopped with its children, and its resident memory."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_bytes(pid: int) -> int:
    """Resident memory of process ``pid``, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def wait_for_http(url: str, process: subprocess.Popen, log_path: Path, timeout: float) -> None:
    """Poll ``url`` until it answers 200; fail with the end of the process's log if it exits or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode}:\n{log_path.read_text()[-8000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} not ready after {timeout} s:\n{log_path.read_text()[-8000:]}")
        time.sleep(0.2)


@contextlib.contextmanager
def running_process(
    command: list[str], log_path: Path, ready_url: str, timeout: float, **popen: object
) -> Iterator[subprocess.Popen]:
    """Start ``command`` (output to ``log_path``), yield once ``ready_url`` answers 200, stop it afterwards.

    The process leads its own process group, and the stop goes to the whole group (SIGTERM, then SIGKILL after
    60 s): servers such as nginx or LitServe leave worker processes behind otherwise.
    """
    with log_path.open("w") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True, **popen)
    try:
        wait_for_http(ready_url, process, log_path, timeout)
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
