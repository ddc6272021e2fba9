"""Keep ultralytics offline, silent towards the outside and inside a temp dir: :func:`configure`.

Ultralytics reads ``YOLO_OFFLINE`` and ``YOLO_CONFIG_DIR`` when it is first imported (and without them probes the
network at import), then writes its settings file there. So :func:`configure` must run before the first import of
ultralytics: ``model/__init__.py`` calls it before importing its own modules, which import ultralytics. Without it,
ultralytics probes DNS, may download fonts and weights, sends usage events and writes to ``~/.config/Ultralytics``.

On import, ultralytics sets ``OMP_NUM_THREADS=1`` when it is unset, which would leave torch on one core in every
process that imports this package (the server included); that is undone when the user had not set it.

Ultralytics also replaces ``PIL.Image.open`` process-wide with a wrapper that, on any file Pillow cannot identify,
tries to pip-install ``pi-heif``. A server handed arbitrary bytes must never do that, so Pillow's own ``open`` is
put back (HEIF input is not supported; see the service's formats).

On import, ultralytics also writes to stdout, in plain text, that it created its settings file (every time the temp
dir is new, as in a fresh container), which would break the JSON lines of the server's logs and tells no one anything
here. So its messages below ERROR are dropped while it is imported (what ``YOLO_VERBOSE=false`` does to them), without
setting ``YOLO_VERBOSE``: that would also silence its messages afterwards, the training progress of
``python -m model train`` among them, and a ``YOLO_VERBOSE`` the user set keeps its effect.

OpenVINO and NNCF (the optional ``openvino`` extra, :mod:`model.openvino_ir`, :mod:`model.quantize`) send usage
events to Google Analytics through ``openvino_telemetry`` unless a consent file under ``~/intel`` says no, and write a
client id there (OpenVINO's converter at its import and at every conversion, nncf at import and at every
quantization). Both import it inside
``try``/``except ImportError`` and fall back to a stub, so :func:`configure` blocks that import
(``sys.modules["openvino_telemetry"] = None``) before either is imported: no network, no files in the home directory.
NNCF's own logger prints to stdout; :mod:`model.quantize` routes it to Python's logging when it imports nncf.
"""

import contextlib
import functools
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

ULTRALYTICS_HOME = Path(tempfile.gettempdir()) / "akconv-detector" / "ultralytics"


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity where the OS reports one, as Linux does)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@contextlib.contextmanager
def errors_only(logger_name: str) -> Iterator[None]:
    """Drop the records of logger ``logger_name`` below ERROR while the block runs.

    A filter rather than a level: ultralytics sets its logger's level when it is imported, in the block.
    """

    def at_least_error(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR

    logger = logging.getLogger(logger_name)
    logger.addFilter(at_least_error)
    try:
        yield
    finally:
        logger.removeFilter(at_least_error)


@functools.cache
def configure() -> None:
    """Import ultralytics offline and undo its process-wide changes, keep OpenVINO's and NNCF's telemetry off (see
    the module docstring). Runs once."""
    import torch
    from PIL import Image

    sys.modules.setdefault("openvino_telemetry", None)  # OpenVINO's and NNCF's telemetry: their stub instead
    os.environ["YOLO_OFFLINE"] = "1"
    os.environ["YOLO_CONFIG_DIR"] = str(ULTRALYTICS_HOME)
    user_omp_threads = os.environ.get("OMP_NUM_THREADS")

    with errors_only("ultralytics"):
        from ultralytics.utils import SETTINGS, patches  # patches Image.open

    Image.open = patches._image_open  # Pillow's own, as ultralytics kept it (even if it was imported before this)
    if user_omp_threads is None:
        os.environ.pop("OMP_NUM_THREADS", None)
        torch.set_num_threads(usable_cores())

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
