"""StreamExplain: frames in, masks out, in frame order, with a drop policy, per-frame errors,
flow-control figures and a drain notice.

- LATEST (default): a frame starts when it arrives while fewer than `stream_latest_inflight`
  (default 2) frames of the stream are unanswered; of the frames that arrive beyond that only the
  newest waits (a newer one replaces it and the replaced one is counted as dropped). Two in flight,
  not one: with one, a single slow frame (a stalled core, the first frame after start) made the
  next frame wait and the one after replace it, so a 30 fps camera lost a frame whenever one took
  more than about two frame periods although the server had spare capacity (bench/bench_stream.py
  traced every such drop). Memory per stream is bounded by inflight + 2 frames (in flight, waiting,
  being answered) whatever the sender or reader does.
- ALL: every frame runs, in order; at most `max_queue` wait; beyond that the stream ends with
  RESOURCE_EXHAUSTED. Two frames may be in flight so the model is never idle between frames.
In both, a frame starts as soon as it arrives when there is room (not when the previous answer is
written); answers go out in frame order.
A client that stops reading blocks our writes (HTTP/2 flow control); the reader keeps bounded
state, so server memory does not grow.

A frame that fails (its image does not decode, is too large, the model queue is full ...) is
answered with its own FrameStatus and no result; the stream goes on. Only errors about the stream
itself (no or unknown model, frame ids that do not increase, an ALL queue overflowing) end it, and
so do `max_consecutive_errors` failed frames in a row (a sender whose every frame is broken).
A running frame holds an admission slot like a unary call (max_inflight, and per principal when
set), so streams cannot starve unary callers: a frame beyond the limit is answered at once with
RESOURCE_EXHAUSTED, which (the server's load, not the sender's fault) does not count in that run.

Every answer carries dropped_total and answer_fps (answers per second over about the last second),
so a sender can pace itself. On drain (SIGTERM) every open stream gets a DrainNotice at once and on
each later answer; shortly before the grace period ends the stream is ended with UNAVAILABLE and
the trailing metadata "xaiserve-draining: 1", rather than cut by the server's shutdown.

Each frame runs through FastPath.explain, so decoding, resizing and building the mask happen in
the fast path's CPU pool and the model call in its micro-batcher: frames of concurrent streams
share batches.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc

from xaiserve.proto.explain.v1 import explainer_pb2 as pb
from xaiserve.service import metrics
from xaiserve.service.config import ServerConfig
from xaiserve.service.errors import (
    DeadlineExceeded,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
    XaiError,
    quote,
    status_of,
)
from xaiserve.service.fastpath import FastPath, Overloaded
from xaiserve.service.mask_wire import with_stream_defaults
from xaiserve.service.registry import ModelEntry

log = logging.getLogger("xaiserve.streams")

DRAIN_METADATA = ("xaiserve-draining", "1")
RATE_WINDOW_S = 1.0  # answer_fps is measured over about this long


async def _cine_frames(frame: _Frame, fast: FastPath) -> list[_Frame]:
    """A frame whose image asks for image.dicom.all_frames, as one frame per frame of its
    multi-frame DICOM: the file is read and checked once, in the CPU pool (frame count and size
    limits on the header, before any frame is decoded: dicom_in.Cine); each frame's own image is
    cut from it when that frame runs (_run). A file that cannot be split is one failed frame with
    that status."""
    from xaiserve.service.dicom_in import Cine

    try:
        cine = await fast.cpu.run(Cine, frame.msg.image)
    except XaiError as e:
        return [_Frame(frame.msg, frame.received_us, frame.received, error=e)]
    return [_Frame(frame.msg, frame.received_us, frame.received, dicom_frame=k, cine=cine) for k in range(cine.frames)]


def _now_us() -> int:
    return time.time_ns() // 1000


def drain_margin(grace_s: float) -> float:
    """How long before the end of the grace period streams are ended by us (with a status and the
    drain trailer) rather than cancelled by the server's shutdown."""
    return min(1.0, 0.2 * grace_s)


@dataclass
class _Frame:
    msg: pb.ExplainFrame
    received_us: int
    received: float  # perf_counter
    dicom_frame: int | None = None  # image.dicom.all_frames: the frame of the file this one explains
    error: XaiError | None = None  # the all_frames message could not be split: its answer's status
    cine: Any = None  # dicom_in.Cine of the all_frames message: cuts this frame's image


