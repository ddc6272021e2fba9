"""``create_app(settings)``: builds the FastAPI app: routers, error mapping, request observation, lifespan.

Lifespan: load and warm up every served model (start-up fails loudly on a bad model) with its batcher
(:mod:`service.core.models`), report ready. On shutdown: readiness goes to 503, the batchers answer everything
queued, then the pools stop.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.core.admission import Admission
from service.core.engine import Engine, EngineProtocol
from service.core.errors import ServiceError, ShuttingDown, shown
from service.core.models import EngineLoader, ModelRegistry, ModelSource
from service.core.pipeline import PARSE_THREADS, Pipeline
from service.doors.dependencies import REQUEST_ID, ServiceState, limit_headers
from service.doors.docs import docs_router
from service.doors.oip import error_body
from service.doors.oip_grpc import start_grpc_server
from service.doors.oip_rest import oip_router
from service.doors.rest import detect_router, ops_router
from service.process import tracing
from service.process.logs import bind_request_id, log_access, unbind_request_id
from service.process.metrics import Metrics
from service.process.settings import Settings

log = logging.getLogger(__name__)


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None, path: str = "") -> JSONResponse:
    """The error answer: ``{"error": {"code", "message"}}``, or the Open Inference Protocol's ``{"error": message}``
    under ``/v2``."""
    body = error_body(message) if path.startswith("/v2") else {"error": {"code": code, "message": message}}
    tracing.note_outcome(code)
    return JSONResponse(body, status_code=status, headers=headers)


def _service_error(error: ServiceError, path: str = "") -> JSONResponse:
    return _error(error.status, error.code, error.message, error.headers, path)


def _endpoint(scope: Scope, routes: list[Route]) -> str:
    """The metric label of a request: its route's template, or ``unmatched``; never the raw path (an unbounded
    label). A request answered before routing (a CORS preflight) gets the template of the route it names."""
    route = scope.get("route")
    if route is not None:
        return route.path
    for candidate in routes:
        match, _ = candidate.matches(scope)
        if match is not Match.NONE:
            return candidate.path
    return "unmatched"


def _admission(settings: Settings, metrics: Metrics) -> Admission:
    admission = Admission(
        max_requests=settings.max_inflight_requests,
        max_body_bytes=settings.max_body_bytes,
        max_decode_pixels=settings.max_decode_pixels,
        observe=lambda name, in_use: metrics.admission_in_use.labels(name).set(in_use),
    )
    for budget in admission.budgets:
        metrics.admission_capacity.labels(budget.name).set(budget.capacity)
        metrics.admission_in_use.labels(budget.name).set(0)
    return admission


class ObserveRequests:
    """Pure ASGI middleware: request id, arrival time, request metrics and one JSON access-log line per request,
    all inside the request's span when tracing is on (:func:`service.process.tracing.request_span`).

    Also the last word on a request the server gives up on: uvicorn cancels what is still running when its drain
    window ends, and such a request is answered a JSON 503 ``shutting_down`` here (not uvicorn's plain-text 500).
    """

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: list[Route]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        arrived = time.monotonic()
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if REQUEST_ID.match(given) else uuid.uuid4().hex[:16]
        scope.setdefault("state", {}).update(request_id=request_id, arrived=arrived)
        status = 500
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        logged = bind_request_id(request_id)
        attributes = {
            "http.request.method": scope["method"],
            "url.path": scope["path"],
            "detector.request_id": request_id,
        }
        with tracing.request_span(scope["method"], tracing.http_carrier(scope["headers"]), attributes) as span:
            try:
                await self.app(scope, receive, send_with_id)
            except asyncio.CancelledError:
                # Only the server cancels a request's task: its drain window is over. The task ends here, answered.
                if not started:
                    refusal = ShuttingDown("the server shut down before this request was answered")
                    await _service_error(refusal, scope["path"])(scope, receive, send_with_id)
            finally:
                endpoint = _endpoint(scope, self.routes)
                tracing.set_outcome(span, status, http_route=endpoint)
                seconds = time.monotonic() - arrived
                self.metrics.observe_request(endpoint, status, seconds)
                client = scope.get("client") or ("", 0)
                path = shown(scope["path"], quote=False)  # the client sizes it (to max_header_bytes)
                log_access(request_id, scope["method"], path, endpoint, status, seconds, client[0])
                unbind_request_id(logged)


def create_app(
    settings: Settings, engines: Sequence[EngineProtocol] = (), loader: EngineLoader | None = None
) -> FastAPI:
    """The app for ``settings``.

    Args:
        settings: the service's settings.
        engines: engines already loaded for the configured models, in their order (``python -m service`` loads them
            before it listens; tests pass fakes); the models without one are loaded at start-up.
        loader: loads a model's file, at start-up and for each swap; default: :class:`service.core.engine.Engine`.
    """
    metrics = Metrics()
    state = ServiceState(settings=settings, metrics=metrics)
    models = ModelRegistry.for_settings(settings, metrics, loader or (lambda source: load_engine(settings, source)))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await models.start(engines)
        decode_pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="decode")
        parse_pool = ThreadPoolExecutor(PARSE_THREADS, thread_name_prefix="parse")
        state.pipeline = Pipeline(settings, metrics, decode_pool, _admission(settings, metrics), parse_pool)
        state.models = models
        grpc_server = await start_grpc_server(state) if settings.grpc_port else None
        state.set_ready(True)
        for slot in models.slots:
            engine = slot.live.engine
            log.info(
                "ready",
                extra={
                    "model": slot.name,
                    "version": engine.version,
                    "device": engine.device,
                    "finds": engine.metadata.summary(),
                },
            )
        try:
            yield
        finally:
            state.draining = True
            state.set_ready(False)
            if grpc_server is not None:  # its calls in flight were admitted: the HTTP server's drain waited for them
                await grpc_server.stop(grace=settings.request_timeout_s)
            await models.stop()
            decode_pool.shutdown(wait=True)
            parse_pool.shutdown(wait=True)
            log.info("stopped")
            tracing.flush()  # the last spans out before the process ends (a stop signal ends it without exit handlers)

    app = FastAPI(
        title="AKConv detector",
        summary="YOLOv10-AKConv object detection with dynamic batching",
        version="0.1.0",
        lifespan=lifespan,
        dependencies=[Depends(limit_headers)],
        docs_url=None,  # FastAPI's pages load their scripts from a CDN; service.doors.docs serves them from local files
        redoc_url=None,
    )
    app.state.service = state
    app.include_router(detect_router)
    app.include_router(ops_router)
    app.include_router(oip_router)
    app.include_router(docs_router)
    if settings.cors_origins:  # off unless configured: browsers get no cross-origin access by default
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-API-Key", "X-Request-ID"],
            expose_headers=["Retry-After", "X-Detections", "X-Model-Version", "X-Request-ID"],
        )
    routes = [
        route
        for route in (*app.router.routes, *detect_router.routes, *ops_router.routes, *oip_router.routes)
        if isinstance(route, Route)
    ]
    app.add_middleware(ObserveRequests, metrics=metrics, routes=routes)

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, error: ServiceError) -> JSONResponse:
        if error.rejection:
            metrics.rejected.labels(error.rejection).inc()
        return _service_error(error, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        metrics.rejected.labels("bad_input").inc()
        problems = "; ".join(_describe(problem) for problem in error.errors())
        return _error(400, "bad_request", problems or "invalid request", path=request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        return _error(error.status_code, code, str(error.detail), getattr(error, "headers", None), request.url.path)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        log.exception("unhandled error", extra={"request_id": getattr(request.state, "request_id", None)})
        return _error(500, "internal_error", "internal server error", path=request.url.path)

    return app


def _describe(problem: dict[str, Any]) -> str:
    where = ".".join(str(part) for part in problem.get("loc", ()) if part not in ("query", "body"))
    return f"{where}: {problem.get('msg', 'invalid')}" if where else str(problem.get("msg", "invalid"))


def load_engine(settings: Settings, source: ModelSource) -> Engine:
    """The :class:`Engine` of ``source`` on the runtime ``settings`` give it; at start-up and for each swap."""
    return Engine(settings, source.path, settings.runtime_for(source.name))
