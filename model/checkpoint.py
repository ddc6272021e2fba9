"""Weights formats: the project's bundle, and import of ultralytics ``.pt`` checkpoints without running their code.

A model file is untrusted data (``docs/RELIABILITY.md``, "Model files"): nothing in it is evaluated or unpickled
beyond an allow-list, its config passes :func:`model.config_check.check_config` before anything is built, and a
bundle's weights are checked against the sha256 it was written with.

**Bundle** (a directory):

- ``model.safetensors``: the ``state_dict`` of the unfused ``DetectionModel`` (fp16 or fp32 tensors);
- ``model.json``: :class:`ModelMetadata`: name, version, the full model config (scale included), class names,
  input size, AKConv sampling geometry, the weights file's sha256 and provenance (source, data, epochs, recorded
  validation metrics, date, project version).

Loading a bundle never unpickles anything: the model is rebuilt from its config and the tensors are copied in.
Bundles are written atomically (a temporary directory renamed into place), readable by every user (files 0644,
directory 0755), and never over an existing bundle unless asked (``force``).

**Ultralytics ``.pt``** (a pickled ``DetectionModel``, as the seed recipe's trainer saves it, with AKConv at
``ultralytics.nn.Extramodule.AKConv.AKConv``; plain YOLOv10 checkpoints too): the globals it names are listed
without unpickling (torch's scan) and refused unless allowed, then it is read with an allow-list unpickler that
turns every pickled class into an inert stub, so no pickled code runs and the AKConv module need not exist. Only
the tensors, the config and the class names are kept; the model is rebuilt from the config with
:func:`model.build.build_model` and the weights are loaded strictly. AKConv layers of a seed-recipe checkpoint get
``indexing="xy"`` (the geometry they were trained with).

Every failure is a :class:`CheckpointError` of one kind (its ``exit_status`` is what the command-line tools exit
with) whose message names the file and what to do.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.metadata
import json
import logging
import pickle
import re
import shutil
import tempfile
import types
import zipfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file
from ultralytics.nn.tasks import DetectionModel

from model.build import build_model
from model.config_check import ConfigError, check_config

log = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).parent / "weights"
DEFAULT_BUNDLE = WEIGHTS_DIR / "yolov10n-akconv"
WEIGHTS_FILE = "model.safetensors"
METADATA_FILE = "model.json"
BUNDLE_FORMAT_VERSION = 2  # 2 added weights_sha256; 1 is still read, with a warning that nothing is verified
MAX_METADATA_BYTES = 1024 * 1024
LOW_MAP50 = 0.05  # a recorded validation mAP50 below this: the model starts with a warning


class CheckpointError(ValueError):
    """A model file that cannot be loaded; the message names the file and says what to do."""

    exit_status = 3


class ModelNotFound(CheckpointError):
    """The path does not exist or is not a bundle or ``.pt``."""

    exit_status = 4


class CorruptModel(CheckpointError):
    """The bytes are damaged: checksum mismatch, truncated weights, unreadable ``model.json`` or archive."""

    exit_status = 5


class RefusedModel(CheckpointError):
    """The file asks for something the allow-lists refuse: code in the config or the pickle, unknown keys, types."""

    exit_status = 6


class ModelMismatch(CheckpointError):
    """The parts disagree: weights of another shape or class count than the config, names that are not ``nc``."""

    exit_status = 7


class BundleExists(CheckpointError):
    """Writing would replace an existing bundle (or a folder that is not one) and ``force`` was not given."""

    exit_status = 8


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
    weights_sha256: str | None = None  # None only in format 1 bundles and for .pt imports
    format_version: int = BUNDLE_FORMAT_VERSION
    description: str = ""  # what the model finds, for people; optional

    def summary(self) -> str:
        """What the model finds, in a sentence: its description, else its classes."""
        if self.description:
            return self.description
        shown = ", ".join(self.names[:20]) + (f" and {len(self.names) - 20} more" if len(self.names) > 20 else "")
        return f"Finds {len(self.names)} classes: {shown}."

    def sha256(self) -> str | None:
        """The sha256 of what the model was loaded from: a bundle's weights file, or the ``.pt`` it came from."""
        return self.weights_sha256 or (self.provenance.get("source") or {}).get("sha256")

    def recorded_map50(self) -> float | None:
        """The validation mAP50 training recorded, if any."""
        value = (self.provenance.get("val_metrics") or {}).get("mAP50")
        return float(value) if isinstance(value, int | float) else None


