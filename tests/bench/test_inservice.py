"""bench.inservice: the rounds' arithmetic, and the freeing of a thread's OpenMP pool that keeps its scenes apart."""

from __future__ import annotations

import time

import pytest
import torch

from bench.inservice import OPENMP, SCENES, os_threads, release_openmp_pool, rotated, summarise


def test_rotated_starts_each_round_one_scene_later():
    assert [rotated(["a", "b", "c"], r) for r in range(4)] == [
        ["a", "b", "c"],
        ["b", "c", "a"],
        ["c", "a", "b"],
        ["a", "b", "c"],
    ]


def _row(r: int, scene: str, ms: float, decoded: float | None = None) -> dict[str, object]:
    return {"round": r, "scene": scene, "ms": ms, "first_ms": 2 * ms, "threads": 4, "decoded_per_s": decoded}


def test_summarise_takes_ratios_within_each_round_then_their_median():
    rows = [_row(0, "script", 100), _row(0, "thread", 110, 20.0), _row(1, "script", 200), _row(1, "thread", 180, 30.0)]
    rows.append(_row(2, "script", 50))
    rows.append(_row(2, "thread", 60, 10.0))
    script, thread = summarise(rows, ["script", "thread"])
    assert (script["median ms"], script["vs script"], script["decoded/s"]) == (100, 1.0, "")
    assert thread["median ms"] == 110 and thread["range ms"] == "60.0-180.0"
    assert thread["vs script"] == 1.1 and thread["range"] == "0.90-1.20"  # 1.1, 0.9, 1.2: not 110 / 100 by chance
    assert thread["first ms"] == 220 and thread["decoded/s"] == 20.0


def test_every_scene_has_a_description():
    assert all(scene.description for scene in SCENES.values()) and "script" in SCENES


@pytest.mark.skipif(OPENMP is None or torch.get_num_threads() < 2, reason="needs torch's OpenMP runtime, 2 threads")
def test_release_openmp_pool_ends_the_calling_threads_pool():
    torch.ones(1_000_000).add_(1)  # a parallel region: this thread gets a pool of worker threads
    with_pool = os_threads()
    release_openmp_pool()
    deadline = time.monotonic() + 5  # the workers leave a moment after they are released
    while os_threads() >= with_pool and time.monotonic() < deadline:
        time.sleep(0.01)
    assert os_threads() < with_pool
    torch.ones(1_000_000).add_(1)  # and a new one when needed
    assert os_threads() == with_pool
