"""``python -m model``: train, convert, inspect, evaluate and compile YOLOv10-AKConv models.

A model file that cannot be used ends the command with one line on stderr naming the file and what to do, and the
exit status of its kind (see :class:`model.checkpoint.CheckpointError`: 4 not found, 5 damaged, 6 refused, 7 parts
that disagree, 8 output exists).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml


def _shapes(text: str) -> list[tuple[int, int]]:
    """An argparse type: ``HxW,HxW,...``, distinct, each side a positive multiple of 32."""
    shapes = []
    for item in text.split(","):
        sides = item.strip().split("x")
        if len(sides) != 2 or not all(side.isdigit() and int(side) > 0 and int(side) % 32 == 0 for side in sides):
            raise argparse.ArgumentTypeError(f"shapes are HxW with sides multiples of 32, e.g. 640x480; got {item!r}")
        shapes.append((int(sides[0]), int(sides[1])))
    return list(dict.fromkeys(shapes))


def _at_least(minimum: float, kind: type = int) -> Callable[[str], float]:
    """An argparse type: a number of ``kind`` no smaller than ``minimum``."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {text}")
        return value

    return parse


def _override(item: str) -> tuple[str, object]:
    """``KEY=VALUE`` with the value typed as YAML reads it (``0.001`` a float, ``false`` a bool)."""
    key, equals, value = item.partition("=")
    if not key or not equals:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {item!r}")
    return key, yaml.safe_load(value)


