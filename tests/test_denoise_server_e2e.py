"""Denoise through the real server on a store holding a small exported spiral denoiser."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch

from tests.serverutil import running_server
from xaiserve.handlers.denoise.export import export_onnx
from xaiserve.handlers.denoise.mrc import mrc_bytes, parse_mrc_bytes
from xaiserve.handlers.denoise.networks import Denoiser, DenoiserConfig, expected_signal_rms
from xaiserve.proto.explain.v1 import explainer_pb2 as pb
from xaiserve.service.denoise import DEFAULT_POLICY, fourier_resample
from xaiserve.service.modelstore import add_entry
from xaiserve.service.tensors import from_tensor, to_tensor
from xaiserve.training.datasets.cryoem import CryoEMConfig, CryoEMSimulator

# the module's store is a spiral denoiser exported through torch.onnx (dynamo): ~5 s to build
pytestmark = pytest.mark.slow

SIZE = 32


@pytest.fixture(scope="module")
def store_and_model(tmp_path_factory):
    torch.manual_seed(0)
    model = Denoiser(
        DenoiserConfig(arch="spiral", size=SIZE, channels=(4, 8), out_gain=expected_signal_rms(0.25))
    ).eval()
    root = tmp_path_factory.mktemp("dnstore")
    export_onnx(model, root / "tiny-spiral" / "1" / "model.onnx")
    torch.save(model.state_dict(), root / "tiny-spiral" / "1" / "weights.pt")  # served by the spiral runtime
    add_entry(
        root,
        {
            "name": "tiny-spiral",
            "version": "1",
            "kind": "denoiser",
            "files": {"onnx": "tiny-spiral/1/model.onnx", "state_dict": "tiny-spiral/1/weights.pt"},
            "input": {"height": SIZE, "width": SIZE, "channels": 1, "mean": [0.0], "std": [1.0]},
            "particles": dict(DEFAULT_POLICY),
            "arch": model.config.to_dict(),
        },
    )
    return root, model


@pytest.fixture(scope="module")
def srv(store_and_model):
    with running_server(store_and_model[0], max_delay_ms=2.0, max_denoise_batch=16) as s:
        yield s


@pytest.fixture(scope="module")
def particles() -> np.ndarray:
    cfg = CryoEMConfig(size=SIZE, snr=0.25, sizes={"train": 1, "val": 1, "test": 5})
    return CryoEMSimulator(cfg).generate("test").noisy


def test_tensor_and_mrc_requests_match_the_torch_model(srv, store_and_model, particles):
    _, model = store_and_model
    stub = srv.stub()
    with torch.no_grad():
        ref = model(torch.from_numpy(particles)[:, None])[:, 0].numpy()
    r = stub.Denoise(pb.DenoiseRequest(model="tiny-spiral", tensor=to_tensor(particles), return_mrc=True), timeout=60)
    den = from_tensor(r.denoised)
    assert r.model == "tiny-spiral:1" and den.shape == particles.shape
    np.testing.assert_allclose(den, ref, rtol=1e-3, atol=1e-4 * np.abs(ref).max())
    np.testing.assert_allclose(parse_mrc_bytes(r.mrc), den, atol=1e-6)
    r2 = stub.Denoise(pb.DenoiseRequest(model="tiny-spiral", mrc=mrc_bytes(particles)), timeout=60)
    np.testing.assert_allclose(from_tensor(r2.denoised), den, atol=1e-5)
    one = stub.Denoise(pb.DenoiseRequest(model="tiny-spiral", tensor=to_tensor(particles[2])), timeout=60)
    np.testing.assert_allclose(from_tensor(one.denoised)[0], den[2], rtol=1e-4, atol=1e-5)


def test_other_square_sizes_are_resampled_to_the_model(srv, store_and_model, particles):
    _, model = store_and_model
    big = fourier_resample(particles[:2], 2 * SIZE)
    r = srv.stub().Denoise(pb.DenoiseRequest(model="tiny-spiral", tensor=to_tensor(big)), timeout=60)
    den = from_tensor(r.denoised)
    assert den.shape == (2, SIZE, SIZE)
    with torch.no_grad():
        ref = model(torch.from_numpy(fourier_resample(big, SIZE))[:, None])[:, 0].numpy()
    np.testing.assert_allclose(den, ref, rtol=1e-3, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize(
    "make, code, text",
    [
        (
            lambda p: pb.DenoiseRequest(
                model="tiny-spiral",
                tensor=to_tensor(np.where(np.arange(p.size).reshape(p.shape) == 7, np.inf, p).astype(np.float32)),
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "NaN or Inf",
        ),
        (
            lambda p: pb.DenoiseRequest(
                model="tiny-spiral", tensor=to_tensor(np.zeros((2, SIZE, SIZE + 4), np.float32))
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "not square",
        ),
        (
            lambda p: pb.DenoiseRequest(model="tiny-spiral", tensor=to_tensor(np.zeros((17, SIZE, SIZE), np.float32))),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "maximum of 16",
        ),
        (
            lambda p: pb.DenoiseRequest(model="tiny-spiral", mrc=mrc_bytes(p)[:-64]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "corrupt",
        ),
        (lambda p: pb.DenoiseRequest(model="tiny-spiral"), grpc.StatusCode.INVALID_ARGUMENT, "no particles"),
    ],
)
def test_bad_input_gets_a_precise_status(srv, particles, make, code, text):
    with pytest.raises(grpc.RpcError) as e:
        srv.stub().Denoise(make(particles), timeout=60)
    assert e.value.code() == code, e.value.details()
    assert text in e.value.details()
