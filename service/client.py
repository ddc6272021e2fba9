"""A typed Python client for the detector, sync and async.

    from service.client import DetectorClient

    with DetectorClient("http://127.0.0.1:8000") as client:
        result = client.detect("photo.jpg", conf=0.3)
        for d in result.detections:
            print(d.class_name, d.confidence, d.box)

Retries: a 503 (queue full, not ready) is retried after the server's ``Retry-After`` (or an exponential backoff
when it sends none), and so is a connection that could not be made; at most ``retries`` times. Any other error
raises :class:`DetectorError` carrying the server's status and error code; a server that cannot be reached (after
the retries) or does not answer in time raises it with status 0 and code ``unreachable`` or ``timeout``.
Timeouts are per request (seconds).

``detect_batch`` answers one item per image, in order: its :class:`DetectResponse`, or, for an image the server
could not use (not an image, undecodable, too many pixels), a :class:`DetectorError` in its place, returned rather
than raised so that the other images' results are kept.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel

from service.schemas import BatchDetectResponse, DetectResponse, ImageError, ModelInfo

Image = bytes | str | Path
Model = TypeVar("Model", bound=BaseModel)


class DetectorError(Exception):
    """An answer other than success. ``code`` is the server's error code (``queue_full``, ``bad_request``...), or
    ``unreachable`` / ``timeout`` with status 0 when no answer came."""

    def __init__(self, status: int, code: str, message: str, request_id: str | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.request_id = status, code, message, request_id


def _image_bytes(image: Image) -> tuple[str, bytes]:
    if isinstance(image, bytes):
        return "image", image
    path = Path(image)
    return path.name, path.read_bytes()


def _query(
    conf: float | None = None,
    max_det: int | None = None,
    classes: Iterable[str | int] | None = None,
    dedupe: float | None = None,
    model: str | None = None,
) -> dict[str, Any]:
    """The detection query (``/detect``'s parameters); ``model`` picks one of several served models."""
    query: dict[str, Any] = {}
    if model is not None:
        query["model"] = model
    if dedupe is not None:
        query["dedupe"] = dedupe
    if conf is not None:
        query["conf"] = conf
    if max_det is not None:
        query["max_det"] = max_det
    if classes is not None:
        query["classes"] = ",".join(str(c) for c in classes)
    return query


def _no_answer(url: str, error: httpx.TransportError) -> DetectorError:
    code = "timeout" if isinstance(error, httpx.TimeoutException) else "unreachable"
    return DetectorError(0, code, f"no answer from {url}: {error or type(error).__name__}")


def _error(response: httpx.Response) -> DetectorError:
    try:
        error = response.json()["error"]
        code, message = error["code"], error["message"]
    except (ValueError, KeyError, TypeError):
        code, message = "http_error", response.text[:200]
    return DetectorError(response.status_code, code, message, response.headers.get("x-request-id"))


class _Policy:
    """Which failures are retried, and after how long."""

    def __init__(self, retries: int, backoff: float, max_backoff: float) -> None:
        self.retries, self.backoff, self.max_backoff = retries, backoff, max_backoff

    def delay(self, attempt: int, response: httpx.Response | None) -> float | None:
        """Seconds to wait before retry ``attempt`` + 1, or None when the failure is final."""
        if attempt >= self.retries:
            return None
        if response is not None and response.status_code != 503:
            return None
        fallback = min(self.backoff * 2**attempt, self.max_backoff)
        if response is None:
            return fallback
        retry_after = response.headers.get("retry-after", "")
        return min(float(retry_after), self.max_backoff) if retry_after.isdigit() else fallback


class _Base:
    """Settings, request building and response parsing shared by both clients; they differ only in how they send."""

    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
    ) -> None:
        self.url = url.rstrip("/")
        self.headers = {"X-API-Key": api_key} if api_key else {}
        self.timeout = timeout
        self.policy = _Policy(retries, backoff, max_backoff)

    @staticmethod
    def _detect_call(image: Image, **query: Any) -> tuple[str, str, dict[str, Any]]:
        return "POST", "/detect", {"files": {"file": _image_bytes(image)}, "params": _query(**query)}

    @staticmethod
    def _batch_call(images: Iterable[Image], **query: Any) -> tuple[str, str, dict[str, Any]]:
        files = [("files", _image_bytes(image)) for image in images]
        return "POST", "/detect/batch", {"files": files, "params": _query(**query)}

    @staticmethod
    def _annotated_call(image: Image, png: bool, **query: Any) -> tuple[str, str, dict[str, Any]]:
        headers = {"Accept": "image/png" if png else "image/jpeg"}
        return (
            "POST",
            "/detect/annotated",
            {"files": {"file": _image_bytes(image)}, "params": _query(**query), "headers": headers},
        )

    @staticmethod
    def _parse(response: httpx.Response, model: type[Model]) -> Model:
        if response.is_success:
            return model.model_validate(response.json())
        raise _error(response)

    @classmethod
    def _batch_results(cls, response: httpx.Response) -> list[DetectResponse | DetectorError]:
        answer = cls._parse(response, BatchDetectResponse)
        return [
            DetectorError(result.status, result.error.code, result.error.message, answer.request_id)
            if isinstance(result, ImageError)
            else result
            for result in answer.results
        ]

    @staticmethod
    def _content(response: httpx.Response) -> bytes:
        if response.is_success:
            return response.content
        raise _error(response)


