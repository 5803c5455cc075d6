"""The spiral denoiser's inference graph (regrouped ribbon convolutions, folded batch norms,
batch-folded gathers) against a straightforward reference of the same network ([THESIS],
sec. 7.3.2-7.3.3), and the store's denoiser as a torch module."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.tiny_models import perturbed_denoiser
from xaiserve.handlers.denoise import geometry as geo
from xaiserve.handlers.denoise.export import export_onnx, ort_denoise, ort_session
from xaiserve.handlers.denoise.layers import SpiralConv, gather_apply
from xaiserve.handlers.denoise.networks import Denoiser, DenoiserConfig, normalise

torch.set_num_threads(1)
STORE = Path(__file__).resolve().parent.parent / "model_store"


def reference_gather(x: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """out[b, c, m] = sum_k weight[m, k] x[b, c, index[m, k]], the obvious way."""
    return (x[..., index] * weight).sum(-1)


def reference_ribbon_conv(ops, conv: SpiralConv, parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate, build the whole rows x n ribbon with one GridSample, convolve (the form the
    network had before the inference graph was regrouped)."""
    x = torch.cat(parts, 1)
    grid = getattr(ops, f"rib{conv.level}_grid").expand(x.shape[0], -1, -1, -1)
    rib = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return F.conv2d(rib, conv.conv.weight, conv.conv.bias, padding=conv.conv.padding)


def reference_forward(m: Denoiser, particles: torch.Tensor) -> torch.Tensor:
    """The denoiser written out layer by layer: gathers, full ribbons, conv, batch norm, ReLU."""
    ops, core = m.ops, m.core
    xn, sd = normalise(particles, m.disc, m.config.eps)

    def unit(u, parts):
        return torch.relu(u.norm(reference_ribbon_conv(ops, u.conv, parts)))

    def level(name, f):
        return reference_gather(f.squeeze(2), getattr(ops, f"{name}_index"), getattr(ops, f"{name}_weight")).unsqueeze(
            2
        )

    f = reference_gather(xn.flatten(-2), ops.enc_index, ops.enc_weight).unsqueeze(2)
    skips = []
    for lev, units in enumerate(core.enc):
        if lev > 0:
            f = level(f"down{lev - 1}", f)
        for u in units:
            f = unit(u, [f])
        skips.append(f)
    for i, lev in enumerate(range(core.levels - 2, -1, -1)):
        f = unit(core.dec[i], [level(f"up{lev}", f), skips[lev]])
    y = reference_ribbon_conv(ops, core.out, [f])
    y = (
        reference_gather(y.squeeze(2), ops.dec_index, ops.dec_weight).unflatten(-1, (m.config.size, m.config.size))
        * m.gain
    )
    return y * m.disc * sd


@pytest.fixture(scope="module")
def trained_looking() -> Denoiser:
    """A small 3-level spiral net with batch-norm statistics and affine terms off their defaults."""
    return perturbed_denoiser(DenoiserConfig(arch="spiral", size=32, channels=(4, 8, 16)))


@pytest.mark.parametrize("c", [1, 5])
def test_gather_apply_is_the_sparse_operator(c):
    """The exported gather form (batch folded into the samples-major layout) against the dense
    matrix of the operator, for the one-channel and the multi-channel branch."""
    spec = geo.default_spiral(32)
    op = geo.cartesian_to_spiral(32, 32, spec, 0.7)
    x = torch.randn(3, c, 32 * 32, dtype=torch.float64)
    got = gather_apply(x.float(), torch.from_numpy(op.index), torch.from_numpy(op.weight))
    want = x @ torch.from_numpy(op.dense()).T
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("kernel", [3, 5])
def test_ribbon_conv_equals_the_full_ribbon_conv(kernel):
    """Middle row exact + outer rows interpolated, summed over the parts of a concatenation, with a
    folded affine: the same linear map as conv2d over the whole GridSample ribbon."""
    torch.manual_seed(0)
    ops = Denoiser(DenoiserConfig(arch="spiral", size=32, channels=(4,), kernel=kernel)).ops
    conv = SpiralConv(0, 7, 6, kernel, kernel, bias=True)
    n = ops.n[0]
    parts = [torch.randn(2, 3, 1, n), torch.randn(2, 4, 1, n)]
    scale, shift = torch.rand(6) + 0.5, torch.randn(6)
    got = conv(parts, ops, scale, shift)
    ref = reference_ribbon_conv(ops, conv, parts) * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    # the reference reads the middle row by GridSample, off the integer by float32 rounding of
    # its sample coordinate (< 1e-4 of a sample at this size): equal to that rounding
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4 * float(ref.abs().max()))
    # and exactly, to float32 rounding of the sums, once the reference's middle row is the spiral
    mid = kernel // 2
    x = torch.cat(parts, 1)
    rib = F.grid_sample(
        x, ops.rib0_grid.expand(2, -1, -1, -1), mode="bilinear", padding_mode="zeros", align_corners=False
    )
    rib[:, :, mid] = x[:, :, 0]
    exact = F.conv2d(
        rib, conv.conv.weight * scale.view(-1, 1, 1, 1), conv.conv.bias * scale + shift, padding=conv.conv.padding
    )
    torch.testing.assert_close(got, exact, rtol=1e-5, atol=1e-5)
    # the training form (embedding_bag gathers) gives the same values
    ops.portable = False
    try:
        fast = conv(parts, ops, scale, shift)
    finally:
        ops.portable = True
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-4 * float(ref.abs().max()))


@pytest.mark.slow
@torch.no_grad()
def test_inference_graph_matches_the_reference_network_in_torch_and_onnx(trained_looking, tmp_path):
    m = trained_looking
    x = torch.randn(5, 1, 32, 32) * 3.0 + 0.5
    ref = reference_forward(m, x)
    scale = float(ref.abs().max())
    assert scale > 0
    got = m(x)
    assert (got - ref).abs().max() / scale < 1e-4
    path = export_onnx(m, tmp_path / "spiral.onnx")
    out = ort_denoise(ort_session(path), x.numpy())
    assert np.abs(out - ref.numpy()).max() / scale < 1e-4
    # batch norm folded: the graph has no BatchNormalization node left, and no Concat of skips
    import onnx

    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "BatchNormalization" not in ops and "GridSample" in ops


def test_registry_torch_module_of_the_store_spiral_matches_its_onnx_graph():
    """`Registry.torch_module` on the committed cryoem-spiral (handlers.nets.load_module, kind
    denoiser) gives the network whose export is the store's model.onnx."""
    from xaiserve.service.registry import Registry, RegistryConfig
    from xaiserve.training.datasets.cryoem import CryoEMConfig, CryoEMSimulator

    reg = Registry(RegistryConfig(store=STORE, warmup=False, prefer_cuda=False))
    entry = reg.resolve("cryoem-spiral")
    module = reg.torch_module(entry)
    assert isinstance(module, Denoiser) and not module.training
    assert all(not p.requires_grad for p in module.parameters())
    ps = CryoEMSimulator(CryoEMConfig(size=64, snr=1 / 64, sizes={"train": 4, "val": 4, "test": 4})).generate("test")
    x = ps.noisy[:, None].astype(np.float32)
    with torch.no_grad():
        want = module(torch.from_numpy(x)).numpy()
    got = ort_denoise(ort_session(reg.path(entry, "onnx")), x)
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-4
