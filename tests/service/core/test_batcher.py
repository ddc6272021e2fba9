"""The batcher with a fake model held back by a threading.Event: plain asyncio, no HTTP, no torch."""

import asyncio
import threading
import time

import pytest

from service.core.batcher import BatchObserver, DynamicBatcher
from service.core.errors import DeadlineExceeded, InferenceFailed, NotReady, QueueFull


class FakeModel:
    """Doubles its inputs; each batch waits for ``gate``; raises for a batch containing ``poison``."""

    def __init__(self, poison=None):
        self.batches: list[list[int]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.poison = poison

    def __call__(self, items):
        self.gate.wait(5)
        self.batches.append(list(items))
        if self.poison in items:
            raise RuntimeError("poisoned batch")
        return [2 * item for item in items]


class Recorder(BatchObserver):
    def __init__(self):
        self.sizes: list[int] = []
        self.depths: list[int] = []
        super().__init__(queue_depth=self.depths.append, batch=lambda size, seconds: self.sizes.append(size))


def make(model, max_batch_size=4, max_wait_s=0.05, max_queue=16, **grouping):
    recorder = Recorder()
    batcher = DynamicBatcher(model, max_batch_size, max_wait_s, max_queue, observer=recorder, **grouping)
    batcher.start()
    return batcher, recorder


def far() -> float:
    return time.monotonic() + 30


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 20))


def test_concurrent_items_form_one_full_batch_in_order():
    async def scenario():
        model = FakeModel()
        batcher, recorder = make(model, max_batch_size=4, max_wait_s=1.0)
        results = await asyncio.gather(*(batcher.submit(i, far()) for i in range(4)))
        await batcher.stop()
        return model, results, recorder

    model, results, recorder = run(scenario())
    assert results == [0, 2, 4, 6]
    assert model.batches == [[0, 1, 2, 3]], "a full batch closes at once, before max_wait"
    assert recorder.sizes == [4]


def test_nothing_completes_before_the_batch_runs():
    async def scenario():
        model = FakeModel()
        model.gate.clear()
        batcher, _ = make(model, max_batch_size=2, max_wait_s=0.01)
        tasks = [asyncio.ensure_future(batcher.submit(i, far())) for i in range(2)]
        await asyncio.sleep(0.1)
        assert not any(t.done() for t in tasks)
        model.gate.set()
        results = await asyncio.gather(*tasks)
        await batcher.stop()
        return results

    assert run(scenario()) == [0, 2]


def test_a_lone_item_waits_at_most_max_wait():
    async def scenario():
        batcher, _ = make(FakeModel(), max_batch_size=8, max_wait_s=0.05)
        started = time.monotonic()
        result = await batcher.submit(21, far())
        waited = time.monotonic() - started
        await batcher.stop()
        return result, waited

    result, waited = run(scenario())
    assert result == 42 and waited >= 0.05


def test_full_queue_refuses_at_once_with_retry_after():
    async def scenario():
        model = FakeModel()
        model.gate.clear()
        batcher, recorder = make(model, max_batch_size=1, max_wait_s=0, max_queue=2)
        running = asyncio.ensure_future(batcher.submit(0, far()))
        await asyncio.sleep(0.05)  # item 0 is in the worker, the queue is empty
        queued = [asyncio.ensure_future(batcher.submit(i, far())) for i in (1, 2)]
        await asyncio.sleep(0)
        with pytest.raises(QueueFull) as refused:
            await batcher.submit(3, far())
        model.gate.set()
        results = await asyncio.gather(running, *queued)
        await batcher.stop()
        return refused.value, results, recorder

    refused, results, recorder = run(scenario())
    assert int(refused.headers["Retry-After"]) >= 1
    assert results == [0, 2, 4], "everything accepted is answered"
    assert max(recorder.depths) == 2 and recorder.depths[-1] == 0