class DetectorClient(_Base):
    """Blocking client; use as a context manager or call :meth:`close`. Query keywords: ``conf``, ``max_det``,
    ``classes`` (ids or names)."""

    def __init__(self, url: str = "http://127.0.0.1:8000", **options: Any) -> None:
        super().__init__(url, **options)
        self._http = httpx.Client(base_url=self.url, headers=self.headers, timeout=self.timeout)

    def __enter__(self) -> DetectorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, method: str, path: str, kwargs: dict[str, Any]) -> httpx.Response:
        attempt = 0
        while True:
            try:
                response = self._http.request(method, path, **kwargs)
            except (httpx.ConnectError, httpx.RemoteProtocolError) as error:
                if (delay := self.policy.delay(attempt, None)) is None:
                    raise _no_answer(self.url, error) from error
            except httpx.TransportError as error:  # a timeout: the server may be working on it, not retried
                raise _no_answer(self.url, error) from error
            else:
                if response.is_success or (delay := self.policy.delay(attempt, response)) is None:
                    return response
            time.sleep(delay)
            attempt += 1

    def detect(self, image: Image, **query: Any) -> DetectResponse:
        return self._parse(self._send(*self._detect_call(image, **query)), DetectResponse)

    def detect_batch(self, images: Iterable[Image], **query: Any) -> list[DetectResponse | DetectorError]:
        return self._batch_results(self._send(*self._batch_call(images, **query)))

    def annotated(self, image: Image, *, png: bool = False, **query: Any) -> bytes:
        """The image with its detections drawn, as JPEG (or PNG)."""
        return self._content(self._send(*self._annotated_call(image, png, **query)))

    def model_info(self, model: str | None = None) -> ModelInfo:
        """The live version of the default model, or of ``model``."""
        return self._parse(self._send("GET", "/v1/model", {"params": _query(model=model)}), ModelInfo)


class AsyncDetectorClient(_Base):
    """Asyncio client with the same calls as :class:`DetectorClient`."""

    def __init__(self, url: str = "http://127.0.0.1:8000", **options: Any) -> None:
        super().__init__(url, **options)
        self._http = httpx.AsyncClient(base_url=self.url, headers=self.headers, timeout=self.timeout)

    async def __aenter__(self) -> AsyncDetectorClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def _send(self, method: str, path: str, kwargs: dict[str, Any]) -> httpx.Response:
        attempt = 0
        while True:
            try:
                response = await self._http.request(method, path, **kwargs)
            except (httpx.ConnectError, httpx.RemoteProtocolError) as error:
                if (delay := self.policy.delay(attempt, None)) is None:
                    raise _no_answer(self.url, error) from error
            except httpx.TransportError as error:  # a timeout: the server may be working on it, not retried
                raise _no_answer(self.url, error) from error
            else:
                if response.is_success or (delay := self.policy.delay(attempt, response)) is None:
                    return response
            await asyncio.sleep(delay)
            attempt += 1

    async def detect(self, image: Image, **query: Any) -> DetectResponse:
        return self._parse(await self._send(*self._detect_call(image, **query)), DetectResponse)

    async def detect_batch(self, images: Iterable[Image], **query: Any) -> list[DetectResponse | DetectorError]:
        return self._batch_results(await self._send(*self._batch_call(images, **query)))

    async def annotated(self, image: Image, *, png: bool = False, **query: Any) -> bytes:
        return self._content(await self._send(*self._annotated_call(image, png, **query)))

    async def model_info(self, model: str | None = None) -> ModelInfo:
        return self._parse(await self._send("GET", "/v1/model", {"params": _query(model=model)}), ModelInfo)
