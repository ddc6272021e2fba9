"""A seed-recipe checkpoint of yolov10s-akconv with random weights: what the recipe's trainer would save.

    python -m bench.seed_checkpoint OUT.pt [--size 640]

The recipe's model is built the recipe's way — ultralytics' ``DetectionModel`` on the recipe's config, with the
seed's AKConv registered as the recipe does (:mod:`bench.peers.recipe`) — and saved in the layout of ultralytics'
trainer after ``strip_optimizer`` (an fp16 EMA model, ``train_args`` with the input size). Its pickle refers to
``ultralytics.nn.Extramodule.AKConv.AKConv`` as a trained one would, so the recipe peer loads it with
``YOLO(OUT.pt)`` and the service with ``python -m service --model-path OUT.pt``. The weights are random (speed does
not depend on them), except that AKConv's offset convolution gets small random weights instead of the seed's zeros,
so that sampling points move as in a trained model. Its detections mean nothing.
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

import torch

from bench.peers.export_pt import write_checkpoint
from bench.peers.recipe import register_recipe_akconv
from model.build import CONFIG_DIR  # importing ``model`` first makes ultralytics offline (model.offline)

RECIPE_CONFIG = CONFIG_DIR / "yolov10s-akconv.yaml"  # the seed's yolov10nAKConv.yaml under a name that guesses 's'


def recipe_model(seed: int = 0) -> torch.nn.Module:
    """YOLOv10-S-AKConv built by ultralytics from the recipe's config with the seed's AKConv, random weights."""
    from ultralytics.nn.tasks import DetectionModel  # after ``model``: see the import of CONFIG_DIR

    akconv_class = register_recipe_akconv()
    torch.manual_seed(seed)
    model = DetectionModel(str(RECIPE_CONFIG), nc=2, verbose=False)
    for layer in model.modules():
        if isinstance(layer, akconv_class):
            torch.nn.init.normal_(layer.p_conv.weight, std=0.05)
    return model


def save_recipe_checkpoint(out: str | Path, size: int = 640) -> Path:
    """Write :func:`recipe_model` at ``out`` as ultralytics' trainer saves ``best.pt``; returns the path."""
    import ultralytics

    checkpoint = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "version": ultralytics.__version__,
        "epoch": -1,
        "model": None,
        "ema": recipe_model().half(),
        "optimizer": None,
        "train_args": {"task": "detect", "imgsz": size, "data": "random weights, for speed measurements only"},
    }
    return write_checkpoint(checkpoint, out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="where to write the .pt")
    parser.add_argument("--size", type=int, default=640, help="the input size recorded in train_args")
    args = parser.parse_args(argv)
    print(save_recipe_checkpoint(args.out, args.size))


if __name__ == "__main__":
    main()
