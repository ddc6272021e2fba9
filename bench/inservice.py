"""Why the model's forward runs at another speed inside the service than in a plain script: one process, one run.

    python -m bench.inservice [--models bundled,seed] [--rounds 5] [--calls 5] [--scenes script,thread,...]
    OMP_WAIT_POLICY=PASSIVE python -m bench.inservice     # the same with OpenMP's waiting policy chosen

The same forward (``Engine.infer`` of ``bus.jpg`` letterboxed as the service does, batch 1) is timed in *scenes*
(:data:`SCENES`) that differ from a plain script in one thing at a time: the thread it runs on (the main thread, or a
single worker thread like the batcher's ``inference`` thread), which other threads have run torch work and stay alive
(the main thread that loaded the model, the app's warm-up thread, the decode threads), whether the decode threads
are busy meanwhile, the memory format and the thread count. Every round runs every scene once, in a rotated order
(this VM's speed drifts by up to 1.5x within minutes and other processes share its cores); a scene's figure in a
round is the median of ``--calls`` forwards after a first one, reported apart. Ratios to ``script`` are taken within
each round, then their median and range over the rounds are reported.

What the scenes separate: torch's CPU build runs its intra-op work on OpenMP (GNU libgomp, bundled in torch/lib),
and libgomp keeps one pool of worker threads *per thread that starts a parallel region* (the main thread, the
warm-up thread, each decode thread that ran a torch op over 32 K elements, the inference thread), alive as long as
that thread. Between two parallel regions a pool's workers spin (300,000 iterations by default, milliseconds) before
they sleep -- unless the process holds more libgomp threads than it has cores: then libgomp throttles every pool to
100 iterations, and workers sleep at once and are woken through the kernel for the next region. A plain script on 2
cores has one pool (2 threads) and spins; the service, with pools in its main, warm-up and inference threads, sleeps.
Spinning wins on an idle machine (no wake-ups) and loses badly when other threads want the cores (a spinning worker
holds a core the thread it waits for needs): other processes, or the service's own decode threads. Between scenes
every extra pool is freed (``omp_pause_resource_all`` on the main thread; worker threads end), so each scene starts
from the same state. ``OMP_WAIT_POLICY=PASSIVE`` (read when torch loads) makes every pool sleep at once, in any
scene.

Prints a table per model and writes ``bench/results/inservice.json`` (``inservice-passive.json`` etc. when
``OMP_WAIT_POLICY`` is set).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.common import print_table, write_results
from bench.load import real_payloads
from service.core.engine import Engine
from service.core.images import decode, letterbox
from service.process.settings import Settings

SEED_MODEL_BUNDLE = Path("runs/bench/yolov10s-akconv-random")  # the Makefile's SEED_MODEL_BUNDLE
MAX_PIXELS = 40_000_000
OMP_PAUSE_SOFT = 1  # omp_pause_resource_t: omp_pause_soft


def openmp_library() -> ctypes.CDLL | None:
    """The OpenMP runtime torch runs on (the libgomp bundled in torch/lib on Linux), or None."""
    for name in ("libgomp.so.1", "libomp.so", "libiomp5.so", "libomp.dylib"):
        path = Path(torch.__file__).parent / "lib" / name
        if path.exists():
            return ctypes.CDLL(str(path))
    return None


OPENMP = openmp_library()


def release_openmp_pool() -> None:
    """Free the calling thread's OpenMP worker threads (OpenMP 5.0 ``omp_pause_resource_all``); the thread's next
    parallel region starts a new pool."""
    if OPENMP is None or OPENMP.omp_pause_resource_all(OMP_PAUSE_SOFT) != 0:
        raise RuntimeError("this torch build's OpenMP runtime cannot free a thread's pool; scenes would leak pools")


def os_threads() -> int:
    """Threads of this process now (Linux), OpenMP pool threads included."""
    return len(os.listdir("/proc/self/task"))


class Parked:
    """Threads that each ran ``work`` once and then wait, alive, until :meth:`stop` (an idle warm-up thread, idle
    decode threads: what they leave behind is their OpenMP pool, if ``work`` made one)."""

    def __init__(self, work: Callable[[], object], count: int = 1) -> None:
        self._release = threading.Event()
        ready = threading.Barrier(count + 1)

        def run() -> None:
            work()
            ready.wait()
            self._release.wait()

        self._threads = [threading.Thread(target=run, daemon=True) for _ in range(count)]
        for thread in self._threads:
            thread.start()
        ready.wait()

    def stop(self) -> None:
        self._release.set()
        for thread in self._threads:
            thread.join()


class Busy:
    """``count`` threads running ``work`` back to back until :meth:`stop` (the decode pool under load)."""

    def __init__(self, work: Callable[[], object], count: int = 2) -> None:
        self._stop = threading.Event()
        self.done = 0
        self.started = time.perf_counter()

        def run() -> None:
            while not self._stop.is_set():
                work()
                self.done += 1

        self._threads = [threading.Thread(target=run, daemon=True) for _ in range(count)]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def per_second(self) -> float:
        return self.done / (time.perf_counter() - self.started)


@dataclass
class Model:
    name: str
    engine: Engine
    image: torch.Tensor  # (3, H, W) uint8: bus.jpg as the service letterboxes it
    contiguous: torch.nn.Module  # the engine's detector in torch.contiguous_format

    def forward(self) -> None:
        self.engine.infer([self.image])

    def forward_contiguous(self) -> None:
        with torch.inference_mode():
            batch = self.image.unsqueeze(0).to(self.engine.torch_dtype).div_(255)
            self.contiguous(batch)


@dataclass
class Photos:
    """The real photos as encoded bytes, and the decode jobs the decode threads run on them."""

    payloads: list[bytes]
    size: int
    _next: int = 0

    def _decoded(self) -> torch.Tensor:
        self._next += 1
        data = self.payloads[self._next % len(self.payloads)]
        tensor, _ = letterbox(decode(data, MAX_PIXELS, fit=self.size), self.size)
        return tensor

    def decode(self) -> None:
        """The service's decode job now (no torch op)."""
        self._decoded()

    def decode_with_torch_copy(self) -> None:
        """The decode job as it was: letterbox ended with a torch copy of the input's size (HWC -> CHW), a parallel
        region that makes the decode thread an OpenMP pool; here the same-sized copy the other way round."""
        self._decoded().permute(1, 2, 0).contiguous()


