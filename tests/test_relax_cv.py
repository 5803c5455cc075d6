"""The control-variate estimator of RELAX importance (handlers/relax/control_variate.py; beyond
[RELAX], it estimates R of eq. 12): C_ij = E[M_ij f(M)] / E[M_ij] in closed form against a
brute-force enumeration of every grid and crop offset, exactness when the similarity is a function
the regression can represent, agreement with the plain estimator on a real network, the
integration (progress, two-pass, stopping) and configuration validation."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from xaiserve.errors import InvalidArgument
from xaiserve.handlers.relax import Relax, RelaxConfig
from xaiserve.handlers.relax import control_variate as cv
from xaiserve.handlers.relax import estimator as est
from xaiserve.handlers.relax.masks import generate_masks, mask_geometry

torch.set_num_threads(1)


def _enumerate(geom, p: float):
    """Every (mask, probability) of the sec. 3.1 distribution, built independently of masks.py's
    matrix construction: bilinear F.interpolate of each 0/1 grid, then each crop offset."""
    nc = geom.cells_h * geom.cells_w
    offsets = [(oh, ow) for oh in range(geom.offsets_h) for ow in range(geom.offsets_w)]
    for bits in itertools.product((0.0, 1.0), repeat=nc):
        k = int(sum(bits))
        prob = p**k * (1 - p) ** (nc - k) / len(offsets)
        grid = torch.tensor(bits, dtype=torch.float64).reshape(1, 1, geom.cells_h, geom.cells_w)
        up = F.interpolate(grid, size=(geom.up_h, geom.up_w), mode="bilinear", align_corners=False)[0, 0]
        for oh, ow in offsets:
            yield up[oh : oh + geom.height, ow : ow + geom.width], prob


# --- (c) C_ij --------------------------------------------------------------------------------------
@pytest.mark.parametrize("quadratic", [False, True])
def test_feature_expectations_equal_brute_force_enumeration(quadratic):
    geom = mask_geometry(5, 7, (2, 3))  # non-square: catches a transposed axis
    p = 0.3
    spec = cv.FeatureSpec(2, 3, quadratic)
    c = cv.feature_expectations(geom, p, spec)
    num = torch.zeros(5 * 7, spec.num_features, dtype=torch.float64)
    den = torch.zeros(5 * 7, dtype=torch.float64)
    for m, prob in _enumerate(geom, p):
        f = cv.mask_features(m[None], spec)[0]
        num += prob * m.reshape(-1, 1) * f[None]
        den += prob * m.reshape(-1)
    assert c.shape == (35, spec.num_features)
    torch.testing.assert_close(c, num / den[:, None], rtol=0, atol=1e-12)


@pytest.mark.slow
def test_feature_expectations_match_sampled_masks():
    geom = mask_geometry(24, 24, 4)
    spec = cv.FeatureSpec(8, 8, True)
    c = cv.feature_expectations(geom, 0.5, spec)
    g = torch.Generator().manual_seed(0)
    m = generate_masks(20000, geom, generator=g, dtype=torch.float64)
    f = cv.mask_features(m, spec)
    mm = m.reshape(20000, -1)
    w, w2 = mm.sum(0)[:, None], (mm * mm).sum(0)[:, None]
    mc = (mm.T @ f) / w
    # the Monte Carlo standard error of each weighted mean (Kish n_eff); the closed form has none
    se = torch.sqrt(((mm.T @ (f * f)) / w - mc * mc).clamp_min(0) * w2) / w
    z = (mc - c) / se
    assert float(z.abs().max()) < 6.0 and abs(float(z.mean())) < 0.5
    assert float((mc - c).abs().max()) < 0.02


def test_pooling_matches_adaptive_avg_pool():
    m = torch.rand(3, 13, 10, dtype=torch.float64)
    f = cv.mask_features(m, cv.FeatureSpec(4, 3, False))
    torch.testing.assert_close(f, F.adaptive_avg_pool2d(m[:, None], (4, 3)).reshape(3, -1))
    with pytest.raises(ValueError):
        cv.pooling_matrix(5, 6)


# --- (a) a similarity the regression represents exactly ---------------------------------------------
class PooledSimilarity(nn.Module):
    """An 'encoder' of the all-ones image whose cosine similarity to the reference is exactly
    s(M) = a + b . f(M) (+ c . f(M)^2): the first call embeds the reference x as [1, 0]; every
    masked image (x * M = M) is embedded as [s, sqrt(1 - s^2)]."""

    def __init__(self, spec: cv.FeatureSpec, a: float, b: torch.Tensor, c: torch.Tensor | None = None):
        super().__init__()
        self.spec, self.a, self.b, self.c, self.calls = spec, a, b, c, 0

    def similarity(self, masks: torch.Tensor) -> torch.Tensor:
        lin = cv.mask_features(masks, cv.FeatureSpec(self.spec.grid_h, self.spec.grid_w, False))
        s = self.a + lin @ self.b
        return s if self.c is None else s + (lin * lin) @ self.c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == 1:
            return torch.tensor([[1.0, 0.0]], dtype=torch.float64).expand(x.shape[0], 2)
        s = self.similarity(x[:, 0].double())
        return torch.stack([s, torch.sqrt(1 - s * s)], 1)


@pytest.mark.slow
@pytest.mark.parametrize("quadratic", [False, True])
def test_control_variate_is_exact_when_the_regression_is(quadratic):
    size, cells = 12, 3
    geom = mask_geometry(size, size, cells)
    spec = cv.FeatureSpec(3, 3, quadratic)
    g = torch.Generator().manual_seed(4)
    b = (torch.rand(9, generator=g, dtype=torch.float64) - 0.5) * 0.2
    c = (torch.rand(9, generator=g, dtype=torch.float64) - 0.5) * 0.2 if quadratic else None
    model = PooledSimilarity(spec, 0.3, b, c)
    # the exact R_ij = E[M_ij s] / E[M_ij] (eq. 12), by enumerating every mask (4096 grids x 16 offsets)
    masks, probs = zip(*_enumerate(geom, 0.5))
    mstack = torch.stack(masks)
    pr = torch.tensor(probs, dtype=torch.float64)
    s = model.similarity(mstack)
    num = torch.einsum("n,nhw->hw", pr * s, mstack)
    den = torch.einsum("n,nhw->hw", pr, mstack)
    exact = num / den

    x = torch.ones(1, size, size)
    common = dict(
        num_masks=96, batch_size=32, cells=cells, cv_grid=3, cv_quadratic=quadratic, cv_ridge=0.0, cv_min_fit=32, seed=1
    )
    plain = Relax(PooledSimilarity(spec, 0.3, b, c), RelaxConfig(estimator="plain", **common)).attribute(x)
    ctrl = Relax(model, RelaxConfig(estimator="control_variate", **common)).attribute(x)
    assert ctrl.estimator == "control_variate" and plain.estimator == "plain"
    # 96 masks: the control variate is exact up to float32 cosine rounding and the w_init pseudo-observation
    assert float((ctrl.importance.double() - exact).abs().max()) < 2e-5
    assert float(ctrl.std_error.max()) < 1e-4
    assert float((plain.importance.double() - exact).abs().max()) > 1e-3  # the plain estimator is not
    # U (eq. 13) is still the variance of s itself, the same for both estimators (same masks)
    torch.testing.assert_close(ctrl.uncertainty, plain.uncertainty)


class NonlinearSimilarity(nn.Module):
    """s(M) that the pooled linear + square features cannot represent (products, tanh, sin)."""

    @staticmethod
    def similarity(m: torch.Tensor) -> torch.Tensor:
        f = cv.mask_features(m, cv.FeatureSpec(3, 3, False))
        return 0.5 + 0.3 * torch.tanh(3 * (f[:, 0] * f[:, 8] - f[:, 4] + 0.2)) + 0.1 * torch.sin(5 * f[:, 2] * f[:, 6])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1:  # the reference image (batches of masks have 64 here)
            return torch.tensor([[1.0, 0.0]], dtype=torch.float64)
        s = self.similarity(x[:, 0].double())
        return torch.stack([s, torch.sqrt(1 - s * s)], 1)


@pytest.mark.slow
def test_control_variate_is_unbiased_and_its_standard_error_is_calibrated():
    """Over 200 independent runs of 192 masks, the mean of R_cv is the exact R (eq. 12, by
    enumeration) within its Monte Carlo error, with a regression that cannot fit s exactly; the
    reported standard error matches the spread between runs, which is well below the plain one's."""
    geom = mask_geometry(12, 12, 3)
    ms, ps = zip(*_enumerate(geom, 0.5))
    m, p = torch.stack(ms), torch.tensor(ps, dtype=torch.float64)
    exact = torch.einsum("n,nhw->hw", p * NonlinearSimilarity.similarity(m), m) / torch.einsum("n,nhw->hw", p, m)
    runs = 200
    spread = {}
    for name in ("plain", "control_variate"):
        cfg = dict(num_masks=192, batch_size=64, cells=3, cv_grid=3, cv_min_fit=64, estimator=name)
        outs = [
            Relax(NonlinearSimilarity(), RelaxConfig(seed=k, **cfg)).attribute(torch.ones(1, 12, 12))
            for k in range(runs)
        ]
        r = torch.stack([o.importance.double() for o in outs])
        sd = r.std(0)
        z = (r.mean(0) - exact) / (sd / runs**0.5)
        assert float(z.abs().max()) < 4.5, name  # no bias beyond the Monte Carlo error of the mean
        reported = torch.stack([o.std_error.double() for o in outs]).mean(0)
        assert 0.75 < float((reported / sd).median()) < 1.33, name
        spread[name] = float(sd.mean())
    assert spread["control_variate"] < 0.7 * spread["plain"]