@dataclass
class LoadedModel:
    """A ``DetectionModel`` (eval mode, float32, unfused, CPU), its metadata and what was verified.

    ``checksum``: ``"verified"`` (a bundle's weights match its recorded sha256), ``"not recorded"`` (a format 1
    bundle) or ``"not applicable"`` (a ``.pt``: its own sha256 is in the provenance).
    """

    model: DetectionModel
    metadata: ModelMetadata
    checksum: str


def project_version() -> str:
    try:
        return importlib.metadata.version("akconv-detector")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def normalize_metrics(metrics: dict[str, Any] | None) -> dict[str, float]:
    """Ultralytics' metric keys (``metrics/mAP50(B)``) as plain names (``mAP50``); numbers only."""
    return {
        re.sub(r"^metrics/|\(B\)$", "", str(key)): round(float(value), 4)
        for key, value in (metrics or {}).items()
        if isinstance(value, int | float)
    }


def architecture_name(config: dict[str, Any]) -> str:
    """``yolov10s-akconv`` for a YOLOv10 config at scale s with AKConv rows; ``yolov10n`` without AKConv."""
    family = re.search(r"yolo(v?\d+)", str(config.get("yaml_file", "")), re.IGNORECASE)
    base = f"yolo{family.group(1).lower() if family else 'v10'}{config.get('scale') or ''}"
    has_akconv = any(row[2] == "AKConv" for row in config.get("backbone", []) + config.get("head", []))
    return f"{base}-akconv" if has_akconv else base


def save_bundle(
    model: DetectionModel,
    out_dir: str | Path,
    *,
    name: str,
    version: str,
    input_size: int,
    provenance: dict[str, Any] | None = None,
    half: bool = True,
    force: bool = False,
) -> Path:
    """Write ``model`` (unfused) as a bundle in ``out_dir``; floating tensors in fp16 when ``half``.

    Written into a temporary directory beside ``out_dir``, then renamed into place: a reader never sees half a
    bundle. With ``force`` an existing bundle (or empty directory) at ``out_dir`` is replaced; anything else there is
    never touched.

    Raises:
        BundleExists: ``out_dir`` exists and ``force`` is not set, or it is a folder that holds no bundle.
    """
    out_dir = Path(out_dir)
    check_writable(out_dir, force)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        tensors = {
            key: (value.half() if half and value.is_floating_point() else value).detach().cpu().contiguous()
            for key, value in model.state_dict().items()
        }
        save_file(tensors, staging / WEIGHTS_FILE)
        names = model.names if isinstance(model.names, dict) else dict(enumerate(model.names))
        metadata = ModelMetadata(
            name=name,
            version=version,
            config=model.yaml,
            names=[str(names[i]) for i in range(len(names))],
            input_size=input_size,
            akconv_indexing=model.yaml.get("akconv_indexing", "ij"),
            provenance=provenance or {},
            weights_sha256=file_sha256(staging / WEIGHTS_FILE),
        )
        (staging / METADATA_FILE).write_text(json.dumps(asdict(metadata), indent=2) + "\n")
        for path in staging.iterdir():
            path.chmod(0o644)
        staging.chmod(0o755)  # mkdtemp makes it 0700: the container's user could not read a mounted bundle
        if out_dir.exists():
            retired = out_dir.with_name(f".{out_dir.name}.replaced")
            shutil.rmtree(retired, ignore_errors=True)
            out_dir.rename(retired)
            staging.rename(out_dir)
            shutil.rmtree(retired)
        else:
            staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def check_writable(out_dir: Path, force: bool) -> None:
    """Refuse (:class:`BundleExists`) to write over ``out_dir`` unless ``force`` and it is a bundle or empty."""
    if not out_dir.exists():
        return
    if not force:
        raise BundleExists(f"{out_dir} already exists; choose another output or pass --force to replace the bundle")
    if not out_dir.is_dir() or not ((out_dir / METADATA_FILE).is_file() or not any(out_dir.iterdir())):
        raise BundleExists(f"{out_dir} exists and is not a model bundle; --force only replaces a bundle")


def _metadata_error(bundle: Path, message: str) -> CheckpointError:
    return RefusedModel(f"{bundle / METADATA_FILE}: {message}; re-export the bundle with python -m model convert")


_METADATA_TYPES: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "version": (str,),
    "config": (dict,),
    "names": (list,),
    "input_size": (int,),
    "akconv_indexing": (str,),
    "provenance": (dict,),
    "weights_sha256": (str, type(None)),
    "format_version": (int,),
    "description": (str,),
}


