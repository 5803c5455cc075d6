"""StreamExplain: frames in, masks out, in frame order, with a drop policy.

- LATEST (default): one frame runs at a time; of the frames that arrive meanwhile only the newest
  waits (a newer one replaces it and the replaced one is counted as dropped). Memory per stream is
  bounded by two frames whatever the sender or reader does.
- ALL: every frame runs, in order; at most `max_queue` wait; beyond that the stream ends with
  RESOURCE_EXHAUSTED. Two frames may be in flight so the model is never idle between frames.
A client that stops reading blocks our writes (HTTP/2 flow control); the reader keeps bounded
state, so server memory does not grow.
"""
from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

from xaiserve.proto.explain.v1 import explainer_pb2 as pb
from xaiserve.service import metrics
from xaiserve.service.errors import InvalidArgument, ResourceExhausted, XaiError
from xaiserve.service.fastpath import FastPath
from xaiserve.service.registry import ModelEntry


def _now_us() -> int:
    return time.time_ns() // 1000


@dataclass
class _Frame:
    msg: pb.ExplainFrame
    received_us: int


class StreamSession:
    def __init__(self, fast: FastPath, stream_default_queue: int, stream_max_queue: int):
        self.fast = fast
        self.default_queue = stream_default_queue
        self.max_queue_limit = stream_max_queue
        self.entry: ModelEntry | None = None
        self.options = pb.ExplainOptions()
        self.policy = pb.LATEST
        self.max_queue = stream_default_queue
        self.dropped = 0
        self.last_id: int | None = None
        self._pending: deque[_Frame] = deque()
        self._wake = asyncio.Event()
        self._error: XaiError | None = None
        self._eof = False

    @property
    def model_label(self) -> str:
        return self.entry.id if self.entry else "unknown"

    def _configure(self, f: pb.ExplainFrame) -> None:
        if self.entry is None:
            if not f.model:
                raise InvalidArgument(f"frame {f.frame_id}: the first frame of a stream must name the model")
            self.entry = self.fast.registry.resolve(f.model)
            if f.policy == pb.ALL:
                self.policy = pb.ALL
                q = f.max_queue or self.default_queue
                if not 1 <= q <= self.max_queue_limit:
                    raise InvalidArgument(f"max_queue {q} is out of range 1..{self.max_queue_limit}")
                self.max_queue = q
        elif f.model and self.fast.registry.resolve(f.model).id != self.entry.id:
            raise InvalidArgument(f"frame {f.frame_id}: a stream serves one model ({self.entry.id}); open another stream for {f.model}")
        if f.HasField("options"):
            self.options = f.options
        if self.last_id is not None and f.frame_id <= self.last_id:
            raise InvalidArgument(f"frame ids must increase: got {f.frame_id} after {self.last_id}")
        self.last_id = f.frame_id

    async def _read(self, requests: AsyncIterator[pb.ExplainFrame]) -> None:
        try:
            async for f in requests:
                received = _now_us()
                self._configure(f)
                metrics.STREAM_FRAMES.labels(self.model_label, "received").inc()
                frame = _Frame(f, received)
                if self.policy == pb.ALL:
                    if len(self._pending) >= self.max_queue:
                        raise ResourceExhausted(
                            f"frame {f.frame_id}: {self.max_queue} frames already wait (policy ALL); "
                            "send slower, raise max_queue, or use policy LATEST"
                        )
                    self._pending.append(frame)
                else:
                    if self._pending:
                        self._pending.popleft()
                        self.dropped += 1
                        metrics.STREAM_FRAMES.labels(self.model_label, "dropped").inc()
                    self._pending.append(frame)
                self._wake.set()
        except XaiError as e:
            self._error = e
        finally:
            self._eof = True
            self._wake.set()

    async def _run(self, frame: _Frame) -> pb.ExplainFrameResult:
        req = pb.ExplainRequest(model=self.entry.id, image=frame.msg.image, options=self.options)
        try:
            resp = await self.fast.explain(req, timeout=None, entry=self.entry)
        except XaiError as e:
            raise type(e)(f"frame {frame.msg.frame_id}: {e}") from None
        return pb.ExplainFrameResult(
            frame_id=frame.msg.frame_id, result=resp, received_unix_us=frame.received_us,
            client_timestamp_us=frame.msg.client_timestamp_us,
        )

    async def run(self, requests: AsyncIterator[pb.ExplainFrame]) -> AsyncIterator[pb.ExplainFrameResult]:
        reader = asyncio.get_running_loop().create_task(self._read(requests))
        depth = 2 if self.policy == pb.ALL else 1
        inflight: deque[asyncio.Task] = deque()
        try:
            while True:
                # policy is known once the first frame has been read
                depth = 2 if self.policy == pb.ALL else 1
                while self._pending and len(inflight) < depth:
                    inflight.append(asyncio.ensure_future(self._run(self._pending.popleft())))
                if inflight:
                    res = await inflight.popleft()
                    res.answered_unix_us = _now_us()
                    res.dropped_total = self.dropped
                    metrics.STREAM_FRAMES.labels(self.model_label, "answered").inc()
                    yield res
                    continue
                if self._error is not None:
                    raise self._error
                if self._eof:
                    return
                self._wake.clear()
                if not self._pending and not self._eof:
                    await self._wake.wait()
        finally:
            reader.cancel()
            for t in inflight:
                t.cancel()
