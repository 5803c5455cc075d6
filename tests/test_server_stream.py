"""StreamExplain: order, drop policy, bounded queues, over a real channel."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest

from xaiserve.proto.explain.v1 import explainer_pb2 as pb
from xaiserve.service.tensors import to_tensor


def frames(n: int, model: str, size: int, policy=pb.LATEST, max_queue: int = 0, start: int = 0):
    rng = np.random.default_rng(0)
    for i in range(n):
        f = pb.ExplainFrame(
            frame_id=start + i,
            image=pb.Image(tensor=to_tensor(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))),
            client_timestamp_us=1000 + i,
        )
        if i == 0:
            f.model, f.policy, f.max_queue = model, policy, max_queue
        yield f


def test_all_policy_answers_every_frame_in_order(stub):
    out = list(stub.StreamExplain(frames(20, "tiny-nemu", 32, pb.ALL, max_queue=64), timeout=60))
    assert [r.frame_id for r in out] == list(range(20))
    assert all(r.dropped_total == 0 for r in out)
    assert all(r.result.mask.shape == [32, 32] for r in out)
    assert all(r.answered_unix_us >= r.received_unix_us for r in out)
    assert [r.client_timestamp_us for r in out] == [1000 + i for i in range(20)]


def test_latest_policy_drops_stale_frames_with_a_slow_model_and_fast_sender(stub):
    out = list(stub.StreamExplain(frames(30, "slow-nemu", 64), timeout=120))
    ids = [r.frame_id for r in out]
    assert ids == sorted(ids) and len(set(ids)) == len(ids), "answers must be in frame order"
    assert ids[-1] == 29, "the newest frame is always answered"
    assert len(ids) < 30, "a sender far faster than the model must see drops"
    assert out[-1].dropped_total == 30 - len(ids), "every frame is either answered or counted as dropped"
    counts = [r.dropped_total for r in out]
    assert counts == sorted(counts)


def test_all_policy_overflow_is_resource_exhausted(stub):
    with pytest.raises(grpc.RpcError) as e:
        list(stub.StreamExplain(frames(40, "slow-nemu", 64, pb.ALL, max_queue=2), timeout=120))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_queue" in e.value.details()


@pytest.mark.parametrize(
    "first,code,fragment",
    [
        (pb.ExplainFrame(frame_id=0), grpc.StatusCode.INVALID_ARGUMENT, "must name the model"),
        (pb.ExplainFrame(frame_id=0, model="nope"), grpc.StatusCode.NOT_FOUND, "not in the store"),
        (
            pb.ExplainFrame(frame_id=0, model="tiny-nemu", policy=pb.ALL, max_queue=10_000),
            grpc.StatusCode.INVALID_ARGUMENT,
            "max_queue",
        ),
    ],
)
def test_bad_first_frame(stub, first, code, fragment):
    with pytest.raises(grpc.RpcError) as e:
        list(stub.StreamExplain(iter([first]), timeout=30))
    assert e.value.code() == code and fragment in e.value.details()


def test_non_increasing_frame_ids_end_the_stream_and_a_bad_image_does_with_max_consecutive_errors_1(stub):
    msgs = list(frames(2, "tiny-nemu", 32))
    msgs[1].frame_id = 0
    with pytest.raises(grpc.RpcError) as e:
        list(stub.StreamExplain(iter(msgs), timeout=30))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "increase" in e.value.details()
    msgs = list(frames(2, "tiny-nemu", 32))
    msgs[0].max_consecutive_errors = 1  # fail fast: the first failed frame ends the stream
    msgs[1].image.CopyFrom(pb.Image(encoded=b"junk"))
    with pytest.raises(grpc.RpcError) as e:
        list(stub.StreamExplain(iter(msgs), timeout=30))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "frame 1" in e.value.details()


@pytest.mark.slow
def test_a_client_that_stops_reading_does_not_stall_other_callers(server):
    stub = server.stub()
    stop = threading.Event()

    def endless():
        for f in frames(10_000, "tiny-nemu", 32):
            if stop.is_set():
                return
            yield f

    call = stub.StreamExplain(endless(), timeout=60)
    next(call)  # read one answer, then stop reading while the sender keeps sending
    time.sleep(1.0)
    other = server.stub().Explain(
        pb.ExplainRequest(model="tiny-nemu", image=pb.Image(tensor=to_tensor(np.zeros((32, 32, 3), np.uint8)))),
        timeout=30,
    )
    assert other.mask.shape == [32, 32]
    stop.set()
    call.cancel()