def _check_identity(metadata: ModelMetadata, where: str) -> None:
    """Name, version, class names and input size of a model, from a bundle or a ``.pt``: types and bounds."""
    printable = re.compile(r"^[\w.@+:-]{1,128}$")
    if not printable.match(metadata.name):
        raise RefusedModel(f"{where}: model name {metadata.name[:80]!r} must be 1-128 letters, digits or ._-@+:")
    if not printable.match(metadata.version):
        raise RefusedModel(f"{where}: model version {metadata.version[:80]!r} must be 1-128 letters, digits or ._-@+:")
    if len(metadata.description) > 2000:
        raise RefusedModel(f"{where}: the description is over 2,000 characters")
    if not all(isinstance(n, str) and 0 < len(n) <= 64 for n in metadata.names):
        raise RefusedModel(f"{where}: class names must be strings of 1 to 64 characters")
    if not 32 <= metadata.input_size <= 4096 or metadata.input_size % 32:
        raise RefusedModel(f"{where}: input_size {metadata.input_size} must be a multiple of 32 from 32 to 4096")
    if metadata.akconv_indexing not in ("ij", "xy"):
        raise RefusedModel(f"{where}: akconv_indexing must be 'ij' or 'xy', got {metadata.akconv_indexing[:20]!r}")
    nc = metadata.config.get("nc")
    if len(metadata.names) != nc:
        raise ModelMismatch(
            f"{where}: {len(metadata.names)} class names for a config with nc={nc}; give one name per class"
        )


def read_metadata(bundle: Path) -> ModelMetadata:
    """``model.json`` of ``bundle``, every field checked (types, bounds, config allow-list); nothing built."""
    path = bundle / METADATA_FILE
    if path.stat().st_size > MAX_METADATA_BYTES:
        raise _metadata_error(bundle, f"is larger than {MAX_METADATA_BYTES} bytes")
    try:
        raw = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CorruptModel(f"{path} is not valid JSON ({error}); the bundle is damaged: re-export it") from None
    if not isinstance(raw, dict):
        raise _metadata_error(bundle, "must hold a JSON object")
    if raw.get("format_version") not in (1, BUNDLE_FORMAT_VERSION):
        raise _metadata_error(bundle, f"unsupported format_version {raw.get('format_version')!r}")
    known = {f.name for f in fields(ModelMetadata)}
    for key, value in raw.items():
        if key not in known:
            raise _metadata_error(bundle, f"unknown key {key[:80]!r}")
        if not isinstance(value, _METADATA_TYPES[key]) or isinstance(value, bool):
            raise _metadata_error(bundle, f"key {key!r} has the wrong type ({type(value).__name__})")
    missing = [key for key in ("name", "version", "config", "names", "input_size", "akconv_indexing") if key not in raw]
    if missing:
        raise _metadata_error(bundle, f"missing keys {', '.join(missing)}")
    metadata = ModelMetadata(**raw)
    sha = metadata.weights_sha256
    if metadata.format_version >= 2 and (sha is None or not re.fullmatch(r"[0-9a-f]{64}", sha)):
        raise _metadata_error(bundle, "weights_sha256 must be the 64 hex digits of the weights file's sha256")
    _check_config(metadata.config, path)
    _check_identity(metadata, str(path))
    return metadata


def _check_config(config: dict[str, Any], source: Path) -> None:
    try:
        check_config(config)
    except ConfigError as error:
        raise RefusedModel(f"{source}: refused: {error}") from None


def verify_checksum(path: Path, data: bytes, recorded: str | None) -> str:
    """``"verified"`` when ``data`` (the weights file at ``path``) hashes to ``recorded``, ``"not recorded"`` when
    there is nothing to compare (format 1); raises :class:`CorruptModel` on a mismatch."""
    if recorded is None:
        return "not recorded"
    actual = hashlib.sha256(data).hexdigest()
    if actual != recorded:
        raise CorruptModel(
            f"{path}: sha256 {actual} does not match {recorded} recorded in {METADATA_FILE}: the weights are damaged "
            "or were replaced; copy or re-export the bundle"
        )
    return "verified"


def _read_tensors(path: Path, data: bytes) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file's bytes (``data``, read from ``path``)."""
    try:
        return load_safetensors(data)
    except (SafetensorError, ValueError) as error:
        raise CorruptModel(f"{path} could not be read ({error}); the file is damaged: copy or re-export it") from None


def _head_classes(state_dict: dict[str, torch.Tensor]) -> int | None:
    """The class count a detection head's weights were trained for (its class branch's last conv)."""
    for key, tensor in state_dict.items():
        if re.search(r"\.cv3\.0\.2\.weight$", key):
            return int(tensor.shape[0])
    return None


