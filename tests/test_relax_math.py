"""RELAX math ([RELAX]): masks (sec. 3.1), the batched one-pass estimator against Algorithm 1
mask by mask, the two-pass estimator, uncertainty and U-RELAX against hand-computed values
(eq. 9-13), the adaptive stopping rule, and the masking strategies (Appendix A, [SSL-XAI])."""

from __future__ import annotations

import math

import pytest
import torch

from xaiserve.errors import Cancelled, InvalidArgument
from xaiserve.handlers.relax import Relax, RelaxConfig
from xaiserve.handlers.relax import estimator as est
from xaiserve.handlers.relax.masking import canny, lab_to_rgb, make_perturbation, rgb_to_lab
from xaiserve.handlers.relax.masks import generate_masks, mask_geometry
from xaiserve.handlers.relax.relax import cosine
from xaiserve.handlers.relax.uncertainty import hoeffding_error, hoeffding_num_masks, threshold, u_relax

torch.set_num_threads(1)


# --- masks -------------------------------------------------------------------------------------
def test_masks_follow_the_rise_distribution():
    geom = mask_geometry(64, 64, 7)
    assert (geom.cell_h, geom.up_h, geom.offsets_h) == (9, 72, 9)  # C = floor(64/7), (7+1)*9
    m = generate_masks(2000, geom, p_keep=0.3, generator=torch.Generator().manual_seed(1))
    assert m.shape == (2000, 64, 64) and m.dtype == torch.float32
    assert float(m.min()) >= 0.0 and float(m.max()) <= 1.0
    assert abs(float(m.mean()) - 0.3) < 0.02  # bilinear interpolation preserves the keep rate
    # bilinear upsampling of a cell grid: neighbouring pixels differ by at most 1/C
    assert float((m[:, 1:] - m[:, :-1]).abs().max()) <= 1 / 9 + 1e-6
    # not all masks are cropped at the same offset
    assert len({tuple(mm[0, :3].tolist()) for mm in m[:50]}) > 10


