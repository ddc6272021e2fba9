"""bench.load_rounds: the alternating schedule, the ratio arithmetic and the servers' clean environment."""

from __future__ import annotations

from collections import Counter

import pytest

from bench.load_rounds import Slot, clean_environment, median_ratios, schedule


def test_schedule_runs_every_server_at_every_level_once_per_round() -> None:
    slots = schedule(["service", "peer-a", "peer-b"], [1, 16], rounds=3)
    assert len(slots) == 3 * 2 * 3
    assert Counter((slot.round, slot.concurrency, slot.server) for slot in slots) == Counter(
        (r, level, server) for r in range(3) for level in (1, 16) for server in ("service", "peer-a", "peer-b")
    )
    assert [slot.round for slot in slots] == sorted(slot.round for slot in slots)  # rounds do not interleave


def _order(slots: list[Slot], round_index: int, concurrency: int) -> list[str]:
    return [slot.server for slot in slots if (slot.round, slot.concurrency) == (round_index, concurrency)]


def test_schedule_rotates_the_server_order_each_round() -> None:
    slots = schedule(["service", "peer-a", "peer-b"], [1, 16], rounds=4)
    assert _order(slots, 0, 1) == ["service", "peer-a", "peer-b"]
    assert _order(slots, 1, 1) == ["peer-a", "peer-b", "service"]
    assert _order(slots, 2, 1) == ["peer-b", "service", "peer-a"]
    assert _order(slots, 3, 1) == ["service", "peer-a", "peer-b"]
    assert _order(slots, 1, 16) == _order(slots, 1, 1)


def _rows(server: str, concurrency: int, throughputs: list[float]) -> list[dict[str, object]]:
    return [
        {"round": r, "concurrency": concurrency, "server": server, "throughput_rps": rps}
        for r, rps in enumerate(throughputs)
    ]


def test_median_ratio_is_taken_over_per_round_ratios() -> None:
    rows = [
        *_rows("service", 1, [10.0, 12.0, 9.0]),
        *_rows("peer", 1, [5.0, 4.0, 9.0]),
        *_rows("service", 16, [8.0, 8.0, 8.0]),
        *_rows("peer", 16, [2.0, 4.0, 16.0]),
    ]
    assert median_ratios(rows) == [
        {"concurrency": 1, "peer": "peer", "ratios": [2.0, 3.0, 1.0], "median_ratio": 2.0},
        {"concurrency": 16, "peer": "peer", "ratios": [4.0, 2.0, 0.5], "median_ratio": 2.0},
    ]


def test_a_round_where_the_peer_served_nothing_has_no_ratio() -> None:
    rows = [*_rows("service", 1, [6.0, 6.0]), *_rows("peer", 1, [0.0, 3.0])]
    assert median_ratios(rows) == [{"concurrency": 1, "peer": "peer", "ratios": [2.0], "median_ratio": 2.0}]


def test_servers_never_inherit_thread_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
    environment = clean_environment()
    assert "OMP_NUM_THREADS" not in environment and "MKL_NUM_THREADS" not in environment
    assert environment["PATH"]
