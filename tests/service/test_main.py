import signal
import socket
import subprocess
import sys

import pytest

import service.__main__ as entry
from service.app import create_app
from service.config import Settings, settings_from_cli
from tests.service.server import REPO


def test_stop_signal_drops_readiness_at_once():
    app = create_app(Settings())
    state = app.state.service
    state.set_ready(True)
    server = entry.draining_server(app, Settings())
    server.handle_exit(signal.SIGTERM, None)
    assert state.draining and server.should_exit
    assert state.metrics.ready._value.get() == 0


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
