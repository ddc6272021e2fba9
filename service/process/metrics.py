"""Every Prometheus metric of the service, defined once. Names and labels are fixed: dashboards and alerts use
them. Each :class:`Metrics` owns its registry, so several apps (tests) can live in one process.

What belongs to one served model (its queue, batches, inference time, detections, version) carries a ``model`` label,
the served name (``/detect?model=NAME``); requests, admission and decoding are the process's.

When tracing is on, the latency histograms keep the trace of a sampled observation as its bucket's exemplar
(:class:`TracedHistogram`); exemplars are exported only in OpenMetrics, for a scrape that asks for it
(``Accept: application/openmetrics-text``, as Prometheus does)."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, choose_encoder, generate_latest

from service.process import tracing

# From sub-millisecond GPU batches to multi-second CPU queues (seconds).
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
    1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 30.0, 60.0,
)  # fmt: skip
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
disable_created_metrics()  # no *_created series: dashboards don't use them and they double the exposition

REJECTION_REASONS = (
    "overloaded",
    "queue_full",
    "deadline",
    "client_gone",
    "slow_upload",
    "too_large",
    "bad_input",
    "unauthorized",
)


class TracedHistogram(Histogram):
    """A histogram whose observations made in a sampled span carry it as their exemplar (trace_id, span_id)."""

    def observe(self, amount: float, exemplar: dict[str, str] | None = None) -> None:
        super().observe(amount, exemplar if exemplar is not None else tracing.exemplar())


class Metrics:
    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        """One answered request, by either front door (gRPC calls with the REST status of their outcome)."""
        self.requests.labels(endpoint, str(status)).inc()
        self.request_duration.labels(endpoint).observe(seconds)

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        # The process's resident memory, CPU time and open files (process_*), for the DetectorMemoryGrowing alert.
        ProcessCollector(registry=registry)
        self.requests = Counter(
            "detector_requests", "HTTP requests answered", ["endpoint", "status"], registry=registry
        )
        self.request_duration = TracedHistogram(
            "detector_request_duration_seconds", "Request latency, arrival to response", ["endpoint"],
            buckets=LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.queue_wait = TracedHistogram(
            "detector_queue_wait_seconds", "Time an image waited in the batch queue", ["model"],
            buckets=LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.preprocess_duration = TracedHistogram(
            "detector_preprocess_duration_seconds", "Decode and letterbox time per image", buckets=LATENCY_BUCKETS,
            registry=registry,
        )  # fmt: skip
        self.inference_duration = TracedHistogram(
            "detector_inference_duration_seconds", "Model time per batch (transfer, forward, copy back)", ["model"],
            buckets=LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.batch_size = Histogram(
            "detector_batch_size", "Images per inference batch", ["model"], buckets=BATCH_SIZE_BUCKETS,
            registry=registry,
        )  # fmt: skip
        self.queue_depth = Gauge("detector_queue_depth", "Images waiting for inference", ["model"], registry=registry)
        self.queue_capacity = Gauge(
            "detector_queue_capacity", "Images that may wait before requests are refused (max_queue)", ["model"],
            registry=registry,
        )  # fmt: skip
        self.admission_in_use = Gauge(
            "detector_admission_in_use", "Units of an admission budget in use (requests, body_bytes, decode_pixels)",
            ["budget"], registry=registry,
        )  # fmt: skip
        self.admission_capacity = Gauge(
            "detector_admission_capacity", "Capacity of an admission budget; requests beyond it are refused with 503",
            ["budget"], registry=registry,
        )  # fmt: skip
        self.inflight = Gauge("detector_inflight_requests", "Detection requests being handled", registry=registry)
        self.ready = Gauge("detector_ready", "1 when warmed up and not draining", registry=registry)
        self.rejected = Counter(
            "detector_rejected", "Requests refused or dropped, by reason", ["reason"], registry=registry
        )
        self.detections = Counter(
            "detector_detections",
            "Detections returned, by model and class",
            ["model", "class_name"],
            registry=registry,
        )
        self.model_info = Info("detector_model", "The live version of each served model", ["model"], registry=registry)
        self.model_loads = Counter(
            "detector_model_loads", "Loads of a model's file by outcome: loaded, unchanged, failed",
            ["model", "outcome"], registry=registry,
        )  # fmt: skip
        self.gpu_memory = Gauge("detector_gpu_memory_bytes", "CUDA memory of this process", ["kind"], registry=registry)
        for reason in REJECTION_REASONS:
            self.rejected.labels(reason)  # export zeros, so rate() works before the first rejection

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition and its content type: OpenMetrics (with exemplars) when ``accept`` (the scrape's
        ``Accept`` header) asks for ``application/openmetrics-text``, else Prometheus' text format."""
        if accept and "application/openmetrics-text" in accept:
            encoder, content_type = choose_encoder(accept)
            return encoder(self.registry), content_type
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
