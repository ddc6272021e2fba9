"""Checkpoints made the way the seed recipe's trainer saves them, for the import tests.

The seed recipe puts AKConv at ``ultralytics.nn.Extramodule.AKConv`` and pickles the whole model. Here a module of
that name exists only inside the process that runs this file; its AKConv computes with the tests' loop reference
(seed geometry), so the saved outputs are the seed algorithm's, not ``model.akconv``'s.

    python -m tests.model.seed_recipe OUT_DIR [--plain]

writes ``OUT_DIR/model.pt``, ``OUT_DIR/input.pt`` and ``OUT_DIR/expected.pt`` (the unpickled fp32 model's output).
"""

import argparse
import copy
import sys
import types
from pathlib import Path

import torch

SEED_MODULE = "ultralytics.nn.Extramodule.AKConv"
IMAGE_SIZE = 64

_SEED_SOURCE = """
import torch
from torch import nn

class AKConv(nn.Module):
    def __init__(self, inc, outc, num_param, stride=1, bias=None):
        super().__init__()
        self.num_param = num_param
        self.stride = stride
        self.conv = nn.Sequential(
            nn.Conv2d(inc, outc, kernel_size=(num_param, 1), stride=(num_param, 1), bias=bias),
            nn.BatchNorm2d(outc),
            nn.SiLU(),
        )
        self.p_conv = nn.Conv2d(inc, 2 * num_param, kernel_size=3, padding=1, stride=stride)
        self.p_conv.register_full_backward_hook(self._set_lr)

    @staticmethod
    def _set_lr(module, grad_input, grad_output):
        pass

    def forward(self, x):
        from tests.model.akconv_reference import akconv_forward
        return akconv_forward(self, x, indexing="xy")
"""


def seed_module() -> types.ModuleType:
    """Register the recipe's module path in ``sys.modules`` (this process only)."""
    for name in ("ultralytics.nn.Extramodule", SEED_MODULE):
        sys.modules.setdefault(name, types.ModuleType(name))
    module = sys.modules[SEED_MODULE]
    exec(compile(_SEED_SOURCE, SEED_MODULE, "exec"), module.__dict__)
    return module


def seed_recipe_model():
    """YOLOv10-N-AKConv as the recipe builds it: the seed's AKConv class, 'xy' geometry, random offsets."""
    from model.build import akconv_layers, build_model

    module = seed_module()
    model = build_model("yolov10n-akconv", indexing="xy")
    torch.manual_seed(0)
    for layer in akconv_layers(model):
        seed_layer = module.AKConv(layer.p_conv.in_channels, layer.conv[0].out_channels, layer.num_param, layer.stride)
        seed_layer.load_state_dict(layer.state_dict())
        torch.nn.init.normal_(seed_layer.p_conv.weight, std=0.05)
        seed_layer.i, seed_layer.f, seed_layer.np = layer.i, layer.f, layer.np
        seed_layer.type = f"{SEED_MODULE}.AKConv"
        model.model[layer.i] = seed_layer
    del model.yaml["akconv_indexing"]  # the recipe's model.yaml has no such key
    return model


def plain_yolov10_model():
    from ultralytics.nn.tasks import DetectionModel

    return DetectionModel("yolov10n.yaml", nc=2, verbose=False)


def save_like_ultralytics(model, path: Path) -> None:
    """The checkpoint layout of ultralytics' trainer after ``strip_optimizer``: an fp16 EMA model and metadata."""
    model.names = {0: "triangle", 1: "star"}
    torch.save(
        {
            "date": "2026-01-01T00:00:00",
            "version": "8.4.190",
            "license": "AGPL-3.0",
            "epoch": -1,
            "best_fitness": None,
            "model": None,
            "ema": copy.deepcopy(model).half(),
            "updates": None,
            "optimizer": None,
            "train_args": {"data": "seed.yaml", "epochs": 100, "imgsz": IMAGE_SIZE, "batch": 16},
            "train_metrics": {"metrics/mAP50(B)": 0.5, "fitness": 0.4},
        },
        path,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--plain", action="store_true", help="a plain YOLOv10-N, no AKConv")
    args = parser.parse_args()
    import model  # noqa: F401  (ultralytics offline)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    save_like_ultralytics(plain_yolov10_model() if args.plain else seed_recipe_model(), args.out_dir / "model.pt")
    original = torch.load(args.out_dir / "model.pt", weights_only=False)["ema"].float().eval()
    torch.manual_seed(1)
    images = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        expected = original(images)[0]  # decoded one-to-many predictions (B, 4 + nc, anchors)
    torch.save(images, args.out_dir / "input.pt")
    torch.save(expected, args.out_dir / "expected.pt")


if __name__ == "__main__":
    main()
