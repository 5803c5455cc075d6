"""Ablation-path math ([THESIS], sec. 2.5-2.6): the vectorised monotone projection is L-inf-optimal
(against the O(T^2) brute-force bound) and idempotent, the per-pixel Algorithm 1 port agrees, the
constant-speed re-parametrisation (Lemma 7) keeps the masks of a monotone path, and the soft
constraints (blur, saturation, pinching) have the properties the projection relies on."""

from __future__ import annotations

import math

import pytest
import torch

from xaiserve.handlers.ablation import path as P
from xaiserve.handlers.ablation.reference import algorithm1, monotonise_loop

torch.set_num_threads(1)


def _random_paths(seed: int, n: int = 400) -> list[torch.Tensor]:
    """Random 1-D sequences of several kinds: pure noise, noisy increasing, steps, ties."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        T = int(torch.randint(2, 18, (1,), generator=g))
        kind = i % 4
        if kind == 0:
            p = torch.randn(T, generator=g, dtype=torch.float64) * 2
        elif kind == 1:
            p = torch.linspace(0, 1, T, dtype=torch.float64) + 0.1 * torch.randn(T, generator=g, dtype=torch.float64)
        elif kind == 2:
            p = torch.randint(-3, 4, (T,), generator=g).to(torch.float64)  # many ties
        else:
            p = torch.rand(T, generator=g, dtype=torch.float64) * 1.4 - 0.2  # around [0, 1]
        out.append(p)
    return out


def _brute_bound(p: torch.Tensor) -> float:
    """max over i <= j of (p_i - p_j) / 2 by an explicit double loop (independent of linf_monotone_bound)."""
    best = 0.0
    for i in range(len(p)):
        for j in range(i, len(p)):
            best = max(best, float(p[i] - p[j]) / 2)
    return best


def test_envelope_is_monotone_and_linf_optimal_on_random_inputs():
    for p in _random_paths(0):
        q = P.monotone_envelope(p)
        assert bool((q[1:] >= q[:-1]).all()), p
        bound = _brute_bound(p)
        assert abs(float((q - p).abs().max()) - bound) < 1e-12, (p, q)
        assert abs(float(P.linf_monotone_bound(p)) - bound) < 1e-12


def test_envelope_is_idempotent_and_keeps_monotone_inputs():
    for p in _random_paths(1, 200):
        q = P.monotone_envelope(p)
        assert torch.equal(P.monotone_envelope(q), q)
    inc = torch.sort(torch.rand(14, 8, 8, dtype=torch.float64), dim=0).values
    assert torch.equal(P.monotone_envelope(inc), inc)


def test_envelope_acts_per_pixel_along_t():
    g = torch.Generator().manual_seed(2)
    phi = torch.randn(14, 6, 5, generator=g, dtype=torch.float64)
    q = P.monotone_envelope(phi, dim=0)
    for i in range(6):
        for j in range(5):
            assert torch.allclose(q[:, i, j], P.monotone_envelope(phi[:, i, j]))
    assert torch.allclose(P.linf_monotone_bound(phi), (q - phi).abs().amax(dim=0))


@pytest.mark.slow
def test_clamped_projection_is_optimal_for_the_box_constrained_problem():
    """With the read-only boundaries phi(0)=0, phi(1)=1 the feasible set is 0 <= q_1 <= ... <= q_T <= 1;
    its optimal L-inf distance is max(isotonic bound, box violation)."""
    for p in _random_paths(3):
        q = P.project_monotone_clamped(p[:, None, None])[:, 0, 0]  # one pixel's path [T, 1, 1]
        assert bool((q[1:] >= q[:-1]).all()) and float(q.min()) >= 0 and float(q.max()) <= 1
        box = max(0.0, float((p - 1).max()), float((-p).max()))
        assert abs(float((q - p).abs().max()) - max(_brute_bound(p), box)) < 1e-12


def test_algorithm1_port_is_monotone_and_as_optimal_as_the_envelope():
    for p in _random_paths(4):
        q = torch.from_numpy(algorithm1(p.numpy()))
        assert bool((q[1:] >= q[:-1]).all()), p
        assert abs(float((q - p).abs().max()) - _brute_bound(p)) < 1e-12, (p, q)
    phi = torch.randn(6, 4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    loop = torch.from_numpy(monotonise_loop(phi.numpy()))
    assert torch.allclose((loop - phi).abs().amax(dim=0), (P.monotone_envelope(phi) - phi).abs().amax(dim=0))


def _axioms(phi: torch.Tensor, tol: float = 1e-5) -> None:
    """Definition 1 on the discrete path: range, monotone in t (boundaries included), constant speed."""
    full = P.with_boundaries(phi)
    assert float(full.min()) >= 0 and float(full.max()) <= 1
    assert bool((full[1:] >= full[:-1] - 1e-7).all())
    assert float((phi.mean(dim=(1, 2)) - P.interior_times(phi.shape[0], dtype=phi.dtype)).abs().max()) < tol


def test_projection_gives_an_ablation_path_from_arbitrary_input():
    g = torch.Generator().manual_seed(6)
    for T in (2, 5, 14):
        phi = torch.randn(T, 16, 16, generator=g) * 0.7 + 0.5
        _axioms(P.project(phi))
    # a path that is already an ablation path is a fixpoint
    phi = P.affine_path(14, 8, 8)
    assert torch.allclose(P.project(phi), phi, atol=1e-7)


def _continuous_path(s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """A continuous, pointwise monotone path s -> s ** a(r) with phi(0)=0, phi(1)=1, NOT constant speed."""
    return s[:, None, None] ** a[None]


def test_constant_speed_keeps_the_masks_of_a_continuous_monotone_path():
    """Lemma 7: each re-parametrised mask is the path's own mask at the time s* of the right mass."""
    g = torch.Generator().manual_seed(7)
    a = 1.0 + 2.0 * torch.rand(12, 12, generator=g, dtype=torch.float64)  # exponents in [1, 3]: Lipschitz in s
    s_dense = torch.linspace(0, 1, 2002, dtype=torch.float64)[1:-1]
    dense = _continuous_path(s_dense, a)
    out = P.constant_speed(dense)
    _axioms(out, tol=1e-12)
    T = dense.shape[0]
    for k in (1, 300, 1000, 1700, T):
        w = k / (T + 1)
        lo, hi = 0.0, 1.0  # bisection for the s with mean(phi(s)) = w
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            if float(_continuous_path(torch.tensor([mid], dtype=torch.float64), a).mean()) < w:
                lo = mid
            else:
                hi = mid
        exact = _continuous_path(torch.tensor([lo], dtype=torch.float64), a)[0]
        assert float((out[k - 1] - exact).abs().max()) < 2e-3, k


