"""OpenTelemetry traces, off unless the standard ``OTEL_*`` environment turns them on; the only module that imports
OpenTelemetry.

Tracing is on when ``OTEL_TRACES_EXPORTER`` names ``otlp`` (and ``OTEL_SDK_DISABLED`` is not ``true``): spans are
then exported over OTLP/HTTP (protobuf) by a batch processor to ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``, or
``OTEL_EXPORTER_OTLP_ENDPOINT`` + ``/v1/traces`` (default ``http://localhost:4318/v1/traces``), sampled by
``OTEL_TRACES_SAMPLER`` / ``OTEL_TRACES_SAMPLER_ARG`` (default ``parentbased_always_on``), under the resource of
``OTEL_SERVICE_NAME`` / ``OTEL_RESOURCE_ATTRIBUTES`` (default service name ``akconv-detector``). The exporter's other
variables (headers, timeout in seconds, compression, certificates) and the batch processor's (``OTEL_BSP_*``) are
read by the SDK. A value the service cannot use (another exporter or protocol, an unknown sampler, a ratio outside
0-1, an endpoint that is not an http(s) URL, a number that is not one) stops the start with one plain line
(:class:`TracingConfigError`, exit 2 as a bad setting). An exporter that fails (collector down, slow, refusing) never
fails a request: spans wait in the processor's bounded queue, its failures are logged at most once a minute.

Off (the default), no tracer provider exists, nothing is exported, and every helper below returns at once (a module
flag): :func:`request_span` and :func:`span` hand out the API's shared non-recording span, the others return ``None``
or what they were given; no span or context is made.

The API (callers never import OpenTelemetry; spans they get are OpenTelemetry spans, whose ``set_attribute`` and
``is_recording`` they may call):

- ``setup(environ=os.environ) -> bool``: read the ``OTEL_*`` environment once, at start (``python -m service``);
  on: installs the provider and registers :func:`shutdown` at exit. ``install(processor, sampler)`` / ``uninstall()``
  do the same with a given span processor (tests).
- ``flush(timeout_s)``: export what is queued, within ``timeout_s`` (at the end of the app's lifespan);
  ``shutdown(timeout_s)``: flush and stop (at exit).
- ``request_span(name, carrier, attributes)``: context manager; the SERVER span of one request, continuing the
  caller's W3C ``traceparent`` / ``tracestate`` found in ``carrier`` (HTTP headers, or gRPC metadata as a dict with
  lower-case keys), current while the block runs, so every stage span below becomes its child. Yields the span.
- ``set_outcome(span, status_code, code, http_route=None)``: the request's answer on its span: ``detector.status_code``
  (the HTTP status, or the HTTP status a gRPC error maps from), ``detector.outcome`` (the error code, ``ok`` below 400
  when none is given), error status from 500 on; with ``http_route``, ``http.route`` and ``http.response.status_code``
  too and the span renamed ``"{name} {http_route}"`` (its name being the method). ``note_outcome(code)``: the error
  code on the current request span, from where an error is answered (the REST error handlers).
- ``span(name, attributes=None)``: context manager; a stage span (INTERNAL), child of the current span, current in
  the block; an exception leaving it marks it failed with the error's ``code`` (the service's typed errors) or type.
- ``in_current_context(function)``: ``function`` to run on another thread (a pool) in the caller's context, so that
  its spans and log lines belong to the request.
- Batches (:mod:`service.core.batcher`): ``start_span(name, attributes)`` starts an item's queue-wait span (not made
  current); ``start_batch(name, item_spans)`` the one span of a batch: child of the first sampled item's parent, a
  link to each item's span, the first item's attributes and ``detector.batch.size``; ``end_span(span, error, batch)``
  ends an item's span (with ``detector.batch.trace_id`` / ``span_id`` / ``size`` when it ran in ``batch``) or the
  batch's; ``using(span)`` makes a span current for a block, ``bound(function, span)`` for a function on a thread.
- Correlation: ``log_fields()`` (``trace_id``, 32 hex, and ``span_id``, 16 hex, of the current span, for the JSON
  log lines), ``exemplar()`` (the same, for a histogram observation, when the span is sampled).

A front door wraps each call (the REST middleware in :mod:`service.app` does the same for HTTP)::

    token = bind_request_id(request_id)  # service.process.logs: the request id on every line logged for it
    with tracing.request_span("/inference.GRPCInferenceService/ModelInfer", metadata, {"rpc.system": "grpc"}) as span:
        ...  # the Pipeline's methods: their stage spans become children of this one
        tracing.set_outcome(span, status, code)  # e.g. 200, None ("ok"); 503, "queue_full"
    unbind_request_id(token)

Span names: the request's ``{method} {route}`` (REST) or what the door names it (gRPC), then ``admission``,
``read_body``, ``parse`` (OIP bodies), ``decode`` (header, waiting for a decode thread, decode and letterbox),
``queue_wait``, ``forward`` (one per batch), ``postprocess``. Attribute names: :data:`ATTRIBUTES` documents ours.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, nullcontext
from importlib import metadata
from typing import Any, TypeVar
from urllib.parse import urlsplit

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.trace import Link, NonRecordingSpan, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger(__name__)

T = TypeVar("T")

SERVICE_NAME = "akconv-detector"
FLUSH_TIMEOUT_S = 3.0  # at the end of the lifespan: a collector that is down delays the stop this much at most
EXIT_TIMEOUT_S = 1.0  # at exit, after that flush: what the last moment added
ATTRIBUTES = {
    "detector.request_id": "the request id (X-Request-ID), on the request span",
    "detector.status_code": "the answer's HTTP status (gRPC: the HTTP status its error maps from)",
    "detector.outcome": "ok, or the error code answered (queue_full, deadline_exceeded, ...)",
    "detector.model.name": "the served model's name (queue_wait, forward)",
    "detector.model.version": "the model version that ran the image (queue_wait, forward)",
    "detector.input.shape": "the model input of one image, [3, H, W] (decode, queue_wait, forward)",
    "detector.image.width": "the image's width in pixels (decode)",
    "detector.image.height": "the image's height in pixels (decode)",
    "detector.decode_ms": "decode and letterbox on the decode thread, without the wait for it (decode)",
    "detector.batch.size": "images in the batch (queue_wait, forward)",
    "detector.batch.trace_id": "the trace of the forward span the image ran in (queue_wait)",
    "detector.batch.span_id": "the forward span the image ran in (queue_wait)",
    "detector.detections": "detections answered for the image (postprocess)",
    "http.request.body.size": "bytes read (read_body)",
}
SAMPLERS = {
    "always_on": lambda ratio: ALWAYS_ON,
    "always_off": lambda ratio: ALWAYS_OFF,
    "traceidratio": lambda ratio: TraceIdRatioBased(ratio),
    "parentbased_always_on": lambda ratio: ParentBased(ALWAYS_ON),
    "parentbased_always_off": lambda ratio: ParentBased(ALWAYS_OFF),
    "parentbased_traceidratio": lambda ratio: ParentBased(TraceIdRatioBased(ratio)),
}
NUMBERS = (  # read by the SDK, which would log and fall back on a value that is not a number; checked here first
    "OTEL_EXPORTER_OTLP_TIMEOUT",
    "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
    "OTEL_BSP_SCHEDULE_DELAY",
    "OTEL_BSP_EXPORT_TIMEOUT",
    "OTEL_BSP_MAX_QUEUE_SIZE",
    "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
)
# The loggers an exporter that fails writes to, at every retry: throttled to one line a minute each.
EXPORT_LOGGERS = ("opentelemetry.exporter.otlp.proto.http.trace_exporter", "opentelemetry.sdk._shared_internal")

_NOT_TRACING: AbstractContextManager[Span] = nullcontext(trace.INVALID_SPAN)
_NO_CONTEXT: AbstractContextManager[None] = nullcontext()
_PROPAGATOR = TraceContextTextMapPropagator()
_EMPTY: dict[str, str] = {}

# The module's state: None while tracing is off (the default). Set once at start, before the server runs.
_tracer: trace.Tracer | None = None
_provider: TracerProvider | None = None
_processor: SpanProcessor | None = None


class TracingConfigError(ValueError):
    """An ``OTEL_*`` value the service cannot use; the message names the variable and what to set."""


def enabled() -> bool:
    """Whether tracing is on."""
    return _tracer is not None


def provider() -> TracerProvider | None:
    """The tracer provider, None while tracing is off (the global OpenTelemetry provider is never set)."""
    return _provider


# --- set-up -------------------------------------------------------------------------------------------------------


def setup(environ: Mapping[str, str] | None = None) -> bool:
    """Turn tracing on when ``environ`` (default ``os.environ``) asks for it; returns whether it is on. Raises
    :class:`TracingConfigError` for a value it cannot use. Call once, at start."""
    environ = os.environ if environ is None else environ
    sampler = configured_sampler(environ)  # checked even while off: a typo is found before it is needed
    check_numbers(environ)
    if not wanted(environ):
        if environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
            log.warning("tracing is off: an OTLP endpoint is set but OTEL_TRACES_EXPORTER is not otlp")
        return False
    endpoint = configured_endpoint(environ)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # only when on: 0.3 s import

    try:
        processor = BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint))
    except ValueError as error:  # the OTEL_BSP_* sizes and delay disagree
        raise TracingConfigError(f"OTEL_BSP_*: {error}") from None
    install(processor, sampler, resource(environ))
    for name in EXPORT_LOGGERS:
        logging.getLogger(name).addFilter(OncePerInterval(60.0))
    atexit.register(shutdown, EXIT_TIMEOUT_S)
    log.info("tracing on", extra={"endpoint": endpoint, "sampler": environ.get("OTEL_TRACES_SAMPLER", "")})
    return True


def wanted(environ: Mapping[str, str]) -> bool:
    """Whether ``environ`` turns tracing on: ``OTEL_TRACES_EXPORTER`` names ``otlp``, the SDK is not disabled."""
    disabled = environ.get("OTEL_SDK_DISABLED", "").strip().lower()
    if disabled not in ("", "true", "false"):
        raise TracingConfigError(f"OTEL_SDK_DISABLED: {disabled!r} is not true or false")
    exporters = {name.strip().lower() for name in environ.get("OTEL_TRACES_EXPORTER", "").split(",")} - {""}
    if exporters - {"otlp", "none"}:
        unknown = ", ".join(sorted(exporters - {"otlp", "none"}))
        raise TracingConfigError(f"OTEL_TRACES_EXPORTER: {unknown} is not supported: set otlp (OTLP/HTTP) or none")
    for variable in ("OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"):
        protocol = environ.get(variable, "").strip()
        if protocol and protocol != "http/protobuf":
            raise TracingConfigError(
                f"{variable}: {protocol!r} is not supported: this service exports OTLP over HTTP, set http/protobuf "
                "(and point the endpoint at the collector's HTTP port, 4318)"
            )
    return disabled != "true" and "otlp" in exporters


def configured_sampler(environ: Mapping[str, str]) -> Sampler:
    """The sampler ``OTEL_TRACES_SAMPLER`` / ``OTEL_TRACES_SAMPLER_ARG`` name (the specification's default:
    ``parentbased_always_on``)."""
    name = environ.get("OTEL_TRACES_SAMPLER", "").strip().lower() or "parentbased_always_on"
    if name not in SAMPLERS:
        raise TracingConfigError(f"OTEL_TRACES_SAMPLER: {name!r} is not one of {', '.join(SAMPLERS)}")
    given = environ.get("OTEL_TRACES_SAMPLER_ARG", "").strip()
    ratio = 1.0
    if given and name.endswith("traceidratio"):
        try:
            ratio = float(given)
        except ValueError:
            ratio = math.nan
        if not 0 <= ratio <= 1:
            raise TracingConfigError(f"OTEL_TRACES_SAMPLER_ARG: {given!r} is not a ratio between 0 and 1")
    return SAMPLERS[name](ratio)


def configured_endpoint(environ: Mapping[str, str]) -> str:
    """Where spans go: ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` as it is, else ``OTEL_EXPORTER_OTLP_ENDPOINT`` +
    ``/v1/traces``, else the local collector's."""
    endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    variable = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    if not endpoint:
        variable = "OTEL_EXPORTER_OTLP_ENDPOINT"
        base = environ.get(variable, "").strip() or "http://localhost:4318"
        endpoint = base.removesuffix("/") + "/v1/traces"
    try:
        parts = urlsplit(endpoint)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname) and (parts.port or 1) > 0  # port: may raise
    except ValueError:
        ok = False
    if not ok:
        raise TracingConfigError(f"{variable}: {endpoint!r} is not an http(s) URL, e.g. http://collector:4318")
    return endpoint


def check_numbers(environ: Mapping[str, str]) -> None:
    """Each of :data:`NUMBERS` that is set is a number, not negative."""
    for variable in NUMBERS:
        given = environ.get(variable, "").strip()
        if not given:
            continue
        try:
            ok = float(given) >= 0
        except ValueError:
            ok = False
        if not ok:
            raise TracingConfigError(f"{variable}: {given!r} is not a number of 0 or more")


def resource(environ: Mapping[str, str]) -> Resource:
    """The SDK's resource (``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``), with ``service.name``
    ``akconv-detector`` and the package's ``service.version`` where they leave them out."""
    detected = Resource.create()
    named = str(detected.attributes.get("service.name", ""))
    defaults = {
        "service.name": environ.get("OTEL_SERVICE_NAME")
        or (SERVICE_NAME if named.startswith("unknown_service") else named)
    }
    if "service.version" not in detected.attributes:
        with contextlib.suppress(metadata.PackageNotFoundError):
            defaults["service.version"] = metadata.version(SERVICE_NAME)
    return detected.merge(Resource(defaults))


def install(processor: SpanProcessor, sampler: Sampler | None = None, resource: Resource | None = None) -> None:
    """Tracing on, spans to ``processor`` (tests: a simple processor and an in-memory exporter)."""
    global _tracer, _provider, _processor
    uninstall()
    _provider = TracerProvider(
        sampler=sampler or ParentBased(ALWAYS_ON), resource=resource or Resource.create(), shutdown_on_exit=False
    )
    _provider.add_span_processor(processor)
    _processor = processor
    _tracer = _provider.get_tracer("service")


def uninstall() -> None:
    """Tracing off again (tests), the installed processor shut down."""
    global _tracer, _provider, _processor
    processor, _tracer, _provider, _processor = _processor, None, None, None
    if processor is not None:
        processor.shutdown()


def flush(timeout_s: float = FLUSH_TIMEOUT_S) -> None:
    """Export the spans still queued, waiting ``timeout_s`` at most (the SDK's own flush does not keep to its
    timeout while a collector is unreachable: it retries on a thread of its own here)."""
    if _processor is not None:
        _bounded(_processor.force_flush, timeout_s)


def shutdown(timeout_s: float = FLUSH_TIMEOUT_S) -> None:
    """Flush and stop the exporter (at exit; ``python -m service`` exits through its exit handlers)."""
    global _tracer
    processor, _tracer = _processor, None
    if processor is not None:
        _bounded(processor.shutdown, timeout_s)


def _bounded(work: Callable[[], object], timeout_s: float) -> None:
    worker = threading.Thread(target=work, name="trace-flush", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        log.warning("spans not exported: the collector did not take them in time", extra={"timeout_s": timeout_s})


class OncePerInterval(logging.Filter):
    """Lets a logger's record through once per ``interval_s`` for each message (an unreachable collector makes the
    exporter log at each retry of each batch)."""

    def __init__(self, interval_s: float) -> None:
        super().__init__()
        self.interval_s = interval_s
        self.last: dict[tuple[str, int], float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key, now = (str(record.msg), record.levelno), time.monotonic()
        if now - self.last.get(key, -math.inf) < self.interval_s:
            return False
        self.last[key] = now
        return True


# --- requests and stages ------------------------------------------------------------------------------------------


def http_carrier(headers: Iterable[tuple[bytes, bytes]]) -> Mapping[str, str]:
    """The W3C trace headers of an ASGI request's ``headers``, for :func:`request_span` (empty while off)."""
    if _tracer is None:
        return _EMPTY
    return {
        name.decode("latin-1"): value.decode("latin-1")
        for name, value in headers
        if name in (b"traceparent", b"tracestate")
    }


def request_span(name: str, carrier: Mapping[str, str], attributes: Mapping[str, Any]) -> AbstractContextManager[Span]:
    """The SERVER span of one request, named ``name``, continuing the trace of ``carrier``'s ``traceparent`` (and
    ``tracestate``); current while the block runs. ``carrier``: HTTP headers or gRPC metadata, lower-case keys."""
    if _tracer is None:
        return _NOT_TRACING
    return _request_span(_tracer, name, carrier, attributes)


@contextlib.contextmanager
def _request_span(
    tracer: trace.Tracer, name: str, carrier: Mapping[str, str], attributes: Mapping[str, Any]
) -> Iterator[Span]:
    parent = _PROPAGATOR.extract(carrier)
    span = tracer.start_span(name, context=parent, kind=SpanKind.SERVER, attributes=attributes)
    token = otel_context.attach(trace.set_span_in_context(span, parent))
    try:
        yield span
    except BaseException as error:
        _failed(span, error)
        raise
    finally:
        otel_context.detach(token)
        span.end()


def set_outcome(span: Span, status_code: int, code: str | None = None, http_route: str | None = None) -> None:
    """The answer of ``span``'s request (see the module's docstring)."""
    if not span.is_recording():
        return
    span.set_attribute("detector.status_code", status_code)
    code = code or ("ok" if status_code < 400 else None)
    if code:
        span.set_attribute("detector.outcome", code)
    if http_route is not None:
        span.set_attributes({"http.route": http_route, "http.response.status_code": status_code})
        span.update_name(f"{getattr(span, 'name', '')} {http_route}".strip())
    if status_code >= 500:
        span.set_status(Status(StatusCode.ERROR, code or str(status_code)))


def note_outcome(code: str) -> None:
    """``code`` as the outcome of the current span (the request's, where an error is answered)."""
    if _tracer is not None:
        current = trace.get_current_span()
        if current.is_recording():
            current.set_attribute("detector.outcome", code)


def span(name: str, attributes: Mapping[str, Any] | None = None) -> AbstractContextManager[Span]:
    """A stage span, child of the current span and current in the block; failed by an exception that leaves it."""
    if _tracer is None:
        return _NOT_TRACING
    return _stage(_tracer, name, attributes)


@contextlib.contextmanager
def _stage(tracer: trace.Tracer, name: str, attributes: Mapping[str, Any] | None) -> Iterator[Span]:
    stage = tracer.start_span(name, attributes=attributes)
    token = otel_context.attach(trace.set_span_in_context(stage))
    try:
        yield stage
    except BaseException as error:
        _failed(stage, error)
        raise
    finally:
        otel_context.detach(token)
        stage.end()


def _failed(failed: Span, error: BaseException) -> None:
    """An error status with the service's error code (its typed errors have one) or the exception's type; the
    exception itself, with its traceback, only when it is not one of the service's errors."""
    code = getattr(error, "code", None)
    if not isinstance(code, str):
        code = type(error).__name__
        if isinstance(error, Exception):
            failed.record_exception(error)
    failed.set_attribute("detector.outcome", code)
    failed.set_status(Status(StatusCode.ERROR, code))


def in_current_context(function: Callable[..., T]) -> Callable[..., T]:
    """``function``, run in the caller's context wherever it is called (a pool's thread): its spans and log lines
    belong to the caller's span. ``function`` itself while off."""
    if _tracer is None:
        return function
    return functools.partial(_run_in, otel_context.get_current(), function)


def _run_in(context: otel_context.Context, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    token = otel_context.attach(context)
    try:
        return function(*args, **kwargs)
    finally:
        otel_context.detach(token)


# --- batches ------------------------------------------------------------------------------------------------------


def start_span(name: str, attributes: Mapping[str, Any] | None = None) -> Span | None:
    """A span started now as a child of the current span, not made current (an item's wait in a queue); None while
    off. End it with :func:`end_span`."""
    if _tracer is None:
        return None
    return _tracer.start_span(name, attributes=attributes)


def start_batch(name: str, item_spans: Iterable[Span | None]) -> Span | None:
    """The one span of a batch of items whose spans are ``item_spans`` (from :func:`start_span`): a child of the first
    sampled item's parent (the batch then shows in that request's trace), with a link to every item's span and the
    first sampled item's attributes, and ``detector.batch.size``. None while off or when no item is sampled."""
    if _tracer is None:
        return None
    items = [item for item in item_spans if item is not None]
    sampled = next((item for item in items if item.is_recording()), None)
    if sampled is None:
        return None
    parent_context = getattr(sampled, "parent", None) or sampled.get_span_context()
    attributes = {**(getattr(sampled, "attributes", None) or {}), "detector.batch.size": len(items)}
    attributes.pop("detector.outcome", None)
    return _tracer.start_span(
        name,
        context=trace.set_span_in_context(NonRecordingSpan(parent_context)),
        links=[Link(item.get_span_context()) for item in items],
        attributes=attributes,
    )


def end_span(ended: Span | None, error: BaseException | None = None, batch: Span | None = None) -> None:
    """End ``ended`` (from :func:`start_span` or :func:`start_batch`; None: nothing), failed by ``error`` if given;
    an item's span names the ``batch`` it ran in."""
    if ended is None:
        return
    if batch is not None:
        context = batch.get_span_context()
        size = (getattr(batch, "attributes", None) or {}).get("detector.batch.size")
        ended.set_attributes(
            {
                "detector.batch.trace_id": format(context.trace_id, "032x"),
                "detector.batch.span_id": format(context.span_id, "016x"),
                **({"detector.batch.size": size} if size is not None else {}),
            }
        )
    if error is not None:
        _failed(ended, error)
    ended.end()


def using(current: Span | None) -> AbstractContextManager[Any]:
    """A block with ``current`` as the current span (not ended after); nothing for None."""
    if current is None:
        return _NO_CONTEXT
    return trace.use_span(current, end_on_exit=False)


def bound(function: Callable[..., T], current: Span | None) -> Callable[..., T]:
    """``function`` with ``current`` as the current span wherever it runs (the inference thread); ``function`` itself
    for None."""
    if current is None:
        return function
    return functools.partial(_run_in, trace.set_span_in_context(current), function)


# --- correlation --------------------------------------------------------------------------------------------------


def log_fields() -> dict[str, str]:
    """``trace_id`` and ``span_id`` of the current span, for a log line; empty while off or outside a span."""
    if _tracer is None:
        return _EMPTY
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return _EMPTY
    return {"trace_id": format(context.trace_id, "032x"), "span_id": format(context.span_id, "016x")}


def exemplar() -> dict[str, str] | None:
    """The current span as a histogram exemplar (``trace_id``, ``span_id``) when it is sampled; else None."""
    if _tracer is None:
        return None
    context = trace.get_current_span().get_span_context()
    if not context.is_valid or not context.trace_flags.sampled:
        return None
    return {"trace_id": format(context.trace_id, "032x"), "span_id": format(context.span_id, "016x")}
