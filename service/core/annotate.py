"""Draw detections on an image: boxes, class names and confidences, one fixed colour per class.

Drawing happens on a bounded copy (:func:`drawable_copy`, at most :data:`MAX_SIDE` pixels on its longer side), so
any image the service accepts can be drawn and encoded: JPEG sides are limited to 65,535 pixels and FreeType font
sizes too, and a full-resolution copy of a 40-megapixel image would hold 120 MB per request.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from service.schemas import Detection

# Fixed per class id (cycled): the same class always has the same colour, across requests and clients.
PALETTE = (
    (255, 56, 56), (56, 120, 255), (255, 178, 29), (72, 249, 10), (146, 204, 23), (61, 219, 134),
    (26, 147, 52), (0, 212, 187), (44, 153, 168), (0, 194, 255), (52, 69, 147), (100, 115, 255),
)  # fmt: skip
FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG"}
MAX_SIDE = 2048  # pixels, the longer side of a drawn image


def drawable_copy(pixels: np.ndarray) -> np.ndarray:
    """``pixels`` (H, W, 3) RGB uint8, downscaled (aspect kept, each side at least 1) to at most :data:`MAX_SIDE`
    pixels on its longer side; returned as is when it already fits."""
    height, width = pixels.shape[:2]
    if max(height, width) <= MAX_SIDE:
        return pixels
    scale = MAX_SIDE / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.BILINEAR))


def class_colour(class_id: int) -> tuple[int, int, int]:
    return PALETTE[class_id % len(PALETTE)]


def annotate(pixels: np.ndarray, detections: Sequence[Detection], scale: float = 1.0) -> Image.Image:
    """A copy of ``pixels`` (H, W, 3) RGB uint8 with every detection drawn; line width scales with image size.

    ``scale``: pixels of ``pixels`` per pixel of the image the detections' boxes are in (below 1 for a
    :func:`drawable_copy` of a larger image).
    """
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    width = max(2, round(max(image.size) / 400))
    font = ImageFont.load_default(size=max(12, 6 * width))
    for detection in detections:
        colour = class_colour(detection.class_id)
        x1, y1, x2, y2 = (value * scale for value in detection.box)
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=width)
        label = f"{detection.class_name} {detection.confidence:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        label_y = y1 - (bottom - top) - 2 * width if y1 - (bottom - top) - 2 * width >= 0 else y1
        draw.rectangle((x1, label_y, x1 + right - left + 2 * width, label_y + bottom - top + 2 * width), fill=colour)
        draw.text((x1 + width, label_y + width - top), label, fill=(255, 255, 255), font=font)
    return image


def encode(image: Image.Image, media_type: str) -> bytes:
    """PNG or JPEG (quality 90) bytes of ``image``; ``media_type`` is a key of :data:`FORMATS`."""
    buffer = io.BytesIO()
    image.save(buffer, format=FORMATS[media_type], **({"quality": 90} if media_type == "image/jpeg" else {}))
    return buffer.getvalue()


def negotiate(accept: str | None) -> str:
    """The first of ``image/png`` / ``image/jpeg`` listed in an Accept header; JPEG when neither is."""
    for part in (accept or "").split(","):
        media_type = part.split(";")[0].strip().lower()
        if media_type in FORMATS:
            return media_type
    return "image/jpeg"
