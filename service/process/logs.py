"""Structured logs: one JSON object per line, with the request id wherever there is one.

A line logged while a request is served carries its ``request_id`` (:func:`bind_request_id`, by the front doors) and,
when tracing is on, the ``trace_id`` and ``span_id`` of the span it was logged in (:mod:`service.process.tracing`).

Every line the process writes to stderr is JSON: our records, uvicorn's and asyncio's, Python warnings (PIL's
``DecompressionBombWarning`` and EXIF warnings among them), and what C libraries print on file descriptor 2 (libtiff's
warnings and errors, for one), which :func:`configure_logging` turns into records of the ``stderr`` logger.

Ultralytics' logger prints its warnings and summaries on stdout, in plain text: :func:`configure_logging` routes it
into the same JSON lines (its import-time messages are dropped by :func:`model.offline.configure`), so the server
writes nothing on stdout. File descriptor 1 itself is not taken over: nothing the server runs is known to write there.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import logging
import os
import sys
import threading
import time
from contextvars import ContextVar, Token
from typing import TextIO

from service.process import tracing

_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "color_message"}
# A C library writes to the pipe while it may hold the GIL that the forwarding thread needs to empty it: room for
# 1 MiB of such output (the largest pipe an unprivileged process may ask for by default) instead of Linux's 64 KiB.
_PIPE_BYTES = 1024 * 1024
_DRAIN_AT_EXIT_S = 5.0
_REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)
access_log = logging.getLogger("service.access")


def bind_request_id(request_id: str) -> Token:
    """``request_id`` on every line logged in the current context (the request's task, from its front door) that
    does not name one; give the token to :func:`unbind_request_id` when the request is answered."""
    return _REQUEST_ID.set(request_id)


def unbind_request_id(token: Token) -> None:
    _REQUEST_ID.reset(token)


def log_access(
    request_id: str, method: str, path: str, endpoint: str, status: int, seconds: float, client: str
) -> None:
    """The access-log line of one answered request (logger ``service.access``), by either front door: ``method`` is
    ``GRPC`` for a gRPC call, ``status`` the REST status of its outcome; ``path`` as the client sent it (cut)."""
    access_log.info(
        "request",
        extra={
            "request_id": request_id,
            "method": method,
            "path": path,
            "endpoint": endpoint,
            "status": status,
            "duration_ms": round(seconds * 1000, 2),
            "client": client,
        },
    )


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, the record's extra fields, any exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry |= {k: v for k, v in record.__dict__.items() if k not in _STANDARD}
        if "request_id" not in entry and (request_id := _REQUEST_ID.get()) is not None:
            entry["request_id"] = request_id
        entry |= tracing.log_fields()
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str) -> None:
    """JSON lines on stderr at ``level`` for the whole process (call it once, from an entry point: it takes over
    file descriptor 2; and after ultralytics is imported, whose import gives its logger a handler of its own)."""
    handler = logging.StreamHandler(_log_native_stderr())
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "ultralytics"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    # Ultralytics set its level from YOLO_VERBOSE (INFO, or ERROR when false): the higher of that and ``level`` holds.
    ultralytics = logging.getLogger("ultralytics")
    ultralytics.setLevel(max(ultralytics.getEffectiveLevel(), root.level))
    logging.captureWarnings(True)


def _log_native_stderr() -> TextIO:
    """Make file descriptor 2 a pipe whose lines a thread logs as ``stderr`` records; returns the real stderr, for
    the JSON lines themselves.

    ``sys.stderr`` is pointed at the real stderr too: Python's own plain writes (the traceback of a crash) go out
    directly and cannot be lost with the forwarding thread.
    """
    real_stderr = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="backslashreplace")
    read_end, write_end = os.pipe()
    with contextlib.suppress(OSError):  # keep the default size where the system allows no more
        fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, _PIPE_BYTES)
    os.dup2(write_end, 2)
    os.close(write_end)
    sys.stderr = real_stderr
    forwarder = threading.Thread(target=_forward_lines, args=(read_end,), name="stderr-to-log", daemon=True)
    forwarder.start()
    atexit.register(_drain, real_stderr, forwarder)
    return real_stderr


def _forward_lines(read_end: int) -> None:
    native = logging.getLogger("stderr")
    with os.fdopen(read_end, "rb") as pipe:
        for line in pipe:
            text = line.decode("utf-8", "backslashreplace").rstrip()
            if text:
                native.warning(text)


def _drain(real_stderr: TextIO, forwarder: threading.Thread) -> None:
    """At exit: give file descriptor 2 back to the real stderr, which closes the pipe; log what was still in it."""
    os.dup2(real_stderr.fileno(), 2)
    forwarder.join(_DRAIN_AT_EXIT_S)
