"""Image files made in memory for tests: nothing binary is kept in git."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def encode(image: Image.Image | np.ndarray, fmt: str = "PNG", **options: object) -> bytes:
    """The bytes of ``image`` saved as a ``fmt`` file.

    Args:
        image: a Pillow image, or an RGB uint8 array (H, W, 3).
        fmt: a Pillow format name (PNG, JPEG, WEBP, ...).
        options: Pillow's save options for that format (``quality=90``, ``exif=...``, ``save_all=True``, ...).
    """
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()
