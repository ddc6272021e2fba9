"""Weights formats: the project's bundle, and import of ultralytics ``.pt`` checkpoints without running their code.

**Bundle** (a directory):

- ``model.safetensors``: the ``state_dict`` of the unfused ``DetectionModel`` (fp16 or fp32 tensors);
- ``model.json``: :class:`ModelMetadata`: name, version, the full model config (scale included), class names,
  input size, AKConv sampling geometry and provenance (data, epochs, metrics, date).

Loading a bundle never unpickles anything: the model is rebuilt from its config and the tensors are copied in.

**Ultralytics ``.pt``** (a pickled ``DetectionModel``, as the seed recipe's trainer saves it, with AKConv at
``ultralytics.nn.Extramodule.AKConv.AKConv``; plain YOLOv10 checkpoints too): read with an allow-list unpickler
that turns every pickled class into an inert stub, so no pickled code runs and the AKConv module need not exist.
Only the tensors, the config and the class names are kept; the model is rebuilt from the config with
:func:`model.build.build_model` and the weights are loaded strictly. AKConv layers of a seed-recipe checkpoint get
``indexing="xy"`` (the geometry they were trained with).
"""

from __future__ import annotations

import json
import pickle
import types
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from ultralytics.nn.tasks import DetectionModel

from model.build import build_model

WEIGHTS_DIR = Path(__file__).parent / "weights"
DEFAULT_BUNDLE = WEIGHTS_DIR / "yolov10n-akconv"
WEIGHTS_FILE = "model.safetensors"
METADATA_FILE = "model.json"
BUNDLE_FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A weights file that cannot be loaded; the message says why."""


@dataclass
class ModelMetadata:
    """What a bundle says about its model (``model.json``)."""

    name: str
    version: str
    config: dict[str, Any]
    names: list[str]
    input_size: int
    akconv_indexing: str
    provenance: dict[str, Any] = field(default_factory=dict)
    format_version: int = BUNDLE_FORMAT_VERSION


@dataclass
class LoadedModel:
    """A ``DetectionModel`` (eval mode, float32, unfused, CPU) and its metadata."""

    model: DetectionModel
    metadata: ModelMetadata


def save_bundle(
    model: DetectionModel,
    out_dir: str | Path,
    *,
    name: str,
    version: str,
    input_size: int,
    provenance: dict[str, Any] | None = None,
    half: bool = True,
) -> Path:
    """Write ``model`` (unfused) as a bundle in ``out_dir``; floating tensors in fp16 when ``half``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {
        key: (value.half() if half and value.is_floating_point() else value).detach().cpu().contiguous()
        for key, value in model.state_dict().items()
    }
    save_file(tensors, out_dir / WEIGHTS_FILE)
    names = model.names if isinstance(model.names, dict) else dict(enumerate(model.names))
    metadata = ModelMetadata(
        name=name,
        version=version,
        config=model.yaml,
        names=[str(names[i]) for i in range(len(names))],
        input_size=input_size,
        akconv_indexing=model.yaml.get("akconv_indexing", "ij"),
        provenance=provenance or {},
    )
    (out_dir / METADATA_FILE).write_text(json.dumps(asdict(metadata), indent=2) + "\n")
    return out_dir


def _rebuild(metadata: ModelMetadata, state_dict: dict[str, torch.Tensor]) -> LoadedModel:
    model = build_model(metadata.config, indexing=metadata.akconv_indexing)
    try:
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()})
    except RuntimeError as error:
        raise CheckpointError(f"weights do not match the model config: {error}") from None
    model.names = dict(enumerate(metadata.names))
    return LoadedModel(model.float().eval(), metadata)


def load_bundle(path: str | Path) -> LoadedModel:
    """Load a bundle directory (or its ``model.json`` / ``model.safetensors``)."""
    bundle = Path(path)
    if bundle.is_file():
        bundle = bundle.parent
    if not (bundle / METADATA_FILE).is_file() or not (bundle / WEIGHTS_FILE).is_file():
        raise CheckpointError(f"{bundle} is not a model bundle: it needs {METADATA_FILE} and {WEIGHTS_FILE}")
    raw = json.loads((bundle / METADATA_FILE).read_text())
    if raw.get("format_version") != BUNDLE_FORMAT_VERSION:
        raise CheckpointError(f"{bundle}: unsupported bundle format_version {raw.get('format_version')!r}")
    return _rebuild(ModelMetadata(**raw), load_file(bundle / WEIGHTS_FILE))


class _Stub:
    """Stand-in for any pickled class: records the state it is given, runs no code of the original."""

    qualified_name = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.__dict__["_args"] = args

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple):  # (dict state, slot state)
            for part in state:
                if isinstance(part, dict):
                    self.__dict__.update(part)
        elif isinstance(state, dict):
            self.__dict__.update(state)


