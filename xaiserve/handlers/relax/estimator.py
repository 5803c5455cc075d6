"""Running weighted mean and variance of RELAX similarity scores ([RELAX], eq. 12-13, Algorithm 1).

Per pixel (i, j), every mask n contributes the similarity s_n = s(h, h_bar_n) with weight M_ij(n).
Algorithm 1 keeps, mask by mask (West 1979):

    W += m;  R_prev = R;  R += m * (s - R) / W;  U += (s - R) * (s - R_prev) * m
    return R, U / (W - 1)

with W initialised to a small positive number (here `w_init`; R and U start at 0, which is the
same as one pseudo-observation s = 0 of weight w_init). Eq. 13 in the text drops the second factor;
Algorithm 1 (the West update) is the correct one and is what we implement.

`update_batch` does the same for a whole batch of masks at once: it reduces the batch to its own
weighted moments (weight, mean, centred sum of squares) with one matrix product and merges them
into the running statistics with the pairwise formula of Chan, Golub & LeVeque (1979):

    W = Wa + Wb;  d = Rb - Ra;  R = Ra + d * Wb / W;  U = Ua + Ub + d^2 * Wa * Wb / W

which is exact, so it equals the mask-by-mask update up to rounding (tested in float64).
Statistics are kept in float64: the [H, W] state is small and the model forward pass dominates.

Beyond the paper we also keep W2 = sum of squared weights, which gives the standard error of the
weighted mean R (Kish's effective sample size n_eff = W^2 / W2):  SE = sqrt(U / (W - 1) * W2) / W.
The adaptive stopping rule uses it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch

STATS_DTYPE = torch.float64


@dataclass(frozen=True)
class WeightedStats:
    """Per-pixel running statistics: W (sum of weights incl. w_init), W2 (sum of squared mask
    weights), R (weighted mean, eq. 12), U (unnormalised weighted sum of squares, eq. 13)."""

    weight: torch.Tensor
    weight_sq: torch.Tensor
    mean: torch.Tensor
    m2: torch.Tensor
    count: int = 0


def init_stats(
    shape: tuple[int, ...],
    *,
    w_init: float = 1e-8,
    dtype: torch.dtype = STATS_DTYPE,
    device: torch.device | str | None = None,
) -> WeightedStats:
    """Algorithm 1's initial state: R = U = 0, W = w_init (a small positive number), on `device`
    (float64 there too: the statistics are [H, W], small next to the forward passes)."""
    if w_init < 0:
        raise ValueError(f"w_init must be >= 0, got {w_init}")
    z = torch.zeros(shape, dtype=dtype, device=device)
    return WeightedStats(
        torch.full(shape, float(w_init), dtype=dtype, device=device), z.clone(), z.clone(), z.clone(), 0
    )


def sequential_update(stats: WeightedStats, mask: torch.Tensor, s: float | torch.Tensor) -> WeightedStats:
    """One mask of Algorithm 1 ([RELAX]), literally: the reference the batched update is tested against."""
    m = mask.to(stats.mean.dtype)
    s = torch.as_tensor(s, dtype=stats.mean.dtype)
    w = stats.weight + m
    r_prev = stats.mean
    # W can only be 0 when w_init = 0 and no mask has covered the pixel yet; then m = 0 too
    step = torch.where(w > 0, m * (s - r_prev) / torch.where(w > 0, w, 1.0), 0.0)
    r = r_prev + step
    u = stats.m2 + (s - r) * (s - r_prev) * m
    return WeightedStats(w, stats.weight_sq + m * m, r, u, stats.count + 1)


@dataclass(frozen=True)
class BatchMoments:
    """Weighted moments of one batch of masks: weight, squared weight, mean, centred sum of squares."""

    weight: torch.Tensor
    weight_sq: torch.Tensor
    mean: torch.Tensor
    m2: torch.Tensor
    count: int


def batch_moments(
    masks: torch.Tensor,
    s: torch.Tensor,
    *,
    dtype: torch.dtype = STATS_DTYPE,
    weight_sq: torch.Tensor | None = None,
) -> BatchMoments:
    """Moments of a batch: masks [B, *shape], similarities s [B] -> per-pixel moments [*shape].

    One [3, B] x [B, P] product gives sum(m), sum(m s'), sum(m s'^2) with s' = s - mean(s); the
    shift keeps the one-pass sum-of-squares formula well conditioned. `weight_sq` = sum(m^2) over
    the batch may be passed in when it was computed elsewhere (Relax does it off the main thread).
    """
    b = masks.shape[0]
    shape = masks.shape[1:]
    raw = masks.reshape(b, -1)
    m = raw.to(dtype)
    sv = s.reshape(b).to(dtype)
    shift = sv.mean()
    sc = sv - shift
    sums = torch.stack([torch.ones_like(sc), sc, sc * sc]) @ m  # [3, P]
    w, sw, sww = sums[0], sums[1], sums[2]
    mean_c = torch.where(w > 0, sw / torch.where(w > 0, w, 1.0), 0.0)
    m2 = (sww - mean_c * sw).clamp_min(0.0)
    w2 = (raw * raw).sum(0).to(dtype) if weight_sq is None else weight_sq.reshape(-1).to(dtype)
    return BatchMoments(w.reshape(shape), w2.reshape(shape), (mean_c + shift).reshape(shape), m2.reshape(shape), b)


def merge(a: WeightedStats, b: BatchMoments | WeightedStats) -> WeightedStats:
    """Chan et al. (1979) pairwise merge of two sets of weighted moments (exact)."""
    w = a.weight + b.weight
    safe = torch.where(w > 0, w, 1.0)
    d = b.mean - a.mean
    r = torch.where(w > 0, a.mean + d * (b.weight / safe), a.mean)
    u = a.m2 + b.m2 + torch.where(w > 0, d * d * (a.weight * b.weight / safe), 0.0)
    return WeightedStats(w, a.weight_sq + b.weight_sq, r, u, a.count + b.count)


def update_batch(
    stats: WeightedStats, masks: torch.Tensor, s: torch.Tensor, *, weight_sq: torch.Tensor | None = None
) -> WeightedStats:
    """Algorithm 1 for a whole batch of masks at once (same numbers as `sequential_update` in a loop)."""
    return merge(stats, batch_moments(masks, s, dtype=stats.mean.dtype, weight_sq=weight_sq))


def variance(stats: WeightedStats) -> torch.Tensor:
    """U / (W - 1), the output of Algorithm 1 (eq. 9 with frequency weights).

    Where W <= 1 the variance is not identifiable from the data; we return +inf there ("as
    uncertain as it gets"), so U-RELAX drops such pixels and the adaptive rule never stops on them.
    """
    den = stats.weight - 1.0
    return torch.where(den > 0, stats.m2 / torch.where(den > 0, den, 1.0), torch.inf)


def standard_error(stats: WeightedStats) -> torch.Tensor:
    """Standard error of R per pixel: sqrt(variance * W2) / W (n_eff = W^2 / W2); +inf where W <= 1."""
    var = variance(stats)
    return torch.sqrt(var * stats.weight_sq) / stats.weight.clamp_min(torch.finfo(stats.weight.dtype).tiny)


def two_pass(
    batches: Callable[[], Iterable[torch.Tensor]],
    s: torch.Tensor,
    *,
    w_init: float = 1e-8,
    dtype: torch.dtype = STATS_DTYPE,
) -> WeightedStats:
    """The two-pass estimator ([RELAX] sec. 3.4, Appendix D): R by eq. 2 (weighted as in eq. 12),
    then U = sum_n M(n) (s_n - R)^2 (eq. 9) in a second pass over the same masks.

    `batches()` must yield the same masks, in order, every time it is called (we replay a saved
    generator state); `s` holds the similarities of all masks in that order. The same w_init
    pseudo-observation (s = 0) as the one-pass update is included so that both agree exactly.
    """
    sv = s.reshape(-1).to(dtype)
    w = w2 = sw = None
    i = 0
    for m in batches():  # pass 1: weights and weighted sum
        b = m.shape[0]
        mm = m.reshape(b, -1).to(dtype)
        part = sv[i : i + b] @ mm
        sw = part if sw is None else sw + part
        ws, w2s = mm.sum(0), torch.einsum("bp,bp->p", mm, mm)
        w = ws if w is None else w + ws
        w2 = w2s if w2 is None else w2 + w2s
        shape = m.shape[1:]
        i += b
    if w is None:
        raise ValueError("two_pass needs at least one batch of masks")
    if i != sv.numel():
        raise ValueError(f"{sv.numel()} similarities for {i} masks")
    wt = w + w_init
    r = torch.where(wt > 0, sw / torch.where(wt > 0, wt, 1.0), 0.0)
    u = w_init * r * r  # the pseudo-observation's squared deviation
    i = 0
    for m in batches():  # pass 2: weighted squared deviations from the final R
        b = m.shape[0]
        mm = m.reshape(b, -1).to(dtype)
        dev = sv[i : i + b, None] - r[None, :]
        u = u + (mm * dev * dev).sum(0)
        i += b
    return WeightedStats(wt.reshape(shape), w2.reshape(shape), r.reshape(shape), u.reshape(shape), i)