class _ShowDefaults(argparse.HelpFormatter):
    """``--help`` shows each option's default, unless it has none or its help already says what it is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        no_default = action.default in (None, False, [], argparse.SUPPRESS)
        if no_default or "default" in help_text or not action.option_strings:
            return help_text
        return f"{help_text} (default: %(default)s)".strip()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m model", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser(
        "train", formatter_class=_ShowDefaults, help="train a config on an ultralytics data set yaml and write a bundle"
    )
    train.add_argument("--config", default="yolov10n-akconv", help="bundled config name or YAML path")
    train.add_argument("--data", required=True, help="ultralytics data set yaml")
    train.add_argument("--out", type=Path, required=True, help="bundle directory to write")
    train.add_argument("--imgsz", type=int, default=640, help="square training input side, pixels")
    train.add_argument("--epochs", type=int, default=100, help="epochs to train (a --time budget may stop it sooner)")
    train.add_argument("--batch", type=int, default=16, help="images per batch")
    train.add_argument("--device", default="cpu", help="cpu, 0, 0,1, ...")
    train.add_argument("--workers", type=int, default=2, help="data loader processes")
    train.add_argument("--indexing", choices=["ij", "xy"], default="ij", help="AKConv sampling geometry")
    train.add_argument("--project", type=Path, default=Path("runs/train"), help="folder of ultralytics' runs")
    train.add_argument("--run-name", default=None, help="run folder under PROJECT (default: the --out folder's name)")
    train.add_argument("--name", default=None, help="model name in the bundle (default: the run name)")
    train.add_argument("--version", default=None, help="model version in the bundle (default: today's date)")
    train.add_argument("--force", action="store_true", help="replace an existing bundle at --out")
    train.add_argument("--resume", action="store_true", help="continue PROJECT/RUN_NAME/weights/last.pt")
    train.add_argument("--weights", type=Path, default=None, help="start from this bundle or .pt (fine-tuning)")
    train.add_argument("--seed", type=int, default=0, help="random seed (training is deterministic)")
    train.add_argument("--close-mosaic", type=int, default=10, help="epochs at the end without mosaic")
    train.add_argument("--cache", choices=["ram", "disk"], default=None, help="cache decoded images")
    train.add_argument(
        "--time", type=float, default=None,
        help="hours: stop when the budget is spent; the learning-rate schedule is fitted to it, never past --epochs",
    )  # fmt: skip
    train.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", type=_override,
        help="any other ultralytics train setting, e.g. --set lr0=0.001 --set optimizer=AdamW (repeatable)",
    )  # fmt: skip

    convert = commands.add_parser(
        "convert", formatter_class=_ShowDefaults, help="convert an ultralytics .pt into a bundle"
    )
    convert.add_argument("checkpoint", type=Path)
    convert.add_argument("out_dir", type=Path)
    convert.add_argument("--fp32", action="store_true", help="keep float32 weights (default: fp16)")
    convert.add_argument("--name", default=None, help="model name (default: the file's stem and architecture)")
    convert.add_argument("--version", default=None, help="model version (default: the checkpoint's date)")
    convert.add_argument("--force", action="store_true", help="replace an existing bundle at OUT_DIR")

    inspect = commands.add_parser(
        "inspect", formatter_class=_ShowDefaults, help="what a bundle or .pt is, without serving it"
    )
    inspect.add_argument("model", type=Path, help="bundle directory or ultralytics .pt")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of text")

    evaluate = commands.add_parser(
        "evaluate", formatter_class=_ShowDefaults, help="mAP of a model on held-out synthetic seeds"
    )
    evaluate.add_argument("model", nargs="?", default=None, help="bundle or .pt (default: the bundled model)")
    evaluate.add_argument("--count", type=int, default=500, help="held-out images")
    evaluate.add_argument("--first-seed", type=int, default=None, help="default: the 'test' split")
    evaluate.add_argument(
        "--size", type=int, default=None,
        help="side of the rendered images; resized to the model's input size as the service does (default: that size)",
    )  # fmt: skip

    compile_ = commands.add_parser(
        "compile",
        formatter_class=_ShowDefaults,
        help="build the compiled artefacts of a model that the service's runtime setting loads (model/compiled.py)",
    )
    compile_.add_argument("model", nargs="?", default=None, help="bundle or .pt (default: the bundled model)")
    compile_.add_argument(
        "--runtime", choices=["aotinductor", "openvino", "int8"], default="aotinductor",
        help="aotinductor (torch), openvino or int8 (OpenVINO quantized by NNCF, gated on held-out accuracy; both "
        "need pip install 'akconv-detector[openvino]')",
    )  # fmt: skip
    compile_.add_argument("--cache-dir", type=Path, default=None, help="default: model.compiled.DEFAULT_CACHE_DIR")
    compile_.add_argument(
        "--size", type=int, default=None, help="the service's input_size (default: the model's input size)"
    )
    compile_.add_argument(
        "--shapes", type=_shapes, default=None,
        help="input shapes HxW, comma-separated (default: the shapes the service serves compiled at --size, "
        "model.letterbox.common_shapes: square, 4:3, 3:2 and 16:9 both ways; 7 at 640, 640x640 ... 640x384)",
    )  # fmt: skip
    compile_.add_argument("--max-batch", type=_at_least(1), default=8, help="the service's max_batch_size")
    compile_.add_argument(
        "--threads", type=_at_least(1), default=None,
        help="OpenVINO's threads while building (default: torch's thread count)",
    )  # fmt: skip
    compile_.add_argument(
        "--calibration", type=Path, default=None, metavar="DIR",
        help="int8: a folder of images like those the model will serve (default: synthetic train seeds, for a model "
        "of the synthetic classes only)",
    )  # fmt: skip
    compile_.add_argument(
        "--held-out", type=Path, default=None, metavar="DIR",
        help="int8: labelled images never trained on, YOLO format (DIR/images, DIR/labels), for the accuracy gate "
        "(default: synthetic test seeds, for a model of the synthetic classes only)",
    )  # fmt: skip
    compile_.add_argument(
        "--max-map-drop", type=_at_least(0.0, float), default=1.0,
        help="int8: refuse the artefact if its held-out mAP50-95 is more than this many points (1.0 = 0.01) below "
        "the float32 eager model's",
    )  # fmt: skip
    compile_.add_argument("--calibration-images", type=_at_least(1), default=128, help="int8: calibration images used")
    compile_.add_argument("--held-out-images", type=_at_least(1), default=200, help="int8: held-out images scored")

    args = parser.parse_args(argv)
    from model.checkpoint import CheckpointError

    try:
        run(args)
    except CheckpointError as error:
        print(f"python -m model {args.command}: {error}", file=sys.stderr)
        sys.exit(error.exit_status)


def run(args: argparse.Namespace) -> None:
    if args.command == "train":
        from model.train import train as run_training

        out = run_training(
            args.config,
            args.data,
            args.out,
            imgsz=args.imgsz,
            epochs=args.epochs,
            batch=args.batch,
            device=args.device,
            workers=args.workers,
            indexing=args.indexing,
            project=args.project,
            run_name=args.run_name,
            model_name=args.name,
            version=args.version,
            force=args.force,
            resume=args.resume,
            initial_weights=args.weights,
            seed=args.seed,
            close_mosaic=args.close_mosaic,
            cache=args.cache or False,
            **({"time": args.time} if args.time else {}),
            **dict(args.set),
        )
        print(f"bundle written to {out}")
    elif args.command == "convert":
        from model.checkpoint import check_writable, import_checkpoint, save_bundle

        check_writable(args.out_dir, args.force)
        loaded = import_checkpoint(args.checkpoint, name=args.name, version=args.version)
        meta = loaded.metadata
        save_bundle(
            loaded.model,
            args.out_dir,
            name=meta.name,
            version=meta.version,
            input_size=meta.input_size,
            provenance=meta.provenance,
            half=not args.fp32,
            force=args.force,
        )
        print(f"bundle {meta.name} {meta.version} written to {args.out_dir}")
    elif args.command == "inspect":
        from model.checkpoint import describe

        description = describe(args.model)
        print(json.dumps(description, indent=2) if args.json else _as_text(description))
    elif args.command == "compile":
        _compile(args)
    else:
        from model.evaluate import evaluate_synthetic

        print(json.dumps(evaluate_synthetic(args.model, args.count, args.first_seed, args.size), indent=2))


def _compile(args: argparse.Namespace) -> None:
    """Build the missing artefact of each shape (those in the cache are loaded and probed), one line per shape; for
    int8 the accuracy record of each shape, also written into the bundle's ``model.json`` when MODEL is a bundle.
    Exit 1 when a shape did not get a servable artefact (int8: the gate refused it), 2 when int8 has no data."""
    import torch

    from model.build import fuse_for_inference
    from model.checkpoint import load
    from model.compiled import DEFAULT_CACHE_DIR, compiled_detector
    from model.quantize import Calibration, NoCalibrationData, class_names, describe, plan, record_in_bundle

    loaded = load(args.model)
    size = args.size or loaded.metadata.input_size
    from model.letterbox import common_shapes

    shapes = args.shapes or common_shapes(size)  # what the service serves compiled: its warm-up shapes
    detector = fuse_for_inference(loaded.model).to(memory_format=torch.channels_last)
    calibration = None
    if args.runtime == "int8":
        calibration = Calibration(
            images_dir=args.calibration,
            held_out_dir=args.held_out,
            images=args.calibration_images,
            held_out_images=args.held_out_images,
            max_map_drop=args.max_map_drop,
        )
        try:
            plan(class_names(detector), calibration)
        except NoCalibrationData as error:
            print(f"python -m model compile: {error}", file=sys.stderr)
            sys.exit(2)
    cache_dir = args.cache_dir or DEFAULT_CACHE_DIR
    prepared = compiled_detector(
        detector,
        shapes,
        args.max_batch,
        cache_dir,
        runtime=args.runtime,
        threads=args.threads or torch.get_num_threads(),
        build_missing=True,
        calibration=calibration,
    )
    for shape, status in prepared.status.items():
        print(f"{shape[0]}x{shape[1]}: {status}")
    for name, record in (prepared.accuracy or {}).items():
        print(f"{name}: {describe(record)}")
    if prepared.accuracy:
        print(json.dumps(prepared.accuracy, indent=2))
        if args.model is not None and Path(args.model).is_dir():
            record_in_bundle(Path(args.model), prepared.accuracy)
            print(f"accuracy recorded in {Path(args.model) / 'model.json'} (provenance.int8)")
    print(f"{args.runtime} artefacts of {loaded.metadata.name} in {cache_dir} ({prepared.seconds:.0f} s)")
    if len(prepared.detector.runners) < len(shapes):
        sys.exit(1)


def _as_text(description: dict[str, Any]) -> str:
    """``inspect``'s report for people: one ``label: value`` line per field, provenance indented below."""
    lines = [f"{key.replace('_', ' ')}: {value}" for key, value in description.items() if key != "provenance"]
    lines.append("provenance:")
    lines += [f"  {key}: {json.dumps(value)}" for key, value in description["provenance"].items()]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