class StreamHub:
    """The open streams of one server: the drain path tells each of them at once."""

    def __init__(self) -> None:
        self._sessions: set[StreamSession] = set()
        self.drain_deadline: float | None = None  # time.monotonic() when the server stops
        self.drain_end: float | None = None  # when streams end themselves, a margin before that

    def open(self, session: "StreamSession") -> None:
        self._sessions.add(session)
        if self.drain_deadline is not None and self.drain_end is not None:
            session.drain(self.drain_deadline, self.drain_end)

    def close(self, session: "StreamSession") -> None:
        self._sessions.discard(session)

    def __len__(self) -> int:
        return len(self._sessions)

    def models_changed(self) -> None:
        """After a model store reload: wake every open stream, so that one whose model was removed
        ends now, not at its next frame (StreamSession._follow_reload; event loop only)."""
        for s in list(self._sessions):
            s._wake.set()

    def drain(self, grace_s: float) -> None:
        """Every open stream: notice now, ended shortly before `grace_s` from now (event loop only)."""
        self.drain_deadline = time.monotonic() + grace_s
        self.drain_end = self.drain_deadline - drain_margin(grace_s)
        for s in list(self._sessions):
            s.drain(self.drain_deadline, self.drain_end)


class _Rate:
    """Events per second over about the last `window` seconds."""

    def __init__(self, window: float = RATE_WINDOW_S):
        self.window = window
        self._t: deque[float] = deque()

    def tick(self, now: float) -> None:
        self._t.append(now)
        while len(self._t) > 2 and now - self._t[0] > self.window:
            self._t.popleft()

    def per_second(self) -> float:
        if len(self._t) < 2:
            return 0.0
        span = self._t[-1] - self._t[0]
        return (len(self._t) - 1) / span if span > 0 else 0.0