def timed(call: Callable[[], None]) -> float:
    started = time.perf_counter()
    call()
    return (time.perf_counter() - started) * 1000


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class Scene:
    """One way to run the same forward; each field changes one thing from a plain script."""

    description: str
    on_inference_thread: bool = False  # on a single worker thread (the batcher's), else on the main thread
    main_pool: bool = False  # a forward on the main thread first, whose pool stays (the service loads the model there)
    warm_up_thread: bool = False  # a thread that ran a forward and stays alive (the app's asyncio.to_thread warm-up)
    decoders: str | None = None  # two decode threads: "idle" (each decoded a photo) or "busy" (decoding non-stop)
    torch_copy: bool = False  # the decode job ends with a torch copy, as letterbox did before this branch
    threads: int | None = None  # torch threads, else torch's (the usable cores)
    contiguous: bool = False  # model and input in torch.contiguous_format instead of channels-last

    @contextlib.contextmanager
    def staged(self, model: Model, photos: Photos) -> Iterator[tuple[Callable[[], float], Busy | None]]:
        """Set the scene up; yield a function that runs one forward where the scene says and returns its ms, and
        the busy decode threads, if any."""
        forward = model.forward_contiguous if self.contiguous else model.forward
        decode = photos.decode_with_torch_copy if self.torch_copy else photos.decode
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch_threads(self.threads))
            if self.main_pool:
                model.forward()
            if self.warm_up_thread:
                stack.callback(Parked(model.forward).stop)
            busy = None
            if self.decoders == "idle":
                stack.callback(Parked(decode, count=2).stop)
            elif self.decoders == "busy":
                busy = Busy(decode, count=2)
                stack.callback(busy.stop)
            if self.on_inference_thread:
                executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
                stack.callback(executor.shutdown, wait=True)  # the thread ends, and its OpenMP pool with it
                yield (lambda: executor.submit(timed, forward).result()), busy
            else:
                yield (lambda: timed(forward)), busy


