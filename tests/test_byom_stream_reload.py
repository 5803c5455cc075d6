"""Open streams across a model store reload, through the real server over gRPC.

A stream whose model version is rewritten in place (same name:version, new content) goes on with
the new version from its next frame; one whose model is removed ends at once, even while it sends
nothing, with NOT_FOUND and a message that says what happened; neither leaves a session or a
batcher of the old version behind (the leak this replaces: the stream rebuilt them on its next frame).
"""

from __future__ import annotations

import io
import queue
import shutil
import time

import grpc
import numpy as np
import pytest
from PIL import Image as PILImage

from tests.serverutil import running_server
from tests.tiny_models import MEAN, STD, build_store
from xaiserve.proto.explain.v1 import explainer_pb2 as pb
from xaiserve.service.modelstore import add_entry, remove_entry


def png(h: int = 32, w: int = 32) -> bytes:
    a = (np.random.default_rng(0).random((h, w, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    PILImage.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def _entry(description: str) -> dict:
    return {
        "name": "extra",
        "version": "1",
        "kind": "nem_u",
        "description": description,
        "files": {"onnx": "extra/1/model.onnx"},
        "explains": "tiny-encoder:1",
        "input": {"height": 32, "width": 32, "channels": 3, "mean": MEAN, "std": STD},
    }


def _wait_reloads(srv, n: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while srv.running.watcher.reloads < n:
        assert time.monotonic() < deadline, "the server did not reload"
        time.sleep(0.05)


def _keys(srv) -> set[str]:
    """Cache keys of the `extra` model's sessions and batchers in the running server."""
    reg, fast = srv.running.registry, srv.running.fast
    return {k for k in (*reg._onnx, *reg._torch, *fast._batchers) if k.startswith("extra:")}


@pytest.mark.slow  # a server and three reloads: ~5 s
def test_stream_follows_a_swapped_model_and_ends_when_it_is_removed(tmp_path):
    store = build_store(tmp_path / "store", slow=False)
    shutil.copytree(store / "tiny-nemu/1", store / "extra/1")
    add_entry(store, _entry("first"))
    with running_server(store, reload_interval_s=0.05, job_workers=0, max_delay_ms=0.0) as srv:
        stub = srv.stub()
        frames: queue.Queue = queue.Queue()

        def send():
            while True:
                f = frames.get()
                if f is None:
                    return
                yield f

        answers = stub.StreamExplain(send(), timeout=60)
        frames.put(pb.ExplainFrame(frame_id=1, model="extra:1", image=pb.Image(encoded=png())))
        first = next(answers)
        assert first.frame_id == 1 and first.HasField("result") and first.result.model == "extra:1"
        (old_key,) = _keys(srv)

        # swap: the same name:version rewritten (new content, so a new cache key)
        n = srv.running.watcher.reloads
        add_entry(store, _entry("second"))
        _wait_reloads(srv, n + 1)
        frames.put(pb.ExplainFrame(frame_id=2, image=pb.Image(encoded=png())))
        second = next(answers)
        assert second.frame_id == 2 and second.HasField("result"), second.status
        keys = _keys(srv)
        assert old_key not in keys and len(keys) >= 1, keys  # served by the new version only

        # remove: the idle stream (no frame sent) ends at once, with the reason
        n = srv.running.watcher.reloads
        remove_entry(store, "extra")
        _wait_reloads(srv, n + 1)
        with pytest.raises(grpc.RpcError) as e:
            next(answers)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        details = e.value.details()
        assert "extra:1" in details and "no longer served after a model store reload" in details, details
        assert "last frame answered: 2" in details and "open a new stream" in details
        frames.put(None)
        assert _keys(srv) == set()
        # the other models serve on
        r = stub.Explain(pb.ExplainRequest(model="tiny-nemu", image=pb.Image(encoded=png())), timeout=30)
        assert r.model == "tiny-nemu:1"
