"""``python -m model``: train, convert and evaluate YOLOv10-AKConv models."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml


def _override(item: str) -> tuple[str, object]:
    """``KEY=VALUE`` with the value typed as YAML reads it (``0.001`` a float, ``false`` a bool)."""
    key, equals, value = item.partition("=")
    if not key or not equals:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {item!r}")
    return key, yaml.safe_load(value)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m model", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a config on an ultralytics data set yaml and write a bundle")
    train.add_argument("--config", default="yolov10n-akconv", help="bundled config name or YAML path")
    train.add_argument("--data", required=True, help="ultralytics data set yaml")
    train.add_argument("--out", type=Path, required=True, help="bundle directory to write")
    train.add_argument("--imgsz", type=int, default=640)
    train.add_argument("--epochs", type=int, default=100)
    train.add_argument("--batch", type=int, default=16)
    train.add_argument("--device", default="cpu", help="cpu, 0, 0,1, ...")
    train.add_argument("--workers", type=int, default=2)
    train.add_argument("--indexing", choices=["ij", "xy"], default="ij")
    train.add_argument("--project", type=Path, default=Path("runs/train"))
    train.add_argument("--name", default="akconv")
    train.add_argument("--resume", action="store_true", help="continue PROJECT/NAME/weights/last.pt")
    train.add_argument("--weights", type=Path, default=None, help="start from this bundle or .pt (fine-tuning)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--close-mosaic", type=int, default=10, help="epochs at the end without mosaic")
    train.add_argument("--cache", choices=["ram", "disk"], default=None, help="cache decoded images")
    train.add_argument("--time", type=float, default=None, help="hours; fits the epochs to it (also on --resume)")
    train.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", type=_override,
        help="any other ultralytics train setting, e.g. --set lr0=0.001 --set optimizer=AdamW (repeatable)",
    )  # fmt: skip

    convert = commands.add_parser("convert", help="convert an ultralytics .pt into a bundle")
    convert.add_argument("checkpoint", type=Path)
    convert.add_argument("out_dir", type=Path)
    convert.add_argument("--fp32", action="store_true", help="keep float32 weights (default: fp16)")

    evaluate = commands.add_parser("evaluate", help="mAP of a model on held-out synthetic seeds")
    evaluate.add_argument("model", nargs="?", default=None, help="bundle or .pt (default: the bundled model)")
    evaluate.add_argument("--count", type=int, default=500)
    evaluate.add_argument("--first-seed", type=int, default=None, help="default: the 'test' split")
    evaluate.add_argument(
        "--size", type=int, default=None,
        help="side of the rendered images; resized to the model's input size as the service does (default: that size)",
    )  # fmt: skip

    args = parser.parse_args(argv)
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
            name=args.name,
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
        from model.checkpoint import import_checkpoint, save_bundle

        loaded = import_checkpoint(args.checkpoint)
        meta = loaded.metadata
        save_bundle(
            loaded.model,
            args.out_dir,
            name=meta.name,
            version=meta.version,
            input_size=meta.input_size,
            provenance=meta.provenance,
            half=not args.fp32,
        )
        print(f"bundle written to {args.out_dir}")
    else:
        from model.evaluate import evaluate_synthetic

        print(json.dumps(evaluate_synthetic(args.model, args.count, args.first_seed, args.size), indent=2))


if __name__ == "__main__":
    main()
