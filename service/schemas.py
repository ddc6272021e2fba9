"""What the API answers, torch-free: the response models (requests are images, described in the routes' OpenAPI
bodies) and :class:`Detection`, the service's own record of one detected object. The client and the annotator
import only this module, so neither needs torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


@dataclass(frozen=True)
class Detection:
    class_id: int
    class_name: str
    confidence: float
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in original-image pixels


class Box(BaseModel):
    x1: float = Field(description="left, original-image pixels")
    y1: float = Field(description="top, original-image pixels")
    x2: float = Field(description="right, original-image pixels")
    y2: float = Field(description="bottom, original-image pixels")


class DetectionOut(BaseModel):
    class_id: int
    class_name: str
    confidence: float = Field(ge=0, le=1)
    box: Box


class ModelRef(BaseModel):
    name: str
    version: str


class ImageSize(BaseModel):
    width: int
    height: int


class Timings(BaseModel):
    queue: float = Field(description="ms waiting for a batch")
    preprocess: float = Field(description="ms decoding and letterboxing")
    inference: float = Field(description="ms of the batch this image ran in")
    postprocess: float = Field(description="ms mapping boxes back")
    total: float = Field(description="ms from arrival to response")


class DetectResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "request_id": "5f0c3b0e9d2a4d0c",
                "file": "photo.jpg",
                "model": {"name": "yolov10n-akconv", "version": "2026-11-29"},
                "image": {"width": 810, "height": 1080},
                "detections": [
                    {
                        "class_id": 1,
                        "class_name": "star",
                        "confidence": 0.91,
                        "box": {"x1": 12.5, "y1": 40.0, "x2": 96.0, "y2": 130.2},
                    }
                ],
                "timings_ms": {"queue": 4.1, "preprocess": 6.3, "inference": 48.0, "postprocess": 0.2, "total": 60.1},
                "batch_size": 4,
            }
        }
    )

    request_id: str
    file: str | None = Field(None, description="the uploaded file's name (multipart), null for a raw body")
    model: ModelRef
    image: ImageSize
    detections: list[DetectionOut]
    timings_ms: Timings
    batch_size: int = Field(description="images in the inference batch this image ran in")


class ErrorBody(BaseModel):
    code: str = Field(examples=["queue_full"])
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class ProtocolError(BaseModel):
    """An error under ``/v2``, in the Open Inference Protocol's shape."""

    error: str = Field(examples=["no model named 'parts'; this server serves shapes"])


class ImageError(ErrorResponse):
    status: int = Field(description="what /detect answers for this image alone", examples=[422])
    file: str | None = Field(None, description="the uploaded file's name")


class BatchDetectResponse(BaseModel):
    request_id: str
    results: list[DetectResponse | ImageError] = Field(
        description="one per file, in the order sent: its detections, or the error of a file that cannot be used "
        "(unsupported_media_type, undecodable_image, too_many_pixels); the other files are answered all the same"
    )


class ModelInfo(BaseModel):
    name: str
    version: str
    description: str = Field(description="what the model finds, in a sentence")
    classes: list[str]
    input_size: int = Field(
        description="side of the square an image is fitted into; the input itself is the smallest "
        "multiple of 32 that holds the fitted image (640 x 480 for a 4:3 photo at 640)"
    )
    device: str
    dtype: str
    akconv_layers: int
    akconv_indexing: str
    parameters: int
    weights_sha256: str | None = Field(description="sha256 of the bundle's weights file, or of the .pt")
    checksum: str = Field(description="verified, not recorded (format 1 bundle) or not applicable (.pt)")
    provenance: dict[str, Any] = Field(
        description="source (file and sha256, or config and starting weights), data, epochs, val_metrics, date, "
        "project_version, training details"
    )
    runtime: dict[str, Any] = Field(
        description="how the model runs: requested (the runtime setting: eager, aotinductor, openvino or int8), "
        "shapes (per input shape HxW: loaded or built, i.e. the runtime's artefact runs it, or eager and why), and "
        "accuracy (int8: the accuracy gate's record per shape, fp32 and int8 mAP50-95 on held-out data; else null)"
    )
    batch_policy: dict[str, Any] = Field(
        description="batch sizes by input shape: source (measured at warm-up, or configured when warm-up rounds are "
        "0), max_batch_size, and per shape its allowed batch_sizes and the measured ms and images/s per batch size"
    )
    workers: int = Field(
        description="batches the model runs at once (inference_workers), each on a share of its threads; a batch "
        "that runs alone gets them all"
    )


class Health(BaseModel):
    status: str = Field(examples=["ok"])
