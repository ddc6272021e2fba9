"""YOLOv10-AKConv as a Python package: the AKConv layer, configs, builder and weights formats.

Importing it first makes ultralytics run offline (see :mod:`model.offline`).
"""

from model import offline as _offline  # noqa: F401  (must run before ultralytics is imported)
from model.akconv import AKConv
from model.build import Detector, akconv_layers, build_model, fuse_for_inference
from model.checkpoint import load, load_model

__all__ = ["AKConv", "Detector", "akconv_layers", "build_model", "fuse_for_inference", "load", "load_model"]
