import asyncio
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import httpx
import numpy as np
import pytest

import service.__main__ as entry
from model.synthetic import SPLITS, render
from service.app import create_app
from service.process.settings import Settings, settings_from_cli
from tests.image_files import encode
from tests.service.fakes import FakeEngine, app_client, fake_settings
from tests.service.server import REPO, running_server

BOUND_S = 30  # no wait in these tests lasts longer
PNG = encode(np.full((48, 64, 3), 90, dtype=np.uint8))
# The drain test's load: LOAD_CLIENTS requests at a time, each waiting up to LOAD_BATCH_WAIT_MS for the others to
# join its batch, so that at the signal they are in flight for longer than stock uvicorn kept its listener open
# (0.1-0.2 s), however fast the machine.
LOAD_CLIENTS = 6
LOAD_BATCH_WAIT_MS = 800
PROBE_INTERVAL_S = 0.02
# An answer reaches its client a moment after the server sent it, and the server may find itself drained in
# between: a connection refused this long before the client saw the last answer is not an early close.
ANSWER_LAG_S = 0.05


def test_stop_signal_drops_readiness_at_once():
    app = create_app(Settings())
    state = app.state.service
    state.set_ready(True)
    server = entry.draining_server(app, Settings())
    server.handle_exit(signal.SIGTERM, None)
    assert state.draining and server.should_exit
    assert state.metrics.ready._value.get() == 0


def test_the_server_is_drained_once_no_detection_request_is_in_flight():
    engine = FakeEngine()

    async def scenario():
        async with app_client(fake_settings(request_timeout_s=7), engine) as (client, app):
            server = entry.draining_server(app, app.state.service.settings)
            idle = server.drained()
            engine.gate.clear()
            request = asyncio.ensure_future(client.post("/detect", files={"file": ("a.png", PNG)}))
            await engine.batch_started()
            busy = server.drained()
            engine.gate.set()
            response = await request
            return idle, busy, response.status_code, server.drained(), server.drain_timeout_s

    assert asyncio.run(asyncio.wait_for(scenario(), BOUND_S)) == (True, False, 200, True, 7)


def test_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit):
        settings_from_cli(["--help"])
    out = capsys.readouterr().out
    for flag in ("--model-path", "--max-batch-size", "--max-batch-wait-ms", "--api-key", "--device"):
        assert flag in out
    for flag in ("--header-timeout-s", "--max-connections"):
        assert flag in out