def test_items_past_their_deadline_are_dropped_before_compute():
    async def scenario():
        model = FakeModel()
        model.gate.clear()
        batcher, recorder = make(model, max_batch_size=1, max_wait_s=0)
        blocker = asyncio.ensure_future(batcher.submit(0, far()))
        await asyncio.sleep(0.05)
        with pytest.raises(DeadlineExceeded):
            await batcher.submit(1, time.monotonic() + 0.05)
        model.gate.set()
        await blocker
        await batcher.stop()
        return model, recorder

    model, recorder = run(scenario())
    assert model.batches == [[0]], "the expired item never reached the model"


def test_cancelled_items_are_skipped():
    async def scenario():
        model = FakeModel()
        model.gate.clear()
        batcher, recorder = make(model, max_batch_size=4, max_wait_s=0)
        blocker = asyncio.ensure_future(batcher.submit(0, far()))
        await asyncio.sleep(0.05)
        gone = asyncio.ensure_future(batcher.submit(1, far()))
        kept = asyncio.ensure_future(batcher.submit(2, far()))
        await asyncio.sleep(0.01)
        gone.cancel()
        await asyncio.sleep(0.01)  # let the cancellation reach submit() before the worker forms the next batch
        model.gate.set()
        results = await asyncio.gather(blocker, kept)
        await batcher.stop()
        return model, results, recorder

    model, results, recorder = run(scenario())
    assert results == [0, 4]
    assert model.batches == [[0], [2]], "the cancelled item never reached the model"


def test_a_failing_batch_fails_its_items_and_the_worker_goes_on():
    async def scenario():
        batcher, _ = make(FakeModel(poison=13), max_batch_size=2, max_wait_s=0.2)
        failed = await asyncio.gather(batcher.submit(13, far()), batcher.submit(1, far()), return_exceptions=True)
        after = await batcher.submit(5, far())
        await batcher.stop()
        return failed, after

    failed, after = run(scenario())
    assert all(isinstance(error, InferenceFailed) for error in failed)
    assert after == 10


def test_stop_drains_the_queue_then_refuses():
    async def scenario():
        model = FakeModel()
        batcher, _ = make(model, max_batch_size=2, max_wait_s=0.01)
        tasks = [asyncio.ensure_future(batcher.submit(i, far())) for i in range(5)]
        await asyncio.sleep(0)
        await batcher.stop(drain=True)
        results = await asyncio.gather(*tasks)
        with pytest.raises(NotReady):
            await batcher.submit(9, far())
        return results

    assert run(scenario()) == [0, 2, 4, 6, 8]


def test_wrong_result_count_fails_the_batch():
    async def scenario():
        batcher, _ = make(lambda items: [1], max_batch_size=2, max_wait_s=0.1)
        results = await asyncio.gather(batcher.submit(1, far()), batcher.submit(2, far()), return_exceptions=True)
        await batcher.stop()
        return results

    assert all(isinstance(r, InferenceFailed) for r in run(scenario()))


def batches_after_a_blocker(items, **batcher_options):
    """The batches run when ``items`` queue while item 0 holds the worker (so they are all waiting together)."""

    async def scenario():
        model = FakeModel()
        model.gate.clear()
        batcher, _ = make(model, max_wait_s=0, **batcher_options)
        blocker = asyncio.ensure_future(batcher.submit(0, far()))
        await asyncio.sleep(0.05)
        queued = [asyncio.ensure_future(batcher.submit(i, far())) for i in items]
        await asyncio.sleep(0.01)
        model.gate.set()
        results = await asyncio.gather(blocker, *queued)
        await batcher.stop()
        return model.batches, results

    batches, results = run(scenario())
    assert results == [0, *(2 * i for i in items)]
    return batches


def test_items_of_different_keys_never_share_a_batch_and_the_oldest_key_goes_first():
    batches = batches_after_a_blocker([1, 2, 3, 4], max_batch_size=4, group_key=lambda item: item % 2)
    assert batches == [[0], [1, 3], [2, 4]]


def test_an_item_of_a_rare_key_does_not_wait_behind_newer_items_of_another():
    batches = batches_after_a_blocker([1, 2, 4, 6, 8, 10, 12], max_batch_size=4, group_key=lambda item: item % 2)
    assert batches == [[0], [1], [2, 4, 6, 8], [10, 12]]


