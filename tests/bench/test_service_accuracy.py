"""How ``bench.service_accuracy`` reads answers and aspects; its scoring is ``model.evaluate.score``
(``tests/model/test_evaluate.py``), the served model's own numbers are in ``tests/service/core/test_accuracy.py``."""

import numpy as np
import pytest

from bench.service_accuracy import _aspect, rows


def test_answer_rows_and_aspects():
    answer = {"detections": [{"class_id": 1, "confidence": 0.5, "box": {"x1": 1, "y1": 2, "x2": 3, "y2": 4}}]}
    np.testing.assert_array_equal(rows(answer), [[1, 2, 3, 4, 0.5, 1]])
    assert rows({"detections": []}).shape == (0, 6)
    assert _aspect("16:9") == pytest.approx(16 / 9) and _aspect("1") == 1.0
