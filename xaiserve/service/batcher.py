"""Per-model micro-batching, off the event loop.

Up to `concurrency` model calls run at a time per model (default 1), in a thread pool, never on the
event loop. The requests that arrived while the calls ran form the next batch (up to `max_rows`
rows), optionally after waiting up to `max_delay_ms` for more: at low load a request runs at once,
at high load batches fill by themselves. With concurrency 2, a batch starts while the previous one
still runs: a model whose calls use one core each (one intra-op thread) keeps two cores busy. The
waiting queue is bounded: a full queue answers RESOURCE_EXHAUSTED at once instead of growing without
bound. Requests whose caller went away (cancelled) or whose deadline passed are dropped before the
model runs.

The queue is a plain deque under a lock, so requests are queued from any thread: the event loop
(`submit`) or a CPU-pool thread that has just decoded the request's image (`put`, the fast path's
one task per request: decode, queue). Each request may carry `post`, its per-row post-processing
(the fast path renders the mask and builds the response there), which runs on the thread that ran
the batch, after the model call and after the model slot is free again. Answers reach the event
loop with one `call_soon_threadsafe` per batch, not one per request. When a free slot finds the
batcher idle (no batch running, nothing queued, no batching delay configured), a request queued by
`put(solo=True)` runs on the thread that queued it (decode, model, response on one thread: no
hand-off), exactly when the asyncio design would have started it as a batch of one at once.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from xaiserve.service import metrics
from xaiserve.service.errors import DeadlineExceeded, ResourceExhausted, Unavailable

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
class Item:
    """One request: `future` (on its event loop) gets post(part, timing) when `post` is set, else
    (part, timing); `post` runs on the thread that ran the batch."""

    feeds: Feeds
    rows: int
    enqueued: float
    deadline: float | None
    future: asyncio.Future = field(repr=False)
    post: Callable[[dict[str, np.ndarray], BatchTiming], Any] | None = field(default=None, repr=False)


Answer = tuple[asyncio.Future, Any, BaseException | None]
# What `post` returns when it handed the request on (to the CPU pool) and will answer it itself.
DEFERRED: Any = object()


def _resolve(answers: list[Answer]) -> None:
    """On the event loop: complete the futures of one batch (those whose caller is still waiting)."""
    for fut, result, exc in answers:
        if fut.done():
            continue
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)


def resolve_threadsafe(answers: list[Answer]) -> None:
    """Hand answers to their loops: one callback per loop (in practice one per batch)."""
    by_loop: dict[int, tuple[asyncio.AbstractEventLoop, list[Answer]]] = {}
    for a in answers:
        loop = a[0].get_loop()
        by_loop.setdefault(id(loop), (loop, []))[1].append(a)
    for loop, part in by_loop.values():
        try:
            loop.call_soon_threadsafe(_resolve, part)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass


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
        self._cond = threading.Condition(threading.Lock())
        self._queue: deque[Item] = deque()
        self._slots = 0  # model calls running or about to take a batch (<= concurrency)
        self._active = 0  # batches taken from the queue and not answered yet
        self._depth = metrics.BATCHER_QUEUE.labels(name)
        self._queue_wait = metrics.QUEUE_WAIT.labels(name)
        self._inference = metrics.INFERENCE.labels(name)
        self._batch_size = metrics.BATCH_SIZE.labels(name)

    def start(self) -> None:
        """Nothing to start: model calls run on the executor's threads as requests arrive."""

    async def stop(self) -> None:
        """Nothing runs between batches: a stopped batcher still answers what reaches it (a call that
        resolved a retired entry just before the reload), as the asyncio design restarted its task."""

    async def drain_and_stop(self, poll_s: float = 0.05) -> None:
        """Stop once every request already queued has its answer (a model version a reload retired:
        nothing new arrives, what is queued finishes on this model)."""
        while self._active or self._slots or self._queue:
            await asyncio.sleep(poll_s)
        await self.stop()

    async def submit(self, feeds: Feeds, *, timeout: float | None = None) -> tuple[dict[str, np.ndarray], BatchTiming]:
        """Queue one request (rows = leading dim of its arrays); await its slice of the batch output."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self.put(self.item(feeds, fut, timeout))
        return await fut  # cancelled with the caller: the batch skips it

    def item(self, feeds: Feeds, future: asyncio.Future, timeout: float | None, post=None) -> Item:
        """The queue entry of one request (any thread); DEADLINE_EXCEEDED when no time is left."""
        if timeout is not None and timeout <= 0:
            raise DeadlineExceeded("the call's deadline had already passed when it reached the model queue")
        now = time.perf_counter()
        rows = int(next(iter(feeds.values())).shape[0])
        return Item(feeds, rows, now, None if timeout is None else now + timeout, future, post)

    def put(self, item: Item, *, solo: bool = False) -> None:
        """Queue `item` (any thread; RESOURCE_EXHAUSTED when the queue is full). solo: the caller is a
        pool thread with nothing else to do, which runs the model itself when the batcher is idle
        (no batch running, none queued; the request would start alone at once). Under load the
        pool threads keep decoding while the model threads run batches."""
        with self._cond:
            if len(self._queue) >= self.max_queue:
                raise ResourceExhausted(
                    f"model {self.name} has {self.max_queue} requests waiting; retry with backoff or add replicas"
                )
            here = (
                solo and self.max_delay <= 0 and not self._active and not self._queue and self._slots < self.concurrency
            )
            if here:
                self._slots += 1
                self._active += 1
                launch = False
            else:
                self._queue.append(item)
                launch = self._claim_locked()
                self._cond.notify()  # a batch waiting for max_delay takes it
            depth = len(self._queue)
        self._depth.set(depth)
        if here:
            self._run_batch([item])
        elif launch:
            self._launch()

    # -- on the model threads ----------------------------------------------------------------------
    def _claim_locked(self) -> bool:
        if self._queue and self._slots < self.concurrency:
            self._slots += 1
            return True
        return False

    def _launch(self) -> None:
        try:
            self._executor.submit(self._drain)
        except RuntimeError:  # the executor is shut down
            with self._cond:
                self._slots -= 1
                left = list(self._queue)
                self._queue.clear()
            err = Unavailable("the server is shutting down; retry on another replica")
            resolve_threadsafe([(it.future, None, err) for it in left])

    def _take(self) -> list[Item]:
        """The next batch, in arrival order: up to max_rows rows (a first request with more rows runs
        alone), waiting up to max_delay for more when it is set. Holds a slot."""
        with self._cond:
            batch: list[Item] = []
            rows = 0
            end = None
            while True:
                while self._queue and rows < self.max_rows:
                    nxt = self._queue[0]
                    if batch and rows + nxt.rows > self.max_rows:
                        break
                    batch.append(self._queue.popleft())
                    rows += nxt.rows
                full = rows >= self.max_rows or (batch and self._queue)
                if full or self.max_delay <= 0 or not batch:
                    break
                now = time.perf_counter()
                end = now + self.max_delay if end is None else end
                if now >= end or not self._cond.wait(end - now):
                    if self._queue and rows < self.max_rows:
                        continue  # arrived with the timeout: take what fits
                    break
            if batch:
                self._active += 1
            else:
                self._slots -= 1
            depth = len(self._queue)
        self._depth.set(depth)
        return batch

    def _drain(self) -> None:
        batch = self._take()
        if batch:
            self._run_batch(batch)

    def _release(self) -> None:
        """The model call is over: free its slot; a queued request starts the next batch."""
        with self._cond:
            self._slots -= 1
            launch = self._claim_locked()
        if launch:
            self._launch()

    def _run_batch(self, batch: list[Item]) -> None:
        """Run one batch (holding a slot) and answer its requests; a failure fails this batch only."""
        live: list[Item] = []
        try:
            start = time.perf_counter()
            late: list[Answer] = []
            for it in batch:
                if it.future.done():  # caller cancelled
                    continue
                if it.deadline is not None and start >= it.deadline:
                    late.append(
                        (
                            it.future,
                            None,
                            DeadlineExceeded("the deadline passed while the request waited for the model"),
                        )
                    )
                    continue
                live.append(it)
            if late:
                resolve_threadsafe(late)
            out: dict[str, np.ndarray] | None = None
            error: BaseException | None = None
            if live:
                try:
                    out = self._run(_concat([it.feeds for it in live]))
                except Exception as e:  # a model failure fails this batch only, never the batcher
                    log.exception("model call failed", extra={"model": self.name, "rows": sum(i.rows for i in live)})
                    error = e
            took = time.perf_counter() - start
        finally:
            self._release()
        try:
            if not live:
                return
            answers: list[Answer] = []
            if out is None:
                answers = [(it.future, None, error) for it in live]
            else:
                rows = sum(it.rows for it in live)
                self._inference.observe(took)
                self._batch_size.observe(rows)
                offset = 0
                for it in live:
                    part = {k: v[offset : offset + it.rows] for k, v in out.items()}
                    offset += it.rows
                    self._queue_wait.observe(start - it.enqueued)
                    timing = BatchTiming(start - it.enqueued, took, rows, len(live))
                    if it.post is None:
                        answers.append((it.future, (part, timing), None))
                    elif it.future.done():
                        continue
                    else:
                        try:
                            res = it.post(part, timing)
                        except Exception as e:  # this request's response failed, not the batch
                            answers.append((it.future, None, e))
                        else:
                            if res is not DEFERRED:
                                answers.append((it.future, res, None))
            resolve_threadsafe(answers)
        finally:
            with self._cond:
                self._active -= 1


def _concat(feeds: Sequence[Feeds]) -> Feeds:
    if len(feeds) == 1:
        return feeds[0]
    return {k: np.concatenate([f[k] for f in feeds], axis=0) for k in feeds[0]}
