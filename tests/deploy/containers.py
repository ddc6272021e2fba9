"""Docker for the container tests (marked ``container``, run by ``make test-deploy``): the engine, the image, containers
published on loopback, and load on fresh connections."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import httpx
import pytest

from bench.processes import free_port
from tests.deploy.tools import REPO

IMAGE = "akconv-detector:0.1.0"
SAMPLE = REPO / "service" / "static" / "sample.jpg"


def docker(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    """``docker ARGS``, its output as text; fails the test with docker's own words when it fails and ``check``."""
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, check=False)
    if check:
        assert result.returncode == 0, f"docker {' '.join(args)}: {result.stderr.strip()}"
    return result


def require_engine() -> None:
    """A Docker engine that answers, or a skip saying why; in CI (CI=true) its absence fails the run."""
    found = shutil.which("docker")
    if found and subprocess.run(["docker", "info"], capture_output=True, timeout=60, check=False).returncode == 0:
        return
    reason = "no Docker engine answers `docker info` (make docker-engine starts Debian's)"
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def require_image(image: str = IMAGE) -> None:
    """The image ``make test-deploy`` built first (``make image``)."""
    require_engine()
    if docker("image", "inspect", image, check=False).returncode != 0:
        pytest.fail(f"{image} is not built: run `make image` (make test-deploy does)")


def wait_until(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.25) -> float:
    """Poll ``condition`` until it holds; return the seconds it took; fail naming ``what`` after ``timeout``."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, f"{what} within {timeout} s"
        time.sleep(interval)
    return time.monotonic() - start


def answers(url: str) -> bool:
    """``url`` answers 200 now."""
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(url, timeout=2).status_code == 200
    return False


@dataclass
class Container:
    name: str
    url: str  # the service's port, published on 127.0.0.1
    ready_after_s: float = 0.0  # from `docker run` to the first 200 of /readyz

    def inspect(self, template: str) -> str:
        return docker("inspect", "-f", template, self.name).stdout.strip()

    def logs(self) -> tuple[str, str]:
        """(stdout, stderr) of the container, as docker keeps them apart."""
        result = docker("logs", self.name)
        return result.stdout, result.stderr


@contextlib.contextmanager
def running_container(*run_args: str, image: str = IMAGE, ready_timeout: float = 120) -> Iterator[Container]:
    """``image`` run as deployed (read-only root, tmpfs /tmp) with ``run_args``, port 8000 published on 127.0.0.1;
    yields once /readyz answers 200 (failing with the container's logs otherwise); removed afterwards."""
    name = f"akconv-test-{os.getpid()}-{free_port()}"
    port = free_port()
    started_at = time.monotonic()
    docker("run", "-d", "--name", name, "--read-only", "--tmpfs", "/tmp", "-p", f"127.0.0.1:{port}:8000", *run_args,
           image)  # fmt: skip
    container = Container(name, f"http://127.0.0.1:{port}")
    try:
        deadline = started_at + ready_timeout
        while not answers(container.url + "/readyz"):
            if time.monotonic() > deadline or container.inspect("{{.State.Running}}") != "true":
                stdout, stderr = container.logs()
                pytest.fail(f"{name} not ready within {ready_timeout} s:\n{stdout[-3000:]}\n{stderr[-5000:]}")
            time.sleep(0.25)
        container.ready_after_s = time.monotonic() - started_at
        yield container
    finally:
        docker("rm", "-f", name, check=False)


def json_lines(text: str) -> list[dict]:
    """Every line of ``text`` parsed as one JSON object; fails on the first line that is not one."""
    entries = []
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            entry = None
        assert isinstance(entry, dict), f"not a JSON object: {line!r}"
        entries.append(entry)
    return entries


@dataclass
class Outcome:
    """One request of :class:`Load`: when it was sent (time.time(), comparable with log times) and how it ended."""

    sent_at: float
    status: int | None  # None: no HTTP answer
    error_code: str | None = None  # the JSON error's code, for an answer other than 200
    failure: str | None = None  # the exception's name when no answer came
    version: str | None = None  # model.version of a 200


@dataclass
class Load:
    """``concurrency`` clients sending ``POST /detect`` with the sample image to ``url`` in a loop, each request on
    a new connection (a reset or a refusal shows as itself, not as a stale keep-alive connection), until stopped or
    ``max_requests`` were sent. Runs in threads; every outcome is kept."""

    url: str
    concurrency: int
    max_requests: int = 5000
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __enter__(self) -> Load:
        image = SAMPLE.read_bytes()
        for _ in range(self.concurrency):
            thread = threading.Thread(target=self._client, args=(image,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def _client(self, image: bytes) -> None:
        limits = httpx.Limits(max_keepalive_connections=0)
        with httpx.Client(limits=limits, timeout=httpx.Timeout(40, connect=5)) as client:
            while not self._stop.is_set():
                with self._lock:
                    if len(self.outcomes) >= self.max_requests:
                        return
                outcome = Outcome(sent_at=time.time(), status=None)
                try:
                    response = client.post(self.url, files={"file": ("sample.jpg", image, "image/jpeg")})
                    outcome.status = response.status_code
                    body = response.json()
                    if response.status_code == 200:
                        outcome.version = body["model"]["version"]
                    else:
                        outcome.error_code = body["error"]["code"]
                except (httpx.HTTPError, ValueError, KeyError) as error:
                    outcome.failure = type(error).__name__
                with self._lock:
                    self.outcomes.append(outcome)

    def count(self) -> int:
        with self._lock:
            return len(self.outcomes)

    def wait_for(self, count: int, timeout: float) -> None:
        wait_until(lambda: self.count() >= count, timeout, f"{count} answers")
