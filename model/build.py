"""Build YOLOv10-AKConv models through ultralytics' own ``parse_model``, without patching ultralytics.

Every config is checked first (:func:`model.config_check.check_config`): nothing in a config is evaluated, and
ultralytics' own restricted parsing (no ``eval``, layers only) is switched on as a second line.

``parse_model`` resolves layer names in its own module and only scales the channels of layers it knows. So the
config is parsed with each ``AKConv`` row replaced by a ``Conv`` placeholder of the same output channels and stride
(ultralytics computes the scaled channels and strides as for any layer), then each placeholder is swapped for an
:class:`~model.akconv.AKConv` of the same shape. ``model.yaml`` keeps the ``AKConv`` rows and records the sampling
geometry under ``akconv_indexing``. Plain ultralytics models are untouched by any of this.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
import yaml
from torch import nn
from ultralytics.nn.modules import Conv
from ultralytics.nn.tasks import DetectionModel, _SafeLoad
from ultralytics.utils import LOGGER
from ultralytics.utils.torch_utils import initialize_weights

from model.akconv import AKConv, Indexing
from model.config_check import ACTIVATIONS, ConfigError, check_config

CopiedT = TypeVar("CopiedT")

CONFIG_DIR = Path(__file__).parent / "configs"
AKCONV_MODULE = "AKConv"
# Ultralytics keeps the default activation in a class attribute (process-wide); builds take turns setting it.
_BUILD_LOCK = threading.Lock()


def load_config(config: str | Path | dict[str, Any]) -> dict[str, Any]:
    """Read a model config: a dict, a YAML path, or the name of a bundled config (``"yolov10n-akconv"``)."""
    if isinstance(config, dict):
        return copy.deepcopy(config)
    path = Path(config)
    if not path.exists():
        bundled = CONFIG_DIR / f"{path.stem}.yaml"
        if not bundled.exists():
            known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
            raise ConfigError(f"model config {str(config)!r} is neither a file nor a bundled config ({known})")
        path = bundled
    return yaml.safe_load(path.read_text())


@contextlib.contextmanager
def _restricted_build(activation: str | None) -> Iterator[None]:
    """Build under ultralytics' restricted parsing, with the config's activation from :data:`ACTIVATIONS`.

    ``parse_model`` evaluates a config's ``activation`` unless restricted; here the key never reaches it (the module
    is set from the allow-list instead), and the restricted flag also limits layer names to ``nn.Module`` classes.
    ``Conv.default_act`` is restored afterwards, so one build never changes the activation of the next.
    """
    with _BUILD_LOCK:
        previous_act, previous_flag = Conv.default_act, getattr(_SafeLoad._local, "active", False)
        if activation is not None:
            Conv.default_act = ACTIVATIONS[activation]()
        _SafeLoad._local.active = True
        try:
            yield
        finally:
            Conv.default_act, _SafeLoad._local.active = previous_act, previous_flag


def _with_placeholders(cfg: dict[str, Any]) -> dict[str, Any]:
    """Copy of ``cfg`` with every AKConv row ``[c2, num_param, stride, ...]`` as a ``Conv`` ``[c2, 3, stride]``.

    A 3×3 convolution with padding 1 has the output size of AKConv's offset convolution for any stride.
    """
    placeholder = copy.deepcopy(cfg)
    for section in ("backbone", "head"):
        for row in placeholder[section]:
            if row[2] == AKCONV_MODULE:
                stride = row[3][2] if len(row[3]) > 2 else 1
                row[2], row[3] = "Conv", [row[3][0], 3, stride]
    return placeholder


def _akconv_rows(cfg: dict[str, Any]) -> dict[int, list[Any]]:
    """Layer index -> AKConv args (without c1) for every AKConv row of the config."""
    rows = cfg["backbone"] + cfg["head"]
    return {i: row[3] for i, row in enumerate(rows) if row[2] == AKCONV_MODULE}


def build_model(
    config: str | Path | dict[str, Any],
    *,
    scale: str | None = None,
    nc: int | None = None,
    indexing: Indexing = "ij",
    verbose: bool = False,
) -> DetectionModel:
    """Build an ultralytics ``DetectionModel`` whose AKConv rows are :class:`~model.akconv.AKConv` layers.

    Args:
        config: a dict, a YAML path or a bundled config name (see ``model/configs``).
        scale: scale key of ``scales`` to use; default: the config's ``scale``.
        nc: number of classes; default: the config's ``nc``.
        indexing: sampling geometry of the AKConv layers, ``"ij"`` (correct) or ``"xy"`` (seed recipe).
        verbose: print ultralytics' layer table and summary.

    Returns:
        The model in training mode, float32, on the CPU.

    Raises:
        ConfigError: the config fails :func:`model.config_check.check_config` or names an undefined scale.
    """
    cfg = check_config(load_config(config))
    scales = cfg.get("scales") or {}
    scale = scale or cfg.get("scale")
    if scales and scale not in scales:
        raise ConfigError(f"scale {scale!r} is not defined in the config's scales {sorted(scales)}; set 'scale'")
    if scale:
        cfg["scale"] = scale
    if nc is not None:
        cfg["nc"] = nc
    cfg["akconv_indexing"] = indexing

    parsed = _with_placeholders({key: value for key, value in cfg.items() if key != "activation"})
    with _restricted_build(cfg.get("activation")):
        model = DetectionModel(parsed, nc=cfg["nc"], verbose=False)  # its summary would show the placeholders
    for i, args in _akconv_rows(cfg).items():
        placeholder = model.model[i]
        layer = AKConv(placeholder.conv.in_channels, placeholder.conv.out_channels, *args[1:], indexing=indexing)
        initialize_weights(layer)  # the BatchNorm eps/momentum ultralytics gives every layer it builds
        layer.i, layer.f, layer.type = placeholder.i, placeholder.f, f"{AKConv.__module__}.{AKConv.__name__}"
        layer.np = sum(p.numel() for p in layer.parameters())
        model.model[i] = layer
    model.yaml = cfg
    if verbose:
        _log_layers(model)
    return model


def _log_layers(model: DetectionModel) -> None:
    """Ultralytics' layer table, after the AKConv swap (parse_model's own table shows the placeholders)."""
    LOGGER.info(f"{'':>3}{'from':>20}{'params':>10}  {'module':<45}")
    for layer in model.model:
        LOGGER.info(f"{layer.i:>3}{layer.f!s:>20}{layer.np:10.0f}  {layer.type:<45}")
    model.info()


def akconv_layers(model: nn.Module) -> list[AKConv]:
    """All AKConv layers of a model, in order."""
    return [m for m in model.modules() if isinstance(m, AKConv)]


class Detector(nn.Module):
    """The inference contract the service relies on, pinned once.

    Input: images (B, 3, H, W), RGB, float in [0, 1], H and W multiples of the model's largest stride (32).
    Output: (B, K, 6) rows ``[x1, y1, x2, y2, score, class]`` in input pixels, sorted by score, from the
    one-to-one head (no NMS); K = min(max_det, anchors), ``max_det`` being the head's (300). Anchors at input
    H×W: (H·W / 64)·(1 + 1/4 + 1/16), 2100 at 320×320.
    """

    def __init__(self, model: DetectionModel) -> None:
        super().__init__()
        self.model = model
        self.max_det = model.model[-1].max_det

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)[0]  # an eval v10 head returns (decoded, raw) unless exporting


def fuse_for_inference(model: DetectionModel) -> Detector:
    """Fold every BatchNorm, keep only the one-to-one (NMS-free) head, switch to eval mode (in place).

    Ultralytics' ``fuse()`` drops the one-to-one branch of a v10 head unless ``end2end`` is set first, and only
    then does the forward skip NMS-style decoding and return top-k rows.
    """
    model.end2end = True
    model.fuse(verbose=False)
    for layer in akconv_layers(model):
        layer.fuse()
    return Detector(model.eval()).eval()


def sharing_weights(copied: CopiedT, weights: nn.Module) -> CopiedT:
    """A deep copy of ``copied`` (a detector, or what holds one) that shares the parameters and buffers of
    ``weights``: its modules are its own, no tensor memory is copied. Functions inside are shared, as ``copy`` does.

    For threads running one model at once: ultralytics' head caches the anchors of the last input shape in its
    attributes, so two threads running one module on different shapes would decode with each other's anchors.
    """
    shared = {id(tensor): tensor for tensor in itertools.chain(weights.parameters(), weights.buffers())}
    return copy.deepcopy(copied, shared)
