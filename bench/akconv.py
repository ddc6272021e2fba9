"""AKConv layer benchmark: the seed's module vs the project's, eager and ``torch.compile``d, at the model's shapes.

    python -m bench.akconv [--batch 4] [--image 640]

Shapes are those of YOLOv10-N-AKConv at a 640 input: layer 1 (16 -> 32 channels on a 320×320 map, N=3,
stride 2) and layer 3 (32 -> 64 on 160×160). Inference mode, BatchNorm folded where the module allows it.
The seed's module is loaded from ``../shared/seed/akconv_seed.py`` (reference material, never imported by the
project). CPU always; CUDA fp32 and fp16 too when a GPU is present.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import torch

from bench.common import print_table, time_ms, write_results
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
    for c1, c2, size in ((16, 32, args.image // 2), (32, 64, args.image // 4)):
        for device, dtype in devices:
            seed, ours = (m.to(device, dtype) for m in layers(c1, c2))
            compiled = torch.compile(ours)
            x = torch.randn(args.batch, c1, size, size, device=device, dtype=dtype)
            with torch.inference_mode():
                reference = seed(x)
                assert torch.allclose(ours(x), reference, rtol=1e-2 if dtype == torch.float16 else 1e-3, atol=1e-2)
                timings = {
                    name: time_ms(lambda m=module, x=x: m(x), device, repeats=args.repeats)
                    for name, module in (("seed", seed), ("ours eager", ours), ("ours compiled", compiled))
                }
            rows.append(
                {
                    "layer": f"{c1}->{c2} @ {size}x{size}",
                    "device": f"{device.type} {str(dtype).removeprefix('torch.')}",
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
