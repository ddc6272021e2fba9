import signal

import pytest
import uvicorn

from service.__main__ import DrainingServer
from service.app import create_app
from service.config import Settings, settings_from_cli


def test_stop_signal_drops_readiness_at_once():
    app = create_app(Settings())
    state = app.state.service
    state.set_ready(True)
    server = DrainingServer(uvicorn.Config(app))
    server.handle_exit(signal.SIGTERM, None)
    assert state.draining and server.should_exit
    assert state.metrics.ready._value.get() == 0


def test_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit):
        settings_from_cli(["--help"])
    out = capsys.readouterr().out
    for flag in ("--model-path", "--max-batch-size", "--max-batch-wait-ms", "--api-key", "--device"):
        assert flag in out