SCENES = {
    "script": Scene("the main thread, nothing else: a plain script (its pool spins between regions)"),
    "script+idle-pool": Scene(
        "a plain script beside one idle thread that ran a forward: more libgomp threads than cores, so every pool "
        "sleeps between regions",
        warm_up_thread=True,
    ),
    "script-1-thread": Scene("a plain script, torch on one thread (an inherited OMP_NUM_THREADS=1)", threads=1),
    "script-contiguous": Scene("a plain script, model and input contiguous instead of channels-last", contiguous=True),
    "thread": Scene("the inference thread, no other pool", on_inference_thread=True),
    "thread+main-pool": Scene(
        "the inference thread after a forward on the main thread (the service loads the model there)",
        on_inference_thread=True,
        main_pool=True,
    ),
    "service-c1-before": Scene(
        "between requests at concurrency 1 before this branch: inference thread, main and warm-up threads' pools, "
        "two idle decode threads that each decoded a photo with the torch copy",
        on_inference_thread=True,
        main_pool=True,
        warm_up_thread=True,
        decoders="idle",
        torch_copy=True,
    ),
    "service-c1": Scene(
        "the same with this branch's letterbox (no torch op, no pool in the decode threads)",
        on_inference_thread=True,
        main_pool=True,
        warm_up_thread=True,
        decoders="idle",
    ),
    "one-pool-c1": Scene(
        "every torch op on the inference thread (load and warm-up there too), decode threads without torch: one "
        "pool, which spins",
        on_inference_thread=True,
        decoders="idle",
    ),
    "service-decoding-before": Scene(
        "the inference thread while two decode threads decode photos non-stop with the torch copy; main and "
        "warm-up threads' pools",
        on_inference_thread=True,
        main_pool=True,
        warm_up_thread=True,
        decoders="busy",
        torch_copy=True,
    ),
    "service-decoding": Scene(
        "the same with this branch's letterbox",
        on_inference_thread=True,
        main_pool=True,
        warm_up_thread=True,
        decoders="busy",
    ),
    "one-pool-decoding": Scene(
        "one pool (every torch op on the inference thread) while two decode threads decode non-stop",
        on_inference_thread=True,
        decoders="busy",
    ),
}


def run_scene(scene: Scene, model: Model, photos: Photos, calls: int) -> dict[str, float]:
    """One scene once: its first forward (a new thread's pool and allocator; not in the median), the median of the
    next ``calls`` in ms, the process's thread count while it ran and, with busy decode threads, the photos they
    decoded per second meanwhile (more decoding leaves less CPU to the forward)."""
    release_openmp_pool()  # start from the main thread without a pool, whatever ran before
    with scene.staged(model, photos) as (forward, busy):
        first = forward()
        samples = [forward() for _ in range(calls)]
        threads = os_threads()
        decoded = busy.per_second() if busy else None
    release_openmp_pool()
    return {"ms": statistics.median(samples), "first_ms": first, "threads": threads, "decoded_per_s": decoded}


def rotated(names: list[str], offset: int) -> list[str]:
    offset %= len(names)
    return names[offset:] + names[:offset]