def _rebuild(metadata: ModelMetadata, state_dict: dict[str, torch.Tensor], source: Path, checksum: str) -> LoadedModel:
    model = build_model(metadata.config, indexing=metadata.akconv_indexing)  # its config passed _check_config
    expected = model.state_dict()
    classes = _head_classes(state_dict)
    if classes is not None and classes != metadata.config["nc"]:
        raise ModelMismatch(
            f"{source}: the weights are for {classes} classes but the config says nc={metadata.config['nc']}: "
            "the weights and the config come from different models; convert the checkpoint they were trained as"
        )
    missing, unexpected = expected.keys() - state_dict.keys(), state_dict.keys() - expected.keys()
    reshaped = [k for k in expected.keys() & state_dict.keys() if expected[k].shape != state_dict[k].shape]
    if missing or unexpected or reshaped:
        first = sorted(reshaped or missing or unexpected)[0]
        raise ModelMismatch(
            f"{source}: the weights do not match the config ({len(missing)} tensors missing, {len(unexpected)} "
            f"unexpected, {len(reshaped)} of another shape; first: {first}): they come from a different model; "
            "convert the checkpoint they were trained as"
        )
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()})
    model.names = dict(enumerate(metadata.names))
    return LoadedModel(model.float().eval(), metadata, checksum)


def load_bundle(path: str | Path) -> LoadedModel:
    """Load a bundle directory (or its ``model.json`` / ``model.safetensors``): checked, verified, rebuilt."""
    bundle = Path(path)
    if bundle.is_file():
        bundle = bundle.parent
    if not (bundle / METADATA_FILE).is_file() or not (bundle / WEIGHTS_FILE).is_file():
        raise ModelNotFound(
            f"{bundle} is not a model bundle: it needs {METADATA_FILE} and {WEIGHTS_FILE} "
            "(or give an ultralytics .pt; python -m model convert makes a bundle of one)"
        )
    metadata = read_metadata(bundle)
    weights = bundle / WEIGHTS_FILE
    data = weights.read_bytes()  # read once: hashed, then parsed
    checksum = verify_checksum(weights, data, metadata.weights_sha256)
    if checksum == "not recorded":
        log.warning(
            "bundle has no weights checksum (format 1): its integrity is not verified; re-save it to add one",
            extra={"bundle": str(bundle)},
        )
    return _rebuild(metadata, _read_tensors(weights, data), weights, checksum)


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


def _allowed_global(module: str, name: str) -> bool:
    """Whether a pickle may name ``module.name``: the functions above, torch dtypes, ``getattr`` (on stubs only) and
    classes under :data:`_STUB_PREFIXES`, which become stubs."""
    module = "builtins" if module == "__builtin__" else module
    return (
        (module, name) in _SAFE_GLOBALS
        or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        or (module, name) == ("builtins", "getattr")
        or f"{module}.{name}".startswith(_STUB_PREFIXES)
    )


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
        if not _allowed_global(module, name):
            raise pickle.UnpicklingError(f"checkpoint refers to {qualified}, which is not on the allow-list")
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        if module == "torch":
            return getattr(torch, name)  # a dtype
        if (module, name) == ("builtins", "getattr"):
            return _stub_getattr
        if qualified not in self._stubs:
            self._stubs[qualified] = type(name, (_Stub,), {"qualified_name": qualified})
        return self._stubs[qualified]


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


def _refuse_foreign_globals(path: Path) -> None:
    """List the globals the pickle names (torch's scan, nothing unpickled) and refuse any outside the allow-list."""
    try:
        named = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except (ValueError, RuntimeError, pickle.UnpicklingError) as error:
        raise CorruptModel(f"{path} could not be read as a torch checkpoint ({error}); the file is damaged") from None
    refused = [name for name in named if not _allowed_global(*name.rpartition(".")[::2])]
    if refused:
        raise RefusedModel(
            f"{path} refused: it refers to {', '.join(sorted(refused)[:5])}, which is not on the allow-list "
            "(a detection checkpoint needs only tensors, torch and ultralytics classes)"
        )


