"""Drawing detections: on a bounded copy, boxes scaled to it."""

import numpy as np

from service.core.annotate import MAX_SIDE, annotate, drawable_copy
from service.schemas import Detection


def test_a_large_or_thin_image_is_drawn_on_a_copy_within_the_max_side():
    assert drawable_copy(np.zeros((100, 50, 3), np.uint8)).shape == (100, 50, 3)
    assert drawable_copy(np.zeros((4096, 1024, 3), np.uint8)).shape == (MAX_SIDE, 512, 3)
    assert drawable_copy(np.zeros((1, 100_000, 3), np.uint8)).shape == (1, MAX_SIDE, 3)


def test_boxes_are_scaled_to_the_copy():
    star = Detection(1, "star", 0.9, (100.0, 100.0, 300.0, 300.0))  # in the original image's pixels
    drawn = np.asarray(annotate(np.zeros((200, 200, 3), np.uint8), [star], scale=0.5))
    edges = drawn[100, [50, 150]]  # row 100 crosses the scaled box's left and right edges (x = 50, 150)
    assert edges.any(axis=1).all()
    assert not drawn[100, 100].any()  # inside the scaled box; the unscaled box's left edge would be here
