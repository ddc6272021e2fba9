"""A generated corpus of what the internet sends an image endpoint, each with the answer the service documents.

Nothing binary is kept in git: every body is made here, deterministically. The server these cases expect runs
with the limits in :data:`SERVER_FLAGS`.
"""

from __future__ import annotations

import functools
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import numpy as np
from PIL import Image

from model.synthetic import render
from tests.image_files import encode

MAX_UPLOAD_BYTES = 2 * 1024 * 1024
MAX_IMAGE_PIXELS = 4_000_000
REQUEST_TIMEOUT_S = 20
MAX_BATCH_FILES = 8
SERVER_FLAGS = (
    *("--max-upload-bytes", str(MAX_UPLOAD_BYTES)),
    *("--max-image-pixels", str(MAX_IMAGE_PIXELS)),
    *("--max-batch-files", str(MAX_BATCH_FILES)),
    *("--max-batch-size", "4"),
    *("--max-queue", "16"),
    *("--request-timeout-s", str(REQUEST_TIMEOUT_S)),
)


@dataclass(frozen=True)
class Case:
    """One request and its documented answer (``code`` is the JSON error code; None for a 200)."""

    name: str
    status: int
    code: str | None
    path: str = "/detect"
    files: tuple = ()  # multipart parts: (field, (filename, bytes, content type))
    content: bytes | None = None  # a raw body
    headers: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    chunked: bool = False  # send ``content`` without Content-Length (chunked transfer encoding)
    method: str = "POST"


def send(client: httpx.Client, case: Case) -> httpx.Response:
    content = case.content
    if case.chunked:
        content = _chunks(case.content)
    return client.request(
        case.method, case.path, params=case.params, files=list(case.files) or None, content=content,
        headers=case.headers,
    )  # fmt: skip


