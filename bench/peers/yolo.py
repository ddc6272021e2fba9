"""What both peers share: the ultralytics model from a ``.pt`` or a bundle, and its results as the service's JSON."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bench.peers.export_pt import export_pt
from model.checkpoint import DEFAULT_BUNDLE  # importing ``model`` first makes ultralytics offline (model.offline)

EXPORT_DIR = Path(tempfile.gettempdir()) / "akconv-detector" / "peers"


def checkpoint_path(model_path: Path | None) -> Path:
    """An ultralytics ``.pt`` for ``model_path``: itself when it is one, else the bundle exported once to a temp dir."""
    if model_path is not None and model_path.suffix == ".pt":
        return model_path
    bundle = (model_path or DEFAULT_BUNDLE).resolve()
    out = EXPORT_DIR / f"{bundle.name}.pt"
    if not out.exists() or out.stat().st_mtime < max(p.stat().st_mtime for p in bundle.iterdir()):
        export_pt(out, bundle)
    return out


def load_yolo(model_path: Path | None) -> Any:
    """``ultralytics.YOLO`` on the checkpoint; imported here so that ``model.offline`` has run before it."""
    from ultralytics import YOLO

    return YOLO(str(checkpoint_path(model_path)), task="detect")


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


def predict_options(imgsz: int, device: str | None, half: bool, rect: bool) -> dict[str, Any]:
    """Keyword arguments of ``YOLO.predict`` shared by the peers.

    Both keep the peers doing the service's work, so that a comparison measures the serving, not the model:
    ``nms=False`` selects the one-to-one (NMS-free) head of the v10 model, the one the service answers from
    (ultralytics 8.4 otherwise predicts with the one-to-many head and NMS); the letterbox is square, ``imgsz`` ×
    ``imgsz``, as in the service, unless ``rect``: ultralytics' default, the smallest stride-multiple rectangle,
    which feeds the model fewer pixels for non-square photos.
    """
    return {
        "imgsz": imgsz,
        "device": device,
        "quantize": 16 if half else None,
        "rect": rect,
        "nms": False,
        "verbose": False,
    }