@pytest.fixture
def model_never_loaded(monkeypatch):
    """Fails the test if ``main`` gets as far as loading the model."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(entry, "load_engines", refuse)


@pytest.mark.parametrize(
    "argv,named",
    [
        (["--max-batch-size", "0"], "max_batch_size (--max-batch-size, DETECTOR_MAX_BATCH_SIZE): Input should be"),
        (["--port", "http"], "port (--port, DETECTOR_PORT): Input should be a valid integer"),
        (["--header-timeout-s", "0"], "header_timeout_s (--header-timeout-s, DETECTOR_HEADER_TIMEOUT_S)"),
        (["--max-queue", "2", "--max-batch-size", "4"], "max_queue (2) must be >= max_batch_size (4)"),
    ],
)
def test_a_bad_setting_is_one_plain_line_and_exit_2(argv, named, capsys, model_never_loaded):
    with pytest.raises(SystemExit) as exit_info:
        entry.main(argv)
    assert exit_info.value.code == entry.BAD_SETTINGS
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("akconv-serve: bad setting: ") and named in err


def test_a_malformed_environment_value_is_one_plain_line(capsys, monkeypatch, model_never_loaded):
    monkeypatch.setenv("DETECTOR_CORS_ORIGINS", "not a JSON list")
    with pytest.raises(SystemExit) as exit_info:
        entry.main([])
    assert exit_info.value.code == entry.BAD_SETTINGS
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cors_origins" in err


@pytest.fixture
def taken_port():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def test_a_port_in_use_is_found_before_the_model_loads(taken_port, capsys, model_never_loaded):
    with pytest.raises(SystemExit) as exit_info:
        entry.main(["--host", "127.0.0.1", "--port", str(taken_port)])
    assert exit_info.value.code == entry.STARTUP_FAILURE
    err = capsys.readouterr().err
    assert err == f"akconv-serve: cannot listen on 127.0.0.1:{taken_port}: Address already in use\n"


@pytest.mark.e2e
def test_the_process_prints_only_that_line(taken_port):
    """The real process: nothing but the one line reaches stderr, no log line, no traceback."""
    result = subprocess.run(
        [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(taken_port)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == entry.STARTUP_FAILURE
    assert result.stderr == f"akconv-serve: cannot listen on 127.0.0.1:{taken_port}: Address already in use\n"
    assert result.stdout == ""


@dataclass
class Outcome:
    """One request of :func:`test_sigterm_keeps_listening_until_what_it_accepted_is_answered`: when it was sent and
    ended (``time.monotonic()`` seconds) and how."""

    path: str
    sent: float
    ended: float
    status: int | None = None  # None: no HTTP answer
    code: str | None = None  # an error answer's JSON code
    failure: str | None = None  # the connection error (refused, reset, closed) when there was no answer


def call(client: httpx.Client, url: str, path: str, image: bytes) -> Outcome:
    """POST ``image`` to a ``/detect`` path, or GET any other, on a connection of its own (``Connection: close``)."""
    sent = time.monotonic()
    headers = {"Connection": "close"}
    try:
        if path == "/detect":
            response = client.post(url + path, files={"file": ("x.png", image)}, headers=headers)
        else:
            response = client.get(url + path, headers=headers)
    except httpx.TransportError as error:
        return Outcome(path, sent, time.monotonic(), failure=type(error).__name__)
    ended = time.monotonic()
    body = response.json()  # every answer is JSON, errors included
    return Outcome(path, sent, ended, response.status_code, body["error"]["code"] if "error" in body else None)


@pytest.mark.e2e
@pytest.mark.slow
def test_sigterm_keeps_listening_until_what_it_accepted_is_answered(tmp_path):
    """``docker stop`` under load, on loopback: clients on fresh connections keep sending through a SIGTERM. Until
    every detection request sent before the signal is answered, every request gets an HTTP answer in JSON (new
    detections and readiness 503 ``not_ready``, liveness 200), none is refused or reset; then the listener closes
    and the process exits."""
    image = encode(render(SPLITS["test"], 320)[0])
    # Room for more than the clients in a batch: it never fills, it waits its whole window.
    flags = ("--max-batch-size", str(LOAD_CLIENTS + 1), "--max-batch-wait-ms", str(LOAD_BATCH_WAIT_MS))
    with running_server(tmp_path, *flags) as server:
        load: list[Outcome] = []
        signalled = threading.Event()

        def load_client() -> None:
            with httpx.Client(timeout=BOUND_S) as client:
                for _ in range(int(BOUND_S * 1000 / LOAD_BATCH_WAIT_MS)):
                    load.append(call(client, server.url, "/detect", image))
                    if signalled.is_set():
                        return

        clients = [threading.Thread(target=load_client, daemon=True) for _ in range(LOAD_CLIENTS)]
        for thread in clients:
            thread.start()
        for _ in range(int(BOUND_S / 0.01)):  # a first batch answered: its clients send again at once, ...
            if load:
                break
            time.sleep(0.01)
        time.sleep(0.1)  # ... opening the next batch, which closes LOAD_BATCH_WAIT_MS later
        signal_at = time.monotonic()
        signalled.set()
        server.process.send_signal(signal.SIGTERM)
        probes: list[Outcome] = []
        with httpx.Client(timeout=BOUND_S) as client:
            for index in range(int(BOUND_S / PROBE_INTERVAL_S)):
                probes.append(call(client, server.url, ("/detect", "/readyz", "/healthz")[index % 3], image))
                if probes[-1].failure or server.process.poll() is not None:
                    break
                time.sleep(PROBE_INTERVAL_S)
        for thread in clients:
            thread.join(BOUND_S)
        # uvicorn re-raises the stop signal once it has shut down, so the exit status is SIGTERM's
        assert server.process.wait(BOUND_S) in (0, -signal.SIGTERM)
        log = server.log()
    accepted = [outcome for outcome in load if outcome.sent < signal_at]
    answered_at = max(outcome.ended for outcome in accepted)  # the last of them answered
    assert answered_at - signal_at > 0.3, "nothing was in flight long enough to show the drain"
    assert [outcome.status for outcome in accepted] == [200] * len(accepted)
    refused_early = [o for o in load + probes if o.failure and o.sent < answered_at - ANSWER_LAG_S]
    assert not refused_early, f"{refused_early} of {signal_at=}, {answered_at=}"
    while_draining = [outcome for outcome in probes if outcome.sent < answered_at - ANSWER_LAG_S]
    expected = {"/detect": (503, "not_ready"), "/readyz": (503, "not_ready"), "/healthz": (200, None)}
    assert len(while_draining) >= 3
    assert [(o.path, o.status, o.code) for o in while_draining] == [(o.path, *expected[o.path]) for o in while_draining]
    assert "draining: answering the requests in flight" in log and '"message": "stopped"' in log
