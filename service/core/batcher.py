"""Dynamic batching: an asyncio queue in front of inference threads. Knows nothing of images or models.

Items batch together only when their ``group_key`` is equal (the pipeline's key is the input's shape). A batch is
formed from the oldest item's key, so no item waits behind a newer one of another key. It closes when it holds the
largest size ``batch_sizes(key)`` allows (at most ``max_batch_size``) or when its oldest item has waited
``max_wait_s``, and then runs the largest allowed size that is waiting. ``run_batch`` (a plain function) runs in one
of ``workers`` threads so the event loop never blocks: up to ``workers`` batches run at once (Triton's instance
count), the next batch forming while they run. Guarantees:

- bounded: :meth:`submit` refuses at once with :class:`QueueFull` (and a Retry-After) when the queue is full;
- deadlines: an item whose deadline passes while queued is dropped before compute (:class:`DeadlineExceeded`);
- client gone: a cancelled :meth:`submit` (the client disconnected) drops its item before compute;
- nothing accepted is left hanging: a failing batch fails each of its items with :class:`InferenceFailed`,
  and the worker goes on; :meth:`stop` answers whatever is still queued after draining.

When tracing is on (:mod:`service.process.tracing`), each item waits in a ``queue_wait`` span (a child of the span
current at :meth:`submit`) that names the batch it ran in, and each batch runs in one ``forward`` span linked to its
items' spans, current on the inference thread that runs it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from service.core.errors import DeadlineExceeded, InferenceFailed, NotReady, QueueFull
from service.process import tracing

log = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass
class Pending(Generic[Item]):
    """One queued item and the future its caller awaits."""

    item: Item
    key: Hashable  # the batcher's group_key(item)
    future: asyncio.Future
    enqueued_at: float
    deadline: float
    started: bool = False
    abandoned: bool = False  # the caller stopped waiting (deadline or disconnect): skip it
    span: Any = None  # its queue_wait span while tracing is on


@dataclass
class BatchObserver:
    """Hooks for metrics; the batcher itself imports no metrics library. Refusals and drops are raised as typed
    errors (each carries its rejection reason) and counted where they are answered, once."""

    queue_depth: Callable[[int], None] = lambda depth: None
    queue_wait: Callable[[float], None] = lambda seconds: None
    batch: Callable[[int, float], None] = lambda size, seconds: None


@dataclass
class DynamicBatcher(Generic[Item, Result]):
    run_batch: Callable[[list[Item]], Sequence[Result]]
    max_batch_size: int
    max_wait_s: float
    max_queue: int
    observer: BatchObserver = field(default_factory=BatchObserver)
    # Items of equal keys may share a batch; by default, all of them.
    group_key: Callable[[Item], Hashable] = lambda item: None
    # The batch sizes a key may run at, ascending, starting at 1; sizes above max_batch_size are never run.
    # By default every size up to max_batch_size.
    batch_sizes: Callable[[Hashable], Sequence[int]] | None = None
    workers: int = 1  # batches that run at once, each in its own thread
    _queue: collections.deque = field(default_factory=collections.deque, init=False)
    _wakeup: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    _idle: asyncio.Event = field(default_factory=asyncio.Event, init=False)  # set while nothing is queued or running
    _worker: asyncio.Task | None = field(default=None, init=False)
    _running: set[asyncio.Task] = field(default_factory=set, init=False)  # batches running now
    _executor: ThreadPoolExecutor | None = field(default=None, init=False)
    _batch_seconds: float = field(default=0.1, init=False)  # moving average of a batch's run time
    _accepting: bool = field(default=False, init=False)

    def start(self) -> None:
        self._idle.set()
        self._executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="inference")
        self._accepting = True
        self._worker = asyncio.get_running_loop().create_task(self._work(), name="batcher")

    async def stop(self, drain: bool = True) -> None:
        """Refuse new items; with ``drain``, run everything queued first. Every caller gets an answer."""
        self._accepting = False
        if drain:
            await self._idle.wait()
        if self._worker:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        await asyncio.gather(*self._running, return_exceptions=True)  # batches already computing answer their items
        while self._queue:
            self._resolve(self._queue.popleft(), error=NotReady("the server is shutting down"))
        if self._executor:
            self._executor.shutdown(wait=True)

    @property
    def depth(self) -> int:
        return len(self._queue)

    def retry_after_seconds(self) -> int:
        """How long until the queue has room again: the batches the queue makes (at the largest size its oldest
        item's key runs at) times the measured batch time, over the workers that run them."""
        largest = self._allowed_sizes(self._queue[0].key)[-1] if self._queue else self.max_batch_size
        batches = math.ceil((len(self._queue) + 1) / largest)
        return max(1, math.ceil(batches * self._batch_seconds / self.workers))

    async def submit(self, item: Item, deadline: float, trace_attributes: dict[str, Any] | None = None) -> Result:
        """Queue ``item`` and wait for its result. ``deadline`` is a ``time.monotonic()`` value; ``trace_attributes``
        go on its ``queue_wait`` span and, from the first item, on its batch's ``forward`` span."""
        if not self._accepting:
            raise NotReady("the server is not accepting requests")
        if len(self._queue) >= self.max_queue:
            retry = self.retry_after_seconds()
            raise QueueFull(f"the queue is full ({self.max_queue}); retry in {retry} s", {"Retry-After": str(retry)})
        now = time.monotonic()
        pending = Pending(item, self.group_key(item), asyncio.get_running_loop().create_future(), now, deadline)
        pending.span = tracing.start_span("queue_wait", trace_attributes)
        self._queue.append(pending)
        self._idle.clear()
        self.observer.queue_depth(len(self._queue))
        self._wakeup.set()
        try:
            done, _ = await asyncio.wait({pending.future}, timeout=max(deadline - now, 0))
            if done or pending.started:  # compute already spent: deliver the answer, even late
                return await pending.future
            raise DeadlineExceeded("the request waited past its deadline in the queue")
        except BaseException as error:  # past its deadline, cancelled (the client left), or refused by stop()
            if not pending.started:
                pending.abandoned = True
                tracing.end_span(pending.span, error)  # else the worker ended it when its batch started
            raise

    async def _next_batch(self) -> list[Pending]:
        """Wait for the first live item, then until its key's batch is full or the item has waited max_wait; take
        the largest allowed size of that key's items that are waiting, oldest first."""
        while True:
            self._discard_abandoned()
            if self._queue:
                break
            if not self._running:
                self._idle.set()
            self._wakeup.clear()
            await self._wakeup.wait()
        oldest = self._queue[0]
        sizes = self._allowed_sizes(oldest.key)
        close_at = oldest.enqueued_at + self.max_wait_s
        while self._waiting(oldest.key) < sizes[-1] and (remaining := close_at - time.monotonic()) > 0:
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout=remaining)
            except TimeoutError:
                break
            self._discard_abandoned()
        if not self._queue:
            return []
        key = self._queue[0].key  # the oldest may have left while the batch filled
        waiting = self._waiting(key)
        size = max(size for size in self._allowed_sizes(key) if size <= waiting)
        batch, kept = [], collections.deque()
        for pending in self._queue:
            if len(batch) < size and pending.key == key:
                batch.append(pending)
            else:
                kept.append(pending)
        self._queue = kept
        self.observer.queue_depth(len(self._queue))
        return batch

    def _allowed_sizes(self, key: Hashable) -> list[int]:
        """The sizes ``key`` may run at, ascending, within ``max_batch_size``; 1 always among them."""
        allowed = range(1, self.max_batch_size + 1) if self.batch_sizes is None else self.batch_sizes(key)
        return sorted({1, *(size for size in allowed if 1 <= size <= self.max_batch_size)})

    def _waiting(self, key: Hashable) -> int:
        return sum(1 for pending in self._queue if pending.key == key)

    def _discard_abandoned(self) -> None:
        """Drop items whose caller has gone, and fail items already past their deadline (before compute)."""
        now = time.monotonic()
        kept = collections.deque()
        for pending in self._queue:
            if pending.abandoned:
                continue
            if now >= pending.deadline:
                pending.abandoned = True
                continue  # its submit() times out and answers 504
            kept.append(pending)
        self._queue = kept

    async def _work(self) -> None:
        """Form batches while a worker is free; each batch runs as its own task."""
        free_workers = asyncio.Semaphore(self.workers)
        while True:
            await free_workers.acquire()
            batch = await self._next_batch()
            if not batch:
                free_workers.release()
                continue
            task = asyncio.get_running_loop().create_task(self._run(batch), name="batch")
            self._running.add(task)
            task.add_done_callback(lambda done: self._finished(done, free_workers))

    def _finished(self, task: asyncio.Task, free_workers: asyncio.Semaphore) -> None:
        self._running.discard(task)
        free_workers.release()
        if not self._queue and not self._running:
            self._idle.set()

    async def _run(self, batch: list[Pending]) -> None:
        """Run one batch in a worker thread and answer each of its items."""
        started = time.monotonic()
        forward = tracing.start_batch("forward", (pending.span for pending in batch))
        for pending in batch:
            pending.started = True
            with tracing.using(pending.span):  # the histogram's exemplar
                self.observer.queue_wait(started - pending.enqueued_at)
            tracing.end_span(pending.span, batch=forward)
        failure = None
        try:
            run_batch = tracing.bound(self.run_batch, forward)
            results = await asyncio.get_running_loop().run_in_executor(
                self._executor, run_batch, [p.item for p in batch]
            )
            if len(results) != len(batch):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} items")
        except Exception as error:  # noqa: BLE001  (the worker must survive any batch)
            failure = error
            with tracing.using(forward):
                log.exception("inference batch failed", extra={"batch_size": len(batch)})
            for pending in batch:
                self._resolve(pending, error=InferenceFailed(f"inference failed: {type(error).__name__}"))
        else:
            for pending, result in zip(batch, results, strict=True):
                self._resolve(pending, result=result)
        seconds = time.monotonic() - started
        self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * seconds
        with tracing.using(forward):
            self.observer.batch(len(batch), seconds)
        tracing.end_span(forward, failure)

    @staticmethod
    def _resolve(pending: Pending, result: Any = None, error: Exception | None = None) -> None:
        if pending.future.done():
            return
        if error is not None:
            pending.future.set_exception(error)
        else:
            pending.future.set_result(result)