@pytest.mark.parametrize("size, cells", [((64, 64), 7), ((20, 23), 7), ((5, 5), 1)])
def test_masks_equal_bilinear_upsampling_then_crop(size, cells):
    """The separable-matrix construction gives exactly sec. 3.1's recipe on the same random draws."""
    geom = mask_geometry(*size, cells)
    m = generate_masks(16, geom, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    grid = (torch.rand(16, 1, geom.cells_h, geom.cells_w, generator=g) < 0.5).double()
    oh = torch.randint(0, geom.offsets_h, (16,), generator=g)
    ow = torch.randint(0, geom.offsets_w, (16,), generator=g)
    up = torch.nn.functional.interpolate(grid, size=(geom.up_h, geom.up_w), mode="bilinear", align_corners=False)[:, 0]
    ref = torch.stack([up[i, oh[i] : oh[i] + size[0], ow[i] : ow[i] + size[1]] for i in range(16)])
    torch.testing.assert_close(m, ref, rtol=0, atol=1e-12)
    assert set(torch.unique(grid).tolist()) == {0.0, 1.0}


def test_masks_are_reproducible_from_the_seed():
    geom = mask_geometry(20, 23, 7)
    a = generate_masks(8, geom, generator=torch.Generator().manual_seed(5))
    b = generate_masks(8, geom, generator=torch.Generator().manual_seed(5))
    c = generate_masks(8, geom, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_mask_geometry_fits_awkward_sizes():
    # floor(20/7) = 2 gives an upsampled 16 < 20: the crop must still fit (ceil fallback)
    geom = mask_geometry(20, 23, 7)
    assert geom.up_h >= geom.height + geom.offsets_h - 1 and geom.up_w >= geom.width + geom.offsets_w - 1
    assert generate_masks(3, geom).shape == (3, 20, 23)
    assert generate_masks(2, mask_geometry(5, 5, 5)).shape == (2, 5, 5)
    assert generate_masks(2, mask_geometry(5, 5, 1)).shape == (2, 5, 5)
    with pytest.raises(ValueError):
        mask_geometry(5, 5, 6)


# --- estimator: batched == sequential, two-pass == one-pass -----------------------------------
def _sequential(masks: torch.Tensor, s: torch.Tensor, w_init: float) -> est.WeightedStats:
    st = est.init_stats(masks.shape[1:], w_init=w_init)
    for i in range(masks.shape[0]):
        st = est.sequential_update(st, masks[i], s[i])
    return st


@pytest.mark.parametrize("w_init", [1e-8, 0.0])
def test_batched_update_equals_algorithm_1_mask_by_mask(w_init):
    g = torch.Generator().manual_seed(0)
    masks = generate_masks(500, mask_geometry(12, 16, 4), generator=g, dtype=torch.float64)
    s = 0.5 + 0.4 * torch.rand(500, generator=g, dtype=torch.float64)
    ref = _sequential(masks, s, w_init)
    for bs in (1, 7, 64, 500):  # uneven batch sizes, including a single batch
        st = est.init_stats(masks.shape[1:], w_init=w_init)
        for i in range(0, 500, bs):
            st = est.update_batch(st, masks[i : i + bs], s[i : i + bs])
        assert st.count == 500
        torch.testing.assert_close(st.weight, ref.weight, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(st.weight_sq, ref.weight_sq, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(st.mean, ref.mean, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(st.m2, ref.m2, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(est.variance(st), est.variance(ref), rtol=1e-10, atol=1e-13)


def test_batched_update_from_float32_masks_matches_float64_reference():
    g = torch.Generator().manual_seed(3)
    masks = generate_masks(300, mask_geometry(16, 16, 7), generator=g)  # float32, as in production
    s = torch.rand(300, generator=g)
    ref = _sequential(masks.double(), s.double(), 1e-8)
    st = est.init_stats((16, 16))
    for i in range(0, 300, 64):
        st = est.update_batch(st, masks[i : i + 64], s[i : i + 64])
    torch.testing.assert_close(st.mean, ref.mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(st.m2, ref.m2, rtol=1e-10, atol=1e-12)


def test_pixels_no_mask_covers_keep_their_state():
    masks = torch.zeros(4, 2, 2, dtype=torch.float64)
    masks[:, 0, 0] = 1.0
    s = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    st = est.update_batch(est.init_stats((2, 2), w_init=0.0), masks, s)
    assert torch.isfinite(st.mean).all() and torch.isfinite(st.m2).all()
    assert float(st.mean[0, 0]) == pytest.approx(0.25) and float(st.mean[1, 1]) == 0.0
    assert math.isinf(float(est.variance(st)[1, 1]))  # no data: infinitely uncertain


def test_two_pass_equals_one_pass():
    g = torch.Generator().manual_seed(1)
    geom = mask_geometry(10, 10, 3)
    state = g.get_state()
    sizes = [50, 50, 37]
    masks = [generate_masks(k, geom, generator=g, dtype=torch.float64) for k in sizes]
    s = torch.rand(sum(sizes), dtype=torch.float64, generator=g)

    def replay():
        gg = torch.Generator()
        gg.set_state(state)
        return (generate_masks(k, geom, generator=gg, dtype=torch.float64) for k in sizes)

    one = est.init_stats((10, 10))
    i = 0
    for m in masks:
        one = est.update_batch(one, m, s[i : i + m.shape[0]])
        i += m.shape[0]
    two = est.two_pass(replay, s)
    torch.testing.assert_close(two.mean, one.mean, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(two.m2, one.m2, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(two.weight, one.weight, rtol=1e-12, atol=1e-12)


# --- uncertainty and U-RELAX against hand-computed values ---------------------------------------
# three masks over four pixels, similarities s = 0.2, 0.8, 0.5
HAND_MASKS = torch.tensor([[1.0, 0.5, 1.0, 0.0], [0.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
HAND_S = torch.tensor([0.2, 0.8, 0.5], dtype=torch.float64)
# R = sum m s / sum m;  U = sum m (s - R)^2;  var = U / (W - 1)
HAND_R = [0.7 / 2, 1.4 / 2.5, 1.5 / 3, 1.3 / 2]  # 0.35, 0.56, 0.5, 0.65
HAND_VAR = [0.045 / 1, 0.126 / 1.5, 0.18 / 2, 0.045 / 1]  # 0.045, 0.084, 0.09, 0.045


@pytest.mark.parametrize("batched", [False, True])
def test_importance_and_uncertainty_by_hand(batched):
    st = est.init_stats((4,), w_init=0.0)
    if batched:
        st = est.update_batch(st, HAND_MASKS, HAND_S)
    else:
        for m, s in zip(HAND_MASKS, HAND_S):
            st = est.sequential_update(st, m, s)
    torch.testing.assert_close(st.mean, torch.tensor(HAND_R, dtype=torch.float64))
    torch.testing.assert_close(est.variance(st), torch.tensor(HAND_VAR, dtype=torch.float64))
    # standard error of a weighted mean: sqrt(var * sum m^2) / sum m
    w2 = [2.0, 2.25, 3.0, 2.0]
    w = [2.0, 2.5, 3.0, 2.0]
    se = [math.sqrt(v * q) / ww for v, q, ww in zip(HAND_VAR, w2, w)]
    torch.testing.assert_close(est.standard_error(st), torch.tensor(se, dtype=torch.float64))
    assert se[0] == pytest.approx(0.15)


def test_u_relax_thresholds_by_hand():
    r = torch.tensor(HAND_R)
    u = torch.tensor(HAND_VAR)
    # median of (0.045, 0.045, 0.084, 0.09) = 0.0645, mean = 0.066 (eq. 11)
    assert threshold(u, "median", 1.0) == pytest.approx(0.0645, rel=1e-6)
    assert threshold(u, "mean", 1.0) == pytest.approx(0.066, rel=1e-6)
    eps = threshold(u, "median", 1.0)
    torch.testing.assert_close(u_relax(r, u, eps), torch.tensor([0.35, 0.0, 0.0, 0.65]))
    # gamma = 1.3: mean rule eps = 0.0858 keeps pixel 1 (U = 0.084); median rule eps = 0.08385 does not
    torch.testing.assert_close(u_relax(r, u, threshold(u, "mean", 1.3)), torch.tensor([0.35, 0.56, 0.0, 0.65]))
    torch.testing.assert_close(u_relax(r, u, threshold(u, "median", 1.3)), torch.tensor([0.35, 0.0, 0.0, 0.65]))
    # an odd count takes the middle value; +inf (no data) is ignored and never kept
    assert threshold(torch.tensor([3.0, 1.0, 2.0, math.inf]), "median") == 2.0
    assert float(u_relax(torch.ones(2), torch.tensor([0.0, math.inf]), math.inf)[1]) == 0.0


def test_theorem_1_bound():
    assert hoeffding_num_masks(0.01, 0.01) == 26492  # METHODS.md: the bound, not the paper's 3000
    assert 0.029 < hoeffding_error(3000, 0.01) < 0.03


# --- the Relax object ---------------------------------------------------------------------------
class Quadrants(torch.nn.Module):
    """A transparent 'encoder': per image quadrant, ReLU(mean - 0.3) and ReLU(0.3 - mean).
    Dimming the bright top-left quadrant flips its features; the dark quadrants barely change."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[2] // 2, x.shape[3] // 2
        q = torch.stack(
            [t.mean(dim=(1, 2, 3)) for t in (x[:, :, :h, :w], x[:, :, :h, w:], x[:, :, h:, :w], x[:, :, h:, w:])], 1
        )
        return torch.cat([torch.relu(q - 0.3), torch.relu(0.3 - q)], dim=1)


def _image(size: int = 24) -> torch.Tensor:
    x = torch.full((3, size, size), 0.02)
    x[:, : size // 2, : size // 2] = 1.0
    return x


def test_relax_equals_the_reference_loop_on_the_same_masks():
    """Relax.attribute (batched) == Algorithm 1 run mask by mask with the same masks and model."""
    x, f = _image(), Quadrants()
    cfg = RelaxConfig(num_masks=150, batch_size=64, cells=4, seed=11)
    out = Relax(f, cfg).attribute(x)
    # regenerate the masks exactly as Relax does: same seed, same batch sizes
    g = torch.Generator().manual_seed(11)
    geom = mask_geometry(24, 24, 4)
    masks = torch.cat([generate_masks(k, geom, generator=g) for k in (64, 64, 22)])
    h = f(x[None])
    st = est.init_stats((24, 24), w_init=cfg.w_init)
    for m in masks:
        s = cosine(h, f((x * m)[None]))[0]
        st = est.sequential_update(st, m.double(), s.double())
    assert out.num_masks == 150
    torch.testing.assert_close(out.importance, st.mean.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.uncertainty, est.variance(st).float(), rtol=1e-4, atol=1e-8)
    assert out.threshold == pytest.approx(float(torch.quantile(out.uncertainty.double(), 0.5)), rel=1e-5)
    torch.testing.assert_close(
        out.u_relax, torch.where(out.uncertainty < out.threshold, out.importance, torch.zeros(()))
    )


@pytest.mark.slow
def test_relax_two_pass_option_matches_one_pass():
    x, f = _image(), Quadrants()
    one = Relax(f, RelaxConfig(num_masks=200, cells=4)).attribute(x)
    two = Relax(f, RelaxConfig(num_masks=200, cells=4, two_pass=True)).attribute(x)
    torch.testing.assert_close(two.importance, one.importance, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(two.uncertainty, one.uncertainty, rtol=1e-5, atol=1e-9)


def test_importance_is_highest_where_the_embedding_looks():
    out = Relax(Quadrants(), RelaxConfig(num_masks=600, cells=4)).attribute(_image())
    r = out.importance
    # masking the bright quadrant changes the embedding: keeping it (M = 1 there) keeps s high
    gap = float(r[:12, :12].mean()) - float(r[12:, 12:].mean())
    assert gap > 5 * out.achieved_error
    assert int(r.argmax()) // 24 < 12 and int(r.argmax()) % 24 < 12


def test_adaptive_rule_stops_early_below_target_and_agrees_with_n_3000():
    x, f = _image(), Quadrants()
    fixed = Relax(f, RelaxConfig(num_masks=3000, batch_size=100, cells=4)).attribute(x)
    ada = Relax(f, RelaxConfig(num_masks=3000, batch_size=100, cells=4, adaptive=True, target_error=0.01)).attribute(x)
    assert ada.converged and ada.num_masks < 3000 and ada.num_masks % 100 == 0
    assert ada.achieved_error < 0.01 <= float(ada.std_error.max()) + 0.01
    assert float(ada.std_error.max()) == pytest.approx(ada.achieved_error)
    # the adaptive map estimates the same R: within a few standard errors of the N = 3000 map
    assert float((ada.importance - fixed.importance).abs().max()) < 5 * 0.01
    corr = torch.corrcoef(torch.stack([ada.importance.flatten(), fixed.importance.flatten()]))[0, 1]
    assert float(corr) > 0.9
    # a target it cannot reach within the maximum: N masks, not converged, error reported
    hard = Relax(f, RelaxConfig(num_masks=200, batch_size=100, cells=4, adaptive=True, target_error=1e-4)).attribute(x)
    assert hard.num_masks == 200 and not hard.converged and hard.achieved_error > 1e-4


def test_progress_and_should_stop():
    seen = []
    out = Relax(Quadrants(), RelaxConfig(num_masks=500, batch_size=100, cells=4)).attribute(
        _image(), progress=seen.append, should_stop=lambda: len(seen) >= 2
    )
    assert [p.num_masks for p in seen] == [100, 200]
    assert out.stopped and out.num_masks == 200
    assert seen[0].fraction == pytest.approx(0.2) and seen[1].importance.shape == (24, 24)
    with pytest.raises(Cancelled):
        Relax(Quadrants(), RelaxConfig(num_masks=10)).attribute(_image(), should_stop=lambda: True)


@pytest.mark.parametrize(
    "kw",
    [
        {"num_masks": 0},
        {"p_keep": 0.0},
        {"p_keep": 1.0},
        {"cells": 0},
        {"masking": "blur"},
        {"threshold": "max"},
        {"gamma": 0.0},
        {"target_error": -1.0},
        {"batch_size": 0},
        {"noise_std": float("nan")},
    ],
)
def test_config_rejects_out_of_range(kw):
    with pytest.raises(InvalidArgument) as e:
        RelaxConfig(**kw)
    assert next(iter(kw)) in str(e.value)


def test_cells_larger_than_the_image_and_colour_on_gray_are_rejected():
    with pytest.raises(InvalidArgument, match="cells"):
        Relax(Quadrants(), RelaxConfig(cells=30)).attribute(_image(24))
    with pytest.raises(InvalidArgument, match="RGB"):
        Relax(Quadrants(), RelaxConfig(masking="colour")).attribute(torch.rand(1, 24, 24))


# --- masking strategies -------------------------------------------------------------------------
def _scene() -> torch.Tensor:
    """Pixel-space RGB image: a red square on a gray-blue background with some texture."""
    g = torch.Generator().manual_seed(0)
    img = torch.empty(3, 32, 32)
    img[:] = torch.tensor([0.3, 0.4, 0.6]).view(3, 1, 1)
    img += 0.1 * torch.rand(3, 32, 32, generator=g)
    img[:, 8:24, 8:24] = torch.tensor([0.9, 0.1, 0.1]).view(3, 1, 1)
    return img.clamp(0, 1)


MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _norm(img):
    return (img - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


def _pixels(x):
    return x * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)


def test_zero_and_noise_masking():
    x = _norm(_scene())
    ones, zeros = torch.ones(1, 32, 32), torch.zeros(1, 32, 32)
    z = make_perturbation(x, "zero")
    torch.testing.assert_close(z.apply(ones)[0], x)
    assert float(z.apply(zeros).abs().max()) == 0.0
    n = make_perturbation(x, "noise", noise_mean=0.5, noise_std=2.0)
    g = torch.Generator().manual_seed(0)
    torch.testing.assert_close(n.apply(ones, g)[0], x)
    d = n.apply(torch.zeros(4, 32, 32), g)  # all masked out: pure N(0.5, 2) noise
    assert abs(float(d.mean()) - 0.5) < 0.1 and abs(float(d.std()) - 2.0) < 0.1
    assert not torch.equal(d[0], d[1])  # fresh noise per mask


def test_colour_masking_replaces_with_grayscale():
    img = _scene()
    p = make_perturbation(_norm(img), "colour", mean=MEAN, std=STD)
    out = _pixels(p.apply(torch.zeros(1, 32, 32))[0])
    torch.testing.assert_close(out[0], out[1], atol=1e-5, rtol=0)  # no colour left
    luma = 0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2]
    torch.testing.assert_close(out[0], luma, atol=1e-5, rtol=0)


def test_shape_masking_uses_the_canny_edges():
    img = _scene()
    edges = canny(0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2])
    # the square's outline is found, its flat interior is not
    assert bool(edges[8:24, 7:9].any(dim=1).all()) and bool(edges[7:9, 8:24].any(dim=0).all())
    assert not bool(edges[12:20, 12:20].any())
    p = make_perturbation(_norm(img), "shape", mean=MEAN, std=STD)
    full = _pixels(p.apply(torch.ones(1, 32, 32))[0])
    torch.testing.assert_close(full[0], edges.float(), atol=1e-5, rtol=0)
    assert float(_pixels(p.apply(torch.zeros(1, 32, 32))[0]).abs().max()) < 1e-5  # E * 0 = black


def test_texture_masking_blurs_but_keeps_edges():
    img = _scene()
    p = make_perturbation(_norm(img), "texture", mean=MEAN, std=STD)
    out = _pixels(p.apply(torch.zeros(1, 32, 32))[0])
    edges = p.floor.bool()
    assert edges.any()
    torch.testing.assert_close(out[:, edges], img[:, edges], atol=1e-5, rtol=0)  # M_t = M OR E
    # the background texture (uniform noise) is smoothed away off the edges
    bg = torch.zeros(32, 32, dtype=torch.bool)
    bg[26:, 26:] = True
    bg &= ~edges
    for c in range(3):
        assert float(out[c][bg].std()) < 0.5 * float(img[c][bg].std())


def test_brightness_masking_lowers_lab_lightness():
    img = _scene()
    torch.testing.assert_close(lab_to_rgb(rgb_to_lab(img)).float(), img, atol=1e-5, rtol=0)
    p = make_perturbation(_norm(img), "brightness", mean=MEAN, std=STD, brightness_delta=20.0)
    out = _pixels(p.apply(torch.zeros(1, 32, 32))[0])
    dl = rgb_to_lab(img)[0] - rgb_to_lab(out)[0]
    # exactly delta in the (in-gamut) background; the saturated red square is clipped to the gamut
    assert float(dl[:, :6].min()) > 19.99 and float(dl[:, :6].max()) < 20.01
    assert float(dl.min()) > 10.0 and float(dl.max()) < 20.01


def test_sharpness_masking_uses_the_laplacian_sharpened_image():
    img = _scene()
    p = make_perturbation(_norm(img), "sharpness", mean=MEAN, std=STD)
    out = _pixels(p.apply(torch.zeros(1, 32, 32))[0])
    lap = 4 * img[:, 16, 24] - img[:, 15, 24] - img[:, 17, 24] - img[:, 16, 23] - img[:, 16, 25]
    torch.testing.assert_close(out[:, 16, 24], (img[:, 16, 24] + lap).clamp(0, 1), atol=1e-5, rtol=0)
    assert float((out - img).abs().max()) > 0.1  # the edge of the square is enhanced


@pytest.mark.parametrize("masking", ["noise", "colour", "shape", "texture", "brightness", "sharpness"])
def test_every_masking_runs_through_relax(masking):
    x = _norm(_scene())
    out = Relax(Quadrants(), RelaxConfig(num_masks=64, batch_size=32, masking=masking), mean=MEAN, std=STD).attribute(x)
    assert out.num_masks == 64 and torch.isfinite(out.importance).all() and out.importance.shape == (32, 32)


def test_png_panels_red_high_blue_low():
    import io

    import numpy as np
    from PIL import Image as PILImage

    from xaiserve.service.render.relax import render_png

    imp = np.array([[0.2, 0.9], [0.5, 0.3]], np.float32)
    unc = np.array([[0.1, 0.0], [0.4, 0.2]], np.float32)
    ur = np.where(unc < 0.15, imp, 0.0)  # keeps (0,0) and (0,1)
    png = np.asarray(PILImage.open(io.BytesIO(render_png(imp, unc, ur))).convert("RGB")).astype(int)
    assert png.shape == (128, 3 * 128 + 2 * 2, 3)  # 2 px enlarged 64x, three panels, 2 px gaps

    def px(panel, i, j):
        r, _, b = png[i * 64 + 32, panel * 130 + j * 64 + 32]
        return r, b

    red, blue = (lambda p: p[0] > p[1] + 100), (lambda p: p[1] > p[0] + 100)
    assert red(px(0, 0, 1)) and blue(px(0, 0, 0))  # importance: max red, min blue
    assert red(px(1, 1, 0)) and blue(px(1, 0, 1))  # uncertainty
    assert red(px(2, 0, 1)) and blue(px(2, 0, 0)) and blue(px(2, 1, 0))  # U-RELAX: filtered -> blue