# Pickled classes under these prefixes become stubs; nothing else but the functions below is resolved.
_STUB_PREFIXES = ("ultralytics.", "torch.nn.modules.", "model.akconv.", "model.build.", "__main__.")
_SAFE_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("collections", "OrderedDict"): __import__("collections").OrderedDict,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
}


def _stub_getattr(owner: Any, name: str) -> Any:
    """``getattr`` for pickles of nested names (e.g. a hook ``AKConv._set_lr``): only on stubs, returns a stub."""
    if isinstance(owner, type) and issubclass(owner, _Stub):
        return type(name, (_Stub,), {"qualified_name": f"{owner.qualified_name}.{name}"})
    raise pickle.UnpicklingError(f"getattr on {owner!r} is not allowed in a checkpoint")


class _AllowListUnpickler(pickle.Unpickler):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._stubs: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        module = "builtins" if module == "__builtin__" else module  # protocol-2 pickles name it the Python 2 way
        qualified = f"{module}.{name}"
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) == ("builtins", "getattr"):
            return _stub_getattr
        if qualified.startswith(_STUB_PREFIXES):
            if qualified not in self._stubs:
                self._stubs[qualified] = type(name, (_Stub,), {"qualified_name": qualified})
            return self._stubs[qualified]
        raise pickle.UnpicklingError(f"checkpoint refers to {qualified}, which is not on the allow-list")


_allow_list_pickle = types.SimpleNamespace(Unpickler=_AllowListUnpickler, __name__="allow_list_pickle")


def _stub_state_dict(module: _Stub, prefix: str = "") -> dict[str, torch.Tensor]:
    """The ``state_dict`` a pickled ``nn.Module`` would have, read from its stub's recorded attributes."""
    state = module.__dict__
    tensors = {prefix + k: v.detach() for k, v in state.get("_parameters", {}).items() if v is not None}
    skipped = state.get("_non_persistent_buffers_set", set())
    tensors |= {prefix + k: v for k, v in state.get("_buffers", {}).items() if v is not None and k not in skipped}
    for name, child in state.get("_modules", {}).items():
        if child is not None:
            tensors |= _stub_state_dict(child, f"{prefix}{name}.")
    return tensors


def import_checkpoint(path: str | Path) -> LoadedModel:
    """Load an ultralytics ``.pt`` detection checkpoint without executing pickled code (see module docstring)."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is not a torch zip checkpoint (legacy pickles are not supported)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_allow_list_pickle)
    except pickle.UnpicklingError as error:
        raise CheckpointError(f"{path} refused: {error}") from None
    root = checkpoint.get("ema") or checkpoint.get("model") if isinstance(checkpoint, dict) else None
    if not isinstance(root, _Stub) or not isinstance(root.__dict__.get("yaml"), dict):
        raise CheckpointError(f"{path} holds no ultralytics model (expected a dict with 'ema' or 'model')")
    if not root.qualified_name.endswith("DetectionModel"):
        raise CheckpointError(f"{path} holds a {root.qualified_name}, not a detection model")

    config = dict(root.__dict__["yaml"])
    config.setdefault("akconv_indexing", "xy")  # the seed recipe's geometry; our own trainer records "ij"
    names = root.__dict__.get("names") or {i: str(i) for i in range(config["nc"])}
    train_args = checkpoint.get("train_args") or {}
    imgsz = train_args.get("imgsz", 640)
    metadata = ModelMetadata(
        name=Path(str(config.get("yaml_file") or path.stem)).stem,
        version=str(checkpoint.get("date") or "unknown"),
        config=config,
        names=[str(names[i]) for i in range(len(names))],
        input_size=int(imgsz if isinstance(imgsz, int) else max(imgsz)),
        akconv_indexing=config["akconv_indexing"],
        provenance={
            "imported_from": path.name,
            "ultralytics_version": checkpoint.get("version"),
            "date": checkpoint.get("date"),
            "epoch": checkpoint.get("epoch"),
            "train_args": {k: train_args.get(k) for k in ("data", "epochs", "imgsz", "batch") if k in train_args},
            "train_metrics": checkpoint.get("train_metrics"),
        },
    )
    return _rebuild(metadata, _stub_state_dict(root))


def load(path: str | Path | None = None) -> LoadedModel:
    """Load a bundle or an ultralytics ``.pt``; ``None`` means the bundled default model."""
    path = Path(path) if path is not None else DEFAULT_BUNDLE
    if not path.exists():
        raise CheckpointError(f"model path {path} does not exist")
    if path.suffix == ".pt":
        return import_checkpoint(path)
    return load_bundle(path)


def load_model(path: str | Path | None = None) -> DetectionModel:
    """A ``DetectionModel`` in eval mode, float32, unfused, from a bundle or a ``.pt`` (``None``: the default)."""
    return load(path).model
