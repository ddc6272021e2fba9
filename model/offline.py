"""Keep ultralytics offline, silent towards the outside and inside a temp dir.

Imported by ``model/__init__.py`` before anything imports ultralytics: ultralytics reads ``YOLO_OFFLINE`` and
``YOLO_CONFIG_DIR`` at import time, then writes its settings file there. Without this it probes DNS, may download
fonts and weights, sends usage events and writes to ``~/.config/Ultralytics``.
"""

import os
import tempfile
from pathlib import Path

ULTRALYTICS_HOME = Path(tempfile.gettempdir()) / "akconv-detector" / "ultralytics"

os.environ["YOLO_OFFLINE"] = "1"
os.environ["YOLO_CONFIG_DIR"] = str(ULTRALYTICS_HOME)

from ultralytics.utils import SETTINGS  # noqa: E402  (must follow the environment above)

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