def summarise(rows: list[dict[str, object]], names: list[str]) -> list[dict[str, object]]:
    """Per scene: median and range of its round medians, and of its ratio to ``script`` in the same round."""
    by_round = {(row["round"], row["scene"]): row for row in rows}
    rounds = sorted({row["round"] for row in rows})
    table = []
    for name in names:
        ms = [by_round[(r, name)]["ms"] for r in rounds]
        entry: dict[str, object] = {
            "scene": name,
            "median ms": round(statistics.median(ms), 1),
            "range ms": f"{min(ms):.1f}-{max(ms):.1f}",
        }
        if "script" in names:
            ratios = [by_round[(r, name)]["ms"] / by_round[(r, "script")]["ms"] for r in rounds]
            entry["vs script"] = round(statistics.median(ratios), 2)
            entry["range"] = f"{min(ratios):.2f}-{max(ratios):.2f}"
        entry["first ms"] = round(statistics.median(by_round[(r, name)]["first_ms"] for r in rounds), 1)
        decoded = [by_round[(r, name)]["decoded_per_s"] for r in rounds]
        entry["decoded/s"] = round(statistics.median(decoded), 1) if None not in decoded else ""
        entry["threads"] = by_round[(rounds[-1], name)]["threads"]
        table.append(entry)
    return table


def load_model(name: str, settings: Settings, payloads: list[bytes]) -> Model:
    engine = Engine(settings)
    image, _ = letterbox(decode(payloads[0], MAX_PIXELS, fit=engine.input_size), engine.input_size)
    contiguous = copy.deepcopy(engine.detector).to(memory_format=torch.contiguous_format)
    return Model(f"{name} @ {engine.input_size}", engine, image, contiguous)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="bundled,seed", help="bundled and/or seed (runs/bench/...-random)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=5, help="timed forwards per scene and round")
    parser.add_argument("--scenes", default=",".join(SCENES), help=f"subset of {','.join(SCENES)}")
    args = parser.parse_args(argv)
    names = args.scenes.split(",")
    payloads = [payload.body for payload in real_payloads()]
    wanted = {"bundled": Settings(), "seed": Settings(model_path=SEED_MODEL_BUNDLE)}
    models = []
    for name in args.models.split(","):
        if name == "seed" and not (SEED_MODEL_BUNDLE / "model.json").exists():
            print(
                f"skipped seed: no {SEED_MODEL_BUNDLE}; python -m bench.random_bundle yolov10s-akconv "
                f"{SEED_MODEL_BUNDLE} --size 640"
            )
            continue
        models.append(load_model(name, wanted[name], payloads))
    load_before = os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    rows = []
    for model in models:
        photos = Photos(payloads, model.engine.input_size)
        for round_index in range(args.rounds):
            for name in rotated(names, round_index):
                result = run_scene(SCENES[name], model, photos, args.calls)
                rows.append({"model": model.name, "round": round_index, "scene": name, **result})
                print(f"{model.name} round {round_index} {name}: {result['ms']:.1f} ms", flush=True)
    summaries = {}
    for model in models:
        print(f"\n{model.name}, torch {torch.get_num_threads()} threads, {len(os.sched_getaffinity(0))} cores")
        summaries[model.name] = summarise([row for row in rows if row["model"] == model.name], names)
        print_table(summaries[model.name])
    load_after = os.getloadavg()
    print(f"\nload average (1, 5, 15 min) before {load_before}, after {load_after}; started {started}")
    for name in names:
        print(f"{name}: {SCENES[name].description}")
    policy = os.environ.get("OMP_WAIT_POLICY")
    print(f"OMP_WAIT_POLICY={policy}, GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT')}")
    path = write_results(
        "inservice" + (f"-{policy.lower()}" if policy else ""),
        rows,
        omp_wait_policy=policy,
        gomp_spincount=os.environ.get("GOMP_SPINCOUNT"),
        started=started,
        load_average_before=load_before,
        load_average_after=load_after,
        rounds=args.rounds,
        calls=args.calls,
        summaries=summaries,
    )
    print(path)


if __name__ == "__main__":
    main()
