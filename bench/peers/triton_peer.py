"""Peer 4: Triton Inference Server (PyTriton 0.7.0, Triton 2.51) with its dynamic batcher around the project's model.

    .venv-triton/bin/python -m bench.peers.triton_peer [--model BEST.pt|BUNDLE_DIR] [--port 8005] [--grpc-port N]
        [--metrics-port N] [--model-name NAME] [--max-batch-size 8] [--preferred-batch-sizes 4,8]
        [--queue-delay-us 5000] [--instances 1] [--conf 0.25] [--max-det 100]

What a Triton user writes for this model: PyTriton binds a Python callable as a Triton model, and Triton's own HTTP and
gRPC front ends, scheduler and dynamic batcher serve it. Triton's batcher collects requests up to ``max_batch_size``,
preferring the ``preferred_batch_size`` sizes, each request waiting at most ``max_queue_delay_microseconds`` for one to
fill (bench/README.md, "Triton (PyTriton 0.7.0) as a peer", says how the default delay was chosen). The batch reaches
the callable (``@batch``) as one array; one model instance runs one batch at a time. ``--instances N`` is Triton's
instance group count: N callables, each with its own copy of the model's modules (the weights shared; ultralytics'
head caches per-shape anchors, so one module cannot run two shapes at once) and its share of the cores (torch threads
set in its thread at its first call), the way the service runs its ``inference_workers``. The default, one instance
on every core, is what a Triton user writes without tuning.

The model, as Triton's protocol sees it — the service's ``/v2`` door's (:mod:`service.doors.oip`), so that one client
calls both:

- input ``IMAGE``, ``BYTES``, shape ``[B, 1]`` (the batch dimension, then one element): each element an encoded image
  file, sent with the binary tensor data extension;
- outputs ``num_dets`` INT32 ``[B, 1]``, ``det_boxes`` FP32 ``[B, K, 4]`` (x1, y1, x2, y2 in the photo's pixels),
  ``det_scores`` FP32 ``[B, K]``, ``det_classes`` INT32 ``[B, K]``, K = ``max_det`` (the service's default, 100), rows
  past ``num_dets`` zero: TensorRT's EfficientNMS convention, as the service answers.

The work per image is the service's, from the project's own code: :func:`service.core.images.decode` (a JPEG decoded at
a reduced DCT scale when that still covers the input) and :func:`service.core.images.letterbox` (rectangular, to
multiples of 32), the model as :func:`model.checkpoint.load` and :func:`model.build.fuse_for_inference` give it
(channels-last, float32), one forward per letterboxed shape in the batch (as the service's batcher buckets by shape),
detections at ``conf`` or above mapped back with :func:`service.core.images.unletterbox_boxes`. What differs is the
serving: the callable decodes its batch's images one after the other in Triton's single model instance, before the
forward (the service decodes on two threads while the model runs), and every request passes Triton's server process,
its Python backend stub and PyTriton's proxy to this process. An image that fails to decode fails its whole batch.

Threads: left as a Triton user has them. Importing :mod:`model` undoes ultralytics' ``OMP_NUM_THREADS=1`` unless the
environment set it (torch then runs on every usable core, as in the service); no ``OMP_WAIT_POLICY`` is set (the
service sets ``PASSIVE``). Start it with a clean environment (bench.load_rounds does).

Runs in its own virtualenv (``make triton-venv``: PyTriton pins ``numpy<2``). Triton's Python backend stub needs
``libpython3.11.so``: its directory is put on ``LD_LIBRARY_PATH`` here, before Triton starts. Listens on 127.0.0.1
only; ``GET /v2/health/ready`` answers 200 once the model is bound. gRPC and metrics ports default to free ones.
"""

from __future__ import annotations

import argparse
import os
import signal
import sysconfig
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

from bench.processes import free_port

# Importing model configures ultralytics (offline, threads) before importing it.
from model import fuse_for_inference, load, sharing_weights
from service.core.images import Letterbox, decode, letterbox, unletterbox_boxes

MAX_IMAGE_PIXELS = 40_000_000  # the service's default max_image_pixels
MODEL_NAME = "yolov10-akconv"


def detection_outputs(
    rows: list[np.ndarray], geometries: list[Letterbox], conf: float, max_det: int
) -> dict[str, np.ndarray]:
    """The four outputs for B images: each image's rows (K', 6) ``[x1, y1, x2, y2, score, class]`` in model-input
    pixels, sorted by score, kept at ``conf`` or above, at most ``max_det``, boxes in the image's own pixels."""
    count = len(rows)
    num_dets = np.zeros((count, 1), np.int32)  # (B, 1)
    boxes = np.zeros((count, max_det, 4), np.float32)  # (B, K, 4)
    scores = np.zeros((count, max_det), np.float32)  # (B, K)
    classes = np.zeros((count, max_det), np.int32)  # (B, K)
    for index, (image_rows, geometry) in enumerate(zip(rows, geometries, strict=True)):
        kept = image_rows[image_rows[:, 4] >= conf][:max_det]
        found = len(kept)
        num_dets[index, 0] = found
        boxes[index, :found] = unletterbox_boxes(kept[:, :4].astype(np.float64), geometry)
        scores[index, :found] = kept[:, 4]
        classes[index, :found] = kept[:, 5]
    return {"num_dets": num_dets, "det_boxes": boxes, "det_scores": scores, "det_classes": classes}


