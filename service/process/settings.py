"""Every knob of the service, in one class: environment variables ``DETECTOR_*`` and matching CLI flags.

Precedence: CLI flag > environment variable > default. ``DETECTOR_MAX_BATCH_SIZE=16`` and ``--max-batch-size 16``
set the same field. Nothing else in the service reads the environment.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
# A served model's name goes into URLs (/v2/models/NAME) and metric labels.
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# How a model runs on the CPU: PyTorch itself, or an artefact built ahead by ``python -m model compile --runtime``
# (model.compiled.RUNTIMES; model/README.md, "Compiled runtimes").
Runtime = Literal["eager", "aotinductor", "openvino", "int8"]


class Settings(BaseSettings):
    """Service settings; validated at start-up, so a bad value stops the process with a message.

    Admission budgets (``service/core/admission.py``; docs/RELIABILITY.md): the defaults keep one replica inside its
    Kubernetes limits (``deploy/k8s/base/deployment.yaml``: memory 4 GiB, ``/tmp`` emptyDir 256 MiB):

    - ``max_body_bytes`` 256 MiB of bodies in memory (a multipart body counts twice: the parser copies its parts);
      nothing is spooled to ``/tmp``;
    - decoding: at most ``decode_threads`` (2) images decode at once, each at most ``max_image_pixels`` (40 M) at
      a peak of 14 bytes per pixel (``python -m bench.decode_memory``: a 6000 × 6000 PNG adds 482 MiB): 2 × 40 M ×
      14 B = 1.1 GB; ``max_decode_pixels`` (100 M) bounds the pixels admitted to decoding (waiting or decoding, and
      the bounded copies kept for drawing, 3 B/px: 0.3 GB), so the backlog a request can wait behind is bounded
      (that PNG decodes in 4 s, 9 M px/s on one thread; a 1 × 40 M px PNG, all rows, takes longer);
    - ``max_inflight_requests`` (128): the queue (64) and a batch (8) plus as many reading or decoding; each holds
      its body (counted above) and a 3 × S × S uint8 model input (0.44 MB at S = 384).

    With the process itself (1.05 GiB resident after start, measured) that is 1.05 + 0.25 + 1.1 + 0.3 + 0.05 ≈
    2.75 GiB at worst, leaving 1.25 GiB of the 4 GiB limit for inference activations and allocator slack.
    Large images (over a tenth of ``max_image_pixels``) decode on at most ``decode_threads - 1`` threads, so one
    thread stays free for small ones.
    """

    model_config = SettingsConfigDict(
        env_prefix="DETECTOR_",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_prog_name="akconv-serve",
        extra="forbid",
    )

    host: str = Field("127.0.0.1", description="interface to listen on (0.0.0.0 in containers)")
    port: int = Field(8000, ge=1, le=65535)
    grpc_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="Open Inference Protocol over gRPC on this port (8001 in the deployments); 0: off",
    )
    model_path: Path | None = Field(None, description="bundle directory or ultralytics .pt; default: bundled model")
    models: dict[str, Path] = Field(
        {},
        description='several models, JSON: {"name": "bundle dir or .pt", ...}; the first is the default, '
        "/detect?model=NAME picks another; instead of model_path",
    )
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N; auto picks cuda when present")
    half: bool | None = Field(None, description="fp16 inference; default: on for CUDA, off on CPU")
    input_size: int | None = Field(
        None, ge=32, le=2048, description="side images are fitted into, padded to multiples of 32; default: the model's"
    )
    max_batch_size: int = Field(8, ge=1, le=64, description="upper bound; warm-up measures which sizes pay")
    # 0: a batch takes whatever queued while the previous one ran (measured best on CPU, bench/README.md);
    # a few ms can pay on a GPU, where a fuller batch costs little more than a small one.
    max_batch_wait_ms: float = Field(0.0, ge=0, le=1000, description="how long a batch waits to fill, from its oldest")
    max_queue: int = Field(64, ge=1, description="requests waiting for inference beyond this are refused with 503")
    request_timeout_s: float = Field(30.0, gt=0, description="deadline from arrival; queued past it -> 504")
    default_conf: float = Field(0.25, ge=0, le=1)
    max_detections: int = Field(100, ge=1, le=300, description="default and upper bound of max_det")
    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1024, description="request body limit (413 beyond)")
    max_image_pixels: int = Field(40_000_000, ge=1, description="decoded width*height limit (422 beyond)")
    max_batch_files: int = Field(16, ge=1, le=64, description="files in one /detect/batch request")
    max_inflight_requests: int = Field(128, ge=1, description="detection requests in flight (503 beyond)")
    max_body_bytes: int = Field(256 * 1024 * 1024, ge=2048, description="request bodies held in memory (503 beyond)")
    max_decode_pixels: int = Field(
        100_000_000, ge=1, description="pixels of images waiting to decode or decoding (503 beyond)"
    )
    runtime: Runtime | dict[str, Runtime] = Field(
        "eager",
        description="eager, aotinductor, openvino or int8 (OpenVINO int8 that passed its accuracy gate): run the "
        "artefacts python -m model compile --runtime RUNTIME built in compiled_dir (CPU); a shape without a usable one "
        'runs eager, with a log line. Per model, JSON: {"name": "int8", ...} (names of models; others run eager)',
    )
    compiled_dir: Path | None = Field(
        None,
        description="where python -m model compile put the runtime's artefacts; default: "
        "~/.cache/akconv-detector/compiled. Artefacts are native code or model graphs: the folder must be as trusted "
        "as the installation",
    )
    intra_op_threads: int | None = Field(None, ge=1, description="torch intra-op threads; default: torch's")
    inference_workers: int | None = Field(
        None,
        ge=1,
        le=64,
        description="batches a model runs at once, sharing its threads (a lone batch gets them all); default: 2 on a "
        "CPU (1 with one thread), 1 on a GPU",
    )
    decode_threads: int = Field(2, ge=1, le=64, description="threads decoding and letterboxing images")
    max_header_bytes: int = Field(16 * 1024, ge=1024, le=1024 * 1024, description="request headers (431 beyond)")
    header_timeout_s: float = Field(
        10.0, gt=0, description="a request's headers must arrive within this, from connecting or the last response"
    )
    # With refusals lingering (service/process/server.py) a replica holds up to 2 * 400 client sockets: room under the
    # 1,024 file limit common in containers for its own ~10 files, uploads spooled to disk and the model's files.
    max_connections: int = Field(400, ge=1, description="open connections; the next one gets 503 and is closed")
    api_key: SecretStr | None = Field(None, description="when set, requests need X-API-Key or a Bearer token")
    metrics_require_key: bool = Field(False, description="put /metrics behind the API key too; probes stay open")
    cors_origins: list[str] = Field([], description="origins browsers may call the API from; empty: CORS off")
    warmup_rounds: int = Field(
        1, ge=0, le=20, description="timed warm-up forwards per batch size and shape (batch policy); 0: not measured"
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not _DEVICE.match(value):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {value!r}")
        return value

    @field_validator("models")
    @classmethod
    def _model_names(cls, value: dict[str, Path]) -> dict[str, Path]:
        for name in value:
            if not MODEL_NAME.match(name):
                raise ValueError(
                    f"model name {name!r} must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or "
                    "digit"
                )
        return value

    @field_validator("input_size")
    @classmethod
    def _multiple_of_stride(cls, value: int | None) -> int | None:
        if value is not None and value % 32:
            raise ValueError(f"input_size must be a multiple of 32 (the model's largest stride), got {value}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.max_queue < self.max_batch_size:
            raise ValueError(f"max_queue ({self.max_queue}) must be >= max_batch_size ({self.max_batch_size})")
        if self.max_body_bytes < 2 * self.max_upload_bytes:
            raise ValueError(
                f"max_body_bytes ({self.max_body_bytes}) must be >= 2 * max_upload_bytes ({self.max_upload_bytes}): "
                "a multipart body counts twice"
            )
        if self.max_decode_pixels < self.max_image_pixels:
            raise ValueError(
                f"max_decode_pixels ({self.max_decode_pixels}) must be >= max_image_pixels ({self.max_image_pixels})"
            )
        if self.models and self.model_path is not None:
            raise ValueError("set model_path (one model) or models (several), not both")
        if self.grpc_port == self.port:
            raise ValueError(f"grpc_port ({self.grpc_port}) must differ from port")
        if self.metrics_require_key and self.api_key is None:
            raise ValueError("metrics_require_key needs an api_key to require")
        runtimes = set(self.runtime.values()) if isinstance(self.runtime, dict) else {self.runtime}
        if self.compiled_dir is not None and runtimes <= {"eager"}:
            # compiled_dir alone used to turn AOTInductor on: refuse, rather than run eager without a word.
            raise ValueError(
                "compiled_dir is read by runtime aotinductor, openvino or int8 only: set runtime aotinductor (what "
                "compiled_dir alone meant before) or leave compiled_dir unset"
            )
        if runtimes - {"eager"} and (self.device.startswith("cuda") or self.half):
            raise ValueError("runtime aotinductor, openvino and int8 run on the CPU in float32: set device cpu or auto")
        if isinstance(self.runtime, dict):
            if not self.models:
                raise ValueError("a runtime per model needs models; with model_path give one runtime")
            unknown = sorted(set(self.runtime) - set(self.models))
            if unknown:
                raise ValueError(f"runtime names models that models does not serve: {', '.join(unknown)}")
        return self

    def runtime_for(self, model: str | None) -> Runtime:
        """The runtime of the model served as ``model`` (None: the one model of ``model_path``)."""
        if isinstance(self.runtime, dict):
            return self.runtime.get(model or "", "eager")
        return self.runtime

    def public(self) -> dict[str, Any]:
        """The effective settings with secrets masked, for ``GET /v1/config``."""
        values = self.model_dump(mode="json")
        values["api_key"] = "********" if self.api_key else None
        return values


def settings_from_cli(argv: list[str]) -> Settings:
    """Settings from CLI flags over the environment (``--help`` lists every flag)."""
    return Settings(_cli_parse_args=argv)
