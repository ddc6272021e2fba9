"""One image's way through the service, without HTTP: admit -> read -> decode -> queue -> infer -> post-process.

The routes hand this module what they took from the request (its body as an async iterator of chunks, its
content type and length, its arrival time) and answer what it returns. A request is admitted first
(:meth:`Pipeline.admit`, :mod:`service.core.admission`): its body bytes are reserved before they are read, its image's
pixels (from the header) before it is decoded, and what does not fit is refused at once. Every stage runs inside
the request's deadline, ``request_timeout_s`` after arrival, waiting for a thread included. Failures are the
typed errors of :mod:`service.core.errors`.

What may run on the event loop: work bounded by the settings (a response of at most ``max_batch_files`` x
``max_detections`` detections), and copies of the body at memory speed (joining its chunks, splitting a multipart
body: 10-20 ms for 10 MB). Work that a client can make grow with its body's content, element by element, runs on
threads: image headers and OIP request bodies on the parse thread (:meth:`Pipeline.parse`), decoding and drawing on
the decode threads; budgets and metrics are touched only on the loop. Threads share the GIL, so one C call that
holds it (``json.loads``) stalls the loop from any thread: such work is bounded before it starts.

When tracing is on, each stage is a span, child of the request's (:mod:`service.process.tracing`): ``admission``,
``read_body``, ``parse``, ``decode``, ``queue_wait`` and ``forward`` (:mod:`service.core.batcher`), ``postprocess``;
work sent to a thread runs in the request's context.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import torch
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from torchvision.ops import box_iou

from service.core.admission import Admission, Ticket
from service.core.annotate import MAX_SIDE, drawable_copy
from service.core.errors import (
    BadRequest,
    DeadlineExceeded,
    PayloadTooLarge,
    RequestTimeout,
    UnsupportedMediaType,
    shown,
)
from service.core.images import Letterbox, decode, letterbox, read_header
from service.core.models import ServedVersion
from service.process import tracing
from service.process.metrics import Metrics
from service.process.settings import Settings
from service.schemas import Detection, DetectResponse

T = TypeVar("T")
# Parsing holds the GIL: a second thread would not parse faster, and would take the GIL from the event loop as well.
PARSE_THREADS = 1


@dataclass(frozen=True)
class DetectQuery:
    """What a caller asks of the detections: minimum confidence, most detections, class ids (None: all), and the IoU
    above which overlapping boxes of different classes are one object (None: keep them all)."""

    conf: float
    max_det: int
    classes: set[int] | None
    dedupe_iou: float | None = None


def one_box_per_place(detections: list[Detection], iou: float) -> list[Detection]:
    """``detections`` (most confident first) without those that overlap a more confident one, of any class, by more
    than ``iou``. An NMS-free head trained short of convergence answers some objects twice: once per class, or twice
    in one class from neighbouring anchors (the bundled model's false positives: ``model/README.md``).

    The (n, n) IoU matrix is computed at once: pair by pair in Python, 300 boxes held the event loop for 85 ms."""
    boxes = torch.tensor([d.box for d in detections], dtype=torch.float64).reshape(-1, 4)
    overlaps = torch.nan_to_num(box_iou(boxes, boxes)).numpy()  # two empty boxes: 0/0, no overlap
    kept: list[int] = []
    for i in range(len(detections)):
        if not kept or overlaps[i, kept].max() <= iou:
            kept.append(i)
    return [detections[i] for i in kept]


async def read_body(
    chunks: AsyncIterator[bytes], declared: int | None, limit: int, deadline: float, hold: Callable[[int], None]
) -> bytes:
    """The whole body, refused with 413 as soon as it is known to exceed ``limit`` bytes (``declared`` is its
    Content-Length, when sent), and with 408 when it has not fully arrived by ``deadline`` (``time.monotonic()``).

    ``hold(n)`` reserves n bytes (or raises): the declared length before the first byte is read, else each chunk as
    it arrives.
    """
    if declared is not None:
        if declared > limit:
            raise PayloadTooLarge(f"the body is {declared} bytes, more than the limit of {limit}")
        hold(declared)
    parts, size = [], 0
    try:
        async with asyncio.timeout(max(deadline - time.monotonic(), 0)):
            async for chunk in chunks:
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"the body exceeds the limit of {limit} bytes")
                if declared is None:
                    hold(len(chunk))
                parts.append(chunk)
    except TimeoutError:
        raise RequestTimeout(f"the body did not arrive within the request timeout ({size} bytes received)") from None
    return b"".join(parts)


def check_content_type(content_type: str, field_name: str) -> bool:
    """Whether the body is multipart (else a raw ``image/*`` body); 415 for anything else, before it is read."""
    if content_type.startswith("multipart/form-data"):
        return True
    if content_type.startswith("image/"):
        return False
    raise UnsupportedMediaType(
        f"send multipart/form-data with a '{field_name}' field, or a raw body with an image/* content type"
    )


FILE_NAME_CHARS = 255  # no file system keeps a longer name (NAME_MAX); multipart lets a client send 4 KB


@dataclass(frozen=True)
class Upload:
    """One uploaded image: its bytes and, when it came as a multipart file, the file name the client gave (cut to
    :data:`FILE_NAME_CHARS`: it is echoed in the answer, an error's included)."""

    name: str | None
    data: bytes


async def multipart_files(body: bytes, content_type: str, field_name: str, max_files: int) -> list[Upload]:
    """The files of a multipart body's ``field_name`` field, parsed in memory (never spooled to disk: ``body`` is
    already within the upload limit and the body budget)."""

    async def stream() -> AsyncIterator[bytes]:
        yield body

    headers = Headers({"content-type": content_type})
    parser = MultiPartParser(headers, stream(), max_files=max_files, max_fields=max_files)
    parser.spool_max_size = len(body) + 1  # a file part is never larger than the body: it stays in memory
    try:
        form = await parser.parse()
    except MultiPartException as error:
        raise BadRequest(f"malformed multipart body: {error.message}") from None
    try:
        files = [value for value in form.getlist(field_name) if isinstance(value, UploadFile)]
        if not files:
            raise BadRequest(f"multipart field '{field_name}' with an image file is required")
        return [Upload(_file_name(upload.filename), await upload.read()) for upload in files]
    finally:
        await form.close()


def _file_name(name: str | None) -> str | None:
    return None if name is None else shown(name, FILE_NAME_CHARS, quote=False)


@dataclass
class Prepared:
    """An image ready to queue: the model input, how it was fitted, and the pixels to draw on when asked for."""

    tensor: torch.Tensor  # (3, S, S) uint8, the letterboxed model input
    geometry: Letterbox
    seconds: float
    pixels: np.ndarray | None  # (h, w, 3) RGB uint8, at most annotate.MAX_SIDE a side; only when it will be drawn on


def prepare(data: bytes, max_pixels: int, size: int, keep_pixels: bool) -> Prepared:
    """Decode and letterbox ``data`` to the model's ``size``; with ``keep_pixels``, keep a bounded copy to draw on
    (:func:`service.core.annotate.drawable_copy`). Runs in the decode pool.

    The model's input is decoded the same way whether or not the image is drawn on (a JPEG at the reduced DCT scale
    that fits ``size``), so ``/detect`` and ``/detect/annotated`` find the same boxes in the same bytes; the copy to
    draw on is a second decode, at the drawing's size.
    """
    started = time.monotonic()
    image = decode(data, max_pixels, fit=size)
    tensor, geometry = letterbox(image, size)
    pixels = drawable_copy(decode(data, max_pixels, fit=MAX_SIDE).pixels) if keep_pixels else None
    return Prepared(tensor, geometry, time.monotonic() - started, pixels)


@dataclass
class ImageResult:
    response: DetectResponse
    detections: list[Detection]
    pixels: np.ndarray | None  # Prepared.pixels


@dataclass
class Pipeline:
    """One image's way, for the process: the thread pools and the admission budgets are shared by every request and
    every model; the model that runs an image is the version the request leased (:mod:`service.core.models`).

    ``parse_pool`` (:data:`PARSE_THREADS`) reads image headers and OIP request bodies; ``decode_pool`` decodes and
    draws. Headers are not read on the decode threads, where they would wait behind decodes.
    """

    settings: Settings
    metrics: Metrics
    decode_pool: ThreadPoolExecutor
    admission: Admission
    parse_pool: ThreadPoolExecutor
    # Large images decode on at most decode_threads - 1 threads at once (all of them when there is only one): a
    # flood of large or slow-to-decode images leaves a thread to the small ones (a 1 x 39,999,999 px PNG decodes
    # for seconds; before, a small request queued behind 60 of them for 46-64 s).
    large_decodes: asyncio.Semaphore = field(init=False)

    def __post_init__(self) -> None:
        self.large_decodes = asyncio.Semaphore(max(1, self.settings.decode_threads - 1))

    def is_large(self, pixels: int) -> bool:
        """Whether an image of ``pixels`` (from its header) takes the large images' lane: above a tenth of
        ``max_image_pixels`` (4 M px by default)."""
        return pixels > self.settings.max_image_pixels // 10

    def deadline(self, arrived: float) -> float:
        """The ``time.monotonic()`` by which a request that arrived at ``arrived`` must be answered."""
        return arrived + self.settings.request_timeout_s

    def admit(self) -> Ticket:
        """Admit one more request in flight, or raise :class:`~service.core.errors.Overloaded`; close the ticket when
        the request is answered."""
        with tracing.span("admission"):
            return self.admission.admit()

    async def read_images(
        self,
        ticket: Ticket,
        chunks: AsyncIterator[bytes],
        content_type: str,
        declared: int | None,
        field_name: str,
        max_files: int,
        arrived: float,
    ) -> list[Upload]:
        """The images of a request: a multipart ``field_name`` field (at most ``max_files``), or the raw body when
        ``content_type`` is ``image/*``. The body is read within the upload limit and the deadline, its bytes held
        on ``ticket`` (a multipart body twice: its parts are copied out of it)."""
        multipart = check_content_type(content_type, field_name)
        body = await self.read_body(ticket, chunks, declared, arrived, copies=2 if multipart else 1)
        if not multipart:
            return [Upload(None, body)]
        return await multipart_files(body, content_type, field_name, max_files)

    async def read_body(
        self, ticket: Ticket, chunks: AsyncIterator[bytes], declared: int | None, arrived: float, copies: int
    ) -> bytes:
        """The whole body, within the upload limit and the deadline; ``copies`` times its bytes held on ``ticket``
        (2 when its images are copied out of it)."""
        limit = self.settings.max_upload_bytes
        with tracing.span("read_body") as span:
            body = await read_body(
                chunks, declared, limit, self.deadline(arrived), lambda n: ticket.hold_body(copies * n)
            )
            span.set_attribute("http.request.body.size", len(body))
            return body

    async def parse(self, work: Callable[[], T], arrived: float) -> T:
        """``work()``, parsing that grows with a request's body (an OIP request), on the parse thread; waiting for
        it counts against the deadline of the request that arrived at ``arrived``. ``work`` must touch no budget and
        no metric: they are the loop's."""
        try:
            async with asyncio.timeout(max(self.deadline(arrived) - time.monotonic(), 0)):
                with tracing.span("parse"):
                    return await asyncio.wrap_future(self.parse_pool.submit(tracing.in_current_context(work)))
        except TimeoutError:
            raise DeadlineExceeded("the request waited past its deadline to be parsed") from None

    async def _prepare(self, ticket: Ticket, data: bytes, size: int, keep_pixels: bool, deadline: float) -> Prepared:
        """Decode and letterbox to ``size`` in the decode pool, the image's pixels (from its header, read on the
        parse thread) reserved on ``ticket`` first; waiting for a thread (or the large images' lane) counts against
        ``deadline``. A request decodes one image at a time."""
        loop = asyncio.get_running_loop()
        max_pixels = self.settings.max_image_pixels
        try:
            async with asyncio.timeout(max(deadline - time.monotonic(), 0)), ticket.decoding:
                # Pillow reads a header in Python, marker by marker: a 10 MB JPEG of 2.6 M empty comment markers
                # held the event loop for 6 s.
                header = await asyncio.wrap_future(self.parse_pool.submit(read_header, data, max_pixels))
                reservation = ticket.reserve_pixels(header.pixels, held_by_request=keep_pixels)
                large = self.is_large(header.pixels)
                try:
                    if large:
                        await self.large_decodes.acquire()
                except BaseException:
                    reservation.release()
                    raise

                def decoded() -> None:
                    reservation.release()
                    if large:
                        self.large_decodes.release()

                job = self.decode_pool.submit(tracing.in_current_context(prepare), data, max_pixels, size, keep_pixels)
                # Released when the thread is done (or the job cancelled before it started), not when the request
                # stops waiting: a decode that outlives its request still holds its memory and its thread.
                job.add_done_callback(lambda _: loop.call_soon_threadsafe(decoded))
                return await asyncio.wrap_future(job)
        except TimeoutError:
            raise DeadlineExceeded("the request waited past its deadline to be decoded") from None

    async def detect(
        self,
        ticket: Ticket,
        model: ServedVersion,
        data: bytes,
        query: DetectQuery,
        request_id: str,
        arrived: float,
        keep_pixels: bool = False,
    ) -> ImageResult:
        """One image of an admitted request on ``model`` (a version the request leased): decode (decode pool), its
        batch queue, inference, boxes back to the image's pixels.

        ``arrived`` is the request's ``time.monotonic()`` arrival. The decoded pixels are kept (``keep_pixels``)
        only for drawing: a queued request otherwise holds just the model input.
        """
        engine, metrics = model.engine, self.metrics
        with tracing.span("decode") as span:
            prepared = await self._prepare(ticket, data, engine.input_size, keep_pixels, self.deadline(arrived))
            if span.is_recording():
                span.set_attributes(_decode_attributes(prepared))
        metrics.preprocess_duration.observe(prepared.seconds)
        submitted = time.monotonic()
        traced = _model_attributes(model, prepared) if tracing.enabled() else None
        output = await model.batcher.submit(prepared.tensor, deadline=self.deadline(arrived), trace_attributes=traced)
        finished = time.monotonic()
        with tracing.span("postprocess") as span:
            detections = engine.detections(output.rows, prepared.geometry, query.conf, query.classes, query.max_det)
            if query.dedupe_iou is not None:
                detections = one_box_per_place(detections, query.dedupe_iou)
            for detection in detections:
                metrics.detections.labels(model.name, detection.class_name).inc()
            span.set_attribute("detector.detections", len(detections))
        done = time.monotonic()
        geometry = prepared.geometry
        response = DetectResponse(
            request_id=request_id,
            model={"name": model.name, "version": model.version},
            image={"width": geometry.width, "height": geometry.height},
            detections=[
                {
                    "class_id": d.class_id,
                    "class_name": d.class_name,
                    "confidence": d.confidence,
                    "box": dict(zip(("x1", "y1", "x2", "y2"), d.box, strict=True)),
                }
                for d in detections
            ],
            timings_ms={
                "queue": round(max(finished - submitted - output.inference_seconds, 0) * 1000, 2),
                "preprocess": round(prepared.seconds * 1000, 2),
                "inference": round(output.inference_seconds * 1000, 2),
                "postprocess": round((done - finished) * 1000, 2),
                "total": round((done - arrived) * 1000, 2),
            },
            batch_size=output.batch_size,
        )
        return ImageResult(response, detections, prepared.pixels)


def _decode_attributes(prepared: Prepared) -> dict[str, object]:
    """A ``decode`` span's attributes (:data:`service.process.tracing.ATTRIBUTES`)."""
    return {
        "detector.image.width": prepared.geometry.width,
        "detector.image.height": prepared.geometry.height,
        "detector.input.shape": list(prepared.tensor.shape),
        "detector.decode_ms": round(prepared.seconds * 1000, 3),
    }


def _model_attributes(model: ServedVersion, prepared: Prepared) -> dict[str, object]:
    """An image's ``queue_wait`` and its batch's ``forward`` attributes."""
    return {
        "detector.model.name": model.name,
        "detector.model.version": model.version,
        "detector.input.shape": list(prepared.tensor.shape),
    }
