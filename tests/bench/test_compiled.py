"""bench.compiled: when a contender's detections count as the same as eager's."""

import numpy as np

from bench.compiled import detections_agree

REFERENCE = np.array([[[0, 0, 10, 10, 0.9, 1], [5, 5, 20, 20, 0.5, 0], [1, 1, 2, 2, 0.1, 0]]], dtype=np.float32)


def test_the_same_detections_in_another_order_agree():
    assert detections_agree(REFERENCE[:, ::-1].copy(), REFERENCE) == (True, 2)


def test_a_detection_moved_by_more_than_the_tolerance_disagrees():
    moved = REFERENCE.copy()
    moved[0, 1, 2] += 2e-3
    assert detections_agree(moved, REFERENCE) == (False, 2)
    moved[0, 1, 2] = REFERENCE[0, 1, 2] + 5e-4
    assert detections_agree(moved, REFERENCE) == (True, 2)


def test_an_extra_detection_disagrees_unless_it_is_at_the_threshold():
    extra = REFERENCE.copy()
    extra[0, 2, 4] = 0.3
    assert detections_agree(extra, REFERENCE) == (False, 2)
    extra[0, 2, 4] = 0.2505  # within 1e-3 of conf 0.25: either side
    assert detections_agree(extra, REFERENCE) == (True, 2)
