"""bench.load_rounds: the alternating schedule, the ratio arithmetic, the servers' clean environment, and the
contenders on the service's OIP door and Triton (their requests; Triton itself is not started here: its benchmark is
a command, ``make bench-load``)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from bench.load import Payload, oip_payload
from bench.load_rounds import (
    TRITON_READY_PATH,
    Contender,
    Slot,
    all_ratios,
    clean_environment,
    contenders,
    counter_totals,
    median_ratios,
    schedule,
    server_commands,
    triton_mean_batch,
    triton_setups,
)
from service.doors.oip import HEADER_LENGTH, parse_infer_request


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
        {"concurrency": 1, "baseline": "service", "peer": "peer", "ratios": [2.0, 3.0, 1.0], "median_ratio": 2.0},
        {"concurrency": 16, "baseline": "service", "peer": "peer", "ratios": [4.0, 2.0, 0.5], "median_ratio": 2.0},
    ]


def test_a_round_where_the_peer_served_nothing_has_no_ratio() -> None:
    rows = [*_rows("service", 1, [6.0, 6.0]), *_rows("peer", 1, [0.0, 3.0])]
    assert median_ratios(rows) == [
        {"concurrency": 1, "baseline": "service", "peer": "peer", "ratios": [2.0], "median_ratio": 2.0}
    ]


def test_servers_never_inherit_thread_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
    environment = clean_environment()
    assert "OMP_NUM_THREADS" not in environment and "MKL_NUM_THREADS" not in environment
    assert environment["PATH"]


def test_service_oip_is_the_service_process_on_its_v2_door_and_triton_one_server_per_setup() -> None:
    assert contenders(["service", "service-oip", "recipe-user", "triton"], list(triton_setups([0, 2000]))) == [
        Contender("service", "service", "detect"),
        Contender("service-oip", "service", "oip"),
        Contender("recipe-user", "recipe-user", "detect"),
        Contender("triton-q0", "triton-q0", "oip"),
        Contender("triton-q2000", "triton-q2000", "oip"),
    ]
    assert triton_setups([5000]) == {"triton": (5000, 1)}
    assert triton_setups([5000], [1, 2]) == {"triton-i1": (5000, 1), "triton-i2": (5000, 2)}
    assert list(triton_setups([0, 5000], [1, 2])) == [
        "triton-q0-i1",
        "triton-q0-i2",
        "triton-q5000-i1",
        "triton-q5000-i2",
    ]


def test_triton_runs_in_its_own_python_on_the_same_checkpoint_with_its_queue_delay_and_instances() -> None:
    commands = server_commands(
        Path("best.pt"),
        Path("bundle"),
        python="py",
        triton_python="triton-py",
        triton_setups=triton_setups([0, 2000], [1, 2]),
    )
    command, ready_path = commands["triton-q2000-i2"]
    assert command[command.index("--instances") + 1] == "2"
    assert command[:3] == ["triton-py", "-m", "bench.peers.triton_peer"]
    assert command[command.index("--model") + 1] == "best.pt" == commands["service"][0][-1]
    assert command[command.index("--queue-delay-us") + 1] == "2000"
    assert ready_path == TRITON_READY_PATH
    assert commands["recipe-user"][0][0] == "py"


def test_service_oip_over_triton_is_reported_beside_service_over_every_peer() -> None:
    rows = [*_rows("service", 4, [8.0, 9.0]), *_rows("service-oip", 4, [6.0, 6.0]), *_rows("triton", 4, [3.0, 4.0])]
    ratios = all_ratios(rows, ["service", "service-oip", "triton"])
    assert [(row["baseline"], row["peer"], row["ratios"]) for row in ratios] == [
        ("service", "service-oip", [1.33, 1.5]),
        ("service", "triton", [2.67, 2.25]),
        ("service-oip", "triton", [2.0, 1.5]),
    ]


def test_a_runtime_contender_is_the_service_with_that_runtime_and_is_compared_with_the_peers() -> None:
    commands = server_commands(Path("best.pt"), Path("bundle"), python="py", compiled_dir=Path("artefacts"))
    command, ready_path = commands["service-int8"]
    assert command[: len(commands["service"][0])] == commands["service"][0] and ready_path == "/readyz"
    assert command[-4:] == ["--runtime", "int8", "--compiled-dir", "artefacts"]
    rows = [
        *_rows("service", 16, [4.0, 5.0]),
        *_rows("service-int8", 16, [8.0, 9.0]),
        *_rows("recipe-user", 16, [2.0, 3.0]),
    ]
    ratios = all_ratios(rows, ["service", "service-int8", "recipe-user"])
    assert [(row["baseline"], row["peer"], row["ratios"]) for row in ratios] == [
        ("service", "service-int8", [0.5, 0.56]),
        ("service", "recipe-user", [2.0, 1.67]),
        ("service-int8", "recipe-user", [4.0, 3.0]),
    ]


def test_the_oip_request_is_the_photo_in_the_binary_extension_as_the_service_parses_it() -> None:
    photo = Payload("photo.jpg", b"\xff\xd8 not really a jpeg \xff\xd9")
    body, headers = oip_payload(photo).encoded
    assert headers["content-type"] == "application/octet-stream"
    parsed = parse_infer_request(body, int(headers[HEADER_LENGTH]), max_images=16)
    assert parsed.images == [photo.body]
    assert [output.name for output in parsed.outputs] == ["num_dets", "det_boxes", "det_scores", "det_classes"]
    assert all(output.binary for output in parsed.outputs)


def test_the_triton_request_differs_only_in_its_batch_dimension() -> None:
    photo = Payload("photo.jpg", b"\xff\xd8 jpeg \xff\xd9")
    service_body, service_headers = oip_payload(photo, (1,)).encoded
    triton_body, triton_headers = oip_payload(photo, (1, 1)).encoded
    service_length, triton_length = int(service_headers[HEADER_LENGTH]), int(triton_headers[HEADER_LENGTH])
    assert service_body[service_length:] == triton_body[triton_length:]
    service_header, triton_header = json.loads(service_body[:service_length]), json.loads(triton_body[:triton_length])
    assert triton_header["inputs"][0].pop("shape") == [1, 1] and service_header["inputs"][0].pop("shape") == [1]
    assert service_header == triton_header


def test_tritons_mean_batch_is_items_over_batches_run_between_two_scrapes() -> None:
    before = {"nv_inference_count": 10.0, "nv_inference_exec_count": 4.0}
    after = {"nv_inference_count": 40.0, "nv_inference_exec_count": 10.0}
    assert triton_mean_batch(before, after) == 5.0
    assert triton_mean_batch(None, None) is None  # not Triton
    assert triton_mean_batch(before, before) is None  # nothing ran


def test_tritons_counters_are_read_from_its_metrics_summed_over_models() -> None:
    metrics = """# HELP nv_inference_count Number of inferences performed (does not include cached requests)
# TYPE nv_inference_count counter
nv_inference_count{model="yolov10-akconv",version="1"} 167
nv_inference_count{model="other",version="1"} 3
# HELP nv_inference_exec_count Number of model executions performed (does not include cached requests)
# TYPE nv_inference_exec_count counter
nv_inference_exec_count{model="yolov10-akconv",version="1"} 37
"""
    assert counter_totals(metrics, ["nv_inference_count", "nv_inference_exec_count", "absent"]) == {
        "nv_inference_count": 170.0,
        "nv_inference_exec_count": 37.0,
        "absent": 0.0,
    }
