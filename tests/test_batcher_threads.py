"""The micro-batcher queued from threads (service/batcher.py): the fast path's one task per request.

A real model function (numpy, so the batch arithmetic is checkable) on a real thread pool; gates
(threading.Event) instead of sleeps decide what is queued while a call runs.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from xaiserve.service.batcher import MicroBatcher
from xaiserve.service.errors import DeadlineExceeded, ResourceExhausted

TIMEOUT = 30


class Model:
    """y = 2 x per row; records each call's rows and thread; `gate` holds calls until set."""

    def __init__(self, gated: bool = False, fail_when=None):
        self.calls: list[tuple[int, str]] = []
        self.gate = threading.Event()
        if not gated:
            self.gate.set()
        self.started = threading.Semaphore(0)
        self.running = 0
        self.most = 0
        self.lock = threading.Lock()
        self.fail_when = fail_when

    def __call__(self, feeds):
        x = feeds["x"]
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
            self.calls.append((x.shape[0], threading.current_thread().name))
        self.started.release()
        try:
            assert self.gate.wait(TIMEOUT)
            if self.fail_when is not None and self.fail_when(x):
                raise RuntimeError("model failed")
            return {"y": 2 * x}
        finally:
            with self.lock:
                self.running -= 1


def row(v: float) -> dict:
    return {"x": np.full((1, 3), v, np.float32)}


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT))


def test_a_request_alone_runs_on_the_thread_that_queued_it():
    model = Model()
    pool = ThreadPoolExecutor(1, thread_name_prefix="infer")
    decode = ThreadPoolExecutor(1, thread_name_prefix="decode")
    b = MicroBatcher("m", model, pool, max_delay_ms=0, concurrency=2)

    async def main():
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        post = lambda part, bt: (part["y"], bt, threading.current_thread().name)  # noqa: E731
        decode.submit(lambda: b.put(b.item(row(3.0), fut, None, post), solo=True))
        return await fut

    y, bt, thread = run(main())
    assert np.array_equal(y, np.full((1, 3), 6.0))
    assert model.calls == [(1, thread)] and thread.startswith("decode")  # model and response: one thread
    assert bt.batch_rows == 1 and bt.batch_requests == 1 and bt.queue_s >= 0


def test_requests_queued_while_the_model_runs_form_one_batch_in_order():
    model = Model(gated=True)
    b = MicroBatcher("m", model, ThreadPoolExecutor(2), max_rows=16, max_delay_ms=0, concurrency=1)

    async def main():
        first = asyncio.ensure_future(b.submit(row(0.0)))
        await asyncio.to_thread(model.started.acquire)  # the first call runs (and holds the only slot)
        rest = [asyncio.ensure_future(b.submit(row(float(i)))) for i in range(1, 6)]
        await asyncio.sleep(0)
        model.gate.set()
        return await first, await asyncio.gather(*rest)

    (p0, t0), rest = run(main())
    assert [c[0] for c in model.calls] == [1, 5]
    assert t0.batch_rows == 1
    for i, (part, bt) in enumerate(rest, start=1):
        assert np.array_equal(part["y"], np.full((1, 3), 2.0 * i)) and bt.batch_rows == 5 and bt.batch_requests == 5


def test_never_more_calls_at_once_than_the_concurrency():
    model = Model(gated=True)
    b = MicroBatcher("m", model, ThreadPoolExecutor(4), max_rows=1, max_delay_ms=0, concurrency=2)
    decode = ThreadPoolExecutor(4)

    async def main():
        loop = asyncio.get_running_loop()
        futs = [loop.create_future() for _ in range(8)]
        for i, f in enumerate(futs):
            decode.submit(lambda i=i, f=f: b.put(b.item(row(float(i)), f, None), solo=True))
        await asyncio.to_thread(model.started.acquire)
        await asyncio.to_thread(model.started.acquire)
        await asyncio.sleep(0.05)
        assert model.running == 2  # the other six wait in the queue
        model.gate.set()
        return await asyncio.gather(*futs)

    out = run(main())
    assert sorted(float(p["y"][0, 0]) for p, _ in out) == [2.0 * i for i in range(8)]
    assert model.most == 2 and len(model.calls) == 8


def test_a_model_failure_fails_its_batch_only_and_a_post_failure_its_row_only():
    model = Model(fail_when=lambda x: bool((x == 7).any()))
    b = MicroBatcher("m", model, ThreadPoolExecutor(1), max_delay_ms=0)

    def post(part, bt):
        if part["y"][0, 0] == 10:
            raise ValueError("render failed")
        return part["y"]

    async def main():
        with pytest.raises(RuntimeError, match="model failed"):
            await b.submit(row(7.0))
        loop = asyncio.get_running_loop()
        ok, bad = loop.create_future(), loop.create_future()
        b.put(b.item(row(1.0), ok, None, post))
        b.put(b.item(row(5.0), bad, None, post))
        assert np.array_equal(await ok, np.full((1, 3), 2.0))
        with pytest.raises(ValueError, match="render failed"):
            await bad
        return await b.submit(row(2.0))

    part, _ = run(main())
    assert np.array_equal(part["y"], np.full((1, 3), 4.0))


def test_deadlines_cancellation_and_a_full_queue():
    model = Model(gated=True)
    b = MicroBatcher("m", model, ThreadPoolExecutor(1), max_queue=3, max_delay_ms=0, concurrency=1)

    async def main():
        with pytest.raises(DeadlineExceeded, match="already passed"):
            await b.submit(row(0.0), timeout=0)
        first = asyncio.ensure_future(b.submit(row(1.0)))
        await asyncio.to_thread(model.started.acquire)
        late = asyncio.ensure_future(b.submit(row(2.0), timeout=0.01))
        gone = asyncio.ensure_future(b.submit(row(3.0)))
        kept = asyncio.ensure_future(b.submit(row(4.0)))
        await asyncio.sleep(0.05)  # late's deadline passes while it waits for the model
        with pytest.raises(ResourceExhausted, match="3 requests waiting"):
            await b.submit(row(5.0))
        gone.cancel()
        await asyncio.sleep(0)
        model.gate.set()
        await first
        with pytest.raises(DeadlineExceeded, match="while the request waited"):
            await late
        part, bt = await kept
        return part, bt

    part, bt = run(main())
    assert float(part["y"][0, 0]) == 8.0 and bt.batch_rows == 1  # neither the late nor the cancelled row ran
    assert [c[0] for c in model.calls] == [1, 1]
