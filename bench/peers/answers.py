"""Peers' answers: uploaded bytes to a PIL image, ultralytics ``Results`` to the service's JSON.

Kept apart from :mod:`bench.peers.yolo`, which imports the project's ``model`` package: that import changes
ultralytics' thread settings, and the recipe user's server must run with the ones ultralytics gives it.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image


def decode_rgb(data: bytes) -> Image.Image:
    """Uploaded bytes -> RGB PIL image (ultralytics reads PIL images as RGB, numpy arrays as BGR)."""
    return Image.open(io.BytesIO(data)).convert("RGB")


def detections_json(result: Any) -> dict[str, Any]:
    """One ultralytics ``Results`` as the service's response fields: image size and detections in image pixels."""
    boxes = result.boxes
    xyxy = boxes.xyxy.cpu().numpy().astype(np.float64)
    height, width = result.orig_shape
    return {
        "image": {"width": int(width), "height": int(height)},
        "detections": [
            {
                "class_id": int(class_id),
                "class_name": result.names[int(class_id)],
                "confidence": round(float(score), 4),
                "box": dict(zip(("x1", "y1", "x2", "y2"), (round(float(v), 1) for v in box), strict=True)),
            }
            for box, score, class_id in zip(xyxy, boxes.conf.cpu().numpy(), boxes.cls.cpu().numpy(), strict=True)
        ],
    }
