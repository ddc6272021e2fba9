"""``python -m service`` / ``akconv-serve``: run the detector under uvicorn, one process per device.

Scale out with replicas, not ``--workers`` (each worker would hold its own model copy and queue). On SIGTERM (or
SIGINT) readiness drops to 503 at once; the listener stays open, and new detection requests are answered 503
``not_ready`` (``/readyz`` 503, ``/healthz`` 200), until every detection request admitted before the signal has been
answered, ``request_timeout_s`` at most; then uvicorn closes the listener and idle connections, waits for the answers
under way and the process exits. uvicorn's graceful window, ``request_timeout_s`` + 5 s from the signal, bounds the
whole stop: what still runs at its end is answered 503 ``shutting_down``. A second SIGINT exits at once.

Start-up fails closed, with one plain line on stderr naming what to fix: exit 2 for a bad setting (an ``OTEL_*``
tracing variable included), exit 3 when the address cannot be bound (checked before the model loads) or the app fails
to start, and a model file that cannot be used exits with its kind's status (``model/README.md``).
"""

from __future__ import annotations

import os

# Before anything imports torch (model.checkpoint below does): OpenMP reads its waiting policy when torch loads it.
# PASSIVE: a pool's threads sleep as soon as a parallel region ends, whichever threads ran torch work before
# (service/process/threads.py; bench/README.md, "In-service speed"). An OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import atexit  # noqa: E402
import logging
import signal
import socket
import sys
from typing import NoReturn

from fastapi import FastAPI
from pydantic import ValidationError
from pydantic_settings import SettingsError

from model.checkpoint import CheckpointError
from service.app import create_app, load_engine
from service.core.engine import Engine
from service.core.models import model_sources
from service.process import tracing
from service.process.logs import configure_logging
from service.process.server import ServiceServer, bind_listener, uvicorn_config, warn_if_files_may_run_out
from service.process.settings import Settings, settings_from_cli
from service.process.threads import log_threads

log = logging.getLogger(__name__)

BAD_SETTINGS = 2  # as argparse exits for a bad flag
STARTUP_FAILURE = 3


def main(argv: list[str] | None = None) -> None:
    try:
        settings = settings_from_cli(sys.argv[1:] if argv is None else argv)
    except (ValidationError, SettingsError) as error:
        fail(BAD_SETTINGS, describe_settings_error(error))
    port = settings.port
    try:
        listener = bind_listener(settings.host, port)
        if settings.grpc_port:
            port = settings.grpc_port
            bind_listener(settings.host, port).close()  # only checked: the gRPC server binds it once the loop runs
    except OSError as error:
        fail(STARTUP_FAILURE, f"cannot listen on {settings.host}:{port}: {error.strerror or error}")
    configure_logging(settings.log_level)
    try:
        tracing.setup()  # OTEL_* (README "Tracing"); off unless OTEL_TRACES_EXPORTER=otlp
    except tracing.TracingConfigError as error:
        fail(BAD_SETTINGS, f"bad setting: {error}")
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # not fatal while the models load; reloads them once serving
    serve(create_app(settings, load_engines(settings)), settings, listener)


def load_engines(settings: Settings) -> list[Engine]:
    """Every served model on its device, before the server starts. A model file that cannot be used ends the
    process with one plain line on stderr (naming the model, when several are served) and its kind's exit status
    (``model/README.md``); the traceback only at debug level."""
    engines = []
    for source in model_sources(settings):
        try:
            engines.append(load_engine(settings, source))
        except CheckpointError as error:
            log.debug("the model could not be loaded", exc_info=True)
            fail(error.exit_status, f"model {source.name}: {error}" if source.name else str(error))
    return engines


def serve(app: FastAPI, settings: Settings, listener: socket.socket) -> None:
    """Run ``app`` (built by :func:`service.app.create_app` for ``settings``) on ``listener`` (from
    :func:`service.process.server.bind_listener`) until a stop signal; logging is configured already."""
    warn_if_files_may_run_out(settings.max_connections)
    log_threads(settings.decode_threads, settings.intra_op_threads)
    server = draining_server(app, settings)
    server.run(sockets=[listener])
    if not server.started:
        sys.exit(STARTUP_FAILURE)
    exit_now()


def exit_now() -> NoReturn:
    """Exit 0 once the server has stopped, without Python's teardown of torch and the models: about 1.4 s as a
    container's PID 1 (measured), during which Docker's port forwarding still accepts connections and resets them.
    Exit handlers run first (the last log lines are written). Outside a container the process rarely gets here: uvicorn
    re-raises the stop signal, which ends it at once."""
    atexit._run_exitfuncs()  # what a normal exit runs before the teardown; os._exit skips it
    logging.shutdown()
    os._exit(0)


def draining_server(app: FastAPI, settings: Settings) -> ServiceServer:
    """The server for ``app``, flipping it to draining (readiness 503) the moment a stop signal arrives and closing
    its listener only once the detection requests admitted before are answered (``request_timeout_s`` at most: a
    request's stages run within its deadline), and reloading its models on SIGHUP (:mod:`service.core.models`)."""
    state = app.state.service

    def drop_readiness() -> None:
        state.draining = True
        state.set_ready(False)

    def reload_models() -> None:
        if state.models is not None and not state.draining:  # None: still starting; its files are being read
            state.models.reload_all_soon()

    return ServiceServer(
        uvicorn_config(app, settings),
        on_stop_signal=drop_readiness,
        on_reload_signal=reload_models,
        drained=state.drained,
        drain_timeout_s=settings.request_timeout_s,
    )


def describe_settings_error(error: ValidationError | SettingsError) -> str:
    """One line naming each bad setting with its flag and environment variable, and what is wrong with it."""
    if isinstance(error, SettingsError):
        return f"bad setting: {error}"
    problems = []
    for problem in error.errors(include_url=False):
        message = problem["msg"].removeprefix("Value error, ")
        if problem["loc"]:
            name = str(problem["loc"][0])
            flag, variable = "--" + name.replace("_", "-"), "DETECTOR_" + name.upper()
            problems.append(f"{name} ({flag}, {variable}): {message}")
        else:
            problems.append(message)
    return "bad setting: " + "; ".join(problems)


def fail(exit_code: int, message: str) -> NoReturn:
    """Print ``message`` as one plain line on stderr (not a JSON log line: read by a person) and exit."""
    print(f"akconv-serve: {message}", file=sys.stderr)
    sys.exit(exit_code)


if __name__ == "__main__":
    main()
