"""Rolling a new model version into two real replicas behind Debian's nginx, without downtime: the new bundle is
written beside the old one and the configured path (a symlink) is repointed at it atomically, as deploy/README.md
("Your own model") says; both replicas get SIGHUP. Under load at concurrency 8, no request fails, readiness never
drops, and each replica's answers switch from the old ``model.version`` to the new one and never go back."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from bench.processes import free_port, running_process
from model.synthetic import render
from tests.deploy.model_versions import point, write_version
from tests.deploy.test_nginx import running_nginx
from tests.image_files import encode
from tests.service.server import REPO, ServerProcess

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

IMAGE = encode(render(12, 320)[0])
OLD, NEW = "swap-test-1", "swap-test-2"
CONCURRENCY = 8
MAX_REQUESTS = 2000  # the whole run stops here at the latest
BEFORE_SWAP = 16  # answers of the old version before the new files are written
AFTER_SWAP = 48  # answers after both replicas report the new version
SWAP_TIMEOUT_S = 120.0  # from SIGHUP until both replicas report the new version
ACCESS_LINE = re.compile(r"upstream=(?P<upstream>.*?) upstream_status=(?P<statuses>.*?) .*request_id=(?P<id>\S+)$")

# How a replica is pointed at the models folder: the multi-model setting, and the single-model one that keeps working.
SETTINGS: dict[str, tuple[str, Callable[[Path], str]]] = {
    "models": ("DETECTOR_MODELS", lambda path: json.dumps({"shapes": str(path)})),
    "model_path": ("DETECTOR_MODEL_PATH", str),
}


def catches(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler for ``signum`` (``SigCgt`` in /proc): without one, SIGHUP kills it."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    raise RuntimeError(f"no SigCgt for pid {pid}")


@contextlib.contextmanager
def running_replica(tmp_dir: Path, setting: str, value: str) -> Iterator[ServerProcess]:
    """``python -m service`` on loopback configured by the environment variable ``setting`` (as in a container);
    yields once /readyz answers 200."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_dir / f"server-{port}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DETECTOR_")} | {setting: value}
    command = [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port), "--warmup-rounds", "0"]
    command += ["--max-batch-size", "4", "--max-batch-wait-ms", "5"]
    with running_process(command, log_path, url + "/readyz", 180, cwd=REPO, env=env) as process:
        yield ServerProcess(process, url, log_path)


@dataclass
class Answer:
    request_id: str
    sent_at: float
    received_at: float
    status: int | str  # the HTTP status, or the name of the client-side error
    version: str | None  # model.version of a 200


@dataclass
class SwapRun:
    answers: list[Answer]
    not_ready: list[str]  # every /readyz answer other than 200 during the run
    written_at: float  # when the new bundle was in place at the configured path
    signalled_at: float


async def until(condition: Callable[[], bool], timeout: float, stop: asyncio.Event) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if stop.is_set() or time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def live_version(http: httpx.AsyncClient, replica: ServerProcess) -> str | None:
    with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
        return (await http.get(replica.url + "/v1/model")).json()["version"]
    return None


async def swap_under_load(lb: str, replicas: list[ServerProcess], link: Path, models: Path) -> SwapRun:
    """POST /detect through ``lb`` from ``CONCURRENCY`` clients; meanwhile the new version is written and pointed at,
    and every replica gets SIGHUP. Stops ``AFTER_SWAP`` answers after all replicas report it (or at the limits)."""
    answers: list[Answer] = []
    not_ready: list[str] = []
    marks: dict[str, float] = {}
    stop = asyncio.Event()
    request_ids = itertools.count()

    async def client(http: httpx.AsyncClient) -> None:
        while not stop.is_set() and (n := next(request_ids)) < MAX_REQUESTS:
            request_id = f"swap-{n}"
            sent_at = time.monotonic()
            try:
                response = await http.post(
                    lb + "/detect", files={"file": ("x.png", IMAGE)}, headers={"X-Request-ID": request_id}
                )
                status: int | str = response.status_code
                version = response.json()["model"]["version"] if status == 200 else None
            except httpx.HTTPError as error:
                status, version = type(error).__name__, None
            answers.append(Answer(request_id, sent_at, time.monotonic(), status, version))
        stop.set()

    async def readiness(http: httpx.AsyncClient) -> None:
        while not stop.is_set():
            for replica in replicas:
                try:
                    status: int | str = (await http.get(replica.url + "/readyz")).status_code
                except httpx.HTTPError as error:
                    status = type(error).__name__
                if status != 200:
                    not_ready.append(f"{replica.url}: {status}")
            await asyncio.sleep(0.1)

    async def roll_forward(http: httpx.AsyncClient) -> None:
        try:
            await until(lambda: len(answers) >= BEFORE_SWAP, 120, stop)
            served = {x.version for x in answers if x.status == 200}
            assert served == {OLD}, f"answers of {served} before the swap: the configured path is not served"
            new_bundle = await asyncio.to_thread(write_version, models, NEW)
            point(link, new_bundle)
            marks["written"] = time.monotonic()
            for replica in replicas:
                assert catches(replica.process.pid, signal.SIGHUP), (
                    f"replica {replica.url} has no SIGHUP handler: the signal would kill it (no model swap in this "
                    "build)"
                )
                replica.process.send_signal(signal.SIGHUP)
            marks["signalled"] = time.monotonic()
            deadline = time.monotonic() + SWAP_TIMEOUT_S
            while not stop.is_set() and time.monotonic() < deadline:
                if [await live_version(http, replica) for replica in replicas] == [NEW] * len(replicas):
                    break
                await asyncio.sleep(0.2)
            swapped = len(answers)
            await until(lambda: len(answers) >= swapped + AFTER_SWAP, 120, stop)
        finally:
            stop.set()

    limits = httpx.Limits(max_connections=CONCURRENCY)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http, httpx.AsyncClient(timeout=5) as probe:
        await asyncio.gather(*(client(http) for _ in range(CONCURRENCY)), readiness(probe), roll_forward(probe))
    return SwapRun(answers, not_ready, marks["written"], marks["signalled"])


