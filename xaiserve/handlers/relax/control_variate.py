"""A control-variate (regression-adjusted) estimator of the RELAX importance R (beyond [RELAX]).

[RELAX] estimates R_ij = E[M_ij s] / E[M_ij] (eq. 12 in the limit; the Parzen form of eq. 7) by
the weighted mean sum_n M_n(ij) s_n / sum_n M_n(ij) (Algorithm 1). Its standard error falls like
1/sqrt(N), so the only way to reach the same error with fewer masks (fewer forward passes) is to
reduce the variance. This module does that with a standard Monte Carlo control variate; it is NOT
in [RELAX] and it estimates exactly the same quantity R of eq. 12.

The idea. The similarity s_n of a mask is largely predictable from where the mask keeps the image:
with cheap mask features f(M) (the mask average-pooled to a coarse grid, and by default also the
squares of those pooled values) a least-squares fit s ~ beta0 + beta . f(M) explains about 85% of
the variance of s on the default encoder (8x8 grid, linear + squares; linear alone ~74%). For any
fixed beta,

    E[M_ij s] = E[M_ij (s - beta . f)] + beta . E[M_ij f]
    =>  R_ij = E[M_ij (s - beta . (f - C_ij))] / E[M_ij],    C_ij = E[M_ij f(M)] / E[M_ij],

because E[M_ij (f - C_ij)] = 0 exactly. C_ij depends only on the mask distribution (image size,
grid cells, p) and is computed once per geometry (`feature_expectations`, cached). The estimator is
Algorithm 1's weighted mean applied to the adjusted similarities

    y_n(ij) = s_n - beta_b . (f(M_n) - C_ij)                (b = the batch of mask n)

    R_cv(ij) = sum_n M_n(ij) y_n(ij) / sum_n M_n(ij),

i.e. [sum_n M_n(ij)(s_n - s_hat_n)] / [sum_n M_n(ij)] + E_w[s_hat | ij] with s_hat = beta . f; the
intercept beta0 cancels. To keep every term's expectation right, beta_b is fitted (ridge least
squares, `coefficients`) only on the batches BEFORE batch b: then E[M_n(ij)(f_n - C_ij) | beta_b] = 0
for every mask of batch b (a martingale-difference correction), so the numerator is unbiased for
N E[M_ij s] exactly as the plain one is, and R_cv -> R (eq. 12) as N grows, with the same O(1/N)
ratio-estimator bias as Algorithm 1. The first masks (the "head": whole batches until at least
`min_fit` masks, default 256) have no earlier batches: they are kept and adjusted with the slopes
fitted on all the LATER masks, which are independent of them, so their terms also have expectation
0 (cross-fitting); without this the head would keep the plain estimator's ~4x larger variance per
mask (measured: 1536 -> 1168 masks to the same standard error on the default encoder). While only
the head exists the estimate is the plain one.

Choices, by measurement on the default encoder (scenes-simclr, 64x64, 7x7 cells): R^2 of s on the
pooled features out of sample 0.68 (4x4), 0.74 (7x7 or 8x8), 0.72 (16x16) for linear features and
0.74 / 0.84 / 0.85 / 0.86 (4x4 / 7x7 / 8x8 / 10x10) with the squares added; masks for the adaptive
rule to reach a max standard error of 0.0028: plain > 6000, 8x8 linear 2048, 8x8 + squares 1536
(before the head cross-fit), 10x10 or 12x12 + squares 1488. Hence 8x8 + squares; ridge 16
(0 is unstable while n < F; 1024 costs ~25% more masks).

Within a batch y_n(ij) = r_n + beta_b . C_ij with the scalar residual r_n = s_n - beta_b . f_n, so
a batch reduces with the same matrix product as the plain estimator (estimator.batch_moments on r)
and the per-pixel shift beta_b . C_ij is added to the batch mean before the Chan merge.

Standard error: Algorithm 1's weighted (West) variance of y with Kish's n_eff, exactly as for the
plain estimator (estimator.standard_error). It includes the spread caused by beta changing between
batches. Measured over independent runs (N = 3000, 12 seeds) the reported standard error is
1.09x the actual spread for the control variate and 1.16x for the plain estimator (Kish's formula
is conservative for the continuous bilinear weights); so at the SAME reported standard error the
control variate's actual error is ~5-20% above the plain estimator's (bench/bench_relax_cv.py).
C_ij is computed in closed form (below), not by Monte Carlo, so it adds no Monte Carlo error: it is
exact up to float64 rounding (~1e-15; tested against a brute-force enumeration of every grid and
crop offset of a small geometry and, with z-scores, against a 20k-mask average). A 40k-mask Monte
Carlo C would have had errors up to 0.007 on the default geometry, i.e. a fixed bias beta . dC.
U-RELAX's uncertainty (eq. 13) is NOT changed: it remains the weighted variance of s itself.

C_ij in closed form. Given the crop offsets (o_h, o_w), a mask is bilinear in the 0/1 grid G:
M_ij = sum_ab U_i[a] G_ab U'_j[b] (U = rows of the interpolation matrix, masks.py), and a pooled
feature is f_kl = sum_ab V_k[a] G_ab V'_l[b] with V = P U (P the pooling matrix). With the cells
i.i.d. Bernoulli(p), E[G_a G_b] = p^2 + (p - p^2)[a = b], and for three indices
E[G_a G_b G_c] = p^3 + (p^2 - p^3)([a=b] + [a=c] + [b=c]) + (p - 3p^2 + 2p^3)[a=b=c]. Writing u, v for
the 2-D weight vectors (u_ab = U_i[a] U'_j[b], ...):

    E[M_ij]          = p (sum u)
    E[M_ij f_kl]     = p^2 (sum u)(sum v) + (p - p^2)(u . v)
    E[M_ij f_kl^2]   = p^3 (sum u)(sum v)^2 + (p^2 - p^3)(2 (u . v)(sum v) + (sum u)(v . v))
                       + (p - 3p^2 + 2p^3) sum_a u_a v_a^2

Every product above factorises into a row part (depends on o_h) times a column part (o_w), and the
two offsets are independent and uniform, so the expectation over offsets is the product of 1-D
averages: a few [H, K] and [W, K] arrays. (The clamp to [0, 1] in masks.py is a no-op: the rows of
the interpolation matrix are non-negative and sum to 1.)
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

import torch

from xaiserve.handlers.relax import estimator as est
from xaiserve.handlers.relax.masks import MaskGeometry, interpolation_matrix

DTYPE = torch.float64


# --- features ------------------------------------------------------------------------------------
def pooling_matrix(
    size: int, k: int, dtype: torch.dtype = DTYPE, device: torch.device | str | None = None
) -> torch.Tensor:
    """[k, size]: row r averages pixels floor(r size/k) .. ceil((r+1) size/k) - 1 (the regions of
    torch's adaptive_avg_pool)."""
    if not 1 <= k <= size:
        raise ValueError(f"a pooling grid of {k} does not fit {size} pixels; use 1..{size}")
    p = torch.zeros(k, size, dtype=dtype, device=device)
    for r in range(k):
        lo, hi = (r * size) // k, -(-((r + 1) * size) // k)
        p[r, lo:hi] = 1.0 / (hi - lo)
    return p


@dataclass(frozen=True)
class FeatureSpec:
    """Mask features f(M): the mask average-pooled to a grid_h x grid_w grid (row-major), followed
    by the squares of those values when `quadratic`."""

    grid_h: int
    grid_w: int
    quadratic: bool = True

    @property
    def num_features(self) -> int:
        return self.grid_h * self.grid_w * (2 if self.quadratic else 1)


@lru_cache(maxsize=32)
def _pooling(size: int, k: int, device: torch.device) -> torch.Tensor:
    return pooling_matrix(size, k, device=device)


def mask_features(masks: torch.Tensor, spec: FeatureSpec) -> torch.Tensor:
    """f(M) for a batch of masks [B, H, W] -> [B, F] float64 (pooling as two matrix products)."""
    b, h, w = masks.shape
    ph, pw = _pooling(h, spec.grid_h, masks.device), _pooling(w, spec.grid_w, masks.device)
    f = (ph @ masks.to(DTYPE) @ pw.T).reshape(b, -1)
    return torch.cat([f, f * f], 1) if spec.quadratic else f


# --- C_ij = E[M_ij f(M)] / E[M_ij], exactly ------------------------------------------------------
def _axis_terms(cells: int, up: int, size: int, offsets: int, k: int, device: torch.device) -> list[torch.Tensor]:
    """The 1-D factors of the closed form (module docstring), averaged over the crop offsets:
    [E sum U_i] ([size]) and six [size, k] arrays."""
    a = interpolation_matrix(cells, up, DTYPE, device)
    pool = pooling_matrix(size, k, device=device)
    acc: list[torch.Tensor] | None = None
    for o in range(offsets):
        u = a[o : o + size]  # [size, cells]: the row of every pixel
        v = pool @ u  # [k, cells]
        su, sv, vv = u.sum(1), v.sum(1), (v * v).sum(1)
        uv = u @ v.T
        terms = [
            su,
            su[:, None] * sv[None],  # (sum u)(sum v)
            uv,  # u . v
            su[:, None] * (sv * sv)[None],  # (sum u)(sum v)^2
            uv * sv[None],  # (u . v)(sum v)
            su[:, None] * vv[None],  # (sum u)(v . v)
            u @ (v * v).T,  # sum_a u_a v_a^2
        ]
        acc = terms if acc is None else [x + t for x, t in zip(acc, terms)]
    assert acc is not None
    return [x / offsets for x in acc]


@lru_cache(maxsize=16)
def feature_expectations(
    geometry: MaskGeometry, p_keep: float, spec: FeatureSpec, device: torch.device = torch.device("cpu")
) -> torch.Tensor:
    """C [H*W, F] float64 with C[ij] = E[M_ij f(M)] / E[M_ij] under the mask distribution of
    masks.py (sec. 3.1, [RELAX]), in closed form (module docstring), computed on `device`. Cached
    per geometry and device: treat the result as read-only."""
    g, p = geometry, float(p_keep)
    if not 0.0 < p < 1.0:
        raise ValueError(f"p_keep must be in (0, 1), got {p}")
    h = _axis_terms(g.cells_h, g.up_h, g.height, g.offsets_h, spec.grid_h, device)
    w = _axis_terms(g.cells_w, g.up_w, g.width, g.offsets_w, spec.grid_w, device)

    def outer(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # [H,K] x [W,L] -> [H,W,K*L]
        return torch.einsum("ik,jl->ijkl", a, b).reshape(a.shape[0], b.shape[0], -1)

    e_m = p * h[0][:, None] * w[0][None, :]  # [H, W]
    e_mf = p * p * outer(h[1], w[1]) + (p - p * p) * outer(h[2], w[2])
    parts = [e_mf]
    if spec.quadratic:
        p2, p3 = p * p, p * p * p
        e_mff = (
            p3 * outer(h[3], w[3])
            + (p2 - p3) * (2.0 * outer(h[4], w[4]) + outer(h[5], w[5]))
            + (p - 3.0 * p2 + 2.0 * p3) * outer(h[6], w[6])
        )
        parts.append(e_mff)
    c = torch.cat(parts, 2) / e_m[:, :, None]
    return c.reshape(g.height * g.width, -1).contiguous()


# --- the regression, fitted on earlier batches only ----------------------------------------------
@dataclass(frozen=True)
class Regression:
    """Running sums for least squares of s on x1 = [1, f]: gram = sum x1 x1^T, cross = sum x1 s."""

    gram: torch.Tensor  # [F+1, F+1]
    cross: torch.Tensor  # [F+1]
    count: int = 0


def init_regression(num_features: int, device: torch.device | str | None = None) -> Regression:
    return Regression(
        torch.zeros(num_features + 1, num_features + 1, dtype=DTYPE, device=device),
        torch.zeros(num_features + 1, dtype=DTYPE, device=device),
    )


def accumulate(reg: Regression, feats: torch.Tensor, s: torch.Tensor) -> Regression:
    """Add one batch (features [B, F], similarities [B]) to the running sums."""
    x1 = torch.cat([torch.ones(feats.shape[0], 1, dtype=DTYPE, device=feats.device), feats.to(DTYPE)], 1)
    sv = s.reshape(-1).to(DTYPE)
    return Regression(reg.gram + x1.T @ x1, reg.cross + x1.T @ sv, reg.count + feats.shape[0])


def coefficients(reg: Regression, *, ridge: float = 16.0, min_count: int = 1) -> torch.Tensor:
    """Slopes beta [F] of the ridge least-squares fit of s on f with an intercept (the intercept
    cancels in R_cv and is not returned). The penalty is `ridge` pseudo-masks' worth of each
    feature's variance: (S_xx + ridge * diag(S_xx) / n) beta = S_xs with S the centred sums, so
    it is scale-free and fades as n grows. Zeros (= the plain estimator) before `min_count` masks."""
    f = reg.gram.shape[0] - 1
    n = float(reg.count)
    if reg.count < max(min_count, 2):
        return torch.zeros(f, dtype=DTYPE, device=reg.gram.device)
    mx = reg.gram[0, 1:] / n
    sxx = reg.gram[1:, 1:] - n * torch.outer(mx, mx)
    sxs = reg.cross[1:] - mx * reg.cross[0]
    d = torch.diagonal(sxx).clamp_min(0.0)
    # a feature that never varied (constant so far) gets a unit penalty so the system stays regular
    pen = ridge * d / n + torch.where(d > 0, 0.0, 1.0)
    a = sxx + torch.diag(pen)
    if ridge > 0:  # positive definite: S_xx is PSD and every diagonal entry got a positive penalty
        return torch.linalg.solve(a, sxs)
    # no ridge: the system is singular while n <= F; take the minimum-norm least-squares solution
    return torch.linalg.lstsq(a, sxs[:, None], driver="gelsd").solution[:, 0]


# --- the adjusted batch -----------------------------------------------------------------------------
def adjusted_moments(
    masks: torch.Tensor,
    s: torch.Tensor,
    feats: torch.Tensor,
    beta: torch.Tensor,
    c: torch.Tensor,
    *,
    weight_sq: torch.Tensor | None = None,
) -> est.BatchMoments:
    """Batch moments of y_n(ij) = s_n - beta . (f_n - C_ij) with weights M_n(ij): those of the
    scalar residuals r_n = s_n - beta . f_n (one matrix product), with the mean shifted per pixel by
    beta . C_ij (a shift common to the whole batch leaves the centred sum of squares unchanged)."""
    r = s.reshape(-1).to(DTYPE) - feats.to(DTYPE) @ beta
    mo = est.batch_moments(masks, r, weight_sq=weight_sq)
    shift = (c @ beta).reshape(mo.mean.shape)
    return replace(mo, mean=mo.mean + shift)


# --- the running estimator -------------------------------------------------------------------------
@dataclass(frozen=True)
class CVState:
    """Running state of the control-variate estimator.

    head: the first masks (at least one batch, at least `min_fit` masks), seen before any
    regression exists. They are kept (masks, features, s) and adjusted with the slopes fitted on
    all the LATER masks (`reg_tail`), which are independent of them: each head term still has
    expectation 0 and the head does not stay at the plain estimator's larger variance (cross-fitting).
    tail: every later batch b, adjusted with the slopes fitted on the masks before it (`reg_all`)
    and merged into `tail` (Chan), which also carries Algorithm 1's w_init pseudo-observation.
    """

    head_masks: list[torch.Tensor]
    head_feats: list[torch.Tensor]
    head_s: list[torch.Tensor]
    head_w2: list[torch.Tensor]
    tail: est.WeightedStats
    reg_all: Regression
    reg_tail: Regression

    @property
    def head_count(self) -> int:
        return sum(m.shape[0] for m in self.head_masks)


def init_state(
    shape: tuple[int, int], num_features: int, *, w_init: float = 1e-8, device: torch.device | str | None = None
) -> CVState:
    return CVState(
        [],
        [],
        [],
        [],
        est.init_stats(shape, w_init=w_init, device=device),
        init_regression(num_features, device),
        init_regression(num_features, device),
    )


def update(
    state: CVState,
    masks: torch.Tensor,
    s: torch.Tensor,
    feats: torch.Tensor,
    c: torch.Tensor,
    *,
    ridge: float = 16.0,
    min_fit: int = 256,
    weight_sq: torch.Tensor | None = None,
) -> CVState:
    """Add one batch (masks [B,H,W], similarities [B], features [B,F], C [H*W,F]). Pure: returns a new state."""
    w2 = (masks * masks).sum(0) if weight_sq is None else weight_sq
    reg_all = accumulate(state.reg_all, feats, s)
    if state.tail.count == 0 and (not state.head_masks or state.head_count < min_fit):
        return replace(
            state,
            head_masks=[*state.head_masks, masks.to(torch.float32)],
            head_feats=[*state.head_feats, feats],
            head_s=[*state.head_s, s.reshape(-1).to(DTYPE)],
            head_w2=[*state.head_w2, w2],
            reg_all=reg_all,
        )
    beta = coefficients(state.reg_all, ridge=ridge)  # the masks before this batch only
    tail = est.merge(state.tail, adjusted_moments(masks, s, feats, beta, c, weight_sq=w2))
    return replace(state, tail=tail, reg_all=reg_all, reg_tail=accumulate(state.reg_tail, feats, s))


def head_coefficients(state: CVState, *, ridge: float = 16.0) -> torch.Tensor:
    """The slopes the head is adjusted with: fitted on the tail only (zeros while it is empty)."""
    return coefficients(state.reg_tail, ridge=ridge)


def current(state: CVState, c: torch.Tensor, *, ridge: float = 16.0) -> est.WeightedStats:
    """The estimator's weighted statistics now: mean = R_cv [H,W] (eq. 12 in the limit), m2 and
    weights for the standard error (estimator.standard_error). With no tail yet (one batch) the head
    is adjusted with beta = 0, i.e. it is the plain estimator."""
    if not state.head_masks:
        return state.tail
    beta = head_coefficients(state, ridge=ridge)
    head = adjusted_moments(
        torch.cat(state.head_masks),
        torch.cat(state.head_s),
        torch.cat(state.head_feats),
        beta,
        c,
        weight_sq=torch.stack(state.head_w2).sum(0),
    )
    return est.merge(state.tail, head)
