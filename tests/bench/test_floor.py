"""bench.floor's arithmetic and variant syntax; the benchmark itself is a command (bench/README.md)."""

from __future__ import annotations

import argparse

import pytest

from bench.floor import Variant, c1_row, per_photo_medians, stage_row
from bench.load_rounds import REPO_ROOT


def test_a_variant_names_its_environment_and_optionally_another_checkout(tmp_path) -> None:
    assert Variant.parse("passive") == Variant("passive", {}, REPO_ROOT)
    spin = Variant.parse("spin=GOMP_SPINCOUNT=100000,OMP_WAIT_POLICY=PASSIVE")
    assert spin.environment == {"GOMP_SPINCOUNT": "100000", "OMP_WAIT_POLICY": "PASSIVE"}
    assert Variant.parse(f"before@{tmp_path}").checkout == tmp_path.resolve()
    for wrong in ("", "=A=1", "x=A", f"x@{tmp_path / 'absent'}"):
        with pytest.raises(argparse.ArgumentTypeError):
            Variant.parse(wrong)


def test_latency_is_divided_by_the_forward_of_the_same_photo() -> None:
    forward = per_photo_medians([100.0, 50.0, 110.0, 40.0, 90.0, 60.0], photos=2)
    assert forward == [100.0, 50.0]
    row = c1_row(0, "v", "detect", [110.0, 55.0, 120.0, 60.0], forward, {})
    assert (row["p50_x_forward"], row["p99_x_forward"]) == (1.15, 1.2)
    assert row["p50_ms"] == 85.0


def test_the_stages_and_what_lies_outside_them() -> None:
    timings = [
        {"preprocess": 4.0, "queue": 1.0, "inference": 100.0, "postprocess": 1.0, "total": 107.0},
        {"preprocess": 2.0, "queue": 1.0, "inference": 50.0, "postprocess": 1.0, "total": 55.0},
    ]
    row = stage_row(0, "v", [110.0, 58.0], timings, [100.0, 50.0])
    assert (row["inference_ms"], row["outside_ms"], row["inference_x_forward"]) == (75.0, 4.0, 1.0)
