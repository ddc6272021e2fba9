"""AKConv layer benchmark: the seed's module vs the project's, eager and ``torch.compile``d, at the model's shapes.

    python -m bench.akconv [--batch 4] [--image 640]

Shapes are those of YOLOv10-N-AKConv at a 640 input: layer 1 (16 -> 32 channels on a 320×320 map, N=3,
stride 2) and layer 3 (32 -> 64 on 160×160). Inference mode, BatchNorm folded where the module allows it. Each
shape runs on a contiguous input and on a channels-last one (the layout the model and the service run in).
The seed's module is loaded from ``../shared/seed/akconv_seed.py`` (reference material, never imported by the
project). CPU always; CUDA fp32 and fp16 too when a GPU is present.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.common import print_table, sync, write_results
from model.akconv import AKConv

SEED_FILE = Path(__file__).resolve().parents[2] / "shared" / "seed" / "akconv_seed.py"


def seed_class() -> type[torch.nn.Module]:
    if not SEED_FILE.exists():
        raise SystemExit(f"the seed's module is needed for comparison: {SEED_FILE} not found")
    spec = importlib.util.spec_from_file_location("akconv_seed", SEED_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.AKConv


def layers(c1: int, c2: int) -> tuple[torch.nn.Module, AKConv]:
    torch.manual_seed(0)
    seed = seed_class()(c1, c2, 3, 2)
    torch.nn.init.normal_(seed.p_conv.weight, std=0.05)
    ours = AKConv(c1, c2, 3, 2, indexing="xy")
    ours.load_state_dict(seed.state_dict())
    ours.fuse()
    return seed.eval(), ours.eval()


def alternating_ms(calls: dict[str, Callable[[], object]], device: torch.device, repeats: int) -> dict[str, float]:
    """Median wall time of each call in milliseconds, timed in alternating rounds (one call of each per round), so
    that the machine's drift reaches every contender alike. Three untimed calls of each first."""
    for call in calls.values():
        for _ in range(3):
            call()
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            sync(device)
            started = time.perf_counter()
            call()
            sync(device)
            samples[name].append((time.perf_counter() - started) * 1000)
    return {name: statistics.median(times) for name, times in samples.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--image", type=int, default=640, help="model input size the shapes derive from")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)

    devices = [(torch.device("cpu"), torch.float32)]
    if torch.cuda.is_available():
        devices += [(torch.device("cuda"), torch.float32), (torch.device("cuda"), torch.float16)]
    rows = []
    layouts = (("contiguous", torch.contiguous_format), ("channels-last", torch.channels_last))
    for c1, c2, size in ((16, 32, args.image // 2), (32, 64, args.image // 4)):
        for device, dtype in devices:
            for layout, memory_format in layouts:
                seed, ours = (m.to(device, dtype, memory_format=memory_format) for m in layers(c1, c2))
                compiled = torch.compile(ours)
                x = torch.randn(args.batch, c1, size, size, device=device, dtype=dtype)
                x = x.contiguous(memory_format=memory_format)
                with torch.inference_mode():
                    reference = seed(x)
                    tolerance = 1e-2 if dtype == torch.float16 else 1e-3
                    assert torch.allclose(ours(x), reference, rtol=tolerance, atol=1e-2)
                    modules = {"seed": seed, "ours eager": ours, "ours compiled": compiled}
                    timings = alternating_ms(
                        {name: lambda m=m, x=x: m(x) for name, m in modules.items()}, device, args.repeats
                    )
                rows.append(
                    {
                        "layer": f"{c1}->{c2} @ {size}x{size}",
                        "device": f"{device.type} {str(dtype).removeprefix('torch.')}",
                        "layout": layout,
                        **{f"{name} ms": round(ms, 2) for name, ms in timings.items()},
                        "speed-up eager": f"{timings['seed'] / timings['ours eager']:.1f}x",
                        "speed-up compiled": f"{timings['seed'] / timings['ours compiled']:.1f}x",
                    }
                )
    print_table(rows)
    suffix = "cuda" if torch.cuda.is_available() else "cpu"
    print(write_results(f"akconv-{suffix}", rows, batch=args.batch, image=args.image))


if __name__ == "__main__":
    main()
