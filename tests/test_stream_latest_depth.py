"""LATEST keeps two frames of a stream in flight: one slow frame (the first after start, a stalled
core) does not make the frames behind it wait and be replaced. bench/bench_stream.py traced every
drop of 4 cameras x 30 fps to a frame that took more than about two frame periods while the next
frame waited behind it (stream_latest_inflight = 1, the old behaviour, kept as a setting).

The slow frame is made deterministic: the first frame's FastPath.explain (the real one) waits on a
gate the test opens once the next frames have reached the server. No timing is asserted."""

from __future__ import annotations

import asyncio
import io
import queue
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
from PIL import Image as PILImage

from tests.serverutil import running_server
from xaiserve.proto.explain.v1 import explainer_pb2 as pb


def jpeg(i: int, side: int = 32) -> bytes:
    a = (np.random.default_rng(i).random((side, side, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    PILImage.fromarray(a).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


class SlowFirstFrame:
    """Wraps the server's real FastPath.explain: the first call waits until `release()`."""

    def __init__(self, srv):
        self.srv, self.fast = srv, srv.running.fast
        self.real = self.fast.explain
        self.started = 0
        self.gate: asyncio.Event | None = None

    def __enter__(self) -> "SlowFirstFrame":
        async def make():
            self.gate = asyncio.Event()

        self.srv.call_in_loop(make())

        async def explain(*a, **k):
            self.started += 1
            if self.started == 1:
                await self.gate.wait()
            return await self.real(*a, **k)

        self.fast.explain = explain
        return self

    def release(self) -> None:
        self.srv.loop.call_soon_threadsafe(self.gate.set)

    def __exit__(self, *exc) -> None:
        self.release()
        self.fast.explain = self.real


def wait_until(cond, what: str, limit_s: float = 60.0) -> None:
    """Poll a server-side condition (a synchronisation, not a timed assertion)."""
    end = time.monotonic() + limit_s
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"the server never reached: {what}")
        time.sleep(0.01)


def received(model: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("xaiserve_stream_frames_total", {"model": model, "event": "received"}) or 0.0


def one_slow_first_frame(tiny_store, **settings) -> list[pb.ExplainFrameResult]:
    """Frame 0 is slow; frames 1 and 2 arrive while it runs (a camera's next two frames); then it
    finishes. Returns the answers."""
    with running_server(tiny_store, job_workers=0, **settings) as srv, SlowFirstFrame(srv) as slow:
        frames: queue.Queue = queue.Queue()

        def requests():
            while (f := frames.get()) is not None:
                yield f

        call = srv.stub().StreamExplain(requests(), timeout=120)
        model = "tiny-nemu:1"
        base = received(model)
        for i in range(3):
            f = pb.ExplainFrame(frame_id=i, image=pb.Image(encoded=jpeg(i)))
            if i == 0:
                f.model, f.policy = "tiny-nemu", pb.LATEST
            frames.put(f)
            wait_until(lambda: received(model) >= base + i + 1, f"frame {i} received")
            if i == 1 and srv.config.stream_latest_inflight > 1:
                wait_until(lambda: slow.started >= 2, "frame 1 started beside the slow frame 0")
        slow.release()
        frames.put(None)
        out = list(call)
        assert call.code() == grpc.StatusCode.OK
        return out


def test_a_slow_first_frame_does_not_make_latest_drop_the_frames_behind_it(tiny_store):
    out = one_slow_first_frame(tiny_store)
    assert [a.frame_id for a in out] == [0, 1, 2], "in order, none dropped"
    assert all(a.HasField("result") for a in out)
    assert [a.dropped_total for a in out] == [0, 0, 0]


def test_with_one_frame_in_flight_the_frame_behind_a_slow_one_is_replaced(tiny_store):
    out = one_slow_first_frame(tiny_store, stream_latest_inflight=1)
    assert [a.frame_id for a in out] == [0, 2], "frame 1 waited behind frame 0 and frame 2 replaced it"
    assert out[-1].dropped_total == 1


@pytest.mark.parametrize("bad", [0, 9])
def test_stream_latest_inflight_is_checked(bad):
    from xaiserve.service.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="stream_latest_inflight"):
        load_config(None, env={}, stream_latest_inflight=bad)


def test_a_started_server_has_already_paid_the_image_paths_first_use(tiny_store):
    """Before it answers, the server has imported Pillow's decoders and run every mask encoding
    once (FastPath.warm_image_path), so the first frame of the first stream does not pay it."""
    code = """
import asyncio, sys, tempfile
from xaiserve.service.config import load_config
from xaiserve.service.server import start_server
async def main():
    cfg = load_config(None, env={}, model_store=sys.argv[1], port=0, metrics_port=-1,
                      state_dir=tempfile.mkdtemp(), job_workers=0)
    rs = await start_server(cfg)
    print(" ".join(m for m in ("PIL.JpegImagePlugin", "PIL.PngImagePlugin") if m in sys.modules))
    await rs.drain(0.1)
asyncio.run(main())
"""
    r = subprocess.run([sys.executable, "-c", code, str(tiny_store)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[-2:] == ["PIL.JpegImagePlugin", "PIL.PngImagePlugin"], r.stdout
