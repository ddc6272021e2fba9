"""How an image is fitted into the model's input, as ultralytics' predict does it: resized with its aspect kept,
centred, padded with grey only as far as the next multiple of the stride on each side (640 × 480 for a 4:3 photo at
640), and the input shapes photos usually have.

One definition for everything that letterboxes: the service (``service/core/images.py`` fits decoded uploads,
``service/core/models.py`` warms up :func:`common_shapes`), ``python -m model compile`` (builds an artefact
per common shape) and :mod:`model.quantize` (calibrates and scores int8 on letterboxed images).
"""

from __future__ import annotations

import numpy as np

Shape = tuple[int, int]  # model-input (height, width), pixels

PAD_VALUE = 114  # ultralytics' letterbox grey, what the model saw in training
STRIDE = 32  # the model's largest stride: each side of its input is a multiple of it
# Photos users send: square, 4:3 (phones), 3:2 (cameras) and 16:9 (video), landscape and portrait.
COMMON_ASPECTS = ((1, 1), (4, 3), (3, 4), (3, 2), (2, 3), (16, 9), (9, 16))


def fit_scale(width: int, height: int, size: int) -> float:
    """The factor that fits ``width`` × ``height`` into ``size`` × ``size``, aspect kept."""
    return min(size / height, size / width)


def fitted_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """(width, height) of the image resized by ``scale``, at least 1 pixel each."""
    return max(round(width * scale), 1), max(round(height * scale), 1)


def letterbox_shape(width: int, height: int, size: int) -> Shape:
    """The model-input (height, width), pixels, for a ``width`` × ``height`` image at input ``size``: the image
    resized to fit ``size`` × ``size``, each side then padded up to a multiple of :data:`STRIDE` (ultralytics'
    ``LetterBox(auto=True)``). 1280 × 720 at 640 -> (384, 640); 810 × 1080 -> (640, 480)."""
    new_w, new_h = fitted_size(width, height, fit_scale(width, height, size))
    return new_h + (size - new_h) % STRIDE, new_w + (size - new_w) % STRIDE


def common_shapes(size: int) -> list[Shape]:
    """The input shapes of :data:`COMMON_ASPECTS` at ``size``, distinct, the square first."""
    return list(dict.fromkeys(letterbox_shape(width, height, size) for width, height in COMMON_ASPECTS))


def pad(pixels: np.ndarray, shape: Shape) -> tuple[np.ndarray, int, int]:
    """Centre resized ``pixels`` (h, w, 3) uint8 in a grey canvas of ``shape``.

    Returns:
        (canvas (3, H, W) uint8 contiguous, left, top): the model's layout, and the padding in pixels (odd padding
        rounded as ultralytics does).
    """
    new_h, new_w = pixels.shape[:2]
    left, top = round((shape[1] - new_w) / 2 - 0.1), round((shape[0] - new_h) / 2 - 0.1)
    canvas = np.full((*shape, 3), PAD_VALUE, dtype=np.uint8)
    canvas[top : top + new_h, left : left + new_w] = pixels
    # (H, W, 3) -> (3, H, W) with numpy, not torch: a torch copy this size runs on an OpenMP pool of the calling
    # (decode) thread, and any such pool slows the model's forward in the inference thread (bench/README.md,
    # "In-service speed of the forward").
    return np.ascontiguousarray(canvas.transpose(2, 0, 1)), left, top


def unletterbox(boxes: np.ndarray, scale: float, pad: tuple[float, float], size: tuple[int, int]) -> np.ndarray:
    """(n, 4) ``[x1, y1, x2, y2]`` in model-input pixels -> in the pixels of the (height, width) ``size`` image that
    was resized by ``scale`` and padded by ``pad`` (left, top), clipped to it."""
    mapped = (boxes - [pad[0], pad[1], pad[0], pad[1]]) / scale
    mapped[:, [0, 2]] = mapped[:, [0, 2]].clip(0, size[1])
    mapped[:, [1, 3]] = mapped[:, [1, 3]].clip(0, size[0])
    return mapped
