"""Spiral convolution, denoiser networks, training and ONNX export ([THESIS], sec. 7.3-7.4)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from xaiserve.handlers.denoise import geometry as geo
from xaiserve.handlers.denoise.equivariance import equivariance_error, rotate
from xaiserve.handlers.denoise.export import export_onnx, from_state_dict, onnx_parity, ort_denoise, ort_session
from xaiserve.handlers.denoise.layers import SpiralConv, SpiralOps
from xaiserve.handlers.denoise.metrics import as_tensor
from xaiserve.handlers.denoise.networks import Denoiser, DenoiserConfig, expected_signal_rms, normalise, parameter_count
from xaiserve.handlers.denoise.train import FastMode, TrainConfig, evaluate, train
from xaiserve.training.datasets.cryoem import CryoEMConfig, CryoEMSimulator

torch.set_num_threads(1)
SMALL = dict(size=32, channels=(4, 8))


@pytest.fixture(scope="module")
def ops64() -> SpiralOps:
    return SpiralOps(64, [geo.default_spiral(64)], rows=3)


@pytest.fixture(scope="module")
def particles32() -> torch.Tensor:
    ps = CryoEMSimulator(CryoEMConfig(size=32, snr=1 / 4, sizes={"train": 8, "val": 16, "test": 8})).generate("val")
    return torch.from_numpy(ps.noisy).unsqueeze(1)


PEAKS = [(0.5, 0.0), (0.35, 2.0), (0.6, 4.0)]  # (radius, angle) of the test peaks


def _peaks(size: int, angle: float, sigma_px: float = 0.7) -> torch.Tensor:
    """A few near-Dirac peaks (narrow Gaussians rendered exactly), all turned by `angle`."""
    c = torch.from_numpy(geo.pixel_centres(size, size)).float()
    img = torch.zeros(size * size)
    sigma = sigma_px * 2 / size
    for r, a in PEAKS:
        p = torch.tensor([r * math.cos(a + angle), r * math.sin(a + angle)])
        img += torch.exp(-((c - p) ** 2).sum(1) / (2 * sigma**2))
    return img.view(1, 1, size, size)


def _local_offsets(y: torch.Tensor, size: int) -> np.ndarray:
    """Centroid of the response around each peak minus the peak, in pixels, in the peak's local
    polar frame: (radial, tangential) per peak."""
    c = torch.from_numpy(geo.pixel_centres(size, size)).float()
    y = y.flatten()
    out = []
    for r, a in PEAKS:
        p = torch.tensor([r * math.cos(a), r * math.sin(a)])
        win = ((c - p) ** 2).sum(1).sqrt() < 8 / size
        w = y[win].clamp_min(0)
        d = ((w[:, None] * c[win]).sum(0) / w.sum() - p) * size / 2
        out.append(
            (float(d @ torch.tensor([math.cos(a), math.sin(a)])), float(d @ torch.tensor([-math.sin(a), math.cos(a)])))
        )
    return np.array(out)


@torch.no_grad()
def test_rotated_dirac_peaks_give_rotated_kernel_copies(ops64):
    """Fig. 7.5: each peak is replaced by a copy of the (asymmetric) kernel oriented in the local
    polar frame, so turning the peaks turns the output; an ordinary conv2d keeps its copies upright."""
    kernel = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.5], [0.0, 0.0, 0.0]])
    spiral = SpiralConv(0, 1, 1, 3, 3, bias=False)
    spiral.conv.weight.copy_(kernel[None, None])
    cart = torch.nn.Conv2d(1, 1, 3, padding=1, bias=False)
    cart.weight.copy_(kernel[None, None])
    inner = torch.from_numpy(geo.disc_mask(64, 64, 0.9).astype(np.float32))
    x0 = _peaks(64, 0.0)
    y0s = ops64.decode(spiral(ops64.encode(x0), ops64))
    y0c = cart(x0)
    es, ec = [], []
    for ang in (0.4, 1.3, 2.9):
        xr = _peaks(64, ang)
        a = torch.tensor([ang])
        ys = ops64.decode(spiral(ops64.encode(xr), ops64))
        es.append(float(((ys - rotate(y0s, a)) * inner).norm() / (y0s * inner).norm()))
        ec.append(float(((cart(xr) - rotate(y0c, a)) * inner).norm() / (y0c * inner).norm()))
    assert max(es) < 0.25, es
    assert np.mean(ec) > 2.5 * np.mean(es), (es, ec)
    # Each copy sits where the kernel puts its mass, in the local frame: the kernel's weights lie
    # one winding outwards (1) and one sample back along the spiral (1 + 0.5) of the centre, so
    # the response centroid moves (1/2.5, -1.5/2.5) = (0.4, -0.6) px in (radial, tangential)
    # for every peak; the cartesian copies keep one image-frame offset, so their local one varies.
    off_s, off_c = _local_offsets(y0s, 64), _local_offsets(y0c, 64)
    np.testing.assert_allclose(off_s, np.tile([0.4, -0.6], (len(PEAKS), 1)), atol=0.08)
    assert np.ptp(off_c, axis=0).max() > 0.5, off_c


@pytest.mark.parametrize("what", ["ribbon", "down", "up"])
def test_fast_path_equals_portable_path_forward_and_backward(what):
    """Training runs the resampling through embedding_bag (fast), export through GridSample and
    Gather (portable): the same linear map, forward and backward."""
    ops = Denoiser(DenoiserConfig(arch="spiral", size=32, channels=(4, 8))).ops
    n = ops.n[1] if what == "up" else ops.n[0]
    torch.manual_seed(0)
    f = torch.randn(3, 5, 1, n, requires_grad=True)  # spiral features are [B, C, 1, n]

    def run() -> torch.Tensor:
        if what == "ribbon":
            return ops.ribbon(0, f).flatten(-2)
        return ops.down(0, f) if what == "down" else ops.up(0, f)

    ref = run()
    g = torch.randn_like(ref)
    (gr,) = torch.autograd.grad((ref * g).sum(), f)
    ops.portable = False
    try:
        fast = run()
    finally:
        ops.portable = True
    (gf,) = torch.autograd.grad((fast * g).sum(), f)
    # GridSample and the 2-tap operator round the sample coordinate differently in float32
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gf, gr, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernel", [3, 5])
def test_spiral_and_cartesian_have_the_same_parameter_count(kernel):
    """3 x n or 5 x n ribbons (sec. 7.3.2) against 3 x 3 or 5 x 5 cartesian filters."""
    s = Denoiser(DenoiserConfig(arch="spiral", kernel=kernel, **SMALL))
    c = Denoiser(DenoiserConfig(arch="cartesian", kernel=kernel, **SMALL))
    assert parameter_count(s) == parameter_count(c) > 0
    x = torch.randn(2, 1, 32, 32)
    for m in (s, c):
        y = m(x)
        assert y.shape == x.shape
        y.square().sum().backward()
        assert all(p.grad is not None for p in m.parameters())


@torch.no_grad()
def test_graph_is_raw_units_in_and_out_and_scale_equivariant(particles32):
    torch.manual_seed(0)
    m = Denoiser(DenoiserConfig(arch="spiral", **SMALL)).eval()
    x = particles32[:4]
    y = m(x)
    assert y.shape == x.shape and y.dtype == torch.float32
    torch.testing.assert_close(m(7.5 * x), 7.5 * y, rtol=1e-4, atol=1e-5)  # units follow the input
    assert torch.all(y[:, :, ~torch.from_numpy(geo.disc_mask(32, 32))] == 0)  # zero off the disc
    xn, sd = normalise(x, m.disc)
    assert torch.allclose((xn * m.disc).pow(2).sum((-2, -1)) / m.disc.sum(), torch.ones(4, 1, 1, 1), atol=0.2)
    const = torch.full((1, 1, 32, 32), 3.0)
    assert torch.isfinite(m(const)).all()  # zero variance does not divide by zero


@pytest.mark.slow
@torch.no_grad()
def test_spiral_is_more_equivariant_than_cartesian_at_initialisation(particles32):
    """Sec. 7.4: 'the spiral denoiser is nearly (rotation-) equivariant already right from the
    start of the training, whereas the cartesian version has much higher non-equivariance'."""
    errs = {}
    for arch in ("spiral", "cartesian"):
        vals = []
        for seed in (0, 1):
            torch.manual_seed(seed)
            m = Denoiser(DenoiserConfig(arch=arch, out_gain=expected_signal_rms(0.25), **SMALL)).eval()
            vals.append(equivariance_error(m, particles32, angles_per_particle=2, seed=3))
        errs[arch] = float(np.mean(vals))
    assert errs["spiral"] < 0.6 * errs["cartesian"], errs


