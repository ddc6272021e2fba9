"""Compiled forwards side by side with eager: ``torch.compile``, AOTInductor, OpenVINO and OpenVINO int8, each with
a dynamic batch.

    python -m bench.compiled [--model BUNDLE_DIR | --config yolov10s-akconv] [--size N]
        [--contenders eager,compile,aoti,openvino,int8] [--rounds 10] [--threads N] [--cache-dir DIR] [--max-batch 8]

Contenders, each in front of the model as the service runs it (``bench.model.as_served``: fused, channels-last,
float32, CPU), each called as ``Engine.infer`` calls the model (uint8 batch converted to float inside the call):

- ``eager``: the detector itself;
- ``compile``: ``torch.compile`` (inductor, default mode) with the batch dimension marked dynamic
  (``maybe_mark_dynamic``: batch 1 still gets its own graph); compiled at its first calls;
- ``aoti``, ``openvino``, ``int8``: the service's runtimes ``aotinductor``, ``openvino`` and ``int8``, each through
  ``model.compiled.compiled_detector`` as the service loads them (built first with ``build_missing``, then loaded
  again, probed against eager): ``torch.export`` with a dynamic batch (1..``--max-batch``), then
  ``torch._inductor.aoti_compile_and_package``, one package per input shape; the same export converted to an
  OpenVINO IR (``model.openvino_ir``), compiled by OpenVINO's CPU plugin at load; that IR quantized to int8 by NNCF
  and gated on held-out accuracy (``model.quantize``: the bundled classes only, its synthetic splits; the gate's
  record of each shape is kept in the result file).

Inputs: ``bus.jpg`` and ``zidane.jpg`` (ultralytics' assets) decoded and letterboxed as the service does
(``service.core.images``), which gives two input shapes (3:4 and 16:9 at the model's size), and a held-out synthetic
sample centre-cropped to each aspect (``bench.letterbox_accuracy.crop``): the photos, at batch 1, and each photo
with its synthetic twin, at batch 2. For each contender: the time to compile or convert (all shapes; int8: with its
calibration and gate; ``cached`` when ``--cache-dir`` already held the artefacts), the time to load the saved
artefacts and probe them (``compile``: a second compile after ``torch._dynamo.reset()``, from inductor's on-disk
cache), the max |Δ| of the top rows vs eager (matched to the nearest row, ``model.compiled.top_rows_difference``),
and whether the detections (eager's rows above conf 0.25) each have a row within 1e-3 and the counts agree (int8's
rows differ from eager's by design: its accuracy is its gate's held-out mAP50-95, also reported).

Timing: ``--rounds`` rounds; each round times one call of every contender at each (shape, batch), the contenders'
order rotated by one each round, so a machine whose speed drifts (or is shared) disturbs all alike. Reported per
contender: median, min and max ms, and the median of the per-round ratios to eager (same round, same input). The
load average is recorded before and after. Writes ``bench/results/compiled-<name>-<size>-cpu[-<tag>].json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from ultralytics.utils import ASSETS

from bench.common import print_table, write_results
from bench.letterbox_accuracy import crop
from bench.model import Forward, add_model_source, as_served, model_from, torch_forward
from model.build import Detector
from model.compiled import Shape, compiled_detector, top_rows_difference
from model.synthetic import SPLITS, render
from service.core.images import Decoded, decode, letterbox

CONTENDERS = ("eager", "compile", "aoti", "openvino", "int8")
RUNTIMES = {"aoti": "aotinductor", "openvino": "openvino", "int8": "int8"}  # contender -> model.compiled runtime
PHOTOS = ("bus.jpg", "zidane.jpg")
ASPECTS = {"bus.jpg": (3, 4), "zidane.jpg": (16, 9)}  # the photos' own aspects (810 × 1080, 1280 × 720)
CONF = 0.25
TOLERANCE = 1e-3
MAX_PIXELS = 40_000_000


def inputs(size: int) -> dict[str, torch.Tensor]:
    """Name -> uint8 (3, H, W) model input: each photo and a synthetic sample of its aspect, letterboxed."""
    images = {}
    for index, photo in enumerate(PHOTOS):
        images[photo] = letterbox(decode((ASSETS / photo).read_bytes(), MAX_PIXELS, fit=size), size)[0]
        pixels, _ = crop(*render(SPLITS["test"] + index, size), ASPECTS[photo])
        images[f"synthetic {ASPECTS[photo][0]}:{ASPECTS[photo][1]}"] = letterbox(
            Decoded(pixels, pixels.shape[1], pixels.shape[0]), size
        )[0]
    return images


def detections_agree(rows: np.ndarray, reference: np.ndarray) -> tuple[bool, int]:
    """(every reference row above :data:`CONF` has a row within :data:`TOLERANCE` and the counts agree, count).

    A row within the tolerance of the threshold counts on either side.
    """
    agree, count = True, 0
    for image_rows, image_reference in zip(rows, reference, strict=True):
        wanted = image_reference[image_reference[:, 4] > CONF]
        count += len(wanted)
        if len(wanted):
            distance = np.abs(wanted[:, None, :] - image_rows[None, :, :]).max(axis=-1)  # (n, K)
            agree &= bool((distance.min(axis=1) <= TOLERANCE).all())
        above = (image_rows[:, 4] > CONF + TOLERANCE).sum()
        at_least = (image_rows[:, 4] > CONF - TOLERANCE).sum()
        agree &= bool(above <= len(wanted) <= at_least)
    return agree, count


def compile_contender(eager: Detector) -> Forward:
    compiled = torch.compile(eager)

    def call(images: torch.Tensor) -> torch.Tensor:
        torch._dynamo.maybe_mark_dynamic(images, 0)
        return compiled(images)

    return torch_forward(call, torch.device("cpu"), torch.float32)


def artefact_contender(
    eager: Detector, contender: str, shapes: list[Shape], max_batch: int, cache_dir: Path, threads: int
) -> tuple[Forward, float | None, float, dict | None]:
    """(forward, seconds to build the artefacts missing from ``cache_dir`` or None when none was, seconds to load and
    probe them, int8's accuracy records or None), through ``compiled_detector`` as the service loads them."""
    runtime = RUNTIMES[contender]
    built = compiled_detector(eager, shapes, max_batch, cache_dir, runtime=runtime, threads=threads, build_missing=True)
    for shape, state in built.status.items():
        print(f"  {contender} {shape[0]}x{shape[1]}: {state}", flush=True)
    if failed := {shape: state for shape, state in built.status.items() if state.startswith("eager")}:
        raise RuntimeError(f"{runtime} did not serve {failed}")
    build_s = built.seconds if "built" in built.status.values() else None
    del built
    loaded = compiled_detector(eager, shapes, max_batch, cache_dir, runtime=runtime, threads=threads)
    forward = torch_forward(loaded.detector, torch.device("cpu"), torch.float32)
    return forward, build_s, loaded.seconds, loaded.accuracy


def load_average() -> str:
    return "/".join(f"{value:.1f}" for value in os.getloadavg())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_source(parser)
    parser.add_argument("--contenders", default=",".join(CONTENDERS), help=f"subset of {','.join(CONTENDERS)}")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch and OpenVINO threads; default: torch's")
    parser.add_argument("--max-batch", type=int, default=8, help="largest batch of the compiled artefacts")
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help="artefacts are read from / built into it; default: a temp dir"
    )
    parser.add_argument("--tag", default=None, help="appended to the result file's name, e.g. quiet")
    args = parser.parse_args(argv)

    contenders = [name.strip() for name in args.contenders.split(",") if name.strip()]
    if unknown := set(contenders) - set(CONTENDERS):
        parser.error(f"unknown contenders {sorted(unknown)}; choose from {', '.join(CONTENDERS)}")
    if "eager" not in contenders:
        contenders.insert(0, "eager")  # the reference
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    scratch = tempfile.TemporaryDirectory(prefix="bench-compiled-")
    cache_dir = args.cache_dir or Path(scratch.name) / "artefacts"
    # Inductor's own cache starts empty, so torch.compile's first calls are a cold compile (AOTInductor too).
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(scratch.name) / "inductor"))

    model, name, size = model_from(args)
    eager = as_served(model, torch.device("cpu"), torch.float32)
    images = inputs(size)
    shapes: list[Shape] = list(dict.fromkeys(tuple(image.shape[1:]) for image in images.values()))
    batches = {  # (shape, batch size) -> uint8 batch: the photo alone, then with its synthetic twin
        (tuple(images[photo].shape[1:]), count): torch.stack([images[photo], images[twin]][:count])
        for photo, twin in zip(PHOTOS, [key for key in images if key not in PHOTOS], strict=True)
        for count in (1, 2)
    }
    setup_load = load_average()
    print(f"{name} at {size}, shapes {shapes}, {threads} threads, load average {setup_load} (1/5/15 min)")

    forwards: dict[str, Forward] = {"eager": torch_forward(eager, torch.device("cpu"), torch.float32)}
    setup: dict[str, dict[str, object]] = {"eager": {"compile_s": 0.0, "load_s": 0.0}}
    for contender in contenders[1:]:
        print(f"{contender}: compiling", flush=True)
        try:
            if contender == "compile":
                forwards[contender] = compile_contender(eager)
                started = time.perf_counter()
                for batch in batches.values():
                    forwards[contender](batch)  # compiles: one graph per shape, batch 1 and dynamic
                compile_s = time.perf_counter() - started
                torch._dynamo.reset()  # a fresh process with inductor's disk cache, as a restart would be
                started = time.perf_counter()
                for batch in batches.values():
                    forwards[contender](batch)
                setup[contender] = {"compile_s": round(compile_s, 1), "load_s": round(time.perf_counter() - started, 1)}
            else:
                forward, build_s, load_s, accuracy = artefact_contender(
                    eager, contender, shapes, args.max_batch, cache_dir, threads
                )
                forwards[contender] = forward
                setup[contender] = {
                    "compile_s": "cached" if build_s is None else round(build_s, 1),
                    "load_s": round(load_s, 1),
                    **({"accuracy": accuracy} if accuracy is not None else {}),
                }
        except Exception as error:  # a contender that cannot be built is reported, the others still run
            print(f"{contender}: failed: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
            setup[contender] = {"failed": f"{type(error).__name__}: {error}"[:500]}
        print(f"{contender}: {setup[contender]}, load average {load_average()}", flush=True)

    references = {key: forwards["eager"](batch) for key, batch in batches.items()}
    checks = {}
    for contender, forward in forwards.items():
        rows = {key: forward(batch) for key, batch in batches.items()}  # also each contender's warm-up call
        differences = [top_rows_difference(rows[key], references[key]) for key in batches]
        agreements = [detections_agree(rows[key], references[key]) for key in batches]
        checks[contender] = {
            "top_rows_max_abs_diff": max(differences),
            "detections_agree": all(agree for agree, _ in agreements),
            "detections_compared": sum(count for _, count in agreements),
        }

    samples: dict[tuple[str, Shape, int], list[float]] = {}
    ratios: dict[tuple[str, Shape, int], list[float]] = {}
    names = list(forwards)
    timing_load = load_average()
    print(f"timing {args.rounds} rounds, load average {timing_load}", flush=True)
    for round_index in range(args.rounds):
        order = names[round_index % len(names) :] + names[: round_index % len(names)]
        for (shape, count), batch in batches.items():
            this_round = {}
            for contender in order:
                started = time.perf_counter()
                forwards[contender](batch)
                this_round[contender] = (time.perf_counter() - started) * 1000
                samples.setdefault((contender, shape, count), []).append(this_round[contender])
            for contender, ms in this_round.items():
                ratios.setdefault((contender, shape, count), []).append(ms / this_round["eager"])
    load_after = load_average()

    rows = []
    for (contender, shape, count), times in samples.items():
        rows.append(
            {
                "contender": contender,
                "shape": f"{shape[0]}x{shape[1]}",
                "batch": count,
                "median_ms": round(statistics.median(times), 1),
                "min_ms": round(min(times), 1),
                "max_ms": round(max(times), 1),
                "vs_eager": round(statistics.median(ratios[(contender, shape, count)]), 2),
            }
        )
    rows.sort(key=lambda row: (row["shape"], row["batch"], names.index(row["contender"])))
    print()
    print_table(rows)
    print()
    summary = []
    for contender in contenders:
        done, check = setup[contender], checks.get(contender, {})
        summary.append(
            {
                "contender": contender,
                "compile_s": done.get("compile_s", "failed"),
                "load_s": done.get("load_s", ""),
                "top_rows_max_abs_diff": f"{check['top_rows_max_abs_diff']:.1e}" if check else "",
                "detections_agree": f"{check['detections_agree']} ({check['detections_compared']})" if check else "",
                "held_out_mAP50-95": "; ".join(
                    f"{shape}: {record['fp32_mAP50-95']} -> {record['int8_mAP50-95']}"
                    for shape, record in done.get("accuracy", {}).items()
                ),
            }
        )
    print_table(summary)
    print(f"load average after: {load_after} (1/5/15 min)")
    print(
        write_results(
            f"compiled-{name}-{size}-cpu" + (f"-{args.tag}" if args.tag else ""),
            rows,
            model=name,
            size=size,
            threads=threads,
            max_batch=args.max_batch,
            rounds=args.rounds,
            inputs=list(images),
            setup=setup,
            checks=checks,
            load_average={"start": setup_load, "timing_start": timing_load, "end": load_after},
        )
    )
    scratch.cleanup()


if __name__ == "__main__":
    main()
