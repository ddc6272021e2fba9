"""Write a model bundle as an ultralytics ``.pt`` checkpoint that ``ultralytics.YOLO(path)`` loads.

    python -m bench.peers.export_pt OUT.pt [--model BUNDLE_DIR]

``YOLO()`` cannot read the project's safetensors bundle, so the peers need a ``.pt``. The bundle is loaded with
:func:`model.checkpoint.load` (same weights, unfused, float32) and pickled as ultralytics' own trainer does: a dict
whose ``model`` is the ``DetectionModel`` itself, with ``train_args`` giving the input size. The pickle refers to
``model.akconv.AKConv``, so loading it needs this repository importable (run the peers from its root). The
service's own ``.pt`` importer reads such a file too (it stubs every pickled class).
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

import torch

from model.checkpoint import load


def export_pt(out: str | Path, bundle: str | Path | None = None) -> Path:
    """Save ``bundle`` (default: the bundled model) as an ultralytics checkpoint at ``out``; returns the path."""
    loaded = load(bundle)
    model, metadata = loaded.model, loaded.metadata
    model.args = {"imgsz": metadata.input_size, "task": "detect"}  # what YOLO() keeps from a checkpoint's args
    checkpoint = {
        "model": model,
        "ema": None,
        "date": metadata.version,
        "version": "akconv-detector bundle export",
        "train_args": {"imgsz": metadata.input_size, "task": "detect", "data": metadata.name},
        "exported_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    return write_checkpoint(checkpoint, out)


def write_checkpoint(checkpoint: dict, out: str | Path) -> Path:
    """``torch.save`` ``checkpoint`` at ``out`` (folders made as needed); returns the path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="where to write the .pt")
    parser.add_argument("--model", type=Path, default=None, help="bundle directory; default: the bundled model")
    args = parser.parse_args(argv)
    print(export_pt(args.out, args.model))


if __name__ == "__main__":
    main()
