"""The real engine's options that the fake engine cannot stand in for."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from model.letterbox import common_shapes
from service.core.engine import FORWARD_THREADS, Engine, ForwardThreads, grey_images
from service.process.settings import Settings


@pytest.fixture(autouse=True)
def torch_threads_kept():
    """Forwards set the calling thread's torch threads (here the test's): give the next test what this one had."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("runtime", ["aotinductor", "openvino", "int8"])
def test_a_runtime_without_artefacts_runs_eager_and_says_which_shapes(runtime, tmp_path, caplog):
    """A runtime whose folder holds no artefact for this model leaves every shape eager, with a warning per shape,
    the engine answers as before, and its runtime description says so."""
    with caplog.at_level(logging.INFO):
        engine = Engine(Settings(runtime=runtime, compiled_dir=tmp_path), None, runtime)
    engine.verify((384, 384))
    assert "384x384" in caplog.text and "python -m model compile" in caplog.text
    assert engine.detector.runners == {}
    compiled = next(record for record in caplog.records if record.getMessage() == "compiled model")
    assert all(state.startswith("eager") for state in compiled.shapes.values())
    assert engine.runtime["requested"] == runtime and engine.runtime["shapes"] == compiled.shapes


def test_eager_describes_every_served_shape():
    engine = Engine(Settings(), None, "eager")
    assert engine.runtime == {
        "requested": "eager",
        "shapes": {f"{height}x{width}": "eager" for height, width in common_shapes(engine.input_size)},
        "accuracy": None,
    }


def test_a_forward_alone_gets_every_thread_and_forwards_side_by_side_share_them():
    """The first forward gets all 4 threads; a second one starting while it runs gets 2, and sets torch's threads
    of its own thread to them; once both are done a forward gets 4 again."""
    forwards = ForwardThreads()
    first_in, second_done = threading.Event(), threading.Event()
    seen = {}

    def first():
        with forwards.share(4) as threads:
            seen["first"] = (threads, torch.get_num_threads())
            first_in.set()
            second_done.wait(5)

    def second():
        first_in.wait(5)
        with forwards.share(4) as threads:
            seen["second"] = (threads, torch.get_num_threads())
        second_done.set()

    workers = [threading.Thread(target=first), threading.Thread(target=second)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(10)
    with forwards.share(4) as alone:
        pass
    assert seen == {"first": (4, 4), "second": (2, 2)} and alone == 4


def test_forwards_never_get_fewer_than_one_thread():
    forwards = ForwardThreads()
    with forwards.share(2), forwards.share(2), forwards.share(2) as third:
        assert third == 1


@pytest.mark.parametrize(
    ("options", "workers"),
    [
        ({"intra_op_threads": 2}, 2),
        ({"intra_op_threads": 1}, 1),
        ({"inference_workers": 3}, 3),
        ({"intra_op_threads": 1, "inference_workers": 2}, 2),
    ],
)
def test_workers_default_to_two_on_a_cpu_with_two_threads_unless_set(options, workers):
    assert Engine(Settings(**options), None, "eager").workers == workers


def test_answers_from_workers_side_by_side_equal_answers_one_at_a_time():
    """Two threads running the real engine at once on two shapes answer what each answers alone."""
    engine = Engine(Settings(warmup_rounds=0), None, "eager")
    inputs = [
        [torch.randint(0, 255, (3, 384, 288), dtype=torch.uint8)],
        [torch.randint(0, 255, (3, 224, 384), dtype=torch.uint8)],
    ]
    alone = [engine.infer(images) for images in inputs]
    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(engine.infer, inputs * 2))
    for rows, expected in zip(together, alone * 2, strict=True):
        torch.testing.assert_close(rows, expected, rtol=1e-4, atol=1e-3)


def test_an_engine_loaded_in_a_thread_running_on_a_share_takes_the_process_threads():
    """A swap loads the new engine in a worker thread whose torch threads may be a forward's share (1): the engine
    still shares the threads the process started with."""
    engines = []

    def load_on_one_thread():
        torch.set_num_threads(1)
        engines.append(Engine(Settings(warmup_rounds=0), None, "eager"))

    loader = threading.Thread(target=load_on_one_thread)
    loader.start()
    loader.join(60)
    assert engines[0].threads == FORWARD_THREADS.process_threads


def test_forwards_alongside_others_get_the_share_they_would_get_beside_them():
    forwards = ForwardThreads()
    with forwards.alongside(1), forwards.share(2) as beside:
        pass
    with forwards.share(2) as alone:
        pass
    assert (beside, alone) == (1, 2)


def test_warm_up_times_each_forward_on_a_workers_share_of_the_threads(monkeypatch):
    """Two workers on two threads: the batch policy is timed on one thread, as batches run under load."""
    engine = Engine(Settings(intra_op_threads=2, warmup_rounds=0), None, "eager")
    seen = []
    monkeypatch.setattr(
        engine,
        "_thread_detector",
        lambda: lambda batch: seen.append(torch.get_num_threads()) or torch.zeros(len(batch), 1, 6),
    )
    engine.warm_up([(64, 64)], max_batch_size=2, rounds=1)
    assert engine.workers == 2 and seen and set(seen) == {1}
    engine.infer(grey_images((64, 64), 1))
    assert seen[-1] == 2, "a forward alone gets every thread"
