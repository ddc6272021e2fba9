"""The CPU threads the service computes on: what it runs with, and one warning line when that starves or oversubscribes
the model.

:func:`thread_report` is logged at start (``threads``) and shown in ``GET /v1/config`` (``threads``): torch's intra-op
and inter-op threads, the decode threads, the cores this process may use (its CPU affinity and, in a container, its
cgroup CPU limit) and the thread variables the process was started with.

Why "started with": importing ultralytics sets ``OMP_NUM_THREADS=1`` when it is unset. In the service's own process
:func:`model.offline.configure` undoes that, but a parent process that imported ultralytics (a supervisor, a test
harness, a notebook) hands ``OMP_NUM_THREADS=1`` to every process it starts, and torch reads it when it loads: the
model then runs on one core, whatever the machine has. Such an inherited value cannot
be told apart from a deliberate one (``OMP_NUM_THREADS=1`` is also how one packs replicas onto cores), so the service
keeps it and says so (:func:`thread_warning`); ``intra_op_threads`` sets the threads whatever was inherited. The
inherited values are read from ``/proc/self/environ``, the environment the process was started with, which later
changes to ``os.environ`` (ultralytics' import) do not touch.

Waiting: torch's intra-op work runs on OpenMP (GNU libgomp on Linux), whose workers by default spin for milliseconds
after each parallel region before they sleep, unless the process holds more OpenMP threads than cores (then they
sleep at once). Which of the two the service got depended on how many of its threads had run torch work; spinning
is faster on an idle machine and many times slower when other threads want the cores (the service's own decode
threads, other processes): ``python -m bench.inservice``, ``bench/README.md``. With ``OMP_WAIT_POLICY=PASSIVE`` in
the environment before torch loads (the server's entry point is the place: nothing has imported torch yet there),
every pool sleeps at once, whichever threads ran torch work; the report shows the policy.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path

import torch

log = logging.getLogger(__name__)

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")  # torch reads these when it loads
PROC_ENVIRON = Path("/proc/self/environ")
CGROUP_ROOT = Path("/sys/fs/cgroup")


def inherited_environment(proc_environ: Path = PROC_ENVIRON) -> dict[str, str]:
    """The :data:`THREAD_VARIABLES` this process was started with (those that were set).

    Read from ``proc_environ`` (Linux: the environment as the process was started, before any import changed
    ``os.environ``); where there is none, from ``os.environ``, in which :func:`model.offline.configure` has put back
    what ultralytics' import changed.
    """
    try:
        entries = proc_environ.read_bytes().split(b"\0")
    except OSError:
        return {name: os.environ[name] for name in THREAD_VARIABLES if name in os.environ}
    found = {}
    for entry in entries:
        name, sep, value = entry.decode("utf-8", "replace").partition("=")
        if sep and name in THREAD_VARIABLES:
            found[name] = value
    return found


def affinity_cores() -> int:
    """The CPUs this process may be scheduled on (its affinity where the OS reports one, as Linux does)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> float | None:
    """The CPU limit of this process's cgroup in cores (a container's ``--cpus``), or None when there is none.

    cgroup v2: ``cpu.max`` (``max 100000`` or ``200000 100000``); v1: ``cpu.cfs_quota_us`` (-1: none) over
    ``cpu.cfs_period_us`` under ``cpu/`` or ``cpu,cpuacct/``.
    """
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    for controller in ("cpu", "cpu,cpuacct"):
        try:
            quota_us = int((root / controller / "cpu.cfs_quota_us").read_text())
            period_us = int((root / controller / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    return None


def usable_cores(affinity: int, cpu_limit: float | None) -> int:
    """Cores the process may keep busy: its affinity, capped by a cgroup CPU limit rounded up (1.5 -> 2)."""
    if cpu_limit is None:
        return affinity
    return max(1, min(affinity, math.ceil(cpu_limit)))


def thread_report(
    decode_threads: int,
    *,
    intra_op: int | None = None,
    inter_op: int | None = None,
    affinity: int | None = None,
    cgroup_root: Path = CGROUP_ROOT,
    inherited: Mapping[str, str] | None = None,
    wait_policy: str | None = None,
) -> dict[str, object]:
    """The threads in use, for the start log and ``/v1/config``. Each keyword left None is read from torch or the
    OS; ``cgroup_root`` is where the cgroup CPU limit is read (tests pass them all).

    Torch's thread counts are the calling thread's: a thread keeps the count it had when it first ran torch work
    (``torch.set_num_threads`` changes the calling thread and threads that start later), so call this on the thread
    that loaded the engine, or on one started after it.

    Returns:
        ``intra_op_threads``, ``inter_op_threads`` (torch's), ``decode_threads``, ``usable_cores``,
        ``affinity_cores``, ``cgroup_cpu_limit`` (cores, or None), ``inherited`` (the :data:`THREAD_VARIABLES` the
        process was started with, only those set), ``omp_wait_policy`` (``OMP_WAIT_POLICY`` as OpenMP read it when
        torch loaded, if it was set before; None: libgomp's default).
    """
    affinity = affinity_cores() if affinity is None else affinity
    cpu_limit = cgroup_cpu_limit(cgroup_root)
    return {
        "intra_op_threads": torch.get_num_threads() if intra_op is None else intra_op,
        "inter_op_threads": torch.get_num_interop_threads() if inter_op is None else inter_op,
        "decode_threads": decode_threads,
        "usable_cores": usable_cores(affinity, cpu_limit),
        "affinity_cores": affinity,
        "cgroup_cpu_limit": cpu_limit,
        "inherited": dict(inherited_environment() if inherited is None else inherited),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY") if wait_policy is None else wait_policy,
    }


def thread_warning(report: Mapping[str, object], intra_op_threads: int | None) -> str | None:
    """One line when the model's threads do not match the usable cores and nobody chose them, else None.

    Args:
        report: a :func:`thread_report`.
        intra_op_threads: the ``intra_op_threads`` setting (None: not set). When set, the threads are the user's
            choice and nothing is said.
    """
    if intra_op_threads is not None:
        return None
    threads, cores = int(report["intra_op_threads"]), int(report["usable_cores"])
    if threads == cores:
        return None
    inherited: Mapping[str, str] = report["inherited"]  # type: ignore[assignment]
    setting = "intra_op_threads (--intra-op-threads, DETECTOR_INTRA_OP_THREADS)"
    if inherited:
        given = ", ".join(f"{name}={value}" for name, value in sorted(inherited.items()))
        why = f"it was started with {given}"
        if threads < cores and inherited.get("OMP_NUM_THREADS") == "1":
            why += " (a parent process that imported ultralytics passes OMP_NUM_THREADS=1 on)"
    elif report["cgroup_cpu_limit"] is not None:
        why = f"its cgroup CPU limit is {report['cgroup_cpu_limit']:g} cores"
    else:
        return None  # torch's own choice, nothing inherited to point at
    if threads < cores:
        return (
            f"torch runs the model on {threads} of the {cores} cores this process may use: {why}; to choose, set "
            f"{setting} ({cores} for all of them)"
        )
    return (
        f"torch runs the model on {threads} threads but this process may use {cores} cores: {why}; the threads "
        f"would wait on each other; set {setting} to {cores}"
    )


def log_threads(decode_threads: int, intra_op_threads: int | None) -> dict[str, object]:
    """Log the threads in use (one ``threads`` info line) and, when :func:`thread_warning` has one, a warning line.
    Call once at start, after the engine has set torch's threads. Returns the report."""
    report = thread_report(decode_threads)
    log.info("threads", extra={"threads": report})
    warning = thread_warning(report, intra_op_threads)
    if warning:
        log.warning(warning, extra={"threads": report})
    return report
