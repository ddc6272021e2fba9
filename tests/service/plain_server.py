"""The service's HTTP server (``service.process.server``) around a tiny ASGI app, for connection tests that need no
model.

In-process: :func:`plain_server` runs it in a thread. As a process (``python -m tests.service.plain_server`` with
the service's flags), for what needs a process of its own, such as a lower file limit.
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
from collections.abc import Iterator

from service.process.logs import configure_logging
from service.process.server import ServiceServer, bind_listener, uvicorn_config
from service.process.settings import Settings, settings_from_cli


async def hello_app(scope, receive, send) -> None:
    """Answers every HTTP request 200 ``{"ok": true}`` once its body is read; ``/early`` answers without reading it
    (as the service does with a body over its limit)."""
    if scope["type"] == "lifespan":
        await receive()  # lifespan.startup
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
        await send({"type": "lifespan.shutdown.complete"})
        return
    if scope["path"] != "/early":
        while (await receive()).get("more_body"):
            pass
    body = json.dumps({"ok": True}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@contextlib.contextmanager
def plain_server(settings: Settings) -> Iterator[tuple[str, int]]:
    """:func:`hello_app` served under ``settings`` on 127.0.0.1 (a free port) in a thread; yields (host, port)."""
    listener = bind_listener("127.0.0.1", 0)
    address = listener.getsockname()
    server = ServiceServer(uvicorn_config(hello_app, settings))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            thread.join(0.01)
            assert thread.is_alive(), "the server did not start"
        yield address
    finally:
        server.should_exit = True
        thread.join(30)


def main() -> None:
    settings = settings_from_cli(sys.argv[1:])
    configure_logging(settings.log_level)
    listener = bind_listener(settings.host, settings.port)
    ServiceServer(uvicorn_config(hello_app, settings)).run(sockets=[listener])


if __name__ == "__main__":
    main()