def test_head_is_plain_until_a_later_batch_exists():
    geom = mask_geometry(12, 12, 3)
    spec = cv.FeatureSpec(3, 3, False)
    c = cv.feature_expectations(geom, 0.5, spec)
    g = torch.Generator().manual_seed(0)
    m = generate_masks(40, geom, generator=g, dtype=torch.float64)
    s = torch.rand(40, generator=g, dtype=torch.float64)
    f = cv.mask_features(m, spec)
    st = cv.update(cv.init_state((12, 12), 9), m[:20], s[:20], f[:20], c, min_fit=20)
    plain = est.update_batch(est.init_stats((12, 12)), m[:20], s[:20])
    torch.testing.assert_close(cv.current(st, c).mean, plain.mean)
    st = cv.update(st, m[20:], s[20:], f[20:], c, min_fit=20)
    assert st.head_count == 20 and st.tail.count == 20 and st.reg_tail.count == 20 and st.reg_all.count == 40


# --- (b) a real (small, random) encoder -------------------------------------------------------------
class SmallEncoder(nn.Module):
    """Random convolutions without biases (with biases the embedding of a random network barely
    depends on the content and s ~ 0.999 for every mask)."""

    def __init__(self) -> None:
        super().__init__()
        conv = dict(padding=1, bias=False)
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, **conv), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, **conv), nn.ReLU()
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(3), nn.Flatten(), nn.Linear(72, 16, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@pytest.mark.slow
def test_control_variate_agrees_with_plain_on_a_real_encoder():
    torch.manual_seed(0)
    enc = SmallEncoder().eval()
    x = torch.randn(3, 24, 24, generator=torch.Generator().manual_seed(1)) * 0.5
    x[:, 4:14, 6:18] += 1.5  # an object
    n = 3000
    plain = Relax(enc, RelaxConfig(num_masks=n, batch_size=100, cells=4, seed=1, estimator="plain")).attribute(x)
    ctrl = Relax(enc, RelaxConfig(num_masks=n, batch_size=100, cells=4, seed=2, estimator="control_variate")).attribute(
        x
    )
    small = Relax(
        enc, RelaxConfig(num_masks=300, batch_size=100, cells=4, seed=3, estimator="control_variate")
    ).attribute(x)
    # independent masks, same R (eq. 12): within a few combined standard errors everywhere
    both = torch.sqrt(plain.std_error**2 + ctrl.std_error**2)
    assert float(((ctrl.importance - plain.importance).abs() / both).max()) < 5.0
    corr = torch.corrcoef(torch.stack([ctrl.importance.flatten(), plain.importance.flatten()]))[0, 1]
    assert float(corr) > 0.95
    # variance reduction on a real network: a smaller standard error for the same N
    assert float(plain.importance.max() - plain.importance.min()) > 5 * float(plain.achieved_error)  # a map, not noise
    assert float(ctrl.std_error.max()) < 0.7 * float(plain.std_error.max())
    # approaching the same map: 3000 masks are closer to the plain map than 300 are
    assert float((ctrl.importance - plain.importance).abs().mean()) < float(
        (small.importance - plain.importance).abs().mean()
    )


# --- integration -----------------------------------------------------------------------------------
def _image(size: int = 24) -> torch.Tensor:
    x = torch.full((3, size, size), 0.02)
    x[:, : size // 2, : size // 2] = 1.0
    return x


@pytest.mark.slow
def test_progress_two_pass_and_stop_with_the_control_variate():
    torch.manual_seed(0)
    enc = SmallEncoder().eval()
    seen = []
    cfg = RelaxConfig(num_masks=400, batch_size=100, cells=4, estimator="control_variate", cv_min_fit=100)
    out = Relax(enc, cfg).attribute(_image(), progress=seen.append)
    assert [p.num_masks for p in seen] == [100, 200, 300, 400]
    torch.testing.assert_close(seen[-1].importance, out.importance)
    assert seen[-1].max_std_error == pytest.approx(out.achieved_error)
    two = Relax(enc, RelaxConfig(**{**cfg.to_dict(), "two_pass": True})).attribute(_image())
    torch.testing.assert_close(two.importance, out.importance)
    torch.testing.assert_close(two.uncertainty, out.uncertainty, rtol=1e-5, atol=1e-9)
    again: list = []
    stopped = Relax(enc, cfg).attribute(_image(), progress=again.append, should_stop=lambda: len(again) >= 2)
    assert stopped.stopped and stopped.num_masks == 200
    torch.testing.assert_close(again[-1].importance, stopped.importance)


@pytest.mark.slow
def test_auto_uses_the_control_variate_only_for_the_adaptive_rule():
    assert RelaxConfig().resolved_estimator == "plain"
    assert RelaxConfig(adaptive=True).resolved_estimator == "control_variate"
    assert RelaxConfig(adaptive=True, estimator="plain").resolved_estimator == "plain"
    assert RelaxConfig(estimator="control_variate").resolved_estimator == "control_variate"
    torch.manual_seed(0)
    ada = Relax(
        SmallEncoder().eval(), RelaxConfig(num_masks=3000, batch_size=100, cells=4, adaptive=True, target_error=0.01)
    ).attribute(_image())
    assert ada.estimator == "control_variate" and ada.converged and ada.achieved_error < 0.01
    # a small budget still gets a tail: the head takes at most half of num_masks (default head 256)
    cfg = dict(num_masks=256, batch_size=64, cells=4, seed=5)
    enc = SmallEncoder().eval()
    small_cv = Relax(enc, RelaxConfig(estimator="control_variate", **cfg)).attribute(_image())
    small_plain = Relax(enc, RelaxConfig(estimator="plain", **cfg)).attribute(_image())
    assert small_cv.achieved_error < 0.8 * small_plain.achieved_error
    # a grid finer than the image is capped to the image size
    tiny = Relax(
        SmallEncoder().eval(), RelaxConfig(num_masks=40, batch_size=20, cells=2, estimator="control_variate")
    ).attribute(torch.rand(3, 5, 5))
    assert tiny.importance.shape == (5, 5) and bool(torch.isfinite(tiny.importance).all())


# --- (d) configuration -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw",
    [
        {"estimator": "regression"},
        {"estimator": 1},
        {"cv_grid": 0},
        {"cv_grid": 2.5},
        {"cv_ridge": -1.0},
        {"cv_ridge": float("inf")},
        {"cv_min_fit": -1},
        {"cv_quadratic": "yes"},
    ],
)
def test_config_rejects_bad_control_variate_parameters(kw):
    with pytest.raises(InvalidArgument) as e:
        RelaxConfig(**kw)
    assert next(iter(kw)) in str(e.value)