def _chunks(data: bytes, size: int = 64 * 1024) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def sample(seed: int = 7, size: int = 320) -> Image.Image:
    return Image.fromarray(render(seed, size)[0])


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` × ``height`` RGB pixels and which holds none: a decompression-bomb probe."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IEND", b"")
    )


def one(data: bytes, name: str = "image", content_type: str = "application/octet-stream") -> tuple:
    return (("file", (name, data, content_type)),)


@functools.cache
def corpus() -> tuple[Case, ...]:
    photo = sample()
    jpeg = encode(photo, "JPEG", quality=90)
    png = encode(photo, "PNG")
    first, *more = [sample(seed) for seed in (7, 8, 9)]
    sixteen_bit = Image.fromarray(np.asarray(photo.convert("L"), dtype=np.uint16) * 257)
    over_limit = np.random.default_rng(0).integers(0, 256, MAX_UPLOAD_BYTES + 1024, dtype=np.uint8).tobytes()
    boundary = "reliability-boundary"
    multipart = {"content-type": f"multipart/form-data; boundary={boundary}"}
    ok, bad, undecodable, unsupported = 200, "bad_request", "undecodable_image", "unsupported_media_type"
    return (
        # images that must work
        Case("jpeg", ok, None, files=one(jpeg)),
        Case("png", ok, None, files=one(png)),
        Case("raw jpeg body", ok, None, content=jpeg, headers={"content-type": "image/jpeg"}),
        Case("1x1 png", ok, None, files=one(encode(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"))),
        Case("16-bit grayscale png", ok, None, files=one(encode(sixteen_bit, "PNG"))),
        Case("palette png", ok, None, files=one(encode(photo.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"))),
        Case("rgba png", ok, None, files=one(encode(photo.convert("RGBA"), "PNG"))),
        Case("grayscale jpeg", ok, None, files=one(encode(photo.convert("L"), "JPEG"))),
        Case("cmyk jpeg", ok, None, files=one(encode(photo.convert("CMYK"), "JPEG"))),
        Case("webp", ok, None, files=one(encode(photo, "WEBP"))),
        Case("bmp", ok, None, files=one(encode(photo, "BMP"))),
        Case("animated gif", ok, None, files=one(encode(first, "GIF", save_all=True, append_images=more))),
        Case("multi-page tiff", ok, None, files=one(encode(first, "TIFF", save_all=True, append_images=more))),
        Case("batch at the file limit", ok, None, path="/detect/batch",
             files=tuple(("files", (f"{i}.jpg", jpeg, "image/jpeg")) for i in range(MAX_BATCH_FILES))),
        # bodies that are not (usable) images
        Case("zero-byte raw body", 422, undecodable, content=b"", headers={"content-type": "image/jpeg"}),
        Case("zero-byte file", 422, undecodable, files=one(b"")),
        Case("random bytes", 415, unsupported, content=np.random.default_rng(1).bytes(4096),
             headers={"content-type": "image/jpeg"}),
        Case("truncated jpeg", 422, undecodable, files=one(jpeg[: len(jpeg) // 2])),
        Case("truncated png", 422, undecodable, files=one(png[: len(png) // 2])),
        Case("png header claiming 60000x60000", 422, "too_many_pixels", files=one(png_header(60000, 60000))),
        Case("real decompression bomb", 422, "too_many_pixels",
             files=one(encode(Image.new("RGB", (2100, 2100)), "PNG"))),
        Case("svg as image/svg+xml", 415, unsupported,
             content=b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>',
             headers={"content-type": "image/svg+xml"}),
        Case("text as image/png", 415, unsupported, content=b"not an image\n", headers={"content-type": "image/png"}),
        Case("text file in multipart", 415, unsupported, files=one(b"hello", "notes.txt", "text/plain")),
        # malformed requests
        Case("no content type", 415, unsupported, content=jpeg),
        Case("json body", 415, unsupported, content=b"{}", headers={"content-type": "application/json"}),
        Case("wrong multipart field", 400, bad, files=(("image", ("a.jpg", jpeg, "image/jpeg")),)),
        Case("empty multipart", 400, bad, content=f"--{boundary}--\r\n".encode(), headers=multipart),
        Case("malformed multipart", 400, bad, content=b"--nope\r\ngarbage", headers=multipart),
        Case("50 files in one batch", 400, bad, path="/detect/batch",
             files=tuple(("files", (f"{i}.jpg", b"x", "image/jpeg")) for i in range(50))),
        Case("body over the limit", 413, "payload_too_large", content=over_limit,
             headers={"content-type": "image/jpeg"}),
        Case("body over the limit, chunked", 413, "payload_too_large", content=over_limit, chunked=True,
             headers={"content-type": "image/jpeg"}),
        # absurd query values
        Case("conf=abc", 400, bad, files=one(jpeg), params={"conf": "abc"}),
        Case("conf=2", 400, bad, files=one(jpeg), params={"conf": "2"}),
        Case("conf=nan", 400, bad, files=one(jpeg), params={"conf": "nan"}),
        Case("max_det=0", 400, bad, files=one(jpeg), params={"max_det": "0"}),
        Case("max_det=100000", 400, bad, files=one(jpeg), params={"max_det": "100000"}),
        Case("unknown class name", 400, bad, files=one(jpeg), params={"classes": "unicorn"}),
        Case("classes=² (a digit, not ASCII)", 400, bad, files=one(jpeg), params={"classes": "²"}),
        Case("classes=١ (Arabic-Indic one)", 400, bad, files=one(jpeg), params={"classes": "١"}),
        Case("classes=%00", 400, bad, files=one(jpeg), params={"classes": "\x00"}),
        Case("classes=,,,,", 400, bad, files=one(jpeg), params={"classes": ",,,,"}),
        Case("classes= (empty)", 400, bad, files=one(jpeg), params={"classes": ""}),
        # wrong routes
        Case("GET /detect", 405, "method_not_allowed", method="GET"),
        Case("unknown path", 404, "not_found", path="/detect/everything"),
    )  # fmt: skip
