"""Matching detections to ground truth, as the held-out evaluation and the quality floors count them."""

import numpy as np

from model.evaluate import MatchCounts, match_detections

TRUTH = np.array([[0, 10, 10, 50, 50], [1, 100, 100, 140, 160]], dtype=np.float32)  # [class, x1, y1, x2, y2]


def detection(box: list[float], score: float, class_id: int) -> list[float]:
    return [*box, score, class_id]


def test_the_most_confident_detection_takes_a_box_and_a_duplicate_does_not():
    detections = np.array(
        [
            detection([11, 11, 50, 50], 0.6, 0),  # IoU 0.95
            detection([10, 10, 50, 52], 0.9, 0),  # IoU 0.95, more confident: it takes the box
            detection([100, 100, 140, 160], 0.8, 0),  # right place, wrong class
        ],
        dtype=np.float32,
    )
    hits = match_detections(detections, TRUTH, np.array([0.5, 0.99]))
    assert hits.tolist() == [[False, False], [True, False], [False, False]]


def test_an_empty_side_matches_nothing():
    assert match_detections(np.zeros((0, 6), np.float32), TRUTH).shape == (0, 10)
    assert not match_detections(np.array([detection([10, 10, 50, 50], 0.9, 0)]), TRUTH[:0]).any()


def test_counts_give_recall_over_boxes_and_precision_over_detections():
    counts = MatchCounts()
    counts.add(np.array([detection([10, 10, 50, 50], 0.9, 0), detection([0, 0, 5, 5], 0.8, 1)]), TRUTH)
    counts.add(np.zeros((0, 6), np.float32), TRUTH[:1])
    assert (counts.hits, counts.detections, counts.truths) == (1, 2, 3)
    assert counts.recall == 1 / 3 and counts.precision == 1 / 2