def test_state_dict_carries_the_geometry():
    torch.manual_seed(0)
    m = Denoiser(DenoiserConfig(arch="spiral", **SMALL)).eval()
    sd = m.state_dict()
    assert {"ops.enc_index", "ops.dec_weight", "ops.rib0_grid", "ops.down0_weight", "ops.up0_index"} <= set(sd)
    x = torch.randn(2, 1, 32, 32)
    m2 = from_state_dict(m.config, sd)
    torch.testing.assert_close(m2(x), m(x))
    # the cached operators are used as given, not recomputed
    sd_mod = dict(sd)
    sd_mod["ops.dec_weight"] = sd["ops.dec_weight"] * 2.0
    m3 = from_state_dict(m.config, sd_mod)
    torch.testing.assert_close(m3(x), 2.0 * m(x), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_tiny_training_run_lowers_the_loss(tmp_path):
    cfg = CryoEMConfig(size=32, snr=1 / 4, sizes={"train": 96, "val": 32, "test": 8})
    sim = CryoEMSimulator(cfg)
    tr, va = sim.generate("train"), sim.generate("val")
    torch.manual_seed(0)
    m = Denoiser(DenoiserConfig(arch="spiral", out_gain=expected_signal_rms(0.25), **SMALL))
    log = tmp_path / "metrics.jsonl"
    hist = train(
        m,
        tr.noisy,
        tr.clean,
        va.noisy,
        va.clean,
        TrainConfig(epochs=3, batch_size=16, lr=3e-3, equivariance_particles=8, equivariance_angles=2),
        log_path=log,
        progress=False,
    )
    assert [h["epoch"] for h in hist] == [0, 1, 2, 3]
    best = min(hist, key=lambda h: h["val_loss"])
    assert best["epoch"] > 0 and best["val_loss"] < 0.8 * hist[0]["val_loss"]
    assert best["val_psnr"] > hist[0]["val_psnr"]
    # the returned model is the best epoch's (early stopping), not the last one's
    assert hist[-1]["best_epoch"] == best["epoch"]
    with FastMode(m):
        again = evaluate(m, as_tensor(va.noisy), as_tensor(va.clean))
    assert again["val_loss"] == pytest.approx(best["val_loss"], rel=1e-5)
    assert len(log.read_text().splitlines()) == 4
    assert all(0 <= h["equivariance"] < 10 for h in hist)
    assert m.ops.portable  # training's fast gathers are switched back off


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["spiral", "cartesian"])
def test_onnx_export_matches_torch(tmp_path, arch, particles32):
    torch.manual_seed(0)
    m = Denoiser(DenoiserConfig(arch=arch, **SMALL)).eval()
    with FastMode(m):  # a trained-looking state: move batch-norm statistics off their defaults
        m.train()
        with torch.no_grad():
            m(particles32)
        m.eval()
    path = export_onnx(m, tmp_path / "model.onnx")
    x = (particles32[:5].numpy() * 3.0 + 0.5).astype(np.float32)
    parity = onnx_parity(m, path, x)
    assert parity["max_rel"] < 1e-4, parity
    sess = ort_session(path)
    assert [i.name for i in sess.get_inputs()] == ["particles"]
    assert [o.name for o in sess.get_outputs()] == ["denoised"]
    for b in (1, 3):  # dynamic batch axis
        out = ort_denoise(sess, x[:b])
        assert out.shape == (b, 1, 32, 32)
        with torch.no_grad():
            np.testing.assert_allclose(out, m(torch.from_numpy(x[:b])).numpy(), rtol=1e-4, atol=1e-5)
