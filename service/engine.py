"""The model on its device: loaded once, fused, warmed up; runs one batch; turns raw rows into detections.

Knows nothing of HTTP or queues. The contract it relies on is :class:`model.Detector`'s: images (B, 3, S, S) in
[0, 1] -> (B, K, 6) rows ``[x1, y1, x2, y2, score, class]`` in input pixels, from the one-to-one head, sorted by
score, no NMS.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from model import Detector, akconv_layers, fuse_for_inference, load
from service.config import Settings
from service.images import Letterbox, unletterbox_boxes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Detection:
    class_id: int
    class_name: str
    confidence: float
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in original-image pixels


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name} was asked for but CUDA is not available; use --device cpu or auto")
    return device


class Engine:
    """Loads the model (``model.load``), fuses it, and moves it to the device (channels-last, fp16 on CUDA)."""

    def __init__(self, settings: Settings) -> None:
        """Raises: ``model.checkpoint.CheckpointError`` (one of its kinds) when the model file cannot be used."""
        if settings.intra_op_threads:
            torch.set_num_threads(settings.intra_op_threads)
        loaded = load(settings.model_path)
        self.metadata = loaded.metadata
        self.checksum = loaded.checksum  # "verified", "not recorded" (format 1 bundle) or "not applicable" (.pt)
        self.names = list(loaded.metadata.names)
        self.device = resolve_device(settings.device)
        half = settings.half if settings.half is not None else self.device.type == "cuda"
        self.dtype = torch.float16 if half else torch.float32
        self.input_size = settings.input_size or loaded.metadata.input_size
        self.akconv_layers = len(akconv_layers(loaded.model))
        self.parameters = sum(p.numel() for p in loaded.model.parameters())
        self.detector: Detector = fuse_for_inference(loaded.model).to(self.device, self.dtype)
        self.detector = self.detector.to(memory_format=torch.channels_last)
        self.max_rows = self.detector.max_det

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def version(self) -> str:
        return self.metadata.version

    def warm_up(self, max_batch_size: int, rounds: int) -> None:
        """Run every batch size the batcher can form, so kernels and allocator pools are ready before traffic."""
        for batch_size in range(1, max_batch_size + 1):
            images = [torch.full((3, self.input_size, self.input_size), 114, dtype=torch.uint8)] * batch_size
            for _ in range(rounds):
                self.infer(images)
        log.info("warmed up", extra={"batch_sizes": max_batch_size, "rounds": rounds})

    @torch.inference_mode()
    def infer(self, images: list[torch.Tensor]) -> torch.Tensor:
        """Args: images, each uint8 (3, S, S). Returns: float32 CPU tensor (B, K, 6), see the module docstring."""
        batch = torch.stack(images)  # (B, 3, S, S) uint8
        if self.device.type == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        batch = batch.to(self.dtype).div_(255).contiguous(memory_format=torch.channels_last)
        return self.detector(batch).float().cpu()

    def detections(
        self, rows: torch.Tensor, geometry: Letterbox, conf: float, classes: set[int] | None, max_det: int
    ) -> list[Detection]:
        """Rows (K, 6) of one image -> detections in its original pixels, filtered and capped."""
        rows_np = rows.numpy()
        keep = rows_np[:, 4] >= conf
        if classes is not None:
            keep &= np.isin(rows_np[:, 5].astype(int), list(classes))
        rows_np = rows_np[keep][:max_det]  # rows are sorted by score
        boxes = unletterbox_boxes(rows_np[:, :4].astype(np.float64), geometry)
        return [
            Detection(int(c), self.names[int(c)], round(float(s), 4), tuple(round(float(v), 1) for v in box))
            for box, s, c in zip(boxes, rows_np[:, 4], rows_np[:, 5], strict=True)
        ]

    def gpu_memory(self) -> dict[str, int]:
        """CUDA memory in bytes by kind (empty on CPU)."""
        if self.device.type != "cuda":
            return {}
        return {
            "allocated": torch.cuda.memory_allocated(self.device),
            "reserved": torch.cuda.memory_reserved(self.device),
        }
