"""Typed errors of the service. Each carries its HTTP status and a stable error code; ``app.py`` maps them to
``{"error": {"code", "message"}}`` responses in one handler.

Also :func:`shown`, the one way a value the client chose (a model or class name, a parameter, a header, a path) is
echoed in an error message, a log line or a metric label: cut short, as the client decides its size.
"""

from __future__ import annotations

import reprlib

SHOWN_CHARS = 100  # a served model's name (64 at most), quoted, fits whole


class _ShortRepr(reprlib.Repr):
    """Containers cut as they are formatted, so a value's size costs nothing (a 2.5-million-element shape, formatted
    whole and then cut, took 0.15 s); integers too long to format (Python refuses over 4,300 digits) by their size."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxlist, self.maxtuple, self.maxdict = 3, 8, 8, 4
        self.maxstring = self.maxlong = self.maxother = SHOWN_CHARS

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 4 * SHOWN_CHARS:  # over 120 digits: formatting it would only be cut
            return f"<an integer of {x.bit_length()} bits>"
        return super().repr_int(x, level)


_REPR = _ShortRepr()


def shown(value: object, limit: int = SHOWN_CHARS, *, quote: bool = True) -> str:
    """``value`` as a message, a log line or a metric label may echo it: at most ``limit`` characters, ending in
    ``...`` when cut.

    Args:
        value: anything a request carried.
        limit: the most characters shown.
        quote: a string in quotes, as its ``repr`` (a message then tells ``'1'`` from ``1``); without, a string as it
            is (a log field). Anything else is always its ``repr``.
    """
    if not isinstance(value, str):
        text = _REPR.repr(value)
    elif quote:
        text = repr(value[:limit])
    else:
        text = value[: limit + 1]
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


class ServiceError(Exception):
    """Base class: ``status`` and ``code`` are fixed per subclass, ``message`` is for people."""

    status = 500
    code = "internal_error"
    rejection: str | None = None  # reason label of detector_rejected_total, if this error is a rejection

    def __init__(self, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class BadRequest(ServiceError):
    status, code, rejection = 400, "bad_request", "bad_input"


class Unauthorized(ServiceError):
    status, code, rejection = 401, "unauthorized", "unauthorized"


class PayloadTooLarge(ServiceError):
    status, code, rejection = 413, "payload_too_large", "too_large"


class RequestTimeout(ServiceError):
    """The body did not arrive before the request's deadline (a slow or stalled upload)."""

    status, code, rejection = 408, "request_timeout", "slow_upload"


class HeadersTooLarge(ServiceError):
    status, code, rejection = 431, "headers_too_large", "too_large"


class ImageRejected(ServiceError):
    """The image itself cannot be used, not the request or the service: in a batch only its own result fails."""


class UnsupportedMediaType(ImageRejected):
    status, code, rejection = 415, "unsupported_media_type", "bad_input"


class UndecodableImage(ImageRejected):
    status, code, rejection = 422, "undecodable_image", "bad_input"


class TooManyPixels(ImageRejected):
    status, code, rejection = 422, "too_many_pixels", "too_large"


class ModelNotServed(ServiceError):
    """No served model has the name a request gave (``?model=``, ``/v2/models/NAME``)."""

    status, code, rejection = 404, "model_not_found", "bad_input"


class ModelLoadFailed(ServiceError):
    """A new version of a model could not be loaded or failed its checks; the live version keeps serving. 400, as
    Triton answers a failed ``/v2/repository/models/NAME/load``."""

    status, code = 400, "model_load_failed"


class QueueFull(ServiceError):
    status, code, rejection = 503, "queue_full", "queue_full"


class Overloaded(ServiceError):
    """A budget of :mod:`service.core.admission` has no room for this request now (requests, body bytes, decode
    pixels)."""

    status, code, rejection = 503, "overloaded", "overloaded"


class NotReady(ServiceError):
    status, code = 503, "not_ready"


class ShuttingDown(ServiceError):
    """The server's drain window ended before this request was answered."""

    status, code = 503, "shutting_down"


class DeadlineExceeded(ServiceError):
    status, code, rejection = 504, "deadline_exceeded", "deadline"


class ClientGone(ServiceError):
    """The client disconnected (mid-body, or while its request was decoded, queued or run); nobody receives this
    response, but the access log and the request metrics count it as 499."""

    status, code, rejection = 499, "client_gone", "client_gone"


class InferenceFailed(ServiceError):
    status, code = 500, "inference_failed"
