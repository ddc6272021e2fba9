"""``python -m service`` / ``akconv-serve``: run the detector under uvicorn, one process per device.

Scale out with replicas, not ``--workers`` (each worker would hold its own model copy and queue). On SIGTERM
readiness drops to 503 at once, new requests are refused, everything accepted is answered, then the process exits.
"""

from __future__ import annotations

import logging
import sys

import uvicorn
from fastapi import FastAPI

from model.checkpoint import CheckpointError
from service.app import create_app
from service.config import Settings, settings_from_cli
from service.engine import Engine
from service.logs import configure_logging

log = logging.getLogger(__name__)

STARTUP_FAILURE = 3


class DrainingServer(uvicorn.Server):
    """uvicorn's server, flipping the app to draining the moment a stop signal arrives."""

    def handle_exit(self, sig: int, frame) -> None:
        state = self.config.app.state.service
        state.draining = True
        state.set_ready(False)
        super().handle_exit(sig, frame)


def serve(app: FastAPI, settings: Settings) -> None:
    """Run ``app`` (built by :func:`service.app.create_app` for ``settings``) until a stop signal."""
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http="h11",  # uvicorn offers a header limit (for headers arriving in pieces) only for h11
        h11_max_incomplete_event_size=settings.max_header_bytes,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(settings.request_timeout_s) + 5,
    )
    server = DrainingServer(config)
    server.run()
    if not server.started:
        sys.exit(STARTUP_FAILURE)


def load_engine(settings: Settings) -> Engine:
    """The model on its device, before the server starts. A model file that cannot be used ends the process with
    one plain line on stderr and its kind's exit status (``model/README.md``); the traceback only at debug level."""
    try:
        return Engine(settings)
    except CheckpointError as error:
        log.debug("the model could not be loaded", exc_info=True)
        print(f"akconv-serve: {error}", file=sys.stderr)
        sys.exit(error.exit_status)


def main(argv: list[str] | None = None) -> None:
    settings = settings_from_cli(sys.argv[1:] if argv is None else argv)
    configure_logging(settings.log_level)
    serve(create_app(settings, load_engine(settings)), settings)


if __name__ == "__main__":
    main()
