"""Accuracy of a model on held-out synthetic samples, through the serving path (fused, one-to-one head, no NMS).

    python -m model evaluate [BUNDLE_OR_PT] --count 500

Seeds default to the ``test`` split of :mod:`model.synthetic` (never used for training or model selection).
mAP is ultralytics' ``ap_per_class`` over IoU 0.50:0.95; precision and recall are counted at confidence 0.25.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torchvision.ops import box_iou
from ultralytics.utils.metrics import ap_per_class

from model.build import fuse_for_inference
from model.checkpoint import load
from model.synthetic import SPLITS, render

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
CONFIDENCE = 0.25  # precision and recall are counted at this confidence (the service's default ``conf``)


def match_detections(
    detections: np.ndarray, truth: np.ndarray, iou_thresholds: np.ndarray = IOU_THRESHOLDS
) -> np.ndarray:
    """Greedy matching, most confident detection first, one ground-truth box per detection and threshold.

    Args:
        detections: (n, 6) rows ``[x1, y1, x2, y2, score, class]``.
        truth: (m, 5) rows ``[class, x1, y1, x2, y2]``.

    Returns:
        Bool array (n, len(iou_thresholds)): detection i is a true positive at threshold j.
    """
    hits = np.zeros((len(detections), len(iou_thresholds)), dtype=bool)
    if not len(detections) or not len(truth):
        return hits
    iou = box_iou(torch.as_tensor(detections[:, :4]), torch.as_tensor(truth[:, 1:])).numpy()
    iou[detections[:, 5][:, None] != truth[:, 0][None, :]] = 0
    order = np.argsort(-detections[:, 4], kind="stable")
    for j, threshold in enumerate(iou_thresholds):
        taken = np.zeros(len(truth), dtype=bool)
        for i in order:
            candidates = np.where(~taken & (iou[i] >= threshold), iou[i], 0)
            best = int(candidates.argmax())
            if candidates[best] > 0:
                taken[best] = hits[i, j] = True
    return hits


@dataclass
class MatchCounts:
    """Detections matched to ground truth at IoU >= 0.5, accumulated over images."""

    hits: int = 0  # detections that matched a box (= boxes found)
    detections: int = 0
    truths: int = 0

    def add(self, detections: np.ndarray, truth: np.ndarray) -> None:
        """``detections`` (n, 6) already filtered by confidence; ``truth`` (m, 5) as in :func:`match_detections`."""
        self.hits += int(match_detections(detections, truth, IOU_THRESHOLDS[:1])[:, 0].sum())
        self.detections += len(detections)
        self.truths += len(truth)

    @property
    def recall(self) -> float:
        return self.hits / max(self.truths, 1)

    @property
    def precision(self) -> float:
        return self.hits / max(self.detections, 1)


@torch.inference_mode()
def detect_synthetic(detector: torch.nn.Module, seeds: range, size: int, input_size: int, batch: int = 8):
    """Yield ``(detections (300, 6) ndarray, truth (m, 5) ndarray)`` for each seed, ``batch`` images at a time.

    Samples are rendered at ``size`` px and resized to the model's ``input_size`` px as the service's letterbox does
    (bilinear; the images are square, so there is no padding); detections come back in the rendered image's pixels.
    """
    scale = size / input_size
    for start in range(seeds.start, seeds.stop, batch):
        samples = [render(seed, size) for seed in range(start, min(start + batch, seeds.stop))]
        pixels = [cv2.resize(image, (input_size, input_size), interpolation=cv2.INTER_LINEAR) for image, _ in samples]
        images = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 255
        for output, (_, truth) in zip(detector(images), samples, strict=True):
            detections = output.numpy()
            detections[:, :4] *= scale
            yield detections, truth


def evaluate_synthetic(
    model_path: str | Path | None = None, count: int = 500, first_seed: int | None = None, size: int | None = None
) -> dict[str, float | int | str]:
    """mAP50, mAP50-95, and precision/recall at confidence 0.25 on ``count`` synthetic seeds.

    ``size``: the side of the rendered images (default: the model's input size); the model always sees its input size.
    """
    loaded = load(model_path)
    input_size = loaded.metadata.input_size
    size = size or input_size
    first_seed = SPLITS["test"] if first_seed is None else first_seed
    detector = fuse_for_inference(loaded.model)
    seeds = range(first_seed, first_seed + count)
    results = (
        (detections[detections[:, 4] > 0.001], truth)
        for detections, truth in detect_synthetic(detector, seeds, size, input_size)
    )
    return {
        "model": str(model_path or "bundled default"),
        "images": count,
        "first_seed": first_seed,
        "size": size,
        "input_size": input_size,
        **score(results),
    }


def score(results: Iterable[tuple[np.ndarray, np.ndarray]]) -> dict[str, float | int]:
    """mAP50, mAP50-95 (ultralytics' ``ap_per_class``) and precision/recall at confidence :data:`CONFIDENCE` of
    ``(detections (n, 6), truth (m, 5))`` pairs, rows as in :func:`match_detections`."""
    hits, scores, classes, truth_classes = [], [], [], []
    confident = MatchCounts()
    for detections, truth in results:
        hits.append(match_detections(detections, truth))
        scores.append(detections[:, 4])
        classes.append(detections[:, 5])
        truth_classes.append(truth[:, 0])
        confident.add(detections[detections[:, 4] >= CONFIDENCE], truth)
    ap = ap_per_class(
        np.concatenate(hits), np.concatenate(scores), np.concatenate(classes), np.concatenate(truth_classes)
    )[5]  # (classes, 10)
    return {
        "ground_truth_boxes": confident.truths,
        "mAP50": round(float(ap[:, 0].mean()), 4),
        "mAP50-95": round(float(ap.mean()), 4),
        "precision@0.25": round(confident.precision, 4),
        "recall@0.25": round(confident.recall, 4),
    }
