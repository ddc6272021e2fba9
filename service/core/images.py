"""Image decoding and letterboxing: pure functions, no web framework, no model.

``decode`` turns uploaded bytes into an upright RGB uint8 array (for the model, a JPEG at a reduced scale);
``letterbox`` fits it into the model input the way ultralytics' predict does (:mod:`model.letterbox`: aspect kept,
centred, grey 114 padding, only as much as makes each side a multiple of the stride: 640 × 480 for a 4:3 photo at 640);
``unletterbox_boxes`` maps boxes back. The letterboxed shape is the image's batch bucket: images of one shape
batch together.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from model.letterbox import fit_scale, fitted_size, letterbox_shape, pad, unletterbox
from service.core.errors import TooManyPixels, UndecodableImage, UnsupportedMediaType, shown

SUPPORTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "BMP", "TIFF", "GIF"})
ORIENTATION_TAG = 0x0112  # EXIF

Image.MAX_IMAGE_PIXELS = None  # the service checks its own pixel limit before decoding; see decode()


@dataclass(frozen=True)
class Letterbox:
    """How an image of ``width`` × ``height`` pixels was fitted into the model input: scaled, then padded."""

    width: int
    height: int
    scale: float
    pad_x: float
    pad_y: float


@dataclass(frozen=True)
class Decoded:
    """An uploaded image, upright RGB. ``pixels`` may be smaller than the image itself (see :func:`decode`'s
    ``fit``); ``width`` and ``height`` are always the upright image's own size, the frame boxes are answered in."""

    pixels: np.ndarray  # (h, w, 3) uint8
    width: int
    height: int


@dataclass(frozen=True)
class Header:
    """What an image file's header says, before any pixel is decoded: its format and stored size."""

    format: str
    width: int
    height: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


def read_header(data: bytes, max_pixels: int) -> Header:
    """The header of an uploaded image, read without decoding a pixel (Pillow's ``open`` reads only the header).

    Raises:
        UnsupportedMediaType: not an image in a supported format.
        TooManyPixels: width × height above ``max_pixels``.
        UndecodableImage: a supported format whose header cannot be read, or an empty body.
    """
    return _header(_open(data), max_pixels)


def _open(data: bytes) -> Image.Image:
    if not data:
        raise UndecodableImage("the request body is empty")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise UnsupportedMediaType("not an image in a supported format (JPEG, PNG, WebP, BMP, TIFF, GIF)") from None
    except (OSError, ValueError, SyntaxError) as error:
        # Pillow's messages may quote the file's own bytes (a PNG chunk's type, a TIFF header).
        raise UndecodableImage(f"the image header could not be read: {shown(str(error), quote=False)}") from None
    return image


def _header(image: Image.Image, max_pixels: int) -> Header:
    if image.format not in SUPPORTED_FORMATS:
        raise UnsupportedMediaType(f"image format {image.format} is not supported (JPEG, PNG, WebP, BMP, TIFF, GIF)")
    header = Header(image.format, *image.size)
    if header.pixels > max_pixels:
        raise TooManyPixels(f"image is {header.width}x{header.height} pixels, more than the limit of {max_pixels}")
    return header


def decode(data: bytes, max_pixels: int, fit: int | None = None) -> Decoded:
    """Decode an uploaded image to an upright RGB array.

    JPEG, PNG, WebP, BMP, TIFF and GIF; of an animation or a multi-page file, the first frame. The EXIF orientation
    is applied; grayscale, RGBA, palette, 16-bit and CMYK are converted to RGB. The pixel limit is checked from the
    header, before any pixel is decoded (:func:`read_header`).

    With ``fit`` (a square's side, pixels: the model's input), a JPEG is decoded at 1/2, 1/4 or 1/8 scale in the DCT
    domain (libjpeg's own scaling) when that still leaves at least the size it will be resized to: 2-3x faster than
    a full decode for a photo several times larger than the input, and the pixels the model sees barely change.

    Raises:
        UnsupportedMediaType: not an image in a supported format.
        TooManyPixels: width × height above ``max_pixels``.
        UndecodableImage: a supported format that fails to decode (truncated, corrupt).
    """
    image = _open(data)
    header = _header(image, max_pixels)
    width, height = header.width, header.height
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL warns on odd EXIF; the image is still usable
            if image.getexif().get(ORIENTATION_TAG, 1) in (5, 6, 7, 8):  # stored sideways
                width, height = height, width
            if fit is not None:
                scale = fit_scale(width, height, fit)  # letterbox()'s; the same for the stored, sideways frame
                image.draft(image.mode, (math.ceil(image.width * scale), math.ceil(image.height * scale)))
            image = ImageOps.exif_transpose(image)
            return Decoded(_to_rgb(image), width, height)
    except (OSError, ValueError, SyntaxError) as error:
        raise UndecodableImage(f"the image could not be decoded: {shown(str(error), quote=False)}") from None


def _to_rgb(image: Image.Image) -> np.ndarray:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16/32-bit grayscale: rescale, don't clip
        pixels = np.asarray(image, dtype=np.float32)
        top = 65535.0 if image.mode.startswith("I;16") or pixels.max() > 255 else 255.0
        gray = np.clip(pixels * (255.0 / top), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=2))
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return np.ascontiguousarray(np.asarray(image.convert("RGB")))


def letterbox(image: Decoded, size: int) -> tuple[torch.Tensor, Letterbox]:
    """Resize ``image`` to fit ``size``×``size`` keeping its aspect, pad centred with grey 114 to
    :func:`letterbox_shape`.

    The geometry is the image's own (``image.width`` × ``image.height``), whatever size its pixels were decoded at.

    Returns:
        (tensor, geometry): uint8 tensor (3, H, W) RGB with (H, W) = ``letterbox_shape(...)``, and the
        :class:`Letterbox` to map boxes back.
    """
    width, height = image.width, image.height
    scale = fit_scale(width, height, size)
    new_w, new_h = fitted_size(width, height, scale)
    pixels = image.pixels
    if pixels.shape[:2] != (new_h, new_w):
        pixels = cv2.resize(pixels, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    canvas, left, top = pad(pixels, letterbox_shape(width, height, size))
    return torch.from_numpy(canvas), Letterbox(width, height, scale, float(left), float(top))


def unletterbox_boxes(boxes: np.ndarray, geometry: Letterbox) -> np.ndarray:
    """Map (n, 4) ``[x1, y1, x2, y2]`` boxes from model-input pixels to original-image pixels, clipped."""
    return unletterbox(boxes, geometry.scale, (geometry.pad_x, geometry.pad_y), (geometry.height, geometry.width))