def upstreams(access_log: Path) -> dict[str, list[str]]:
    """Request id -> the replicas nginx sent it to, in order (more than one: it was retried), from the access log."""
    routed = {}
    for line in access_log.read_text().splitlines():
        match = ACCESS_LINE.search(line)
        if match and match["id"].startswith("swap-"):
            routed[match["id"]] = [addr.strip() for addr in match["upstream"].split(",")]
    return routed


@pytest.mark.parametrize("setting", SETTINGS)
def test_a_sighup_swap_behind_nginx_loses_no_request_and_never_goes_back(tmp_path, setting):
    variable, value = SETTINGS[setting]
    models = tmp_path / "models"
    models.mkdir()
    link = models / "shapes"
    point(link, write_version(models, OLD))
    for name in ("a", "b", "nginx"):
        (tmp_path / name).mkdir()
    with (
        running_replica(tmp_path / "a", variable, value(link)) as a,
        running_replica(tmp_path / "b", variable, value(link)) as b,
        running_nginx(tmp_path / "nginx", [a.url, b.url]) as (lb, _),
    ):
        run = asyncio.run(swap_under_load(lb, [a, b], link, models))
        for replica in (a, b):
            assert replica.process.poll() is None, f"{replica.url} exited ({replica.process.returncode}) in the swap"
        final = {replica.url: httpx.get(replica.url + "/v1/model").json()["version"] for replica in (a, b)}
        info = {replica.url: re.findall(r"^detector_model_info\{.*$", httpx.get(replica.url + "/metrics").text, re.M)}
    answers = run.answers
    assert len(answers) < MAX_REQUESTS, "the run hit its request limit before both replicas swapped"

    failed = [(x.request_id, x.status) for x in answers if x.status != 200]
    assert not failed, f"{len(failed)} of {len(answers)} requests failed: {failed[:10]}"
    assert not run.not_ready, f"readiness dropped during the swap: {run.not_ready[:10]}"
    routed = upstreams(tmp_path / "nginx" / "access.log")
    retried = {request_id: via for request_id, via in routed.items() if len(via) > 1}
    assert not retried, f"nginx had to retry {len(retried)} requests on the other replica: {list(retried.items())[:5]}"
    versions = {x.version for x in answers}
    assert versions <= {OLD, NEW}, f"answers of {versions - {OLD, NEW}}: the replicas do not serve the configured path"

    before = [x for x in answers if x.received_at < run.written_at]
    assert len(before) >= BEFORE_SWAP and {x.version for x in before} == {OLD}, "the configured path is served"
    for replica in (a, b):
        address = replica.url.removeprefix("http://")
        own = sorted((x for x in answers if routed[x.request_id] == [address]), key=lambda x: x.sent_at)
        assert any(x.version == OLD for x in own), f"{address} served nothing before the swap"
        switched = [x.received_at for x in own if x.version == NEW]
        assert switched, f"{address} never answered with {NEW} (answers: {[x.version for x in own][-5:]} ...)"
        after = [x for x in own if x.sent_at > min(switched)]
        went_back = [x.request_id for x in after if x.version != NEW]
        assert not went_back, f"{address} answered {OLD} again after its first {NEW} answer: {went_back[:10]}"
        assert after, f"{address} served no request sent after its swap"
    assert set(final.values()) == {NEW}, f"/v1/model after the swap: {final}"
    for url, lines in info.items():
        assert lines and all(f'version="{NEW}"' in line for line in lines), f"{url} detector_model_info: {lines}"
