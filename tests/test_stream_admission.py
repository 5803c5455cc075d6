"""StreamExplain frames take admission slots like unary calls: a frame beyond max_inflight
gets its own RESOURCE_EXHAUSTED status at once and the stream goes on (such refusals do not count
towards max_consecutive_errors); unary callers meanwhile get answers or refusals, never a hang."""

from __future__ import annotations

import io
import queue
import threading

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image as PILImage

from tests.serverutil import running_server
from xaiserve.proto.explain.v1 import explainer_pb2 as pb
from xaiserve.service.client import ExplainerClient

RE = grpc.StatusCode.RESOURCE_EXHAUSTED


def jpeg(i: int, side: int = 32) -> bytes:
    a = (np.random.default_rng(i).random((side, side, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    PILImage.fromarray(a).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def hold_all_slots(srv) -> list:
    """Enter every free admission slot on the server's event loop (Admission is loop-only)."""
    adm = srv.running.fast.admission

    async def fill():
        held = [adm.slot("") for _ in range(adm.limit - adm.inflight)]
        for cm in held:
            cm.__enter__()
        return held

    return srv.call_in_loop(fill())


def release(srv, held: list) -> None:
    async def go():
        for cm in held:
            cm.__exit__(None, None, None)

    srv.call_in_loop(go())


def test_a_frame_beyond_max_inflight_is_refused_on_its_own_and_the_stream_goes_on(tiny_store):
    with running_server(tiny_store, job_workers=0, max_inflight=2) as srv:
        adm = srv.running.fast.admission
        stub = srv.stub()
        frames: queue.Queue = queue.Queue()

        def requests():
            while (f := frames.get()) is not None:
                yield f

        call = stub.StreamExplain(requests(), timeout=120)

        def send(i: int) -> pb.ExplainFrameResult:  # one frame, its answer (no frame ever waits: no drops)
            f = pb.ExplainFrame(frame_id=i, image=pb.Image(encoded=jpeg(i)))
            if i == 0:
                f.model, f.max_consecutive_errors = "tiny-nemu", 2
            frames.put(f)
            return next(call)

        held = hold_all_slots(srv)
        try:
            refused = [send(i) for i in range(4)]  # twice max_consecutive_errors: refusals are not counted
            with pytest.raises(grpc.RpcError) as e:  # a unary call meets the same full server
                stub.Explain(pb.ExplainRequest(model="tiny-nemu", image=pb.Image(encoded=jpeg(9))), timeout=30)
            assert e.value.code() == RE and "max_inflight" in e.value.details()
            health = health_pb2_grpc.HealthStub(srv.channel())
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == 1  # SERVING
        finally:
            release(srv, held)
        for i, a in enumerate(refused):
            assert a.frame_id == i and not a.HasField("result")
            assert a.status.code == RE.value[0], a.status
            assert a.status.message.startswith(f"frame {i}: ") and "max_inflight" in a.status.message
        answered = [send(i) for i in range(4, 6)]  # room again: the same stream's next frames are answered
        for i, a in zip(range(4, 6), answered):
            assert a.frame_id == i and a.status.code == 0 and a.HasField("result")
        frames.put(None)
        assert list(call) == []  # and it ends normally
        assert call.code() == grpc.StatusCode.OK
        assert adm.inflight == 0  # no slot left behind


def test_many_streams_on_a_slow_model_get_per_frame_refusals_and_unary_calls_still_get_a_status(tiny_store):
    n_streams, n_frames = 4, 8
    with running_server(tiny_store, job_workers=0, max_inflight=2) as srv:
        results: dict[int, list[pb.ExplainFrameResult]] = {}
        errors: list[BaseException] = []

        def one_stream(k: int) -> None:
            try:
                with ExplainerClient(srv.address) as c:
                    frames = [jpeg(100 * k + i, 64) for i in range(n_frames)]
                    # max_consecutive_errors 1: any counted failure would end the stream
                    results[k] = list(
                        c.stream(
                            frames,
                            "slow-nemu",
                            policy=pb.ALL,
                            max_queue=n_frames,
                            pace=None,
                            max_consecutive_errors=1,
                            timeout=120,
                        )
                    )
            except BaseException as e:  # noqa: BLE001 - reported by the main thread
                errors.append(e)

        threads = [threading.Thread(target=one_stream, args=(k,)) for k in range(n_streams)]
        for t in threads:
            t.start()
        stub = srv.stub()
        unary: list[str] = []
        while any(t.is_alive() for t in threads):
            req = pb.ExplainRequest(model="tiny-nemu", image=pb.Image(encoded=jpeg(7)))
            try:
                stub.Explain(req, timeout=60)
                unary.append("OK")
            except grpc.RpcError as e:
                assert e.code() == RE and "max_inflight" in e.details(), (e.code(), e.details())
                unary.append("RESOURCE_EXHAUSTED")
        for t in threads:
            t.join()
        assert not errors, errors
        refused = 0
        for k in range(n_streams):
            answers = results[k]
            assert [a.frame_id for a in answers] == list(range(n_frames))
            for a in answers:
                if a.HasField("result"):
                    assert a.status.code == 0
                else:
                    assert a.status.code == RE.value[0] and "max_inflight" in a.status.message, a.status
                    refused += 1
        assert refused >= 1  # 4 streams x 2 frames in flight against 2 slots
        assert unary  # the unary caller was answered (or refused) while the streams ran
        assert srv.running.fast.admission.inflight == 0


def test_frames_count_towards_their_callers_own_bound(tiny_store):
    from xaiserve.service.security import ANONYMOUS

    # no tokens or client certificates: every caller is the anonymous principal
    with running_server(tiny_store, job_workers=0, max_inflight=8, max_inflight_per_principal=1) as srv:
        adm = srv.running.fast.admission

        async def hold():
            cm = adm.slot(ANONYMOUS)
            cm.__enter__()
            return cm

        cm = srv.call_in_loop(hold())
        try:
            with ExplainerClient(srv.address) as c:
                out = list(c.stream([jpeg(0), jpeg(1)], "tiny-nemu", policy=pb.ALL, window=1, timeout=60))
        finally:
            release(srv, [cm])
        assert [a.frame_id for a in out] == [0, 1]
        for a in out:
            assert a.status.code == RE.value[0] and "max_inflight_per_principal" in a.status.message, a.status
        assert adm.inflight == 0
