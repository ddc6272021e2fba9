"""The letterbox's geometry; its pixels are also tested through the service's (tests/service/core/test_images.py)."""

import numpy as np

from model.letterbox import PAD_VALUE, common_shapes, pad


def test_common_shapes_are_the_square_and_the_photo_aspects_both_ways():
    assert common_shapes(640) == [(640, 640), (480, 640), (640, 480), (448, 640), (640, 448), (384, 640), (640, 384)]
    assert common_shapes(128) == [(128, 128), (96, 128), (128, 96)]  # 3:2 and 16:9 pad to 4:3 there


def test_pad_centres_with_ultralytics_rounding():
    pixels = np.zeros((3, 5, 3), dtype=np.uint8)
    canvas, left, top = pad(pixels, (6, 8))
    assert (left, top) == (1, 1) and canvas.shape == (3, 6, 8) and canvas.flags.c_contiguous
    assert (canvas[:, 1:4, 1:6] == 0).all() and canvas[:, 0].min() == PAD_VALUE and canvas[:, 4:].min() == PAD_VALUE