def infer_function(detector: torch.nn.Module, input_size: int, conf: float, max_det: int, threads: int):
    """The callable Triton runs: a batch of encoded files in, the four outputs out, on ``threads`` torch threads."""

    @batch
    def infer(IMAGE: np.ndarray) -> dict[str, np.ndarray]:  # noqa: N803 (the input's name)
        if torch.get_num_threads() != threads:  # torch's threads are per thread: this instance's own
            torch.set_num_threads(threads)
        files = [bytes(element[0]) for element in IMAGE]  # IMAGE: (B, 1), the encoded files
        prepared = [letterbox(decode(data, MAX_IMAGE_PIXELS, fit=input_size), input_size) for data in files]
        by_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for index, (tensor, _) in enumerate(prepared):
            by_shape[tuple(tensor.shape)].append(index)
        rows: list[np.ndarray] = [np.empty((0, 6), np.float32)] * len(prepared)
        with torch.inference_mode():
            for indices in by_shape.values():
                images = torch.stack([prepared[index][0] for index in indices])  # (b, 3, H, W) uint8
                images = images.float().div_(255).contiguous(memory_format=torch.channels_last)
                output = detector(images)  # (b, K', 6)
                for index, image_rows in zip(indices, output.numpy(), strict=True):
                    rows[index] = image_rows
        return detection_outputs(rows, [geometry for _, geometry in prepared], conf, max_det)

    return infer


def library_path_with_libpython() -> str:
    """``LD_LIBRARY_PATH`` with the directory of this Python's ``libpython3.X.so`` first (Triton's Python backend
    stub links it)."""
    paths = [sysconfig.get_config_var("LIBDIR"), *os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep)]
    return os.pathsep.join(path for path in dict.fromkeys(paths) if path)


def serve(args: argparse.Namespace) -> None:
    # SIGTERM (how bench.load_rounds stops a server) as Ctrl-C: leaving the Triton context then stops Triton and removes
    # its workspace (a copy of Triton in ~/.cache/pytriton), which the default SIGTERM would leave behind.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    loaded = load(args.model)
    input_size = args.imgsz or loaded.metadata.input_size
    detector = fuse_for_inference(loaded.model).to(memory_format=torch.channels_last)
    os.environ["LD_LIBRARY_PATH"] = library_path_with_libpython()
    config = TritonConfig(
        http_address="127.0.0.1",
        http_port=args.port,
        grpc_address="127.0.0.1",
        grpc_port=args.grpc_port or free_port(),
        metrics_port=args.metrics_port or free_port(),
    )
    batcher = DynamicBatcher(
        max_queue_delay_microseconds=args.queue_delay_us, preferred_batch_size=args.preferred_batch_sizes
    )
    with Triton(config=config) as triton:
        threads = max(1, torch.get_num_threads() // args.instances)
        triton.bind(
            model_name=args.model_name,
            infer_func=[
                infer_function(sharing_weights(detector, detector), input_size, args.conf, args.max_det, threads)
                for _ in range(args.instances)
            ],
            inputs=[Tensor(name="IMAGE", dtype=bytes, shape=(1,))],
            outputs=[
                Tensor(name="num_dets", dtype=np.int32, shape=(1,)),
                Tensor(name="det_boxes", dtype=np.float32, shape=(-1, 4)),
                Tensor(name="det_scores", dtype=np.float32, shape=(-1,)),
                Tensor(name="det_classes", dtype=np.int32, shape=(-1,)),
            ],
            config=ModelConfig(max_batch_size=args.max_batch_size, batcher=batcher),
            strict=True,
        )
        print(
            f"triton: model {args.model_name} ({loaded.metadata.name}, input {input_size}) on 127.0.0.1:{args.port} "
            f"(gRPC {config.grpc_port}), max_batch_size {args.max_batch_size}, preferred "
            f"{args.preferred_batch_sizes}, queue delay {args.queue_delay_us} us, {args.instances} instance(s) on "
            f"{threads} torch thread(s) each",
            flush=True,
        )
        triton.serve()


def _sizes(text: str) -> list[int]:
    return [int(size) for size in text.split(",") if size.strip()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="bundle directory or .pt; default: bundled model")
    parser.add_argument("--model-name", default=MODEL_NAME, help="the name Triton serves it under")
    parser.add_argument("--port", type=int, default=8005, help="HTTP")
    parser.add_argument("--grpc-port", type=int, default=0, help="0: a free port")
    parser.add_argument("--metrics-port", type=int, default=0, help="0: a free port")
    parser.add_argument("--imgsz", type=int, default=None, help="default: the model's input size")
    parser.add_argument("--max-batch-size", type=int, default=8, help="the service's default")
    parser.add_argument("--preferred-batch-sizes", type=_sizes, default=[4, 8])
    parser.add_argument(
        "--queue-delay-us", type=int, default=5000, help="max_queue_delay_microseconds (bench/README.md: measured)"
    )
    parser.add_argument("--instances", type=int, default=1, help="model instances (Triton's instance group count)")
    parser.add_argument("--conf", type=float, default=0.25, help="the service's default_conf")
    parser.add_argument("--max-det", type=int, default=100, help="K, the service's max_detections")
    args = parser.parse_args(argv)
    if any(size > args.max_batch_size for size in args.preferred_batch_sizes):
        parser.error(f"--preferred-batch-sizes must not exceed --max-batch-size ({args.max_batch_size})")
    serve(args)


if __name__ == "__main__":
    main()
