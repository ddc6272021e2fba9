"""The bundled model through the service at any image size: held-out samples rendered at 640 and 1280 px (square
and 16:9), sent as JPEG files to ``/detect``.

Issue 19 asks for recall and precision of at least 0.90 at confidence 0.25. Measured on these 30 seeds (2026-11-29,
bundle 2026-11-29): recall 0.94-0.96, asserted at the issue's bar. Precision of the plain answers 0.86-0.88 (0.85-0.87
on 100 other seeds), asserted at 0.83, three points under the lowest: about a third of the false positives are a
second box on an object already found (the one-to-one head, trained on two CPU cores, is short of convergence).
With ``dedupe=0.5`` (one box where boxes overlap above IoU 0.5) precision is 0.91-0.93, asserted at the
issue's 0.90, and recall is unchanged. mAP50 0.96-0.98 and mAP50-95 0.79-0.84, asserted at the held-out bars
(0.90, 0.70)."""

import asyncio

import pytest

from bench.service_accuracy import measure
from model.synthetic import SPLITS
from service.process.settings import Settings

pytestmark = pytest.mark.slow

SEEDS = range(SPLITS["test"] + 20_000, SPLITS["test"] + 20_030)  # outside every training, validation or test range
SIZES = [640, 1280]
ASPECTS = [1.0, 16 / 9]


def accuracy_by_size(dedupe: float | None) -> dict[tuple[int, float], dict]:
    settings = Settings(device="cpu", warmup_rounds=0, max_detections=300)
    rows = asyncio.run(asyncio.wait_for(measure(settings, SIZES, ASPECTS, SEEDS, dedupe), 600))
    return {(row["size"], row["aspect"]): row for row in rows}


@pytest.fixture(scope="module")
def accuracy() -> dict[tuple[int, float], dict]:
    return accuracy_by_size(dedupe=None)


@pytest.fixture(scope="module")
def deduped_accuracy() -> dict[tuple[int, float], dict]:
    return accuracy_by_size(dedupe=0.5)


@pytest.mark.parametrize("aspect", ASPECTS, ids=["square", "16:9"])
@pytest.mark.parametrize("size", SIZES)
def test_the_bundled_model_finds_nine_in_ten_objects_at_any_size(accuracy, size, aspect):
    row = accuracy[(size, round(aspect, 4))]
    assert row["ground_truth_boxes"] > 100
    assert row["recall@0.25"] >= 0.90, row
    assert row["precision@0.25"] >= 0.83, row
    assert row["mAP50"] >= 0.90 and row["mAP50-95"] >= 0.70, row


@pytest.mark.parametrize("aspect", ASPECTS, ids=["square", "16:9"])
@pytest.mark.parametrize("size", SIZES)
def test_with_dedupe_nine_in_ten_answers_are_objects_at_any_size(accuracy, deduped_accuracy, size, aspect):
    plain, deduped = accuracy[(size, round(aspect, 4))], deduped_accuracy[(size, round(aspect, 4))]
    assert deduped["precision@0.25"] >= 0.90 and deduped["recall@0.25"] >= 0.90, deduped
    assert deduped["precision@0.25"] > plain["precision@0.25"]
    assert deduped["recall@0.25"] >= plain["recall@0.25"] - 0.02, (plain, deduped)  # measured: the same
    assert deduped["mAP50"] >= 0.90 and deduped["mAP50-95"] >= 0.70, deduped
