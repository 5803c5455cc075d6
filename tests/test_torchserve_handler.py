"""The TorchServe handler of `xaiserve export torchserve`, run in-process on the default models.

tests/test_torchserve.py serves the archive with a real TorchServe; this file covers, in seconds,
what one archive cannot: every model kind and the gradient methods, against xaiserve's Explain.
The context is TorchServe's interface as the handler uses it (system_properties and
set_response_status).
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from tests.conftest import DEFAULT_STORE
from tests.serverutil import running_server
from xaiserve.proto.explain.v1 import explainer_pb2 as pb
from xaiserve.service.tensors import from_tensor
from xaiserve.service.torchserve_handler import ARCHIVE_CONFIG, XaiserveHandler, decode_array


class Context:
    """The part of ts.context.Context the handler calls."""

    def __init__(self, model_dir):
        self.system_properties = {"model_dir": str(model_dir)}
        self.statuses: dict[int, tuple[int, str]] = {}

    def set_response_status(self, code: int, phrase: str = "", idx: int = 0) -> None:
        self.statuses[idx] = (code, phrase)


@pytest.fixture(scope="module")
def xaiserve():
    with running_server(DEFAULT_STORE, job_workers=0, max_delay_ms=1.0) as srv:
        yield srv.stub()


def handler_for(model: str, tmp_path) -> tuple[XaiserveHandler, Context]:
    d = tmp_path / model
    d.mkdir()
    for p in DEFAULT_STORE.iterdir():  # the default store, read through links (the config file is the archive's)
        (d / p.name).symlink_to(p)
    (d / ARCHIVE_CONFIG).write_text(json.dumps({"model": model}))
    ctx = Context(d)
    h = XaiserveHandler()
    h.initialize(ctx)
    return h, ctx


def png(h: int, w: int, seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_gradient_methods_and_targets_answer_like_explain(xaiserve, tmp_path):
    h, ctx = handler_for("scenes-classifier", tmp_path)
    data = png(48, 60, seed=1)
    batch = [
        {"body": data, "method": b"gradcam", "target_label": b"3"},
        {"body": data, "method": "saliency"},
        {"body": data},
    ]
    got = [json.loads(a) for a in h.handle(batch, ctx)]
    assert ctx.statuses == {}
    for i, (method, target) in enumerate([("gradcam", 3), ("saliency", None)]):
        opts = pb.ExplainOptions(method=method, return_output=True)
        if target is not None:
            opts.target_label = target
        ref = xaiserve.Explain(pb.ExplainRequest(model="scenes-classifier", image=pb.Image(encoded=data), options=opts))
        assert got[i]["method"] == method and got[i]["label"] == ref.target_label
        np.testing.assert_allclose(decode_array(got[i]["mask"]), from_tensor(ref.mask), atol=1e-5)
        np.testing.assert_allclose(got[i]["output"], from_tensor(ref.output), rtol=1e-4, atol=1e-5)
    assert "mask" not in got[2] and len(got[2]["output"]) == 10  # no method: the classifier's logits


def test_nemt_targets_and_fidelity_answer_like_explain(xaiserve, tmp_path):
    h, ctx = handler_for("lesions-nemt", tmp_path)
    data = png(64, 64, seed=2)
    got = [
        json.loads(a)
        for a in h.handle(
            [{"data": data, "target_label": "1", "fidelity": "true"}, {"data": data, "target_label": "2"}], ctx
        )
    ]
    assert [g["label"] for g in got] == [1, 2]
    ref = xaiserve.Explain(
        pb.ExplainRequest(
            model="lesions-nemt", image=pb.Image(encoded=data), options=pb.ExplainOptions(target_label=1, fidelity=True)
        )
    )
    np.testing.assert_allclose(decode_array(got[0]["mask"]), from_tensor(ref.mask), atol=1e-5)
    assert got[0]["fidelity"] == pytest.approx(ref.fidelity, abs=1e-5) and "fidelity" not in got[1]


def test_bad_requests_fail_alone_with_their_status(tmp_path):
    h, ctx = handler_for("scenes-nemu", tmp_path)
    good = png(32, 32, seed=3)
    batch = [
        {"body": good},
        {"body": b"not an image"},
        {"body": good, "method": "astrology"},
        {"other": b"x"},
        {"body": good, "target_label": "2"},
        {"body": good},
    ]
    got = [json.loads(a) for a in h.handle(batch, ctx)]
    assert set(ctx.statuses) == {1, 2, 3, 4} and all(code == 400 for code, _ in ctx.statuses.values())
    assert "could not be decoded" in got[1]["error"] and "astrology" in got[2]["error"]
    assert "no image" in got[3]["error"] and "classifiers and NEMt" in got[4]["error"]
    assert {g["code"] for g in got[1:5]} == {"INVALID_ARGUMENT"}
    assert np.array_equal(decode_array(got[0]["mask"]), decode_array(got[5]["mask"]))
    assert got[0]["batch_size"] == 6
