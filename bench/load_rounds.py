"""The service against its peers in alternating rounds, all servers up, on real photos of several aspect ratios.

    python -m bench.load_rounds --recipe-model BEST.pt --bundle BUNDLE_DIR [--rounds 3] [--duration 5]
        [--concurrency 1,4,16]
        [--servers service,service-oip,recipe-user,litserve-recipe,plain-fastapi,litserve,triton]
        [--triton-queue-delays 5000] [--triton-instances 1] [--triton-python .venv-triton/bin/python]
        [--max-requests 2000] [--name s640]
        [--compiled-dir DIR]

Every server is started first and stays up (each in its own process group, on its own loopback port). Then each
round runs every concurrency level, and at each level every contender for ``duration`` seconds (closed loop, see
:func:`bench.load.closed_loop`), so that this machine's drift — up to 1.5× within minutes — reaches every server
alike. The ratio service/peer is taken per round and level from the two throughputs of that round, and its median
over rounds is reported; with Triton, also service-oip/Triton (the same requests to both).

Contenders (``--servers`` picks some; ``service`` always runs, the baseline):

- ``service``: this project on the seed-recipe checkpoint (``python -m service --model-path BEST.pt``), ``POST
  /detect`` (multipart);
- ``service-aotinductor``, ``service-openvino``, ``service-int8``: the service on the same checkpoint with that
  ``runtime`` (README "Performance"), its artefacts built ahead by ``python -m model compile --runtime R`` into
  ``--compiled-dir``, on ``/detect``; compared with the peers as ``service`` is;
- ``service-oip``: the same process, loaded on its Open Inference Protocol door instead (``POST
  /v2/models/NAME/infer``, binary tensor data extension: :func:`bench.load.oip_payload`), as Triton is;
- ``recipe-user``: :mod:`bench.peers.recipe_user`, what a recipe user writes, on the same checkpoint;
- ``litserve-recipe``: :mod:`bench.peers.litserve_server` ``--recipe`` on the same checkpoint;
- ``plain-fastapi`` and ``litserve``: the serving-overhead peers, on the project's AKConv and square letterbox
  (``BUNDLE_DIR``, same architecture), as before;
- ``triton``: :mod:`bench.peers.triton_peer` (PyTriton, Triton's dynamic batcher) on the same checkpoint, in its own
  virtualenv (``make triton-venv``), loaded with the same OIP requests as ``service-oip``. With several
  ``--triton-queue-delays`` (µs) one Triton server runs per delay, named ``triton-qDELAY``; with several
  ``--triton-instances`` (its instance group count) one per count, named ``triton-iCOUNT`` (both: ``triton-qD-iC``).

Each server gets an environment built here from a few variables of this one (``PATH``, ``HOME``, locale,
``TMPDIR``): nothing inherited decides its threads (a parent that imported ultralytics has ``OMP_NUM_THREADS=1``).
Payloads: ``bus.jpg`` (810×1080) and ``zidane.jpg`` (1280×720) from ultralytics, and scikit-image's astronaut
(512×512), coffee (600×400) and chelsea (451×300) as JPEG, cycled in order. Each row reports throughput, p50/p90/p99
latency and, where the server counts them (the service's ``detector_batch_size``, Triton's ``nv_inference_count`` over
``nv_inference_exec_count``), the mean batch size. Results go to ``bench/results/load-rounds-NAME.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.common import print_table, write_results
from bench.load import Payload, closed_loop, jpeg_bytes, oip_payload, real_payloads, warm_up
from bench.processes import free_port, running_process

REPO_ROOT = Path(__file__).resolve().parents[1]  # the peers run as ``-m bench.peers...``: importable from here
BASELINE = "service"
SERVICE_OIP = "service-oip"
SERVICE_RUNTIMES = ("aotinductor", "openvino", "int8")  # each a contender service-RUNTIME
TRITON = "triton"
TRITON_PYTHON = REPO_ROOT / ".venv-triton" / "bin" / "python"  # make triton-venv
TRITON_MODEL_NAME = "yolov10-akconv"
TRITON_READY_PATH = "/v2/health/ready"
# Triton's counters: requests (batch items) run, and batches run (bench.peers.triton_peer's model).
TRITON_COUNTERS = ("nv_inference_count", "nv_inference_exec_count")
INHERITED_VARIABLES = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")
SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea")
START_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Server:
    """A server to start and load: its name, its command line, and where it answers (and, for Triton, where its
    metrics are)."""

    name: str
    command: list[str]
    port: int
    ready_path: str
    metrics_port: int | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass(frozen=True)
class Contender:
    """What one row of the tables measures: ``server`` loaded on ``route`` (``detect``: ``POST /detect``, multipart;
    ``oip``: ``POST /v2/models/NAME/infer``, the binary tensor data extension)."""

    name: str
    server: str
    route: Literal["detect", "oip"] = "detect"


@dataclass(frozen=True)
class Slot:
    """One run of the schedule: ``server`` (a contender's name) loaded at ``concurrency`` in round ``round``."""

    round: int
    concurrency: int
    server: str


def triton_setups(queue_delays_us: Sequence[int], instances: Sequence[int] = (1,)) -> dict[str, tuple[int, int]]:
    """The Triton servers, name -> (queue delay µs, instances), one per pair: ``triton`` when there is one, else
    the name says what varies (``triton-qDELAY``, ``triton-iCOUNT``, ``triton-qDELAY-iCOUNT``)."""
    setups = {}
    for delay in queue_delays_us:
        for count in instances:
            name = (
                TRITON
                + (f"-q{delay}" if len(queue_delays_us) > 1 else "")
                + (f"-i{count}" if len(instances) > 1 else "")
            )
            setups[name] = (delay, count)
    return setups


def server_commands(
    recipe_model: Path,
    bundle: Path,
    python: str = sys.executable,
    triton_python: str = str(TRITON_PYTHON),
    triton_setups: dict[str, tuple[int, int]] | None = None,
    compiled_dir: Path | None = None,
) -> dict[str, tuple[list[str], str]]:
    """Name -> (command without ``--port``, readiness path) for every server this tool knows; Triton's as
    ``triton_setups`` (default: one, 5,000 µs and one instance) say."""
    triton = [triton_python, "-m", "bench.peers.triton_peer", "--model", str(recipe_model)]
    triton += ["--model-name", TRITON_MODEL_NAME]
    service = [python, "-m", "service", "--model-path", str(recipe_model)]
    artefacts = ["--compiled-dir", str(compiled_dir)] if compiled_dir else []
    return {
        "service": (service, "/readyz"),
        **{
            f"service-{runtime}": ([*service, "--runtime", runtime, *artefacts], "/readyz")
            for runtime in SERVICE_RUNTIMES
        },
        "recipe-user": ([python, "-m", "bench.peers.recipe_user", "--model", str(recipe_model)], "/health"),
        "litserve-recipe": (
            [python, "-m", "bench.peers.litserve_server", "--recipe", "--model", str(recipe_model)],
            "/health",
        ),
        "plain-fastapi": ([python, "-m", "bench.peers.plain_fastapi", "--model", str(bundle)], "/health"),
        "litserve": ([python, "-m", "bench.peers.litserve_server", "--model", str(bundle)], "/health"),
        **{
            name: ([*triton, "--queue-delay-us", str(delay), "--instances", str(count)], TRITON_READY_PATH)
            for name, (delay, count) in (triton_setups or {TRITON: (5000, 1)}).items()
        },
    }


def contenders(names: Sequence[str], triton_servers: Sequence[str]) -> list[Contender]:
    """The contenders ``--servers`` names, in its order: ``service-oip`` is the service's process on its OIP door,
    ``triton`` every Triton server (one per setup), the others a server each on ``/detect``."""
    chosen = []
    for name in names:
        if name == SERVICE_OIP:
            chosen.append(Contender(SERVICE_OIP, BASELINE, "oip"))
        elif name == TRITON:
            chosen += [Contender(server, server, "oip") for server in triton_servers]
        else:
            chosen.append(Contender(name, name))
    return chosen


def clean_environment() -> dict[str, str]:
    """The environment every server starts with: only what finding programs and files needs, no thread settings."""
    return {name: os.environ[name] for name in INHERITED_VARIABLES if name in os.environ}


def schedule(servers: Sequence[str], levels: Sequence[int], rounds: int) -> list[Slot]:
    """Every server at every level in every round; the server order rotates by one each round, so that no server
    always runs right after the same one (whose backlog, or the machine's state it leaves, would favour or burden
    it every time)."""
    slots = []
    for round_index in range(rounds):
        shift = round_index % len(servers)
        order = [*servers[shift:], *servers[:shift]]
        slots += [Slot(round_index, level, server) for level in levels for server in order]
    return slots


def median_ratios(
    rows: Sequence[dict[str, Any]], baseline: str = BASELINE, peers: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """Per level and peer: the baseline's throughput over the peer's in each round, and the median of those ratios.

    ``rows`` carry ``round``, ``concurrency``, ``server`` (the contender) and ``throughput_rps``. ``peers``: every
    other contender in ``rows`` when None. A round where the peer served nothing has no ratio.
    """
    throughput = {(row["round"], row["concurrency"], row["server"]): row["throughput_rps"] for row in rows}
    levels = sorted({row["concurrency"] for row in rows})
    if peers is None:
        peers = [name for name in dict.fromkeys(row["server"] for row in rows) if name != baseline]
    rounds = sorted({row["round"] for row in rows})
    table = []
    for level in levels:
        for peer in peers:
            ratios = [
                throughput[(r, level, baseline)] / throughput[(r, level, peer)]
                for r in rounds
                if (r, level, baseline) in throughput and throughput.get((r, level, peer))
            ]
            table.append(
                {
                    "concurrency": level,
                    "baseline": baseline,
                    "peer": peer,
                    "ratios": [round(ratio, 2) for ratio in ratios],
                    "median_ratio": round(statistics.median(ratios), 2) if ratios else None,
                }
            )
    return table


def photo_payloads() -> list[Payload]:
    """Ultralytics' two photos and scikit-image's, of five aspect ratios between 3:4 and 16:9."""
    from skimage import data

    return real_payloads() + [Payload(f"{name}.jpg", jpeg_bytes(getattr(data, name)())) for name in SKIMAGE_PHOTOS]


def all_ratios(rows: Sequence[dict[str, Any]], contender_names: Sequence[str]) -> list[dict[str, Any]]:
    """service/peer for every peer; with ``service-oip`` and Triton, also service-oip/Triton (the same requests); each
    ``service-RUNTIME`` over the peers that are not the service's."""
    ratios = median_ratios(rows)
    tritons = [name for name in contender_names if name.startswith(TRITON)]
    peers = [name for name in contender_names if not name.startswith(BASELINE)]
    for runtime in (name for name in contender_names if name.removeprefix("service-") in SERVICE_RUNTIMES):
        ratios += median_ratios(rows, runtime, peers)
    if SERVICE_OIP in contender_names and tritons:
        ratios += median_ratios(rows, SERVICE_OIP, tritons)
    return ratios


async def oip_model_name(client: httpx.AsyncClient, server: Server) -> str:
    """The name a server serves its model under: Triton's is set on its command line (its repository index needs
    an access token under PyTriton); the service's is the first of its ``POST /v2/repository/index``."""
    if server.name.startswith(TRITON):
        return TRITON_MODEL_NAME
    response = await client.post(server.base_url + "/v2/repository/index")
    response.raise_for_status()
    return response.json()[0]["name"]


async def targets(
    contenders: Sequence[Contender], servers: dict[str, Server], photos: list[Payload]
) -> dict[str, tuple[str, list[Payload]]]:
    """Contender -> (URL, payloads): the photos as multipart on ``/detect``, or as OIP requests on ``/v2``, shaped
    ``[1]`` for the service and ``[1, 1]`` for Triton (its model batches: the batch dimension comes first)."""
    chosen = {}
    async with httpx.AsyncClient(timeout=30) as client:
        for contender in contenders:
            server = servers[contender.server]
            if contender.route == "detect":
                chosen[contender.name] = (server.base_url + "/detect", photos)
                continue
            shape = (1, 1) if server.name.startswith(TRITON) else (1,)
            url = f"{server.base_url}/v2/models/{await oip_model_name(client, server)}/infer"
            chosen[contender.name] = (url, [oip_payload(photo, shape) for photo in photos])
    return chosen


async def triton_counts(server: Server) -> dict[str, float] | None:
    """Triton's :data:`TRITON_COUNTERS` from its metrics port, summed over models; None for other servers."""
    if server.metrics_port is None:
        return None
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(f"http://127.0.0.1:{server.metrics_port}/metrics")
    return counter_totals(response.text, TRITON_COUNTERS)


def counter_totals(metrics_text: str, names: Sequence[str]) -> dict[str, float]:
    """Each counter of ``names`` in a Prometheus exposition, summed over its label sets (0 when absent)."""
    counts = dict.fromkeys(names, 0.0)
    for family in text_string_to_metric_families(metrics_text):
        if family.name in counts:  # the parser names a counter's samples NAME_total
            counts[family.name] += sum(sample.value for sample in family.samples if sample.name.endswith("_total"))
    return counts


def triton_mean_batch(before: dict[str, float] | None, after: dict[str, float] | None) -> float | None:
    """Batch items over batches run between two :func:`triton_counts`."""
    if before is None or after is None:
        return None
    items, batches = (after[name] - before[name] for name in TRITON_COUNTERS)
    return round(items / batches, 2) if batches else None


async def run_schedule(
    contenders: Sequence[Contender],
    servers: dict[str, Server],
    photos: list[Payload],
    slots: list[Slot],
    args: argparse.Namespace,
) -> list[dict[str, Any]]:
    chosen = await targets(contenders, servers, photos)
    for url, payloads in chosen.values():
        await warm_up(url, payloads)
    server_of = {contender.name: servers[contender.server] for contender in contenders}
    rows = []
    for slot in slots:
        url, payloads = chosen[slot.server]
        before = await triton_counts(server_of[slot.server])
        result = await closed_loop(url, payloads, slot.concurrency, args.duration, args.max_requests)
        summary = result.summary()
        batches = summary["batch_sizes"]
        mean_batch = triton_mean_batch(before, await triton_counts(server_of[slot.server]))
        rows.append(
            {
                "round": slot.round,
                "concurrency": slot.concurrency,
                "server": slot.server,
                "requests": summary["requests"],
                "throughput_rps": summary["throughput_rps"],
                "p50_ms": summary["p50_ms"],
                "p90_ms": summary["p90_ms"],
                "p99_ms": summary["p99_ms"],
                "mean_batch": round(batches["mean"], 2) if batches and batches["mean"] else mean_batch,
                "failed": summary["requests"] - summary["ok"],
            }
        )
        print(" ".join(f"{key}={value}" for key, value in rows[-1].items()), flush=True)
        await asyncio.sleep(args.pause)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe-model", type=Path, required=True, help="seed-recipe .pt (bench.seed_checkpoint)")
    parser.add_argument("--bundle", type=Path, required=True, help="bundle for the serving-overhead peers")
    parser.add_argument(
        "--servers", default="service,service-oip,recipe-user,litserve-recipe,plain-fastapi,litserve,triton"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per server per level per round")
    parser.add_argument("--concurrency", default="1,4,16", help="closed-loop levels")
    parser.add_argument(
        "--triton-queue-delays", default="5000", help="Triton's max_queue_delay_microseconds; several: one server each"
    )
    parser.add_argument(
        "--triton-instances", default="1", help="Triton's instance group count; several: one server each"
    )
    parser.add_argument("--triton-python", type=Path, default=TRITON_PYTHON, help="the Python of make triton-venv")
    parser.add_argument("--max-requests", type=int, default=2000, help="a run stops after this many requests")
    parser.add_argument("--pause", type=float, default=1.0, help="seconds between runs, for queues to drain")
    parser.add_argument("--name", default="s640", help="results go to bench/results/load-rounds-NAME.json")
    parser.add_argument("--compiled-dir", type=Path, default=None, help="the service-RUNTIME contenders' artefacts")
    args = parser.parse_args(argv)
    delays = [int(delay) for delay in args.triton_queue_delays.split(",") if delay.strip()]
    if not delays or len(set(delays)) < len(delays):
        parser.error("--triton-queue-delays: one or more distinct delays in microseconds")
    instances = [int(count) for count in args.triton_instances.split(",") if count.strip()]
    if not instances or len(set(instances)) < len(instances) or min(instances) < 1:
        parser.error("--triton-instances: one or more distinct counts, each at least 1")
    setups = triton_setups(delays, instances)
    tritons = list(setups)
    commands = server_commands(
        args.recipe_model,
        args.bundle,
        triton_python=str(args.triton_python),
        triton_setups=setups,
        compiled_dir=args.compiled_dir,
    )
    known = [name for name in commands if name not in tritons] + [SERVICE_OIP, TRITON]
    names = [name for name in args.servers.split(",") if name]
    unknown = sorted(set(names) - set(known))
    if unknown or BASELINE not in names or len(names) < 2:
        parser.error(f"--servers: {BASELINE} and at least one of {', '.join(known)} (unknown: {unknown})")
    if TRITON in names and not args.triton_python.exists():
        parser.error(f"{args.triton_python} does not exist: make triton-venv creates it (or leave out {TRITON})")
    levels = [int(level) for level in args.concurrency.split(",") if level]

    photos = photo_payloads()
    chosen = contenders(names, tritons)
    servers = {}
    for name in dict.fromkeys(contender.server for contender in chosen):
        port = free_port()
        command = [*commands[name][0], "--port", str(port)]
        metrics_port = None
        if name in tritons:
            metrics_port = free_port()
            command += ["--metrics-port", str(metrics_port)]
        servers[name] = Server(name, command, port, commands[name][1], metrics_port)
    logs = Path(tempfile.mkdtemp(prefix="load-rounds-"))
    with contextlib.ExitStack() as running:
        for server in servers.values():
            print(f"starting {server.name}: {' '.join(server.command)} (log {logs / server.name}.log)", flush=True)
            running.enter_context(
                running_process(
                    server.command,
                    logs / f"{server.name}.log",
                    server.base_url + server.ready_path,
                    START_TIMEOUT_S,
                    env=clean_environment(),
                    cwd=REPO_ROOT,
                )
            )
        slots = schedule([contender.name for contender in chosen], levels, args.rounds)
        rows = asyncio.run(run_schedule(chosen, servers, photos, slots, args))
    ratios = all_ratios(rows, [contender.name for contender in chosen])
    print()
    print_table(rows)
    print()
    print_table(ratios)
    path = write_results(
        f"load-rounds-{args.name}",
        rows,
        ratios=ratios,
        servers={server.name: " ".join(server.command) for server in servers.values()},
        contenders={contender.name: f"{contender.server} {contender.route}" for contender in chosen},
        payloads=[payload.name for payload in photos],
        rounds=args.rounds,
        duration_s=args.duration,
        max_requests=args.max_requests,
    )
    print(path)


if __name__ == "__main__":
    main()
