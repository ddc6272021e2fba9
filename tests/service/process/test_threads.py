"""service.process.threads: the report of the threads in use, the cores and the warning line; a real server started with
an inherited OMP_NUM_THREADS=1."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import httpx
import pytest

from bench.processes import free_port, running_process
from service.process.threads import (
    affinity_cores,
    cgroup_cpu_limit,
    inherited_environment,
    log_threads,
    thread_report,
    thread_warning,
    usable_cores,
)
from tests.service.server import REPO


def report(threads: int, cores: int, inherited: dict[str, str], cpu_limit_root: Path | None = None) -> dict:
    return thread_report(
        2,
        intra_op=threads,
        inter_op=1,
        affinity=cores,
        cgroup_root=cpu_limit_root or Path("/nonexistent"),
        inherited=inherited,
        wait_policy="PASSIVE",
    )


def test_inherited_environment_reads_the_thread_variables_the_process_was_started_with(tmp_path):
    environ = tmp_path / "environ"
    environ.write_bytes(b"PATH=/bin\0OMP_NUM_THREADS=1\0MKL_NUM_THREADS=4\0OMP_NUM_THREADS_X=9\0EMPTY\0")
    assert inherited_environment(environ) == {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "4"}


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux's /proc/self/environ")
def test_inherited_environment_ignores_what_the_process_set_itself(monkeypatch):
    """What ultralytics' import does to os.environ is not taken for an inherited value."""
    started_with = inherited_environment()
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    monkeypatch.setenv("MKL_NUM_THREADS", "7")
    assert inherited_environment() == started_with
    assert "7" not in started_with.values()


def test_inherited_environment_falls_back_to_os_environ_without_proc(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    assert inherited_environment(tmp_path / "missing") == {"OMP_NUM_THREADS": "3"}


@pytest.mark.parametrize(
    ("files", "limit"),
    [
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu.max": "150000 100000\n"}, 1.5),
        ({"cpu.max": "200000 100000\n"}, 2.0),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "50000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 0.5),
        ({"cpu,cpuacct/cpu.cfs_quota_us": "400000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, 4.0),
        ({"cpu.max": "garbage\n"}, None),
        ({}, None),
    ],
    ids=["v2-none", "v2-1.5", "v2-2", "v1-none", "v1-0.5", "v1-cpuacct-4", "unreadable", "no-cgroup"],
)
def test_cgroup_cpu_limit_reads_v2_and_v1(tmp_path, files, limit):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_cpu_limit(tmp_path) == limit


@pytest.mark.parametrize(
    ("affinity", "limit", "cores"), [(2, None, 2), (16, 2.0, 2), (2, 1.5, 2), (4, 0.5, 1), (2, 8.0, 2)]
)
def test_usable_cores_is_the_affinity_capped_by_the_cpu_limit_rounded_up(affinity, limit, cores):
    assert usable_cores(affinity, limit) == cores


def test_thread_report_names_what_runs_where(tmp_path):
    (tmp_path / "cpu.max").write_text("200000 100000\n")
    assert report(2, 16, {"OMP_NUM_THREADS": "2"}, tmp_path) == {
        "intra_op_threads": 2,
        "inter_op_threads": 1,
        "decode_threads": 2,
        "usable_cores": 2,
        "affinity_cores": 16,
        "cgroup_cpu_limit": 2.0,
        "inherited": {"OMP_NUM_THREADS": "2"},
        "omp_wait_policy": "PASSIVE",
    }


def test_thread_report_reads_torch_and_the_os_by_default():
    real = thread_report(3)
    assert real["decode_threads"] == 3 and real["affinity_cores"] == affinity_cores()
    assert real["intra_op_threads"] >= 1 and real["inter_op_threads"] >= 1
    json.dumps(real)  # fit for a log line and /v1/config


def test_an_inherited_omp_num_threads_below_the_cores_warns_and_says_how_to_choose():
    warning = thread_warning(report(1, 2, {"OMP_NUM_THREADS": "1"}), intra_op_threads=None)
    assert warning is not None
    assert "1 of the 2 cores" in warning and "OMP_NUM_THREADS=1" in warning and "ultralytics" in warning
    assert "DETECTOR_INTRA_OP_THREADS" in warning and "--intra-op-threads" in warning


def test_no_warning_when_intra_op_threads_is_set_even_to_one():
    assert thread_warning(report(1, 2, {"OMP_NUM_THREADS": "1"}), intra_op_threads=1) is None


@pytest.mark.parametrize(
    ("threads", "cores", "inherited"),
    [(2, 2, {}), (2, 2, {"OMP_NUM_THREADS": "2"}), (1, 1, {"OMP_NUM_THREADS": "1"}), (1, 2, {})],
    ids=["all-cores", "inherited-all-cores", "one-core-machine", "fewer-nothing-inherited"],
)
def test_no_warning_when_the_threads_match_the_cores_or_nothing_was_inherited(threads, cores, inherited):
    assert thread_warning(report(threads, cores, inherited), intra_op_threads=None) is None


def test_more_threads_than_a_cgroup_cpu_limit_allows_warns(tmp_path):
    (tmp_path / "cpu.max").write_text("200000 100000\n")
    warning = thread_warning(report(16, 16, {}, tmp_path), intra_op_threads=None)
    assert warning is not None and "16 threads" in warning and "2 cores" in warning and "cgroup" in warning


def test_log_threads_logs_the_report(caplog):
    with caplog.at_level("INFO", logger="service.process.threads"):
        logged = log_threads(decode_threads=2, intra_op_threads=None)
    assert [record.threads for record in caplog.records if record.getMessage() == "threads"] == [logged]


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.skipif(affinity_cores() < 2, reason="one core: one thread is all of them, nothing to warn about")
def test_a_server_started_with_omp_num_threads_1_warns_once_and_waits_passively(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    chosen = ("DETECTOR_", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
    env = {k: v for k, v in os.environ.items() if not k.startswith(chosen)}
    env |= {"OMP_NUM_THREADS": "1", "OMP_DISPLAY_ENV": "VERBOSE"}  # libgomp prints what it read when torch loads
    command = [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port), "--warmup-rounds", "0"]
    log_path = tmp_path / "server.log"
    with running_process(command, log_path, url + "/readyz", 180, cwd=REPO, env=env):
        config = httpx.get(url + "/v1/config").json()
    log = log_path.read_text()
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    warnings = [line for line in lines if line["level"] == "warning" and "OMP_NUM_THREADS=1" in line["message"]]
    assert len(warnings) == 1, log
    assert [line["threads"]["intra_op_threads"] for line in lines if line["message"] == "threads"] == [1]
    assert config["threads"]["intra_op_threads"] == 1 and config["threads"]["inherited"] == {"OMP_NUM_THREADS": "1"}
    assert config["threads"]["omp_wait_policy"] == "PASSIVE"
    assert "GOMP_SPINCOUNT = '0'" in log  # libgomp read PASSIVE: set before torch loaded
