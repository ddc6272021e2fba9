"""Whole-model forward throughput: the seed's AKConv vs the project's, eager, ``torch.compile``d and ONNX Runtime.

    python -m bench.model [--model BUNDLE_DIR | --config yolov10s-akconv] [--size N] [--batches 1,2,4,8,16,32]
        [--variants seed,eager,compiled,onnx] [--repeats 10] [--warmup 3] [--threads N] [--device cpu|cuda]

Two configurations matter: the bundled model (default; at its serving size) and the seed recipe's
``--config yolov10s-akconv --size 640`` (built with random weights: speed does not depend on them).

Variants, each the model as the service runs it (``fuse_for_inference``: BatchNorm folded, one-to-one head; then
channels-last, fp16 on CUDA, as ``service/core/engine.py`` does):

- ``seed``: the same model and weights with every AKConv replaced by the seed's module (``../shared/seed``);
- ``eager``: the project's model, exactly what the engine runs;
- ``compiled``: the same under ``torch.compile`` (inductor; compiled at the first call, and once more for a dynamic
  batch size when a second size comes);
- ``onnx``: exported with ``torch.onnx.export(dynamo=True)`` with a dynamic batch axis, run by ONNX Runtime's CPU
  provider with as many threads as torch (CPU only).

Every call takes a uint8 batch (B, 3, S, S) and includes its conversion to float in [0, 1], as ``Engine.infer``
does; the batch holds synthetic test samples (random pixels when scikit-image is missing). Before timing, each
variant's output is compared with the eager model's on 3 images (max abs difference of the sorted scores, and of the
top rows matched to their nearest rows); the seed's with the project's model set to the seed's sampling geometry
(``xy``; the bundled model uses ``ij``, which changes the outputs but not the work). Median of ``--repeats`` timed
calls after ``--warmup`` calls; the first call of each batch size is timed apart (``first_call_ms``). Writes
``bench/results/model-<name>-<size>-<device>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import io
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from ultralytics.nn.tasks import DetectionModel

from bench.akconv import seed_class
from bench.common import print_table, time_ms, write_results
from model.build import Detector, akconv_layers, build_model, fuse_for_inference
from model.checkpoint import DEFAULT_BUNDLE, load
from model.compiled import top_rows_difference
from model.synthetic import SPLITS

VARIANTS = ("seed", "eager", "compiled", "onnx")
CHECK_IMAGES = 3  # not the export's example batch size (2), so the dynamic batch axis is exercised
CHECK_TOP_ROWS = 20
SAMPLE_IMAGES = 8

Forward = Callable[[torch.Tensor], np.ndarray]  # uint8 (B, 3, S, S) -> float32 rows (B, K, 6)


def with_seed_akconv(model: torch.nn.Module) -> torch.nn.Module:
    """Copy of an unfused ``DetectionModel`` with each AKConv swapped for the seed's module, weights copied."""
    seed_akconv = seed_class()
    model = copy.deepcopy(model)
    for layer in akconv_layers(model):
        mix = layer.conv[0]
        seed = seed_akconv(mix.in_channels, mix.out_channels, layer.num_param, layer.stride)
        seed.load_state_dict(layer.state_dict())  # same keys by design (model/akconv.py)
        # BatchNorm eps is no state: ultralytics sets 1e-3 on every layer of a model it builds, the seed recipe's too.
        seed.conv[1].eps, seed.conv[1].momentum = layer.conv[1].eps, layer.conv[1].momentum
        seed.i, seed.f, seed.type, seed.np = layer.i, layer.f, "akconv_seed.AKConv", layer.np  # read by ultralytics
        model.model[layer.i] = seed
    return model.eval()


def with_indexing(model: torch.nn.Module, indexing: str) -> torch.nn.Module:
    """Copy of a model whose AKConv layers sample with ``indexing``: the twin the seed's module must match."""
    model = copy.deepcopy(model)
    for layer in akconv_layers(model):
        layer.indexing = indexing
    return model


