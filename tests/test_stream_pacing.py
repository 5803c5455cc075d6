"""The Python client's stream pacing: pace="auto" slows a fast sender to the server, so a slow
model drops nothing; unpaced, the same sender floods it and most frames are dropped."""

from __future__ import annotations

import numpy as np
import pytest

from xaiserve.proto.explain.v1 import explainer_pb2 as pb
from xaiserve.service.client import ExplainerClient

N = 30


class CountingFrames:
    """A sender as fast as the client pulls; counts how far it ran ahead of the answers."""

    def __init__(self, n: int, size: int = 64):
        rng = np.random.default_rng(0)
        self.frames = [rng.integers(0, 255, (size, size, 3), dtype=np.uint8) for _ in range(n)]
        self.pulled = 0

    def __iter__(self):
        for f in self.frames:
            self.pulled += 1
            yield f


def run(address: str, pace, window: int = 2):
    src = CountingFrames(N)
    ahead = []
    with ExplainerClient(address) as c:
        out = []
        for a in c.stream(src, "slow-nemu", pace=pace, window=window, timeout=120):
            ahead.append(src.pulled - (a.frame_id + 1))  # frames pulled but not yet accounted for
            out.append(a)
    return out, ahead


@pytest.mark.slow
def test_auto_pacing_slows_a_fast_sender_so_nothing_is_dropped(server):
    unpaced, ahead_unpaced = run(server.address, None)
    assert unpaced[-1].frame_id == N - 1
    assert unpaced[-1].dropped_total > 0, "a sender far faster than the model must see drops without pacing"
    assert len(unpaced) + unpaced[-1].dropped_total == N

    paced, ahead = run(server.address, "auto")
    assert [a.frame_id for a in paced] == list(range(N)), "paced, every frame is answered"
    assert paced[-1].dropped_total == 0
    # the sender was held back: never more than the window (plus the frame it holds) ahead of the answers
    assert max(ahead) <= 3
    assert max(ahead_unpaced) > max(ahead)


def test_a_fixed_rate_and_bad_pace_values(server):
    out, _ = run(server.address, 200.0)
    assert out[-1].frame_id == N - 1
    with ExplainerClient(server.address) as c:
        for bad in ("fast", 0, -1.0):
            with pytest.raises(ValueError, match="pace"):
                next(iter(c.stream([], "slow-nemu", pace=bad)))
        with pytest.raises(ValueError, match="window"):
            next(iter(c.stream([], "slow-nemu", window=0)))


@pytest.mark.slow
def test_policy_all_with_auto_pacing_never_overflows_a_small_queue(server):
    src = CountingFrames(N)
    with ExplainerClient(server.address) as c:
        out = list(c.stream(src, "slow-nemu", policy=pb.ALL, max_queue=1, timeout=120))
    assert [a.frame_id for a in out] == list(range(N))
