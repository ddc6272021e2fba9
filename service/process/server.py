"""The HTTP server: uvicorn (h11) with the connection limits it lacks, in the spirit of nginx's.

uvicorn bounds the idle time between requests (``timeout_keep_alive``) and the size of headers that arrive in pieces
(``h11_max_incomplete_event_size``), but not the time a client may take to send its headers, nor the number of open
connections (its ``limit_concurrency`` answers plain text and only once a request has been read), and asyncio floods
the log when file descriptors run out. :class:`GuardedH11Protocol` and :class:`ServiceServer` add the missing pieces:

- header timeout (nginx's ``client_header_timeout``): a request's headers must be complete within
  ``header_timeout_s`` of the connection opening or of the previous response; an idle connection is then closed,
  one that sent part of a request is answered 408 ``header_timeout`` first;
- connection cap: a connection beyond ``max_connections`` is answered 503 ``overloaded`` with ``Retry-After`` at once
  and closed; beyond twice the cap it is closed without an answer, so the process never holds more than
  ``2 * max_connections`` client sockets (the second half lingering briefly to deliver their 503s);
- framing and header errors h11 detects are answered in JSON like every other error (400 ``bad_request``, 431
  ``headers_too_large``, 501 ``not_implemented``) instead of uvicorn's plain text;
- running out of file descriptors is logged as one line per minute, not once per failed ``accept()``, and asyncio
  retries accepting once a second instead of up to 2,048 times (:class:`ServiceEventLoop`);
- a drain before uvicorn's shutdown: uvicorn closes the listener ~0.1 s after SIGTERM, while requests it accepted
  are still being answered, and a client that connects then is refused (6-8 of ~100 under ``docker stop``).
  :class:`ServiceServer` keeps listening, and the app answering (new detection requests: 503 ``not_ready``), until
  the app says it is drained or ``drain_timeout_s`` has passed; only then does uvicorn's shutdown run.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import json
import logging
import resource
import signal
import socket
import threading
import time
from asyncio import constants, trsock
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import STATUS_PHRASES, H11Protocol
from uvicorn.server import ServerState

from service.process.settings import Settings

log = logging.getLogger(__name__)

# Whoever is refused for lack of room may come back soon: idle connections are closed within header_timeout_s.
OVERLOADED_RETRY_AFTER_S = 1
# After an answer the server sends on its own (408, 503, a framing error), the connection stays half-open this long,
# reading and discarding, unless the client closes first: closing a socket with unread input makes the kernel send a
# reset, and a client that is still sending would lose the answer (nginx's lingering close).
LINGER_S = 1.0
# One line per minute says the process is out of file descriptors and how often accept() failed meanwhile.
OUT_OF_FILES_LOG_INTERVAL_S = 60.0
# The process's own files (10 measured on a ready replica) with room for spooled uploads and model files.
FILES_BESIDES_CONNECTIONS = 64
# How often the drain checks whether the app is drained: the listener closes at most this long after it is.
DRAIN_POLL_S = 0.05
_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
_ERROR_CODES = {400: "bad_request", 431: "headers_too_large", 501: "not_implemented"}
_ANSWERING = (h11.SEND_RESPONSE, h11.SEND_BODY)  # h11 states of a server with a request to answer


@dataclass(frozen=True)
class ConnectionLimits:
    """What one connection may hold, from :class:`~service.process.settings.Settings`.

    Args:
        header_timeout_s: seconds a connection has to send complete request headers, from its opening or from the
            end of its previous response.
        max_connections: open connections the process serves; the next one is refused.
        max_header_bytes: request headers that arrive in pieces may not buffer more than this (h11's limit).
    """

    header_timeout_s: float
    max_connections: int
    max_header_bytes: int


class _ErrorRecordingConnection(h11.Connection):
    """h11's server connection, keeping the last protocol error: uvicorn's handler only learns that there was one,
    and the answer depends on which (h11 hints 431 for headers over its limit, 501 for an unknown transfer coding)."""

    last_error: h11.RemoteProtocolError | None = None

    def next_event(self) -> Any:
        try:
            return super().next_event()
        except h11.RemoteProtocolError as error:
            self.last_error = error
            raise


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header timeout, a connection cap and JSON answers to protocol errors."""

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        limits: ConnectionLimits,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.conn = _ErrorRecordingConnection(h11.SERVER, limits.max_header_bytes)
        self.limits = limits
        self.header_timer: asyncio.TimerHandle | None = None
        self.linger_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # counts this connection in self.connections
        if len(self.connections) > 2 * self.limits.max_connections:
            transport.close()  # a flood: answering would hold one more file descriptor per connection for LINGER_S
            return
        if len(self.connections) > self.limits.max_connections:
            self._answer_and_close(
                503,
                "overloaded",
                f"too many open connections (max_connections={self.limits.max_connections}); retry shortly",
                [(b"retry-after", str(OVERLOADED_RETRY_AFTER_S).encode())],
            )
            return
        self._start_header_timer()

    def data_received(self, data: bytes) -> None:
        if self.linger_timer is not None:
            return  # answered already; what the client still sends is read only to be dropped
        super().data_received(data)
        if self.conn.our_state in _ANSWERING:  # a request head is in: the app's deadlines bound the rest
            self._stop_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may already start on a pipelined request
        if not self.transport.is_closing() and self.conn.our_state not in _ANSWERING:
            self._start_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_timer()
        if self.linger_timer is not None:
            self.linger_timer.cancel()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        """Answer what h11 refused to parse, in JSON, with the status h11 suggests."""
        error = self.conn.last_error
        status = error.error_status_hint if error is not None and error.error_status_hint in _ERROR_CODES else 400
        if status == 431:
            message = f"the request headers are larger than the limit of {self.limits.max_header_bytes} bytes"
        else:
            message = f"invalid HTTP request: {error}" if error is not None else "invalid HTTP request"
        self._answer_and_close(status, _ERROR_CODES[status], message)

    def _start_header_timer(self) -> None:
        self._stop_header_timer()
        self.header_timer = self.loop.call_later(self.limits.header_timeout_s, self._header_timed_out)

    def _stop_header_timer(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def _header_timed_out(self) -> None:
        self.header_timer = None
        if self.transport.is_closing() or self.conn.our_state in _ANSWERING:
            return
        received, _ = self.conn.trailing_data
        if self.conn.their_state is h11.IDLE and received:
            self._answer_and_close(
                408,
                "header_timeout",
                f"the request headers did not arrive within {self.limits.header_timeout_s:g} s",
            )
        else:
            # Nothing of a new request was sent (or only the rest of a body already answered, such as a 413's): close
            # silently, as when a keep-alive connection expires (an answer nobody asked for could be read as the
            # answer to the client's next request).
            self.transport.close()

    def _answer_and_close(
        self, status: int, code: str, message: str, extra_headers: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        """Send ``{"error": {"code", "message"}}`` with ``status`` and close the connection within :data:`LINGER_S`;
        close it at once when a response is already under way."""
        self._stop_header_timer()
        if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            self.transport.close()
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True  # the app's own answer can no longer go out on this connection
        body = json.dumps({"error": {"code": code, "message": message}}).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
            *(extra_headers or []),
        ]
        output = self.conn.send(h11.Response(status_code=status, headers=headers, reason=STATUS_PHRASES[status]))
        output += self.conn.send(h11.Data(data=body))
        output += self.conn.send(h11.EndOfMessage())
        self.transport.write(output)
        self.transport.write_eof()  # sent once the answer is out; the client reads the answer, then end of stream
        self.flow.resume_reading()
        self.linger_timer = self.loop.call_later(LINGER_S, self.transport.close)


class ServiceEventLoop(asyncio.SelectorEventLoop):
    """asyncio's selector event loop with CPython issue #151615 fixed (the service runs on Python 3.11).

    When ``accept()`` fails for lack of file descriptors, 3.11 reports it, removes the listener and schedules a retry
    in a second, then goes on calling ``accept()`` up to ``backlog`` (2,048) times, reporting and scheduling a retry
    for each failure. The retries pile up (19,774 error lines were logged at the shutdown that followed three seconds
    of EMFILE, each retry failing on the closed listener). Here the loop stops at the first resource error.
    """

    def _accept_connection(
        self,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        sock: socket.socket,
        sslcontext: Any = None,
        server: Any = None,
        backlog: int = 100,
        ssl_handshake_timeout: float = constants.SSL_HANDSHAKE_TIMEOUT,
        ssl_shutdown_timeout: float = constants.SSL_SHUTDOWN_TIMEOUT,
    ) -> None:
        # Python 3.11's BaseSelectorEventLoop._accept_connection, with the ``return`` after a resource error.
        for _ in range(backlog):
            try:
                conn, addr = sock.accept()
                conn.setblocking(False)
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                if exc.errno not in _OUT_OF_RESOURCES:
                    raise  # the event loop logs and ignores it, as asyncio does
                self.call_exception_handler(
                    {
                        "message": "socket.accept() out of system resource",
                        "exception": exc,
                        "socket": trsock.TransportSocket(sock),
                    }
                )
                self._remove_reader(sock.fileno())
                self.call_later(
                    constants.ACCEPT_RETRY_DELAY,
                    self._start_serving,
                    protocol_factory,
                    sock,
                    sslcontext,
                    server,
                    backlog,
                    ssl_handshake_timeout,
                    ssl_shutdown_timeout,
                )
                return
            else:
                accept = self._accept_connection2(
                    protocol_factory, conn, {"peername": addr}, sslcontext, server, ssl_handshake_timeout,
                    ssl_shutdown_timeout,
                )  # fmt: skip
                self.create_task(accept)


class OutOfFilesLogger:
    """asyncio loop exception handler that turns asyncio's report of each failed ``accept()`` into one line per
    interval.

    When the process runs out of file descriptors, asyncio reports every failed ``accept()`` with a traceback (716,688
    lines in 45 s were measured, issue 17); even with one retry a second that is a line a second. Every other
    exception context goes to asyncio's default handler.

    Args:
        server_state: uvicorn's shared state, for the number of open connections.
        interval_s: at most one line per this many seconds.
        clock: monotonic seconds (tests pass their own).
    """

    def __init__(
        self,
        server_state: ServerState,
        interval_s: float = OUT_OF_FILES_LOG_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.server_state = server_state
        self.interval_s = interval_s
        self.clock = clock
        self.last_logged: float | None = None
        self.unlogged_failures = 0

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        error = context.get("exception")
        if not (isinstance(error, OSError) and error.errno in _OUT_OF_RESOURCES and "socket" in context):
            loop.default_exception_handler(context)
            return
        self.unlogged_failures += 1
        now = self.clock()
        if self.last_logged is not None and now - self.last_logged < self.interval_s:
            return
        soft_limit, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        log.error(
            "cannot accept connections: out of file descriptors; new connections wait in the listen queue",
            extra={
                "errno": errno.errorcode.get(error.errno, str(error.errno)),
                "failed_accepts": self.unlogged_failures,
                "open_connections": len(self.server_state.connections),
                "file_limit": soft_limit,
            },
        )
        self.last_logged = now
        self.unlogged_failures = 0


class ServiceServer(uvicorn.Server):
    """uvicorn's server with the out-of-files logger on its loop, a hook run the moment a stop signal arrives, one
    run on ``SIGHUP``, and a drain before uvicorn's shutdown.

    Args:
        config: from :func:`uvicorn_config`.
        on_stop_signal: called on SIGTERM/SIGINT before uvicorn begins its graceful shutdown (the service drops
            readiness there).
        on_reload_signal: called on the event loop on SIGHUP (the service reloads its models); only when the server
            runs in the main thread, where signals are delivered.
        drained: whether everything the app accepted before the stop has been answered; polled every
            :data:`DRAIN_POLL_S` seconds on the event loop once the server is told to stop. Default: always.
        drain_timeout_s: seconds the drain waits at most for ``drained``, from the start of the shutdown; then
            uvicorn's shutdown runs anyway, in what is left of its graceful window
            (``config.timeout_graceful_shutdown``, which counts from the start of the shutdown too). Default 0: no
            wait.
    """

    def __init__(
        self,
        config: uvicorn.Config,
        on_stop_signal: Callable[[], None] = lambda: None,
        on_reload_signal: Callable[[], None] = lambda: None,
        drained: Callable[[], bool] = lambda: True,
        drain_timeout_s: float = 0.0,
    ) -> None:
        super().__init__(config)
        self.on_stop_signal = on_stop_signal
        self.on_reload_signal = on_reload_signal
        self.drained = drained
        self.drain_timeout_s = drain_timeout_s

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(OutOfFilesLogger(self.server_state))
        if threading.current_thread() is threading.main_thread():
            loop.add_signal_handler(signal.SIGHUP, self.on_reload_signal)
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.on_stop_signal()
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        started = time.monotonic()
        await self.drain()
        window_s = self.config.timeout_graceful_shutdown
        if window_s is not None:
            # uvicorn's graceful window counts from the stop, the drain included, so that the whole stop still fits
            # the deployments' grace period (sized for request_timeout_s + 5 s); uvicorn reads it only here.
            left_s = max(0.0, window_s - (time.monotonic() - started))
            self.config.timeout_graceful_shutdown = left_s  # type: ignore[assignment]  # uvicorn declares int
        await super().shutdown(sockets)

    async def drain(self) -> None:
        """Wait, still listening, until :attr:`drained` or :attr:`drain_timeout_s` has passed. A forced exit (a
        second SIGINT) ends the wait, as it ends uvicorn's."""
        deadline = time.monotonic() + self.drain_timeout_s
        if self.force_exit or self.drained():
            return
        log.info("draining: answering the requests in flight before closing the listener")
        while not (self.force_exit or self.drained()):
            if time.monotonic() >= deadline:
                log.warning(
                    f"still not drained after {self.drain_timeout_s:g} s; shutting down",
                    extra={"drain_timeout_s": self.drain_timeout_s},
                )
                return
            await asyncio.sleep(DRAIN_POLL_S)


def warn_if_files_may_run_out(max_connections: int) -> None:
    """One warning line when ``max_connections`` could take the process past its file limit (``ulimit -n``)."""
    needed = 2 * max_connections + FILES_BESIDES_CONNECTIONS
    soft_limit, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if needed > soft_limit:
        log.warning(
            f"max_connections={max_connections} may need {needed} files, more than the file limit of {soft_limit}: "
            "lower max_connections or raise the limit (ulimit -n)",
            extra={"max_connections": max_connections, "file_limit": soft_limit},
        )


def uvicorn_config(app: Any, settings: Settings) -> uvicorn.Config:
    """uvicorn's configuration for ``app`` under ``settings``: the guarded h11 protocol, logs left to ours."""
    limits = ConnectionLimits(
        header_timeout_s=settings.header_timeout_s,
        max_connections=settings.max_connections,
        max_header_bytes=settings.max_header_bytes,
    )
    return uvicorn.Config(
        app,
        http=functools.partial(GuardedH11Protocol, limits=limits),  # type: ignore[arg-type]
        loop="service.process.server:ServiceEventLoop",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(settings.request_timeout_s) + 5,
    )


def bind_listener(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port``, not yet listening (uvicorn listens once the app has started, so that nobody
    connects to a process still loading its model). Raises ``OSError`` when the address is taken or not ours."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on connections of a listener that names it; without, each
    # kept-alive response waited for the client's delayed ACK (Nagle): on one connection, /healthz p50 44 -> 1.7 ms,
    # /detect of the sample 140 -> 76 ms (bundled model, 2 cores).
    listener = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError:
        listener.close()
        raise
    return listener
