"""Spiral geometry and resampling operators ([THESIS], sec. 7.3.1-7.3.3, eq. 7.5-7.7)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from xaiserve.handlers.denoise import geometry as geo


@pytest.fixture(scope="module")
def spec64() -> geo.SpiralSpec:
    return geo.default_spiral(64)


def test_spiral_follows_eq_7_5_to_7_7(spec64):
    r, theta = geo.spiral_params(spec64)
    i = np.arange(spec64.n_spls)
    t = i * math.pi / spec64.n_spls  # eq. 7.7
    np.testing.assert_allclose(r, np.sqrt(t / math.pi))  # eq. 7.5
    np.testing.assert_allclose(theta, 2 * spec64.n_wind * np.sqrt(math.pi * t))  # eq. 7.6
    # n_wind windings cover the disc: theta grows by 2 pi n_wind from the centre to the rim
    assert theta[-1] / (2 * math.pi) == pytest.approx(spec64.n_wind, rel=1e-3)
    assert r.max() < 1.0 and r.min() == 0.0


def test_spiral_samples_are_evenly_spaced(spec64):
    """Nearest-neighbour distance: one winding distance (1/n_wind) everywhere but the centre."""
    p = geo.spiral_points(spec64)
    d = geo.nearest_neighbour_distances(p) * spec64.n_wind
    r = np.hypot(p[:, 0], p[:, 1])
    outer = r > 0.15
    assert outer.mean() > 0.97
    assert d[outer].std() / d[outer].mean() < 0.01
    assert np.abs(d[outer] - 1.0).max() < 0.02
    # near the tightly wound centre the spacing still stays within a factor 2
    assert d.min() > 0.5 and d.max() < 1.05


def test_interpolation_operator_reproduces_linear_functions():
    rng = np.random.default_rng(0)
    src = rng.uniform(-1, 1, size=(400, 2))
    dst = rng.uniform(-0.6, 0.6, size=(200, 2))
    op = geo.interpolation_operator(src, dst)
    f = lambda q: 0.3 + 1.7 * q[:, 0] - 0.4 * q[:, 1]  # noqa: E731
    np.testing.assert_allclose(op.apply(f(src)), f(dst), atol=1e-6)
    assert np.all(op.weight >= 0) and np.allclose(op.weight.sum(1), 1.0, atol=1e-6)
    # outside the hull: zero (padding) or the nearest source sample
    far = np.array([[5.0, 5.0]])
    assert geo.interpolation_operator(src, far, outside="zero").apply(f(src))[0] == 0.0
    near = geo.interpolation_operator(src, far, outside="nearest")
    assert near.apply(f(src))[0] == pytest.approx(f(src)[np.argmin(np.linalg.norm(src - far, axis=1))], rel=1e-6)


def test_grid_operator_is_a_delaunay_barycentric_map():
    """The explicit grid triangulation reproduces linear functions exactly and every output
    depends on the three corners of one half-cell."""
    h = w = 16
    src = geo.pixel_centres(h, w)
    rng = np.random.default_rng(1)
    dst = rng.uniform(-0.9, 0.9, size=(300, 2))
    op = geo.grid_operator(h, w, dst)
    f = lambda q: -0.2 + 0.9 * q[:, 0] + 2.1 * q[:, 1]  # noqa: E731
    np.testing.assert_allclose(op.apply(f(src)), f(dst), atol=1e-5)
    used = src[op.index]  # [M, 3, 2]
    span = np.ptp(used, axis=1).max(1)
    assert span.max() <= 2.0 / w + 1e-9  # within one pixel cell
    # a Dirac at a pixel centre gives a tent of radius one pixel: symmetric under 90-degree turns
    tent = op.dense()[:, (h // 2) * w + w // 2]
    assert tent.max() <= 1.0 + 1e-6


@pytest.mark.slow
def test_ribbon_rows_lie_on_neighbouring_windings(spec64):
    rows = geo.ribbon_points(spec64, 3)
    p = geo.spiral_points(spec64)
    np.testing.assert_allclose(rows[1], p)  # middle row is the spiral
    r = np.hypot(p[:, 0], p[:, 1])
    sel = (r > 0.2) & (r < 0.95)
    for k in (0, 2):
        rk = np.hypot(rows[k][sel, 0], rows[k][sel, 1])
        # one winding (1/n_wind) inwards / outwards
        np.testing.assert_allclose(np.abs(rk - r[sel]) * spec64.n_wind, 1.0, atol=0.01)
        # ... and on the spiral's neighbouring winding: close to some sample of it
        d = geo.nearest_neighbour_distances(np.concatenate([p, rows[k][sel]]))[len(p) :] * spec64.n_wind
        assert np.median(d) < 0.55
    op = geo.spiral_to_ribbon(spec64, 3)
    n = spec64.n_spls
    mid = op.dense()[n : 2 * n]
    np.testing.assert_allclose(mid, np.eye(n), atol=1e-6)  # identity on the middle row
    assert op.index.shape == (3 * n, 2)  # two taps (footnote 4 of sec. 7.3.3)


def test_five_row_ribbon_reaches_two_windings(spec64):
    rows = geo.ribbon_points(spec64, 5)
    p = geo.spiral_points(spec64)
    r = np.hypot(p[:, 0], p[:, 1])
    sel = (r > 0.3) & (r < 0.9)
    r0 = np.hypot(rows[0][sel, 0], rows[0][sel, 1])
    np.testing.assert_allclose((r[sel] - r0) * spec64.n_wind, 2.0, atol=0.02)
    with pytest.raises(ValueError):
        geo.ribbon_points(spec64, 4)


def test_smooth_function_survives_cartesian_spiral_cartesian(spec64):
    size = 64
    c = geo.pixel_centres(size, size)
    x, y = c[:, 0], c[:, 1]
    f = np.exp(-((x - 0.2) ** 2 + (y + 0.1) ** 2) / 0.1) + 0.3 * np.cos(3 * x + 2 * y)
    to_s = geo.cartesian_to_spiral(size, size, spec64)
    to_c = geo.spiral_to_cartesian(spec64, size, size)
    back = to_c.apply(to_s.apply(f))
    inner = geo.disc_mask(size, size, 0.9).ravel()
    rel = np.linalg.norm((back - f)[inner]) / np.linalg.norm(f[inner])
    assert rel < 0.01
    assert np.abs(back - f)[inner].max() < 0.02
    assert np.all(back[~geo.disc_mask(size, size).ravel()] == 0)  # nothing outside the disc


def test_spiral_to_coarser_spiral_averages_and_back_interpolates(spec64):
    coarse = geo.SpiralSpec(n_wind=spec64.n_wind // 2, n_spls=round(spec64.n_spls / 4))
    down = geo.spiral_to_spiral(spec64, coarse, smooth=True)
    up = geo.spiral_to_spiral(coarse, spec64, smooth=False)
    p, q = geo.spiral_points(spec64), geo.spiral_points(coarse)
    f = lambda pts: np.sin(2 * pts[:, 0]) + pts[:, 1] ** 2  # noqa: E731
    assert np.allclose(down.weight.sum(1), 1.0, atol=1e-6)  # averages preserve constants
    rel_d = np.linalg.norm(down.apply(f(p)) - f(q)) / np.linalg.norm(f(q))
    inner = np.hypot(p[:, 0], p[:, 1]) < 0.9
    rel_u = np.linalg.norm((up.apply(f(q)) - f(p))[inner]) / np.linalg.norm(f(p)[inner])
    assert rel_d < 0.01 and rel_u < 0.01


@pytest.mark.slow
def test_gaussian_input_resampling_makes_pixel_noise_uniform(spec64):
    """Barycentric interpolation of white pixel noise leaves a variance pattern tied to the pixel
    grid (1 on a pixel centre, down to 1/3 between); the Gaussian average (the spiral network's
    default input resampling) makes it nearly uniform, and still reproduces constants."""
    rng = np.random.default_rng(0)
    noise = rng.normal(size=(400, 64 * 64))
    bary = geo.cartesian_to_spiral(64, 64, spec64)
    gauss = geo.cartesian_to_spiral(64, 64, spec64, sigma_px=0.7)
    r = np.hypot(*geo.spiral_points(spec64).T)
    inner = r < 0.9
    v_b = bary.apply(noise).var(0)[inner]
    v_g = gauss.apply(noise).var(0)[inner]
    assert v_b.std() / v_b.mean() > 0.2
    assert v_g.std() / v_g.mean() < 0.1
    np.testing.assert_allclose(gauss.weight.sum(1), 1.0, atol=1e-5)
    # the exact variance of a weighted sum of unit white noise is the sum of squared weights
    np.testing.assert_allclose(v_g.mean(), (gauss.weight.astype(np.float64) ** 2).sum(1)[inner].mean(), rtol=0.05)