class StreamSession:
    def __init__(
        self,
        fast: FastPath,
        config: ServerConfig,
        hub: StreamHub | None = None,
        context: grpc.aio.ServicerContext | None = None,
        principal: str = "",
    ):
        self.fast = fast
        self.principal = principal  # whose admission slots the frames take (max_inflight_per_principal)
        self.default_queue = config.stream_default_queue
        self.max_queue_limit = config.stream_max_queue
        self.max_errors = config.stream_max_consecutive_errors
        self.latest_inflight = config.stream_latest_inflight
        self.hub, self.context = hub, context
        self.entry: ModelEntry | None = None
        self.options = with_stream_defaults(pb.ExplainOptions())
        self.policy = pb.LATEST
        self.max_queue = config.stream_default_queue
        self.dropped = 0
        self.failed_in_a_row = 0
        self.last_id: int | None = None  # of the frames received
        self.last_answered: int | None = None
        self._pending: deque[_Frame] = deque()
        self._inflight: deque[tuple[asyncio.Task, _Frame]] = deque()  # started, not yet answered (in order)
        self._wake = asyncio.Event()
        self._started = asyncio.Event()  # _launch ran: the reader of an all_frames message waits on it
        self._error: XaiError | None = None
        self._eof = False
        self._rate = _Rate()
        self._drain_deadline: float | None = None  # time.monotonic() when the server stops
        self._drain_end: float | None = None  # when this stream ends itself
        self._notice_sent = False
        self._generation = fast.registry.generation  # the registry's served set this stream saw last

    @property
    def model_label(self) -> str:
        return self.entry.id if self.entry else "unknown"

    # -- drain ---------------------------------------------------------------------------------
    def drain(self, deadline: float, end: float) -> None:
        self._drain_deadline, self._drain_end = deadline, end
        self._wake.set()

    def _notice(self) -> pb.DrainNotice | None:
        if self._drain_deadline is None:
            return None
        left = max(0.0, self._drain_deadline - time.monotonic())
        return pb.DrainNotice(
            seconds_left=left,
            message=(
                f"the server is draining (shutting down) and ends this stream in about {left:.1f} s; "
                "reconnect to another replica now"
            ),
        )

    async def _end_for_drain(self) -> None:
        if self.context is not None:
            self.context.set_trailing_metadata((DRAIN_METADATA,))
        raise Unavailable(
            "the server is draining (shutting down); reconnect to another replica "
            f"(last frame answered: {self.last_answered if self.last_answered is not None else 'none'})"
        )

    # -- reading -------------------------------------------------------------------------------
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
            if f.max_consecutive_errors:
                self.max_errors = int(f.max_consecutive_errors)
        elif f.model and self.fast.registry.resolve(f.model).id != self.entry.id:
            raise InvalidArgument(
                f"frame {f.frame_id}: a stream serves one model ({self.entry.id}); open another stream for {quote(f.model)}"
            )
        if f.HasField("options"):
            self.options = with_stream_defaults(f.options)
        if self.last_id is not None and f.frame_id <= self.last_id:
            raise InvalidArgument(f"frame ids must increase: got {f.frame_id} after {self.last_id}")
        self.last_id = f.frame_id

    async def _read(self, requests: AsyncIterator[pb.ExplainFrame]) -> None:
        try:
            async for f in requests:
                received_us, received = _now_us(), time.perf_counter()
                self._configure(f)
                metrics.STREAM_FRAMES.labels(self.model_label, "received").inc()
                frame = _Frame(f, received_us, received)
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
                if f.image.dicom.all_frames:  # one frame per frame of the file; read on once all have started
                    self._pending.pop()
                    self._pending.extend(await _cine_frames(frame, self.fast))
                self._launch()  # start it now if the policy's depth has room
                self._wake.set()
                while f.image.dicom.all_frames and self._pending and self._error is None:
                    self._started.clear()
                    await self._started.wait()
        except XaiError as e:
            self._error = e
        finally:
            self._eof = True
            self._wake.set()

    # -- one frame -----------------------------------------------------------------------------
    async def _run(self, frame: _Frame) -> tuple[pb.ExplainFrameResult, BaseException | None]:
        """The frame's answer: its result, or its status when it failed (and the error)."""
        fid = frame.msg.frame_id
        metrics.FRAME_QUEUE_WAIT.labels(self.model_label).observe(time.perf_counter() - frame.received)
        out = pb.ExplainFrameResult(
            frame_id=fid, received_unix_us=frame.received_us, client_timestamp_us=frame.msg.client_timestamp_us
        )
        try:
            if frame.error is not None:
                raise frame.error
            if frame.cine is not None:  # a frame of an all_frames message: its own small image
                out.dicom_frame = frame.dicom_frame
                image = await self.fast.cpu.run(frame.cine.image, frame.dicom_frame)
                req = pb.ExplainRequest(model=self.entry.id, image=image, options=self.options)
            else:
                req = pb.ExplainRequest(model=self.entry.id, image=frame.msg.image, options=self.options)
            # a slot like a unary call's: a frame beyond max_inflight is refused at once (Overloaded)
            with self.fast.admission.slot(self.principal):
                out.result.CopyFrom(await self.fast.explain(req, timeout=None, entry=self.entry))
            return out, None
        except XaiError as e:
            code, message, err = status_of(e), f"frame {fid}: {e}", e
        except asyncio.TimeoutError as e:
            code, message, err = grpc.StatusCode.DEADLINE_EXCEEDED, f"frame {fid}: the model did not answer in time", e
        except Exception as e:  # noqa: BLE001 - one frame's failure is that frame's answer, not the stream's end
            ref = uuid.uuid4().hex[:12]
            log.error("frame failed", exc_info=e, extra={"model": self.model_label, "error_ref": ref})
            code, message, err = (
                grpc.StatusCode.INTERNAL,
                f"frame {fid}: internal error (reference {ref} in the server log)",
                e,
            )
        out.status.CopyFrom(pb.FrameStatus(code=code.value[0], message=message))
        return out, err

    def _finish(self, res: pb.ExplainFrameResult, frame_received: float | None) -> pb.ExplainFrameResult:
        now = time.perf_counter()
        self._rate.tick(now)
        res.answered_unix_us = _now_us()
        if res.frame_id or res.HasField("result") or res.HasField("status"):
            self.last_answered = res.frame_id
        res.dropped_total = self.dropped
        res.answer_fps = self._rate.per_second()
        notice = self._notice()
        if notice is not None:
            res.drain.CopyFrom(notice)
        if frame_received is not None:
            metrics.FRAME_LATENCY.labels(self.model_label).observe(now - frame_received)
        return res

    def _too_many_errors(self, res: pb.ExplainFrameResult, err: BaseException) -> XaiError:
        n = self.failed_in_a_row
        tail = (
            f" ({n} frames in a row failed; this stream ends after max_consecutive_errors = {self.max_errors})"
            if self.max_errors > 1
            else ""
        )
        message = res.status.message + tail
        if isinstance(err, XaiError):
            return type(err)(message)
        if isinstance(err, asyncio.TimeoutError):
            return DeadlineExceeded(message)
        return XaiError(message)  # INTERNAL

    # -- the stream ----------------------------------------------------------------------------
    def _follow_reload(self) -> bool:
        """After a model store reload (Registry.generation moved): the stream's model rewritten under
        the same name:version switches to the new version for the frames not yet started (started
        ones finish on the version they began with, as unary calls do); a model removed or made
        unavailable ends the stream, once the frames in flight are answered, with the status a new
        call would get (NOT_FOUND / FAILED_PRECONDITION) and a message saying what happened. False
        when the stream must end: frames not yet started are dropped, so the old version is not
        used again (no batcher or session is rebuilt for it)."""
        if self._error is not None:
            self._pending.clear()
            return False
        reg = self.fast.registry
        if self.entry is None or self._generation == reg.generation:
            return True
        self._generation = reg.generation
        try:
            now = reg.resolve(self.entry.id)
        except XaiError as e:
            last = self.last_answered if self.last_answered is not None else "none"
            self._error = type(e)(
                f"the model of this stream, {self.entry.id}, is no longer served after a model store reload ({e}); "
                f"last frame answered: {last}; open a new stream"
            )
            self._pending.clear()
            self._wake.set()
            return False
        if now.key != self.entry.key:
            log.info("stream follows its reloaded model", extra={"model": now.id})
            self.entry = now
        return True

    def _launch(self) -> None:
        """Start waiting frames while fewer than the policy's depth are unanswered (known once the
        first frame has been read): stream_latest_inflight for LATEST, two for ALL so that the model
        never idles between frames. Called when a frame arrives and when one is answered."""
        if not self._follow_reload():
            return
        depth = 2 if self.policy == pb.ALL else self.latest_inflight
        while self._pending and len(self._inflight) < depth:
            frame = self._pending.popleft()
            self._inflight.append((asyncio.ensure_future(self._run(frame)), frame))
        self._started.set()

    async def run(self, requests: AsyncIterator[pb.ExplainFrame]) -> AsyncIterator[pb.ExplainFrameResult]:
        if self.hub is not None:
            self.hub.open(self)
        reader = asyncio.get_running_loop().create_task(self._read(requests))
        inflight = self._inflight
        try:
            while True:
                if self._drain_deadline is not None:
                    if not self._notice_sent:
                        self._notice_sent = True
                        yield self._finish(pb.ExplainFrameResult(), None)
                    if self._drain_end is not None and time.monotonic() >= self._drain_end:
                        await self._end_for_drain()
                self._launch()
                if inflight:
                    task, frame = inflight[0]
                    res, err = await task
                    inflight.popleft()  # only now: while it ran it counted towards the depth
                    # the next frame starts before this answer is written: writing can wait on the
                    # network, and a frame left waiting meanwhile would be replaced (dropped)
                    self._launch()
                    if err is None:
                        self.failed_in_a_row = 0
                        metrics.STREAM_FRAMES.labels(self.model_label, "answered").inc()
                        yield self._finish(res, frame.received)
                        continue
                    metrics.STREAM_FRAMES.labels(self.model_label, "failed").inc()
                    if isinstance(err, Overloaded):  # the server's load, not a broken sender: not counted
                        yield self._finish(res, None)
                        continue
                    self.failed_in_a_row += 1
                    if self.failed_in_a_row >= self.max_errors:
                        raise self._too_many_errors(res, err)
                    yield self._finish(res, None)
                    continue
                if self._error is not None:
                    raise self._error
                if self._eof:
                    return
                self._wake.clear()
                if not self._pending and not inflight and not self._eof:
                    end = self._drain_end
                    timeout = None if end is None else max(0.0, end - time.monotonic())
                    try:
                        await asyncio.wait_for(self._wake.wait(), timeout)
                    except asyncio.TimeoutError:
                        pass
        finally:
            if self.hub is not None:
                self.hub.close(self)
            reader.cancel()
            for t, _ in inflight:
                t.cancel()
