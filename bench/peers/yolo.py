"""What the project-model peers share: the ultralytics model from a ``.pt`` or a bundle, and predict's options."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

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
