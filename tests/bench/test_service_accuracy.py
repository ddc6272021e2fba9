"""The scoring of ``bench.service_accuracy`` on hand-made answers; the served model's own numbers are in
``tests/service/test_accuracy.py``."""

import numpy as np
import pytest

from bench.service_accuracy import _aspect, rows, score

TRUTH = np.array([[0, 10, 10, 50, 50], [1, 100, 100, 160, 150]], dtype=np.float32)


def test_every_box_found_once_scores_one():
    detections = np.array([[10, 10, 50, 50, 0.9, 0], [100, 100, 160, 150, 0.8, 1]], dtype=np.float32)
    result = score([(detections, TRUTH)])
    assert result["ground_truth_boxes"] == 2
    assert result["precision@0.25"] == result["recall@0.25"] == 1.0
    assert result["mAP50"] >= 0.99  # ultralytics' 101-point interpolation tops out at 0.995


def test_precision_and_recall_count_only_confident_detections():
    detections = np.array(
        [
            [10, 10, 50, 50, 0.9, 0],
            [100, 100, 160, 150, 0.1, 1],  # right, but below 0.25
            [200, 200, 240, 240, 0.6, 0],  # nothing there
            [10, 10, 50, 50, 0.5, 1],  # the right box, the wrong class
        ],
        dtype=np.float32,
    )
    result = score([(detections, TRUTH)])
    assert result["recall@0.25"] == 0.5
    assert result["precision@0.25"] == pytest.approx(1 / 3, abs=1e-4)
    assert 0.5 < result["mAP50"] < 1.0, "the low-scored box still counts towards mAP"


def test_answer_rows_and_aspects():
    answer = {"detections": [{"class_id": 1, "confidence": 0.5, "box": {"x1": 1, "y1": 2, "x2": 3, "y2": 4}}]}
    np.testing.assert_array_equal(rows(answer), [[1, 2, 3, 4, 0.5, 1]])
    assert rows({"detections": []}).shape == (0, 6)
    assert _aspect("16:9") == pytest.approx(16 / 9) and _aspect("1") == 1.0