def test_only_allowed_batch_sizes_run():
    """Three waiting, sizes 1, 2 and 4 allowed: a batch of 2, then 1, never 3."""
    batches = batches_after_a_blocker([1, 2, 3], max_batch_size=4, batch_sizes=lambda key: (1, 2, 4))
    assert batches == [[0], [1, 2], [3]]


def test_max_batch_size_bounds_the_allowed_sizes():
    batches = batches_after_a_blocker([1, 2, 3], max_batch_size=2, batch_sizes=lambda key: (1, 3))
    assert batches == [[0], [1], [2], [3]]


@pytest.mark.parametrize(("workers", "retry_after"), [(1, "2"), (2, "1")])
def test_retry_after_counts_batches_at_the_sizes_the_policy_runs_over_the_workers(workers, retry_after):
    """A policy that runs batch 1 only drains a full queue one item per batch: 16 queued at the default 0.1 s a
    batch is 2 s with one worker, not the 1 s that batches of max_batch_size (8) would take; two workers halve it."""

    async def scenario():
        model = FakeModel()
        model.gate.clear()
        batcher, _ = make(
            model, max_batch_size=8, max_wait_s=0, max_queue=16, batch_sizes=lambda key: [1], workers=workers
        )
        running = [asyncio.ensure_future(batcher.submit(i, far())) for i in range(workers)]
        await asyncio.sleep(0.05)  # one item in each worker
        queued = [asyncio.ensure_future(batcher.submit(i, far())) for i in range(workers, workers + 16)]
        await asyncio.sleep(0)
        with pytest.raises(QueueFull) as refused:
            await batcher.submit(workers + 16, far())
        model.gate.set()
        await asyncio.gather(*running, *queued)
        await batcher.stop()
        return refused.value

    assert run(scenario()).headers["Retry-After"] == retry_after


class Overlap:
    """Records how many batches run at once; each batch waits until ``release`` is set."""

    def __init__(self):
        self.lock = threading.Lock()
        self.running = 0
        self.most = 0
        self.release = threading.Event()

    def __call__(self, items):
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        self.release.wait(5)
        with self.lock:
            self.running -= 1
        return [2 * item for item in items]


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_up_to_workers_batches_run_at_once(workers):
    """Six lone items with batch size 1: ``workers`` batches run side by side, never more, and all are answered."""

    async def scenario():
        model = Overlap()
        batcher, recorder = make(model, max_batch_size=1, max_wait_s=0, workers=workers)
        tasks = [asyncio.ensure_future(batcher.submit(i, far())) for i in range(6)]
        await asyncio.sleep(0.2)
        running_while_held = model.running
        model.release.set()
        results = await asyncio.gather(*tasks)
        await batcher.stop()
        return running_while_held, model.most, results, recorder.sizes

    running_while_held, most, results, sizes = run(scenario())
    assert running_while_held == most == workers
    assert results == [0, 2, 4, 6, 8, 10] and sizes == [1] * 6


def test_stop_waits_for_every_running_batch():
    """Two batches running in two workers when ``stop`` is called: both are answered before it returns."""

    async def scenario():
        model = Overlap()
        batcher, _ = make(model, max_batch_size=1, max_wait_s=0, workers=2)
        tasks = [asyncio.ensure_future(batcher.submit(i, far())) for i in range(2)]
        await asyncio.sleep(0.1)
        assert model.running == 2
        stopping = asyncio.ensure_future(batcher.stop(drain=True))
        await asyncio.sleep(0.1)
        assert not stopping.done(), "stop returned while batches were running"
        model.release.set()
        await stopping
        return [task.result() for task in tasks if task.done()]

    assert run(scenario()) == [0, 2]


def test_a_failing_batch_leaves_the_other_worker_running():
    async def scenario():
        model = FakeModel(poison=13)
        batcher, _ = make(model, max_batch_size=1, max_wait_s=0, workers=2)
        answers = await asyncio.gather(*(batcher.submit(i, far()) for i in (13, 1, 2, 3)), return_exceptions=True)
        await batcher.stop()
        return answers

    failed, *served = run(scenario())
    assert isinstance(failed, InferenceFailed) and served == [2, 4, 6]