def import_checkpoint(path: str | Path, name: str | None = None, version: str | None = None) -> LoadedModel:
    """Load an ultralytics ``.pt`` detection checkpoint without executing pickled code (see module docstring).

    ``name`` defaults to the file's stem and its architecture (``best-yolov10s-akconv``), ``version`` to the date the
    checkpoint records (``YYYY-MM-DD``), else today's.
    """
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise CorruptModel(f"{path} is not a torch zip checkpoint (legacy pickles are not supported)")
    _refuse_foreign_globals(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_allow_list_pickle)
    except pickle.UnpicklingError as error:
        raise RefusedModel(f"{path} refused: {error}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile) as error:
        raise CorruptModel(f"{path} could not be read ({error}); the file is damaged") from None
    root = checkpoint.get("ema") or checkpoint.get("model") if isinstance(checkpoint, dict) else None
    if not isinstance(root, _Stub) or not isinstance(root.__dict__.get("yaml"), dict):
        raise RefusedModel(f"{path} holds no ultralytics model (expected a dict with 'ema' or 'model')")
    if not root.qualified_name.endswith("DetectionModel"):
        raise RefusedModel(f"{path} holds a {root.qualified_name}, not a detection model")

    config = dict(root.__dict__["yaml"])
    config.setdefault("akconv_indexing", "xy")  # the seed recipe's geometry; our own trainer records "ij"
    _check_config(config, path)
    names = root.__dict__.get("names")
    names = names if isinstance(names, dict) else {i: str(i) for i in range(config["nc"])}
    train_args = checkpoint.get("train_args") if isinstance(checkpoint.get("train_args"), dict) else {}
    imgsz = train_args.get("imgsz", 640)
    recorded_date = str(checkpoint.get("date") or "")
    metadata = ModelMetadata(
        name=name or f"{path.stem}-{architecture_name(config)}",
        version=version or (recorded_date[:10] if recorded_date else dt.date.today().isoformat()),
        config=config,
        names=[str(names.get(i, i)) for i in range(len(names))],
        input_size=int(imgsz if isinstance(imgsz, int) else max(imgsz)),
        akconv_indexing=config["akconv_indexing"],
        provenance={
            "source": {"file": path.name, "sha256": file_sha256(path)},
            "data": train_args.get("data"),
            "epochs": train_args.get("epochs"),
            "val_metrics": normalize_metrics(checkpoint.get("train_metrics")),
            "date": recorded_date or None,
            "project_version": project_version(),
            "ultralytics_version": checkpoint.get("version"),
            "train_args": {k: train_args.get(k) for k in ("data", "epochs", "imgsz", "batch") if k in train_args},
        },
    )
    _check_identity(metadata, str(path))
    return _rebuild(metadata, _stub_state_dict(root), path, "not applicable")


def load(path: str | Path | None = None) -> LoadedModel:
    """Load a bundle or an ultralytics ``.pt``; ``None`` means the bundled default model.

    A model whose recorded validation mAP50 is below :data:`LOW_MAP50` loads with a warning.

    Raises:
        CheckpointError: one of its kinds (:class:`ModelNotFound`, :class:`CorruptModel`, :class:`RefusedModel`,
            :class:`ModelMismatch`), the message naming the file.
    """
    path = Path(path) if path is not None else DEFAULT_BUNDLE
    if not path.exists():
        raise ModelNotFound(f"model path {path} does not exist; give a bundle directory or an ultralytics .pt")
    loaded = import_checkpoint(path) if path.suffix == ".pt" else load_bundle(path)
    map50 = loaded.metadata.recorded_map50()
    if map50 is not None and map50 < LOW_MAP50:
        log.warning(
            f"model {loaded.metadata.name} recorded a validation mAP50 of {map50:.3f} (below {LOW_MAP50}): it was "
            "barely trained or on other data; check it before serving it",
            extra={"model_path": str(path), "val_mAP50": map50},
        )
    return loaded


def describe(path: str | Path) -> dict[str, Any]:
    """What :func:`load` would serve from ``path``, for ``python -m model inspect``: identity, classes, input size,
    AKConv indexing, parameters, provenance and the checksum's status. Loads (and so checks) the model."""
    loaded = load(path)
    metadata = loaded.metadata
    return {
        "path": str(path),
        "name": metadata.name,
        "version": metadata.version,
        "description": metadata.summary(),
        "classes": metadata.names,
        "input_size": metadata.input_size,
        "akconv_indexing": metadata.akconv_indexing,
        "akconv_layers": sum(row[2] == "AKConv" for row in metadata.config["backbone"] + metadata.config["head"]),
        "parameters": sum(p.numel() for p in loaded.model.parameters()),
        "weights_sha256": metadata.sha256(),
        "checksum": loaded.checksum,
        "provenance": metadata.provenance,
    }


def load_model(path: str | Path | None = None) -> DetectionModel:
    """A ``DetectionModel`` in eval mode, float32, unfused, from a bundle or a ``.pt`` (``None``: the default)."""
    return load(path).model