def test_constant_speed_output_lies_on_the_piecewise_linear_input_path():
    g = torch.Generator().manual_seed(8)
    raw = torch.rand(9, 10, 10, generator=g, dtype=torch.float64) ** 3
    phi = P.project_monotone_clamped(torch.cumsum(raw, dim=0) / raw.sum(dim=0).clamp_min(1e-9) * 0.9)
    out = P.constant_speed(phi)
    _axioms(out, tol=1e-12)
    full = P.with_boundaries(phi)
    for k in range(out.shape[0]):
        # out[k] = (1 - eta) full[j] + eta full[j+1] for some segment j and eta in [0, 1]
        found = False
        for j in range(full.shape[0] - 1):
            d = full[j + 1] - full[j]
            denom = float((d * d).sum())
            eta = float(((out[k] - full[j]) * d).sum()) / denom if denom > 0 else 0.0
            if 0 <= eta <= 1 and float((full[j] + eta * d - out[k]).abs().max()) < 1e-10:
                found = True
                break
        assert found, k


def test_constant_speed_handles_flat_and_jumping_masses():
    """Saturated paths: identical consecutive masks (flat mass) and a jump (pixel insertion, eq. 2.12)."""
    h = w = 4
    heat = torch.arange(h * w, dtype=torch.float64).reshape(h, w) / (h * w)
    s = torch.tensor([0.2, 0.2, 0.5, 0.5, 0.9], dtype=torch.float64)
    ins = (heat[None] > 1 - s[:, None, None]).to(torch.float64)  # monotone, binary, non-constant speed
    out = P.constant_speed(ins)
    _axioms(out, tol=1e-12)


