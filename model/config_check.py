"""Every model config is checked against an allow-list before anything is built from it.

A model config reaches the builder from files other people wrote: the ``config`` of a bundle's ``model.json``, the
``yaml`` pickled inside an ultralytics ``.pt``, a YAML given to ``train``. Ultralytics' ``parse_model`` evaluates the
``activation`` string (``eval``) and resolves layer names in its module's globals, so an unchecked config can run
code. :func:`check_config` refuses anything that is not plainly a YOLO detection config of a known shape:

- top-level keys only from :data:`TOP_LEVEL_KEYS`, each of its type and within its bounds;
- ``activation`` only one of :data:`ACTIVATIONS`: a fixed set of spellings, each mapped to a module in code;
- rows ``[from, repeats, module, args]``: ``module`` only from :data:`LAYERS` (the layers the builder knows), ``from``
  only earlier layers, ``repeats`` a small integer, ``args`` only numbers, booleans, ``null``, short lists of
  numbers and the strings of :data:`ARGUMENT_STRINGS`; the last row, and only it, a detection head;
- sizes bounded (:data:`MAX_ROWS`, :data:`MAX_CHANNELS`, :data:`MAX_REPEATS`, scales), so a config cannot make the
  builder allocate gigabytes.

The checked config is built with ultralytics' own restricted path too (:func:`model.build.build_model`), but the
check here does not rely on it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from torch import nn


class ConfigError(ValueError):
    """A model config that cannot be built or is refused; the message names the offending key."""


# Spellings ultralytics' configs use, each mapped to a constructor here; no string is ever evaluated.
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    f"{prefix}{name}": factory
    for prefix in ("nn.", "torch.nn.")
    for name, factory in {
        "SiLU()": nn.SiLU,
        "ReLU()": nn.ReLU,
        "ReLU6()": nn.ReLU6,
        "LeakyReLU()": nn.LeakyReLU,
        "LeakyReLU(0.1)": lambda: nn.LeakyReLU(0.1),
        "Hardswish()": nn.Hardswish,
        "GELU()": nn.GELU,
        "Mish()": nn.Mish,
        "Identity()": nn.Identity,
    }.items()
}

HEADS = frozenset({"Detect", "v10Detect"})
LAYERS = frozenset(
    {"AKConv", "Conv", "DWConv", "Bottleneck", "C2", "C2f", "C2fCIB", "C3", "C3k2", "C2PSA", "PSA", "SCDown"}
    | {"SPP", "SPPF", "Concat", "nn.Upsample"}
    | HEADS
)
ARGUMENT_STRINGS = frozenset({"nc", "nearest", "bilinear", "None"})  # YAML reads None as a string

MAX_ROWS = 96  # backbone + head; the largest ultralytics detection config has 30
MAX_REPEATS = 16  # before the depth multiple; ultralytics' configs use up to 9
MAX_CHANNELS = 2048  # a row's output channels, and max_channels of a scale
MAX_CLASSES = 4096
MAX_ARGS = 8
MAX_NUMBER = 65536  # any number in a row's arguments
AKCONV_MAX_POINTS = 64
MAX_STRING = 256


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _int_in(low: int, high: int) -> Callable[[Any], bool]:
    return lambda value: _is_int(value) and low <= value <= high


def _number_in(low: float, high: float) -> Callable[[Any], bool]:
    return lambda value: _is_number(value) and low < value <= high


def _short_string(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_STRING


# key -> (what it must be, for the message; the test)
TOP_LEVEL_KEYS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "nc": (f"an integer from 1 to {MAX_CLASSES}", _int_in(1, MAX_CLASSES)),
    "scale": ("a key of 'scales'", lambda value: isinstance(value, str)),
    "scales": ("a mapping of scale names to [depth, width, max_channels]", lambda value: isinstance(value, dict)),
    "backbone": ("a list of rows", lambda value: isinstance(value, list)),
    "head": ("a list of rows", lambda value: isinstance(value, list)),
    "akconv_indexing": ("'ij' or 'xy'", lambda value: value in ("ij", "xy")),
    "activation": (f"one of {', '.join(ACTIVATIONS)}", lambda value: isinstance(value, str) and value in ACTIVATIONS),
    "depth_multiple": ("a number in (0, 2]", _number_in(0, 2)),
    "width_multiple": ("a number in (0, 2]", _number_in(0, 2)),
    "channels": ("3 (RGB input)", lambda value: _is_int(value) and value == 3),
    "ch": ("3 (RGB input)", lambda value: _is_int(value) and value == 3),
    "end2end": ("true or false", lambda value: isinstance(value, bool)),
    "reg_max": ("an integer from 1 to 32", _int_in(1, 32)),
    "yaml_file": (f"a string of at most {MAX_STRING} characters", _short_string),
}


def check_config(config: Any) -> dict[str, Any]:
    """Return ``config`` if it passes the allow-list (module docstring); raise :class:`ConfigError` naming the key.

    Runs no code from the config and builds nothing. The config is returned unchanged (not copied).
    """
    if not isinstance(config, dict):
        raise ConfigError(f"the model config must be a mapping, got {type(config).__name__}")
    for key, value in config.items():
        if key not in TOP_LEVEL_KEYS:
            allowed = ", ".join(TOP_LEVEL_KEYS)
            raise ConfigError(f"config key {str(key)[:MAX_STRING]!r} is not allowed (allowed: {allowed})")
        expected, test = TOP_LEVEL_KEYS[key]
        if not test(value):
            raise ConfigError(f"config key {key!r} must be {expected}, got {_shown(value)}")
    for key in ("nc", "backbone", "head"):
        if key not in config:
            raise ConfigError(f"config key {key!r} is missing")
    _check_scales(config)
    rows = config["backbone"] + config["head"]
    if not 1 <= len(rows) <= MAX_ROWS:
        raise ConfigError(f"config has {len(rows)} layers in backbone and head; 1 to {MAX_ROWS} are allowed")
    for index, row in enumerate(rows):
        where = f"backbone[{index}]" if index < len(config["backbone"]) else f"head[{index - len(config['backbone'])}]"
        _check_row(row, index, where, is_last=index == len(rows) - 1)
    return config


def _check_scales(config: dict[str, Any]) -> None:
    scales = config.get("scales")
    if scales is None:
        if "scale" in config:
            raise ConfigError("config key 'scale' is set but the config defines no 'scales'")
        return
    if not 1 <= len(scales) <= 16:
        raise ConfigError(f"config key 'scales' must define 1 to 16 scales, got {len(scales)}")
    for name, values in scales.items():
        valid = (
            isinstance(name, str)
            and 0 < len(name) <= 16
            and isinstance(values, list)
            and len(values) == 3
            and _number_in(0, 2)(values[0])
            and _number_in(0, 2)(values[1])
            and _int_in(8, MAX_CHANNELS)(values[2])
        )
        if not valid:
            raise ConfigError(
                f"config key 'scales' entry {_shown(name)} must be [depth in (0, 2], width in (0, 2], "
                f"max_channels from 8 to {MAX_CHANNELS}], got {_shown(values)}"
            )
    if "scale" in config and config["scale"] not in scales:
        raise ConfigError(f"config key 'scale' is {_shown(config['scale'])}, not one of the scales {sorted(scales)}")


def _check_row(row: Any, index: int, where: str, is_last: bool) -> None:
    if not isinstance(row, list) or len(row) != 4:
        raise ConfigError(f"config {where} must be a row [from, repeats, module, args], got {_shown(row)}")
    source, repeats, module, args = row
    if not isinstance(module, str) or module not in LAYERS:
        raise ConfigError(
            f"config {where} names layer {_shown(module)}, which is not allowed (allowed: {', '.join(sorted(LAYERS))})"
        )
    if (module in HEADS) != is_last:
        raise ConfigError(f"config {where}: a detection head ({', '.join(sorted(HEADS))}) must be the last row, only")
    sources = source if isinstance(source, list) else [source]
    if not 1 <= len(sources) <= 8 or not all(_is_int(s) and (-index <= s < index or s == -1) for s in sources):
        raise ConfigError(f"config {where} 'from' must refer to earlier layers, got {_shown(source)}")
    if not _int_in(1, MAX_REPEATS)(repeats):
        raise ConfigError(f"config {where} repeats must be an integer from 1 to {MAX_REPEATS}, got {_shown(repeats)}")
    if not isinstance(args, list) or len(args) > MAX_ARGS:
        raise ConfigError(f"config {where} args must be a list of at most {MAX_ARGS} values, got {_shown(args)}")
    for position, value in enumerate(args):
        if not _allowed_argument(value):
            raise ConfigError(
                f"config {where} args[{position}] is {_shown(value)}: arguments may only be numbers up to "
                f"{MAX_NUMBER}, true/false, null, short lists of numbers, or {', '.join(sorted(ARGUMENT_STRINGS))}"
            )
    if module not in HEADS | {"Concat", "nn.Upsample"} and not (args and _int_in(1, MAX_CHANNELS)(args[0])):
        raise ConfigError(f"config {where} ({module}) args[0], its output channels, must be 1 to {MAX_CHANNELS}")
    if module == "AKConv":
        points, stride = (args + [None, 1])[1:3]
        if not _int_in(1, AKCONV_MAX_POINTS)(points) or not _int_in(1, 4)(stride):
            raise ConfigError(
                f"config {where} (AKConv) args must be [c2, num_param 1..{AKCONV_MAX_POINTS}, stride 1..4], "
                f"got {_shown(args)}"
            )


def _allowed_argument(value: Any, nested: bool = False) -> bool:
    if value is None or isinstance(value, bool):
        return True
    if _is_number(value):
        return abs(value) <= MAX_NUMBER
    if isinstance(value, str):
        return value in ARGUMENT_STRINGS
    if isinstance(value, list) and not nested:
        return len(value) <= MAX_ARGS and all(_is_number(v) and abs(v) <= MAX_NUMBER for v in value)
    return False


def _shown(value: Any) -> str:
    """``repr`` of a refused value, cut short: a hostile config must not flood the log."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
