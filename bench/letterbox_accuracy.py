"""Accuracy of a model on non-square held-out samples: square letterbox vs the service's rectangular one.

    python -m bench.letterbox_accuracy [--model BUNDLE_OR_PT] [--count 200] [--aspects 16:9,3:4]

Each held-out synthetic sample (``model.synthetic``'s ``test`` split, rendered at the model's input size) is
centre-cropped to the aspect; boxes are clipped to the crop and kept when at least half of each is inside (the
data set's own rule). The crop is fitted with :func:`service.core.images.letterbox` (rectangular: padded only to
the next multiple of 32) and, for comparison, the same fitted image centred in the full square. mAP as in
``python -m model evaluate``. For a seed-recipe ``xy`` model the rectangular input changes what AKConv computes
(its sampling grid is scrambled on non-square maps), so this is the measurement that decides for ``ij`` models.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np
import torch
from ultralytics.utils.metrics import ap_per_class

from model.build import fuse_for_inference
from model.checkpoint import load
from model.evaluate import match_detections
from model.letterbox import PAD_VALUE
from model.synthetic import MIN_INSIDE_FRACTION, SPLITS, render
from service.core.images import Decoded, Letterbox, letterbox, unletterbox_boxes


def crop(image: np.ndarray, truth: np.ndarray, aspect: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Centre crop of a square (S, S, 3) ``image`` to ``aspect`` (width, height); ``truth`` (m, 5) boxes clipped."""
    size = image.shape[0]
    width, height = aspect
    crop_w, crop_h = (size, round(size * height / width)) if width >= height else (round(size * width / height), size)
    left, top = (size - crop_w) // 2, (size - crop_h) // 2
    boxes = truth[:, 1:] - [left, top, left, top]
    clipped = boxes.clip(0, [crop_w, crop_h, crop_w, crop_h])
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    inside = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
    keep = inside >= MIN_INSIDE_FRACTION * area
    cropped = np.ascontiguousarray(image[top : top + crop_h, left : left + crop_w])
    return cropped, np.concatenate([truth[keep, :1], clipped[keep]], axis=1)


def square(tensor: torch.Tensor, geometry: Letterbox, size: int) -> tuple[torch.Tensor, Letterbox]:
    """The rectangular letterbox (3, H, W) centred in a (3, size, size) grey canvas: the square letterbox."""
    _, height, width = tensor.shape
    top, left = (size - height) // 2, (size - width) // 2
    canvas = torch.full((3, size, size), PAD_VALUE, dtype=torch.uint8)
    canvas[:, top : top + height, left : left + width] = tensor
    return canvas, dataclasses.replace(geometry, pad_x=geometry.pad_x + left, pad_y=geometry.pad_y + top)


@torch.inference_mode()
def evaluate(detector: torch.nn.Module, size: int, aspect: tuple[int, int], count: int, shape: str) -> dict:
    hits, scores, classes, truth_classes = [], [], [], []
    for seed in range(SPLITS["test"], SPLITS["test"] + count):
        image, truth = crop(*render(seed, size), aspect)
        tensor, geometry = letterbox(Decoded(image, image.shape[1], image.shape[0]), size)
        if shape == "square":
            tensor, geometry = square(tensor, geometry, size)
        rows = detector(tensor[None].float() / 255)[0].numpy()  # (K, 6) in input pixels
        rows = rows[rows[:, 4] > 0.001]
        rows[:, :4] = unletterbox_boxes(rows[:, :4].astype(np.float64), geometry)
        hits.append(match_detections(rows, truth))
        scores.append(rows[:, 4])
        classes.append(rows[:, 5])
        truth_classes.append(truth[:, 0])
    ap = ap_per_class(
        np.concatenate(hits), np.concatenate(scores), np.concatenate(classes), np.concatenate(truth_classes)
    )[5]
    return {"mAP50": round(float(ap[:, 0].mean()), 4), "mAP50-95": round(float(ap.mean()), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="bundle or .pt; default: the bundled model")
    parser.add_argument("--count", type=int, default=200, help="held-out samples per aspect")
    parser.add_argument("--aspects", default="16:9,3:4", help="width:height, comma-separated")
    args = parser.parse_args()
    loaded = load(args.model)
    detector = fuse_for_inference(loaded.model)
    size = loaded.metadata.input_size
    for text in args.aspects.split(","):
        aspect = tuple(int(part) for part in text.split(":"))
        for shape in ("square", "rectangular"):
            result = evaluate(detector, size, aspect, args.count, shape)
            print(json.dumps({"model": loaded.metadata.name, "aspect": text, "letterbox": shape, **result}))


if __name__ == "__main__":
    main()
