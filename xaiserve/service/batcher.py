"""Per-model micro-batching on the asyncio event loop.

Up to `concurrency` model calls run at a time per model (default 1), in a thread pool, off the event
loop. The requests that arrived while the calls ran form the next batch (up to `max_rows` rows),
optionally after waiting up to `max_delay_ms` for more: at low load a request runs at once, at high
load batches fill by themselves. With concurrency 2, a batch starts while the previous one still
runs: a model whose calls use one core each (one intra-op thread) keeps two cores busy. The waiting queue is bounded: a full queue
answers RESOURCE_EXHAUSTED at once instead of growing without bound. Requests whose caller went
away (cancelled) or whose deadline passed are dropped before the model runs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from xaiserve.service import metrics
from xaiserve.service.errors import DeadlineExceeded, ResourceExhausted

log = logging.getLogger("xaiserve.batcher")

Feeds = dict[str, np.ndarray]
RunFn = Callable[[Feeds], dict[str, np.ndarray]]


@dataclass(frozen=True)
class BatchTiming:
    queue_s: float
    inference_s: float
    batch_rows: int
    batch_requests: int


@dataclass
class _Item:
    feeds: Feeds
    rows: int
    enqueued: float
    deadline: float | None
    future: asyncio.Future = field(repr=False)


class MicroBatcher:
    """Batches `feeds` dicts (arrays with a leading batch axis) for one model function."""

    def __init__(
        self,
        name: str,
        run: RunFn,
        executor: Executor,
        *,
        max_rows: int = 16,
        max_delay_ms: float = 2.0,
        max_queue: int = 256,
        concurrency: int = 1,
    ):
        self.name = name
        self.concurrency = max(1, int(concurrency))
        self._run = run
        self._executor = executor
        self.max_rows = max_rows
        self.max_delay = max_delay_ms / 1000.0
        self.max_queue = max_queue
        self._queue: asyncio.Queue[_Item] = asyncio.Queue(maxsize=max_queue)
        self._task: asyncio.Task | None = None
        self._carry: _Item | None = None
        self._active = 0  # batches taken from the queue and not answered yet
        self._depth = metrics.BATCHER_QUEUE.labels(name)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher-{self.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def drain_and_stop(self, poll_s: float = 0.05) -> None:
        """Stop once every request already queued has its answer (a model version a reload retired:
        nothing new arrives, what is queued finishes on this model)."""
        while self._active or self._carry is not None or not self._queue.empty():
            await asyncio.sleep(poll_s)
        await self.stop()

    async def submit(self, feeds: Feeds, *, timeout: float | None = None) -> tuple[dict[str, np.ndarray], BatchTiming]:
        """Queue one request (rows = leading dim of its arrays); await its slice of the batch output."""
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        if timeout is not None and timeout <= 0:
            raise DeadlineExceeded("the call's deadline had already passed when it reached the model queue")
        rows = int(next(iter(feeds.values())).shape[0])
        item = _Item(feeds, rows, now, None if timeout is None else now + timeout, loop.create_future())
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            raise ResourceExhausted(
                f"model {self.name} has {self.max_queue} requests waiting; retry with backoff or add replicas"
            ) from None
        self._depth.set(self._queue.qsize())
        self.start()
        try:
            return await item.future
        except asyncio.CancelledError:
            item.future.cancel()
            raise

    async def _next_batch(self) -> list[_Item]:
        first = self._carry or await self._queue.get()
        self._active += 1
        self._carry = None
        batch, rows = [first], first.rows
        end = time.perf_counter() + self.max_delay
        while rows < self.max_rows:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = end - time.perf_counter()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self._queue.get(), remaining)
                except asyncio.TimeoutError:
                    break
            if rows + item.rows > self.max_rows:
                self._carry = item  # starts the next batch; keeps arrival order
                break
            batch.append(item)
            rows += item.rows
        self._depth.set(self._queue.qsize())
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        slots = asyncio.Semaphore(self.concurrency)
        running: set[asyncio.Task] = set()

        def finished(task: asyncio.Task) -> None:
            running.discard(task)
            self._active -= 1
            slots.release()

        try:
            while True:
                await slots.acquire()
                try:
                    batch = await self._next_batch()
                except BaseException:
                    slots.release()
                    raise
                task = loop.create_task(self._answer(loop, batch), name=f"batch-{self.name}")
                running.add(task)
                task.add_done_callback(finished)
        finally:
            for task in list(running):
                task.cancel()

    async def _answer(self, loop: asyncio.AbstractEventLoop, batch: list[_Item]) -> None:
        """Run one batch and answer its requests (a failure fails this batch only)."""
        start = time.perf_counter()
        live: list[_Item] = []
        for it in batch:
            if it.future.done():  # caller cancelled
                continue
            if it.deadline is not None and start >= it.deadline:
                it.future.set_exception(DeadlineExceeded("the deadline passed while the request waited for the model"))
                continue
            live.append(it)
        if not live:
            return
        feeds = _concat([it.feeds for it in live])
        try:
            out = await loop.run_in_executor(self._executor, self._run, feeds)
        except Exception as e:  # a model failure fails this batch only, never the loop
            log.exception("model call failed", extra={"model": self.name, "rows": sum(i.rows for i in live)})
            for it in live:
                if not it.future.done():
                    it.future.set_exception(e)
            return
        took = time.perf_counter() - start
        rows = sum(it.rows for it in live)
        metrics.INFERENCE.labels(self.name).observe(took)
        metrics.BATCH_SIZE.labels(self.name).observe(rows)
        offset = 0
        for it in live:
            part = {k: v[offset : offset + it.rows] for k, v in out.items()}
            offset += it.rows
            metrics.QUEUE_WAIT.labels(self.name).observe(start - it.enqueued)
            if not it.future.done():
                it.future.set_result((part, BatchTiming(start - it.enqueued, took, rows, len(live))))


def _concat(feeds: Sequence[Feeds]) -> Feeds:
    if len(feeds) == 1:
        return feeds[0]
    return {k: np.concatenate([f[k] for f in feeds], axis=0) for k in feeds[0]}
