"""Train a YOLOv10-AKConv config with ultralytics' trainer, then write the project's bundle.

Works on any ultralytics data set yaml, the user's own included. Ultralytics does the rest: data loading and
augmentation, the dual-assignment v10 loss, EMA, validation each epoch, ``last.pt``/``best.pt`` for resuming. The
only change is where the model comes from: :func:`model.build.build_model` instead of ultralytics' parser alone.

    python -m model train --config yolov10n-akconv --data data.yaml --imgsz 320 --epochs 40 --out bundles/shapes

The bundle is named after the run (``--name``, default: the output folder's name) and versioned by date, never
after the bundled model; an existing bundle at ``--out`` is refused before training starts unless ``force``.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from ultralytics.models.yolo.detect import DetectionTrainer

from model.akconv import Indexing
from model.build import CONFIG_DIR, build_model
from model.checkpoint import (
    WEIGHTS_FILE,
    check_writable,
    file_sha256,
    import_checkpoint,
    load,
    normalize_metrics,
    project_version,
    save_bundle,
)


class AKConvTrainer(DetectionTrainer):
    """Ultralytics' detection trainer whose models come from :func:`model.build.build_model`."""

    indexing: Indexing = "ij"
    initial_weights: Path | None = None  # a bundle or .pt whose matching tensors start a fresh run
    epoch_cap: int | None = None  # with a time budget, ultralytics re-fits the epoch count to it: never above this

    @property
    def epochs(self) -> int:
        return self._epochs

    @epochs.setter
    def epochs(self, value: int) -> None:
        # Ultralytics' time mode sets ``self.epochs`` after each epoch from the budget and the mean epoch time, which
        # can raise it far beyond what was asked for; a budget should only ever cut a run short.
        self._epochs = min(value, self.epoch_cap) if self.epoch_cap else value
        self.args.epochs = self._epochs

    def get_model(self, cfg: str | dict | None = None, weights: Any = None, verbose: bool = True):
        # Ultralytics' device selection leaves CPU training on cores - 1 threads (one thread on 2 cores).
        torch.set_num_threads(len(os.sched_getaffinity(0)))
        # A resumed checkpoint carries its own geometry in model.yaml; a fresh run uses the trainer's.
        indexing = cfg.get("akconv_indexing", self.indexing) if isinstance(cfg, dict) else self.indexing
        model = build_model(cfg, nc=self.data["nc"], indexing=indexing, verbose=verbose)
        model = self.set_model_names_for_load(model)
        if weights:
            model.load(weights)
        elif self.initial_weights is not None:
            model.load(load(self.initial_weights).model)  # tensors of matching shape; another nc is fine
        return model


def train(
    config: str,
    data: str | Path,
    out_dir: Path,
    *,
    imgsz: int,
    epochs: int,
    batch: int = 16,
    device: str = "cpu",
    workers: int = 2,
    indexing: Indexing = "ij",
    project: Path = Path("runs/train"),
    run_name: str | None = None,
    model_name: str | None = None,
    version: str | None = None,
    force: bool = False,
    resume: bool = False,
    initial_weights: Path | None = None,
    seed: int = 0,
    **overrides: Any,
) -> Path:
    """Train, then write the bundle of the best epoch to ``out_dir``; returns ``out_dir``.

    ``run_name`` (default: ``out_dir``'s name) names ultralytics' run folder under ``project``; ``model_name``
    (default: the run name) and ``version`` (default: today) name the bundle. ``out_dir`` is checked before training:
    an existing bundle there is replaced only with ``force``.

    ``resume=True`` continues ``project/run_name/weights/last.pt``. ``initial_weights`` (a bundle or ``.pt``) starts
    a new run from a trained model, e.g. to fine-tune the bundled model on your data. ``overrides`` go to
    ultralytics as they are (``lr0``, ``mosaic``, ``close_mosaic``, ``time``, ...).
    """
    check_writable(Path(out_dir), force)
    config_path = Path(config) if Path(config).exists() else CONFIG_DIR / f"{config}.yaml"
    run_name = run_name or Path(out_dir).resolve().name
    run_dir = Path(project).resolve() / run_name
    args = {
        "model": str(run_dir / "weights" / "last.pt") if resume else str(config_path),
        "data": str(data),
        "imgsz": imgsz,
        "epochs": epochs,
        "batch": batch,
        "device": device,
        "workers": workers,
        "project": str(Path(project).resolve()),
        "name": run_name,
        "exist_ok": True,
        "resume": str(run_dir / "weights" / "last.pt") if resume else False,
        "seed": seed,
        "deterministic": True,
        "plots": False,  # plotting fetches a font from the network
        "amp": device != "cpu",
        "pretrained": False,
        **overrides,
    }
    started = time.monotonic()
    trainer = AKConvTrainer(overrides=args)
    trainer.indexing = indexing
    trainer.initial_weights = initial_weights
    trainer.epoch_cap = None if resume else epochs  # a resumed run keeps its checkpoint's epoch count
    trainer.train()
    minutes = (time.monotonic() - started) / 60

    best = Path(trainer.best if Path(trainer.best).exists() else trainer.last)
    data_cfg = yaml.safe_load(Path(data).read_text())
    provenance = {
        "source": {"config": config_path.name, "initial_weights": _described(initial_weights)},
        "data": str(data),
        "epochs": trainer.epoch + 1,
        "val_metrics": normalize_metrics(trainer.metrics),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "project_version": project_version(),
        "training": {
            "data": {k: data_cfg.get(k) for k in ("path", "train", "val", "names")},
            "imgsz": imgsz,
            "batch": batch,
            "device": device,
            "seed": seed,
            "train_minutes_last_run": round(minutes, 1),
            "overrides": overrides,
        },
    }
    loaded = import_checkpoint(best)
    save_bundle(
        loaded.model,
        out_dir,
        name=model_name or run_name,
        version=version or dt.date.today().isoformat(),
        input_size=imgsz,
        provenance=provenance,
        force=force,
    )
    return out_dir


def _described(weights: Path | None) -> dict[str, str] | None:
    """A starting bundle or ``.pt`` as provenance: its path and the sha256 of its weights file."""
    if weights is None:
        return None
    weights = Path(weights)
    return {"file": str(weights), "sha256": file_sha256(weights / WEIGHTS_FILE if weights.is_dir() else weights)}
