"""The service against its peers in alternating rounds, all servers up, on real photos of several aspect ratios.

    python -m bench.load_rounds --recipe-model BEST.pt --bundle BUNDLE_DIR [--rounds 3] [--duration 5]
        [--concurrency 1,16] [--servers service,recipe-user,litserve-recipe,plain-fastapi,litserve]
        [--max-requests 2000] [--name s640]

Every server is started first and stays up (each in its own process group, on its own loopback port). Then each
round runs every concurrency level, and at each level every server for ``duration`` seconds (closed loop, see
:func:`bench.load.closed_loop`), so that this machine's drift — up to 1.5× within minutes — reaches every server
alike. The ratio service/peer is taken per round and level from the two throughputs of that round, and its median
over rounds is reported.

Servers (``--servers`` picks some):

- ``service``: this project on the seed-recipe checkpoint (``python -m service --model-path BEST.pt``);
- ``recipe-user``: :mod:`bench.peers.recipe_user`, what a recipe user writes, on the same checkpoint;
- ``litserve-recipe``: :mod:`bench.peers.litserve_server` ``--recipe`` on the same checkpoint;
- ``plain-fastapi`` and ``litserve``: the serving-overhead peers, on the project's AKConv and square letterbox
  (``BUNDLE_DIR``, same architecture), as before.

Each server gets an environment built here from a few variables of this one (``PATH``, ``HOME``, locale,
``TMPDIR``): nothing inherited decides its threads (a parent that imported ultralytics has ``OMP_NUM_THREADS=1``).
Payloads: ``bus.jpg`` (810×1080) and ``zidane.jpg`` (1280×720) from ultralytics, and scikit-image's astronaut
(512×512), coffee (600×400) and chelsea (451×300) as JPEG, cycled in order. Results go to
``bench/results/load-rounds-NAME.json``.
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
from typing import Any

from bench.common import print_table, write_results
from bench.load import Payload, closed_loop, jpeg_bytes, real_payloads, warm_up
from bench.processes import free_port, running_process

REPO_ROOT = Path(__file__).resolve().parents[1]  # the peers run as ``-m bench.peers...``: importable from here
BASELINE = "service"
INHERITED_VARIABLES = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")
SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea")
START_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Server:
    """A server to start and load: its name in the tables, its command line, and where it answers."""

    name: str
    command: list[str]
    port: int
    ready_path: str

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass(frozen=True)
class Slot:
    """One run of the schedule: ``server`` loaded at ``concurrency`` in round ``round``."""

    round: int
    concurrency: int
    server: str


def server_commands(recipe_model: Path, bundle: Path, python: str = sys.executable) -> dict[str, tuple[list[str], str]]:
    """Name -> (command without ``--port``, readiness path) for every server this tool knows."""
    return {
        "service": ([python, "-m", "service", "--model-path", str(recipe_model)], "/readyz"),
        "recipe-user": ([python, "-m", "bench.peers.recipe_user", "--model", str(recipe_model)], "/health"),
        "litserve-recipe": (
            [python, "-m", "bench.peers.litserve_server", "--recipe", "--model", str(recipe_model)],
            "/health",
        ),
        "plain-fastapi": ([python, "-m", "bench.peers.plain_fastapi", "--model", str(bundle)], "/health"),
        "litserve": ([python, "-m", "bench.peers.litserve_server", "--model", str(bundle)], "/health"),
    }


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


def median_ratios(rows: Sequence[dict[str, Any]], baseline: str = BASELINE) -> list[dict[str, Any]]:
    """Per level and peer: the baseline's throughput over the peer's in each round, and the median of those ratios.

    ``rows`` carry ``round``, ``concurrency``, ``server`` and ``throughput_rps``. A round where the peer served
    nothing has no ratio.
    """
    throughput = {(row["round"], row["concurrency"], row["server"]): row["throughput_rps"] for row in rows}
    levels = sorted({row["concurrency"] for row in rows})
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


async def run_schedule(
    servers: dict[str, Server], payloads: list[Payload], slots: list[Slot], args: argparse.Namespace
) -> list[dict[str, Any]]:
    for server in servers.values():
        await warm_up(server.base_url + "/detect", payloads)
    rows = []
    for slot in slots:
        url = servers[slot.server].base_url + "/detect"
        result = await closed_loop(url, payloads, slot.concurrency, args.duration, args.max_requests)
        summary = result.summary()
        rows.append(
            {
                "round": slot.round,
                "concurrency": slot.concurrency,
                "server": slot.server,
                "requests": summary["requests"],
                "throughput_rps": summary["throughput_rps"],
                "p50_ms": summary["p50_ms"],
                "p99_ms": summary["p99_ms"],
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
    parser.add_argument("--servers", default="service,recipe-user,litserve-recipe,plain-fastapi,litserve")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per server per level per round")
    parser.add_argument("--concurrency", default="1,16", help="closed-loop levels")
    parser.add_argument("--max-requests", type=int, default=2000, help="a run stops after this many requests")
    parser.add_argument("--pause", type=float, default=1.0, help="seconds between runs, for queues to drain")
    parser.add_argument("--name", default="s640", help="results go to bench/results/load-rounds-NAME.json")
    args = parser.parse_args(argv)
    commands = server_commands(args.recipe_model, args.bundle)
    names = [name for name in args.servers.split(",") if name]
    unknown = sorted(set(names) - set(commands))
    if unknown or BASELINE not in names or len(names) < 2:
        parser.error(f"--servers: {BASELINE} and at least one of {', '.join(commands)} (unknown: {unknown})")
    levels = [int(level) for level in args.concurrency.split(",") if level]

    payloads = photo_payloads()
    servers = {
        name: Server(name, [*commands[name][0], "--port", str(port)], port, commands[name][1])
        for name, port in ((name, free_port()) for name in names)
    }
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
        rows = asyncio.run(run_schedule(servers, payloads, schedule(names, levels, args.rounds), args))
    ratios = median_ratios(rows)
    print()
    print_table(rows)
    print()
    print_table(ratios)
    path = write_results(
        f"load-rounds-{args.name}",
        rows,
        ratios=ratios,
        servers={server.name: " ".join(server.command) for server in servers.values()},
        payloads=[payload.name for payload in payloads],
        rounds=args.rounds,
        duration_s=args.duration,
        max_requests=args.max_requests,
    )
    print(path)


if __name__ == "__main__":
    main()
