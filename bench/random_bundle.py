"""A bundle of a bundled config with random weights, for speed measurements only (its detections mean nothing).

    python -m bench.random_bundle yolov10s-akconv OUT_DIR [--size 640]

The seed recipe's model (``yolov10s-akconv`` at 640) has no trained weights here; speed does not depend on them,
so the service and the peer servers are benchmarked on this bundle.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from model import build_model
from model.checkpoint import save_bundle


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="bundled config name, e.g. yolov10s-akconv")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--size", type=int, default=640, help="the bundle's input size")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = build_model(args.config).eval()
    provenance = {"weights": "random (torch.manual_seed(0)); for speed measurements only"}
    path = save_bundle(
        model, args.out_dir, name=args.config, version="random", input_size=args.size, provenance=provenance
    )
    print(path)


if __name__ == "__main__":
    main()
