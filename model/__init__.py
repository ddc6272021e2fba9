"""YOLOv10-AKConv as a Python package: the AKConv layer, configs, builder and weights formats.

Its modules import ultralytics, which must be configured before its first import (see :mod:`model.offline`), so
the package configures it before importing them.
"""

from model.offline import configure

configure()

from model.akconv import AKConv  # noqa: E402  (after configure(): ultralytics is imported from here on)
from model.build import Detector, akconv_layers, build_model, fuse_for_inference, sharing_weights  # noqa: E402
from model.checkpoint import load, load_model  # noqa: E402

__all__ = [
    "AKConv",
    "Detector",
    "akconv_layers",
    "build_model",
    "fuse_for_inference",
    "load",
    "load_model",
    "sharing_weights",
]
