"""Matching detections to ground truth, as the held-out evaluation and the quality floors count them."""

import numpy as np
import pytest
import torch

from model.evaluate import MatchCounts, detect_synthetic, match_detections, score
from model.synthetic import render

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


def test_samples_are_resized_to_the_input_size_and_detections_mapped_back():
    """Rendered at 64 px, served at 96 px: a box over the whole input is the whole rendered image."""
    seen_shapes = []

    def whole_image_detector(images: torch.Tensor) -> torch.Tensor:
        seen_shapes.append(tuple(images.shape))
        side = images.shape[-1]
        return torch.tensor([[0, 0, side, side, 0.5, 0]], dtype=torch.float32).expand(len(images), 1, 6).clone()

    results = list(detect_synthetic(whole_image_detector, range(5, 8), size=64, input_size=96))
    assert seen_shapes == [(3, 3, 96, 96)]
    assert [detections.tolist() for detections, _ in results] == [[[0, 0, 64, 64, 0.5, 0]]] * 3
    truths = [truth for _, truth in results]
    assert all(np.array_equal(truth, render(seed, 64)[1]) for seed, truth in zip(range(5, 8), truths, strict=True))


def test_every_box_found_once_scores_one():
    detections = np.array([[10, 10, 50, 50, 0.9, 0], [100, 100, 140, 160, 0.8, 1]], dtype=np.float32)
    result = score([(detections, TRUTH)])
    assert result["ground_truth_boxes"] == 2
    assert result["precision@0.25"] == result["recall@0.25"] == 1.0
    assert result["mAP50"] >= 0.99  # ultralytics' 101-point interpolation tops out at 0.995


def test_precision_and_recall_count_only_confident_detections():
    detections = np.array(
        [
            [10, 10, 50, 50, 0.9, 0],
            [100, 100, 140, 160, 0.1, 1],  # right, but below 0.25
            [200, 200, 240, 240, 0.6, 0],  # nothing there
            [10, 10, 50, 50, 0.5, 1],  # the right box, the wrong class
        ],
        dtype=np.float32,
    )
    result = score([(detections, TRUTH)])
    assert result["recall@0.25"] == 0.5
    assert result["precision@0.25"] == pytest.approx(1 / 3, abs=1e-4)
    assert 0.5 < result["mAP50"] < 1.0, "the low-scored box still counts towards mAP"