def test_gaussian_blur_matrix_is_doubly_stochastic_and_blurs():
    for n, sigma in ((64, 7.0), (16, 0.5), (32, 100.0)):
        B = P.gaussian_blur_matrix(n, sigma, dtype=torch.float64)
        assert torch.allclose(B.sum(dim=1), torch.ones(n, dtype=torch.float64))
        assert torch.allclose(B.sum(dim=0), torch.ones(n, dtype=torch.float64))
        assert float(B.min()) >= 0
    x = torch.zeros(1, 33, 33, dtype=torch.float64)
    x[0, 16, 16] = 1.0
    y = P.gaussian_blur(x, 3.0)
    assert math.isclose(float(y.sum()), 1.0, rel_tol=1e-12)
    # the interior of the blurred impulse is the 2-D Gaussian of eq. 2.25 (sampled, normalised)
    r = torch.arange(33, dtype=torch.float64) - 16
    k = torch.exp(-(r**2) / 18.0) * (r.abs() <= 12)  # truncated at 4 sigma
    k = k / k.sum()
    assert torch.allclose(y[0], k[:, None] * k[None, :], atol=1e-12)


def test_saturation_and_pinching_fixpoints():
    v = torch.linspace(0, 1, 101, dtype=torch.float64)
    s = P.saturate(v, 0.8)
    assert torch.allclose(s[[0, 50, 100]], torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64))
    assert bool((s[1:] > s[:-1]).all())  # monotone, so it never breaks path monotonicity
    assert bool((s[:50] <= v[:50] + 1e-12).all()) and bool((s[51:] >= v[51:] - 1e-12).all())  # away from 1/2
    assert torch.equal(P.saturate(v, 0.0), v)
    up = torch.full((5,), 0.3, dtype=torch.float64)
    down = up + torch.tensor([-0.2, 0.0, 0.1, 0.5, 0.7], dtype=torch.float64)
    d_new = P.pinch(up, down, 0.5) - up
    d_old = down - up
    assert float(d_new[1]) == 0.0
    assert bool((d_new.abs() <= d_old.abs() + 1e-15).all())  # attracted to 0
    assert torch.allclose(P.pinch(up, up + 1.0, 0.5) - up, torch.ones(5, dtype=torch.float64))  # d = 1 is fixed


def test_saturation_level_eq_2_31():
    # trapezoid over t_k = k/4: only the two boundary slices (weight 1/8 each, saturation 1) count
    assert math.isclose(float(P.saturation(torch.zeros(3, 4, 4) + 0.5)), 1 / 4)
    binary = (torch.rand(7, 8, 8) > 0.5).float()
    assert math.isclose(float(P.saturation(binary)), 1.0, rel_tol=1e-6)


@pytest.mark.parametrize("T", [2, 14])
def test_upsample_keeps_range_and_monotonicity(T):
    phi = P.project(torch.rand(T, 8, 8, generator=torch.Generator().manual_seed(T)))
    up = P.upsample(phi, 32, 24)
    assert up.shape == (T, 32, 24)
    assert float(up.min()) >= 0 and float(up.max()) <= 1
    assert bool((up[1:] >= up[:-1] - 1e-7).all())
    assert float((up.mean(dim=(1, 2)) - P.interior_times(T)).abs().max()) < 0.05


def test_projection_of_several_paths_at_once_equals_one_by_one():
    g = torch.Generator().manual_seed(9)
    phi = torch.randn(2, 7, 6, 5, generator=g) * 0.5 + 0.5
    both = P.project(phi)
    for j in range(2):
        assert torch.allclose(both[j], P.project(phi[j]), atol=1e-7)
    assert torch.allclose(P.saturation(phi), torch.stack([P.saturation(phi[0]), P.saturation(phi[1])]))