def as_served(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> Detector:
    """What ``service.core.engine.Engine`` runs: fused, one-to-one head, on the device, channels-last."""
    detector = fuse_for_inference(copy.deepcopy(model)).to(device, dtype)
    return detector.to(memory_format=torch.channels_last)


def torch_forward(detector: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> Forward:
    @torch.inference_mode()
    def forward(batch: torch.Tensor) -> np.ndarray:
        images = batch.to(device, non_blocking=True).to(dtype).div_(255).contiguous(memory_format=torch.channels_last)
        return detector(images).float().cpu().numpy()

    return forward


def onnx_forward(detector: Detector, size: int, max_batch: int, threads: int, out_dir: Path) -> Forward:
    """Export ``detector`` (float32, CPU) to ONNX with a dynamic batch axis and run it with ONNX Runtime."""
    import onnxruntime

    exported = copy.deepcopy(detector).float().to(memory_format=torch.contiguous_format)
    exported.model.model[-1].dynamic = True  # else the head compares the batch size with its cached one: no export
    path = out_dir / "model.onnx"
    example = torch.rand(2, 3, size, size)
    batch = torch.export.Dim("batch", min=1, max=max(max_batch, 2))
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its progress
        torch.onnx.export(
            exported,
            (example,),
            str(path),
            dynamo=True,  # torch.export-based; AKConv builds its sampling grid in the graph while traced
            input_names=["images"],
            output_names=["rows"],
            dynamic_shapes={"images": {0: batch}},
        )
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def forward(batch: torch.Tensor) -> np.ndarray:
        return session.run(None, {"images": batch.float().div_(255).numpy()})[0]

    return forward


@functools.cache
def _distinct_samples(size: int) -> torch.Tensor:
    """uint8 (8, 3, size, size): synthetic test samples (scikit-image), else random pixels."""
    try:
        from model.synthetic import render

        images = [render(SPLITS["test"] + i, size)[0] for i in range(SAMPLE_IMAGES)]
    except ImportError:
        return torch.randint(0, 256, (SAMPLE_IMAGES, 3, size, size), dtype=torch.uint8)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()  # (8, 3, S, S)


def sample_images(count: int, size: int) -> torch.Tensor:
    """uint8 (count, 3, size, size), cycling through 8 distinct samples."""
    samples = _distinct_samples(size)
    return samples.repeat(-(-count // len(samples)), 1, 1, 1)[:count].contiguous()


def output_difference(rows: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """(max |Δ| of the sorted scores, max |Δ| of those and the top rows, ``model.compiled.top_rows_difference``)."""
    score_diff = np.abs(np.sort(rows[..., 4], axis=-1) - np.sort(reference[..., 4], axis=-1)).max()
    return float(score_diff), top_rows_difference(rows, reference, CHECK_TOP_ROWS)


def add_model_source(parser: argparse.ArgumentParser) -> None:
    """``--model`` or ``--config``, and ``--size``: the model a benchmark runs (:func:`model_from`)."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", type=Path, default=None, help="bundle directory or .pt; default: bundled model")
    source.add_argument("--config", default=None, help="bundled config name, built with random weights")
    parser.add_argument("--size", type=int, default=None, help="input size; default: the bundle's, or 640")


def model_from(args: argparse.Namespace) -> tuple[DetectionModel, str, int]:
    """The model :func:`add_model_source`'s flags name (eval mode), its name and its input size."""
    if args.config:
        return build_model(args.config).eval(), Path(args.config).stem, args.size or 640
    loaded = load(args.model or DEFAULT_BUNDLE)
    return loaded.model, loaded.metadata.name, args.size or loaded.metadata.input_size


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_source(parser)
    parser.add_argument("--batches", default="1,2,4,8,16,32")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {','.join(VARIANTS)}")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch and ONNX Runtime threads; default: torch's")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args(argv)

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if unknown := set(variants) - set(VARIANTS):
        parser.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    batches = [int(b) for b in args.batches.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if "onnx" in variants and device.type != "cpu":
        print("onnx: skipped, ONNX Runtime runs on the CPU provider only here")
        variants.remove("onnx")

    model, name, size = model_from(args)
    indexing = model.yaml.get("akconv_indexing", "ij")
    print(f"{name} at {size}x{size}, {device.type} {str(dtype).removeprefix('torch.')}, {threads} threads")

    eager = as_served(model, device, dtype)
    export_dir = tempfile.TemporaryDirectory(prefix="bench-model-")
    forwards: dict[str, Forward] = {}
    setup_s: dict[str, float] = {}
    for variant in variants:
        started = time.perf_counter()
        if variant == "seed":
            forwards[variant] = torch_forward(as_served(with_seed_akconv(model), device, dtype), device, dtype)
        elif variant == "eager":
            forwards[variant] = torch_forward(eager, device, dtype)
        elif variant == "compiled":
            forwards[variant] = torch_forward(torch.compile(eager), device, dtype)
        else:
            forwards[variant] = onnx_forward(eager, size, max(batches), threads, Path(export_dir.name))
        setup_s[variant] = round(time.perf_counter() - started, 2)

    check_batch = sample_images(CHECK_IMAGES, size)
    checks = {}
    for variant, forward in forwards.items():
        if variant == "eager":
            continue
        # The seed's module samples with the seed's geometry: compare it with the project's model set to the same.
        geometry = "xy" if variant == "seed" else indexing
        reference = torch_forward(as_served(with_indexing(model, geometry), device, dtype), device, dtype)(check_batch)
        started = time.perf_counter()
        score_diff, row_diff = output_difference(forward(check_batch), reference)
        first_call_s = time.perf_counter() - started
        checks[variant] = {"vs": f"eager, {geometry!r} geometry", "scores": score_diff, "top_rows": row_diff}
        print(
            f"{variant} vs eager ({geometry!r} geometry): max abs diff {row_diff:.2e} (top rows), "
            f"{score_diff:.2e} (scores); first call {first_call_s:.1f} s"
        )

    rows = []
    for batch_size in batches:
        images = sample_images(batch_size, size)
        for variant, forward in forwards.items():
            started = time.perf_counter()
            forward(images)  # the first call of a batch size: compilation, allocator growth
            first_call_ms = (time.perf_counter() - started) * 1000
            ms = time_ms(lambda f=forward, x=images: f(x), device, warmup=args.warmup, repeats=args.repeats)
            rows.append(
                {
                    "variant": variant,
                    "batch": batch_size,
                    "ms_per_batch": round(ms, 2),
                    "images_per_s": round(batch_size * 1000 / ms, 1),
                    "first_call_ms": round(first_call_ms, 1),
                }
            )
            print(f"  batch {batch_size} {variant}: {ms:.1f} ms, {batch_size * 1000 / ms:.1f} images/s", flush=True)
    export_dir.cleanup()

    table = []
    for batch_size in batches:
        line: dict[str, object] = {"batch": batch_size}
        for row in (r for r in rows if r["batch"] == batch_size):
            line[f"{row['variant']} ms"] = row["ms_per_batch"]
            line[f"{row['variant']} img/s"] = row["images_per_s"]
        table.append(line)
    print()
    print_table(table)
    print(
        write_results(
            f"model-{name}-{size}-{device.type}",
            rows,
            model=name,
            size=size,
            dtype=str(dtype).removeprefix("torch."),
            threads=threads,
            akconv_indexing=indexing,
            input="uint8 synthetic samples, converted to float [0, 1] inside each timed call",
            setup_s=setup_s,
            checks=checks,
            warmup=args.warmup,
            repeats=args.repeats,
        )
    )


if __name__ == "__main__":
    main()
