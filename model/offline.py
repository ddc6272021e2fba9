"""Keep ultralytics offline, silent towards the outside and inside a temp dir.

Imported by ``model/__init__.py`` before anything imports ultralytics: ultralytics reads ``YOLO_OFFLINE`` and
``YOLO_CONFIG_DIR`` at import time, then writes its settings file there. Without this it probes DNS, may download
fonts and weights, sends usage events and writes to ``~/.config/Ultralytics``.

On import, ultralytics sets ``OMP_NUM_THREADS=1`` when it is unset, which would leave torch on one core in every
process that imports this package (the server included); that is undone when the user had not set it.

Ultralytics also replaces ``PIL.Image.open`` process-wide with a wrapper that, on any file Pillow cannot identify,
tries to pip-install ``pi-heif``. A server handed arbitrary bytes must never do that, so Pillow's own ``open`` is
put back (HEIF input is not supported; see the service's formats).
"""

import os
import tempfile
from pathlib import Path

import torch
from PIL import Image

ULTRALYTICS_HOME = Path(tempfile.gettempdir()) / "akconv-detector" / "ultralytics"

os.environ["YOLO_OFFLINE"] = "1"
os.environ["YOLO_CONFIG_DIR"] = str(ULTRALYTICS_HOME)

_pillow_open = Image.open
_user_omp_threads = os.environ.get("OMP_NUM_THREADS")

import ultralytics.utils.patches  # noqa: E402, F401  (must follow the environment above; patches Image.open)
from ultralytics.utils import SETTINGS  # noqa: E402

Image.open = _pillow_open
if _user_omp_threads is None:
    os.environ.pop("OMP_NUM_THREADS", None)
    torch.set_num_threads(len(os.sched_getaffinity(0)))

SETTINGS.update(
    sync=False,
    clearml=False,
    comet=False,
    dvc=False,
    mlflow=False,
    raytune=False,
    tensorboard=False,
    wandb=False,
    vscode_msg=False,
    openvino_msg=False,
    datasets_dir=str(ULTRALYTICS_HOME / "datasets"),
    weights_dir=str(ULTRALYTICS_HOME / "weights"),
    runs_dir=str(ULTRALYTICS_HOME / "runs"),
)
