"""The measured batch policy: which batch sizes each input shape runs at, from forwards timed at warm-up.

A batch size is run only when it raises throughput (images per second) over every smaller size measured for its
shape; one that loses is never run. On this 2-core CPU at 640 a batch of 8 costs more per image than a batch of 1
(bench/README.md), so the policy there is mostly batch 1; on a GPU it allows large batches. ``max_batch_size``
stays the upper bound. Without measurements (``--warmup-rounds 0``) every size up to ``max_batch_size`` is allowed,
and the policy says so.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from model.letterbox import Shape

Timings = dict[Shape, dict[int, float]]  # shape -> batch size -> seconds of one forward

# Measuring a shape stops after this many sizes in a row that do not raise throughput: on a CPU, where larger
# batches keep losing, warm-up stays short; where they keep winning (a GPU), every size is measured.
LOSING_SIZES_TO_STOP = 2


def measure(
    forward: Callable[[Shape, int], None],
    shapes: list[Shape],
    max_batch_size: int,
    rounds: int,
    clock: Callable[[], float] = time.perf_counter,
) -> Timings:
    """Time ``forward(shape, batch_size)`` for each shape and batch size 1..``max_batch_size``.

    Each shape is first run once untimed (kernels, allocator pools). The first round times the sizes in turn and
    stops after :data:`LOSING_SIZES_TO_STOP` sizes in a row that do not raise throughput; the other ``rounds - 1``
    rounds go over the measured sizes again, alternating, so that a machine whose speed drifts (other work on it)
    disturbs every size alike. Each size keeps its fastest time, the least disturbed.

    Returns: seconds of one forward by shape and batch size; empty when ``rounds`` is 0 (nothing is run).
    """
    timings: Timings = {}
    if rounds == 0:
        return timings

    def timed(shape: Shape, batch_size: int) -> float:
        started = clock()
        forward(shape, batch_size)
        return clock() - started

    for shape in shapes:
        forward(shape, 1)
        seconds_by_size: dict[int, float] = {}
        losing = 0
        for batch_size in range(1, max_batch_size + 1):
            best_before = max((size / seconds for size, seconds in seconds_by_size.items()), default=0.0)
            seconds_by_size[batch_size] = timed(shape, batch_size)
            losing = 0 if batch_size / seconds_by_size[batch_size] > best_before else losing + 1
            if losing == LOSING_SIZES_TO_STOP:
                break
        for _ in range(rounds - 1):
            for batch_size in seconds_by_size:
                seconds_by_size[batch_size] = min(seconds_by_size[batch_size], timed(shape, batch_size))
        timings[shape] = seconds_by_size
    return timings


def winning_sizes(seconds_by_size: dict[int, float]) -> tuple[int, ...]:
    """The batch sizes whose throughput beats every smaller size's, ascending; the smallest measured always.

    ``{1: 0.10, 2: 0.18, 3: 0.30, 4: 0.34}`` (10, 11.1, 10, 11.8 images/s) -> ``(1, 2, 4)``: 3 loses to 2.
    """
    sizes, best = [], 0.0
    for size in sorted(seconds_by_size):
        throughput = size / seconds_by_size[size]
        if throughput > best or not sizes:
            sizes.append(size)
            best = throughput
    return tuple(sizes)


@dataclass(frozen=True)
class BatchPolicy:
    """Batch sizes by input shape: measured, or all sizes up to ``max_batch_size`` when nothing was measured.

    A shape that was not measured runs at the sizes of the measured shape nearest to it in pixels (the cost of a
    forward grows with them).
    """

    max_batch_size: int
    timings: Timings

    def batch_sizes(self, shape: Shape) -> tuple[int, ...]:
        """The sizes a batch of ``shape`` may run at, ascending."""
        if not self.timings:
            return tuple(range(1, self.max_batch_size + 1))
        if shape not in self.timings:
            shape = min(self.timings, key=lambda measured: abs(measured[0] * measured[1] - shape[0] * shape[1]))
        return tuple(size for size in winning_sizes(self.timings[shape]) if size <= self.max_batch_size)

    def describe(self) -> dict[str, Any]:
        """The policy and its measurements, for ``GET /v1/model`` and the start-up log."""
        if not self.timings:
            return {
                "source": "configured",
                "note": "not measured (warm-up rounds 0): every batch size up to max_batch_size runs",
                "max_batch_size": self.max_batch_size,
                "shapes": [],
            }
        return {
            "source": "measured",
            "note": "a batch size runs only when it raises images/s over every smaller size of its shape; an "
            "unmeasured shape follows the measured shape nearest in pixels",
            "max_batch_size": self.max_batch_size,
            "shapes": [
                {
                    "height": height,
                    "width": width,
                    "batch_sizes": list(self.batch_sizes((height, width))),
                    "measured": [
                        {"batch_size": size, "ms": round(seconds * 1000, 2), "images_per_s": round(size / seconds, 2)}
                        for size, seconds in sorted(seconds_by_size.items())
                    ],
                }
                for (height, width), seconds_by_size in self.timings.items()
            ],
        }
