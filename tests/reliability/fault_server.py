"""The real service with a fault-injecting engine: ``python -m tests.reliability.fault_server`` takes the service's
flags. Faults are injected in the inference worker, where real ones (a CUDA error, a bad kernel) happen.

Two marker images, uniform squares of one colour (letterboxing keeps them uniform), trigger the faults:

- :data:`POISON`: the batch holding it raises;
- :data:`SLOW`: the batch holding it takes :data:`SLOW_SECONDS` longer, so that later requests wait in the queue.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch

from service.__main__ import serve
from service.app import create_app
from service.core.engine import Engine
from service.process.logs import configure_logging
from service.process.server import bind_listener
from service.process.settings import settings_from_cli
from tests.image_files import encode

POISON = (255, 0, 255)
SLOW = (0, 255, 255)
SLOW_SECONDS = 3.0


def marker_png(colour: tuple[int, int, int], size: int = 64) -> bytes:
    return encode(np.full((size, size, 3), colour, dtype=np.uint8))


def _is_marker(image: torch.Tensor, colour: tuple[int, int, int]) -> bool:
    """``image``: uint8 (3, S, S), the letterboxed model input."""
    return bool((image == torch.tensor(colour, dtype=torch.uint8).view(3, 1, 1)).all())


class FaultyEngine(Engine):
    def infer(self, images: list[torch.Tensor]) -> torch.Tensor:
        if any(_is_marker(image, POISON) for image in images):
            raise RuntimeError("injected fault")
        if any(_is_marker(image, SLOW) for image in images):
            time.sleep(SLOW_SECONDS)
        return super().infer(images)


def main() -> None:
    settings = settings_from_cli(sys.argv[1:])
    listener = bind_listener(settings.host, settings.port)
    configure_logging(settings.log_level)
    serve(
        create_app(settings, [FaultyEngine(settings, settings.model_path, settings.runtime_for(None))]),
        settings,
        listener,
    )


if __name__ == "__main__":
    main()
