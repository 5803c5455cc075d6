"""SIGTERM with open streams: each gets a DrainNotice at once, keeps being answered, and is ended
by the server with UNAVAILABLE and the "xaiserve-draining" trailer before the grace period runs out."""

from __future__ import annotations

import signal
import threading
import time

import grpc
import numpy as np
import pytest

from tests.serverutil import server_process
from xaiserve.service.client import ExplainerClient, is_notice

# a real server process drained by SIGTERM
pytestmark = pytest.mark.slow

GRACE_S = 3.0


def endless(stop: threading.Event):
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    while not stop.is_set():
        yield frame


def test_sigterm_sends_every_open_stream_a_drain_notice_then_ends_it_with_unavailable(tiny_store, tmp_path):
    with server_process(tiny_store, state_dir=tmp_path / "state", grace_s=GRACE_S) as srv:
        stop = threading.Event()
        seen: list[tuple[float, object]] = []
        errors: list[grpc.RpcError] = []

        def camera():
            with ExplainerClient(srv.address) as c:
                try:
                    for a in c.stream(endless(stop), "tiny-nemu", pace=50.0, timeout=60):
                        seen.append((time.monotonic(), a))
                except grpc.RpcError as e:
                    errors.append(e)

        threads = [threading.Thread(target=camera) for _ in range(2)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while sum(1 for _, a in seen if not is_notice(a)) < 10 and time.monotonic() < deadline:
            time.sleep(0.05)
        t_term = time.monotonic()
        srv.process.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(30)
        stop.set()
        srv.process.wait(30)

    assert len(errors) == 2, "both streams must end with a status, not hang"
    for e in errors:
        assert e.code() == grpc.StatusCode.UNAVAILABLE
        assert "draining" in e.details()
        assert ("xaiserve-draining", "1") in tuple(e.trailing_metadata() or ())
    notices = [(t, a) for t, a in seen if is_notice(a)]
    assert len(notices) == 2, "one standalone notice per stream"
    for t, a in notices:
        assert t - t_term < 1.5, "the notice comes at once, not at the end of the grace period"
        assert 0 < a.drain.seconds_left <= GRACE_S and "reconnect" in a.drain.message
    after = [a for t, a in seen if t > max(t for t, _ in notices) and not is_notice(a)]
    assert after, "streams are still answered while draining"
    assert all(a.HasField("drain") for a in after)
