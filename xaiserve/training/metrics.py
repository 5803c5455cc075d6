"""Explanation metrics: localisation, complexity, faithfulness (pure numpy / torch).

Definitions follow the papers ([RELAX] sec. 4.1, [NEM-U] sec. 4.2 and Appendix A / Table 3,
[NEMt] sec. 4.3) and METHODS.md "Evaluation metrics":

- every attribution map is min-max normalised per image first ([NEM-U] sec. 4.2, [NEMt] sec. 4.3);
  a constant map carries no ranking and is normalised to all ones (uniform attribution), so it
  scores chance level on localisation rather than NaN;
- the ground truth is the union of the object masks of an image ([RELAX] sec. 4.1: "collected into
  one unified segmentation mask").

Shapes: attribution maps `a` are [B,H,W] (or [H,W], treated as B = 1), ground truth `gt` is bool
[B,H,W] or [B,K,H,W] (K object masks, united). Every function returns one float64 score per image.

Relation to Quantus 0.6.0 (tests/test_metrics.py checks each relation on random samples):
- pointing game: Quantus scores a hit if *any* maximal pixel lies in the ground truth, so a constant
  map always hits. Here the score is the fraction of maximal pixels inside the ground truth: equal
  to Quantus when the maximum is unique, never above it, and chance level (|GT|/HW) for a constant map.
- relevance rank: same as Quantus's RelevanceRankAccuracy (top-k, k = |GT|, fraction inside GT) for
  maps without ties; Quantus breaks ties by argsort order, here tied pixels at the k-th value count
  at their expectation under a random tie-break (deterministic, and not biased to the image top).
  [NEMt] sec. 4.3 describes an IoU of the top-k set with the box instead; with k = |GT| that is
  r / (2 - r) of this score r (a monotone transform, so rankings of methods agree).
- top-k intersection: same as Quantus's TopKIntersection for maps without ties; k defaults to
  Quantus's k = 1000 scaled by area to our image size (82 on 64 x 64), ties as in relevance rank.
- relevance mass, complexity, sparseness: Quantus applied to the min-max normalised map gives the
  same value (Quantus normalises by the maximum, which leaves these scale-invariant ratios unchanged
  once the map is non-negative); Quantus's epsilons (1e-12 in the log, 1e-7 added in the Gini)
  make differences below 1e-5.
- monotonicity: Quantus's MonotonicityCorrelation perturbs one input element (one channel of one
  pixel) at a time; here a feature is a patch x patch square over all channels (a pixel would need
  H*W*n_samples forward passes per image). With patch = 1, one channel, a fixed baseline and one
  sample the two agree exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from scipy.special import xlogy
from scipy.stats import spearmanr

from xaiserve.errors import InvalidArgument
from xaiserve.handlers.fidelity import fidelity as fidelity_score

# Relative tolerance for "equal to the maximum" in the pointing game: min-max normalised maps are
# in [0, 1], and float32 attributions that differ by less than this are ties, not a ranking.
_MAX_TIE = 1e-6


def _as_maps(a: np.ndarray | torch.Tensor, what: str = "attribution") -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    a = np.asarray(a, dtype=np.float64)
    if a.ndim == 2:
        a = a[None]
    if a.ndim == 4 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 3:
        raise InvalidArgument(f"{what} maps must be [B,H,W] (or [H,W], [B,1,H,W]); got shape {list(a.shape)}")
    if not np.all(np.isfinite(a)):
        raise InvalidArgument(f"{what} maps contain NaN or infinite values")
    return a


def ground_truth(gt: np.ndarray | torch.Tensor) -> np.ndarray:
    """Union of the object masks: bool [B,H,W] from [H,W], [B,H,W] or [B,K,H,W] ([RELAX] sec. 4.1)."""
    if isinstance(gt, torch.Tensor):
        gt = gt.detach().cpu().numpy()
    g = np.asarray(gt) > 0
    if g.ndim == 2:
        g = g[None]
    if g.ndim == 4:
        g = g.any(axis=1)
    if g.ndim != 3:
        raise InvalidArgument(f"ground truth must be [B,H,W] or [B,K,H,W]; got shape {list(g.shape)}")
    return g


def _pair(a, gt) -> tuple[np.ndarray, np.ndarray]:
    m = normalise_maps(a)
    g = ground_truth(gt)
    if m.shape != g.shape:
        raise InvalidArgument(f"attribution maps {list(m.shape)} and ground truth {list(g.shape)} differ in shape")
    if not np.all(g.reshape(len(g), -1).any(axis=1)):
        raise InvalidArgument("a ground-truth mask is empty; localisation metrics need at least one object pixel")
    return m, g


def normalise_maps(a: np.ndarray | torch.Tensor) -> np.ndarray:
    """Min-max normalise each map to [0, 1] ([NEM-U] sec. 4.2: m' = (m - min m) / (max m - min m)).

    A constant map has no ranking; it becomes all ones (uniform attribution) instead of 0/0.
    """
    a = _as_maps(a)
    flat = a.reshape(len(a), -1)
    lo = flat.min(axis=1, keepdims=True)
    span = flat.max(axis=1, keepdims=True) - lo
    const = span[:, 0] <= 0
    out = (flat - lo) / np.where(span > 0, span, 1.0)
    out[const] = 1.0
    return out.reshape(a.shape)


def pointing_game(a, gt) -> np.ndarray:
    """Is the most important pixel inside the ground truth ([RELAX] sec. 4.1, Zhang et al. 2018).

    With ties for the maximum, the score is the fraction of maximal pixels inside the ground truth
    (1 or 0 for a unique maximum).
    """
    m, g = _pair(a, gt)
    flat, gflat = m.reshape(len(m), -1), g.reshape(len(g), -1)
    is_max = flat >= flat.max(axis=1, keepdims=True) - _MAX_TIE
    return (is_max & gflat).sum(axis=1) / is_max.sum(axis=1)


def relevance_rank(a, gt) -> np.ndarray:
    """Fraction of the k most important pixels inside the ground truth, k = |GT| (Arras et al. 2022;
    [NEM-U] sec. 4.2).

    Ties at the k-th value (saturated masks have many pixels at exactly 1) are counted at their
    expectation under a random tie-break: the pixels strictly above the k-th value, plus the
    remaining slots times the fraction of tied pixels inside the ground truth. Breaking ties by pixel
    order instead would favour objects near the top of the image."""
    m, g = _pair(a, gt)
    flat, gflat = m.reshape(len(m), -1), g.reshape(len(g), -1)
    k = gflat.sum(axis=1)
    return _top_k_hits(flat, gflat, k) / k


def _top_k_hits(flat: np.ndarray, gflat: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Ground-truth pixels among the k[i] highest values of each map [N, P], ties at the k-th value
    counted at their expectation under a random tie-break: the pixels strictly above it, plus the
    remaining slots times the fraction of the tied pixels that lie inside the ground truth."""
    kth = -np.sort(-flat, axis=1)[np.arange(len(flat)), k - 1][:, None]
    above, tied = flat > kth, flat == kth
    slots = k - above.sum(axis=1)
    return (above & gflat).sum(axis=1) + slots * (tied & gflat).sum(axis=1) / tied.sum(axis=1)


# Quantus 0.6.0's TopKIntersection default, k = 1000 pixels of a 224 x 224 image ([RELAX]'s setting).
QUANTUS_TOP_K = 1000
QUANTUS_TOP_K_AREA = 224 * 224


def top_k_for(h: int, w: int) -> int:
    """Quantus's default k scaled to an h x w image by area: round(1000 * h*w / 224^2), at least 1
    (82 for 64 x 64, 20 for 32 x 32): the same fraction (2.0 %) of the image as in [RELAX]."""
    return max(1, round(QUANTUS_TOP_K * h * w / QUANTUS_TOP_K_AREA))


def top_k_intersection(a, gt, k: int | None = None) -> np.ndarray:
    """Top-k intersection ([RELAX] sec. 4.1, Table 1 "top k"; Theiner et al. 2021 via Quantus
    TopKIntersection): binarise the map to its k most important pixels and measure the intersection
    with the ground truth, divided by k. [RELAX] gives no k; it used Quantus, whose default is k = 1000
    on 224 x 224 inputs. Our images are smaller, so k = None scales that default by area
    (`top_k_for`: k = round(1000 * 64*64 / 224^2) = 82 on the 64 x 64 scenes); pass k to fix it.

    With k fixed rather than k = |GT| (relevance rank), a ground truth smaller than k caps the score at
    |GT| / k, as in Quantus. Ties at the k-th value are counted at their expectation under a random
    tie-break, as in `relevance_rank` (Quantus breaks them by argsort order): for maps without ties the
    score equals Quantus's, and a constant map scores chance level |GT| / (H*W)."""
    m, g = _pair(a, gt)
    flat, gflat = m.reshape(len(m), -1), g.reshape(len(g), -1)
    n_pix = flat.shape[1]
    k = top_k_for(*m.shape[1:]) if k is None else int(k)
    if not 1 <= k <= n_pix:
        raise InvalidArgument(
            f"top-k intersection needs 1 <= k <= {n_pix} (the pixels of a {m.shape[1]}x{m.shape[2]} map); got k = {k}"
        )
    return _top_k_hits(flat, gflat, np.full(len(flat), k)) / k


def relevance_mass(a, gt) -> np.ndarray:
    """Positive attribution inside the ground truth / all positive attribution (Arras et al. 2022;
    [NEM-U] sec. 4.2, [NEMt] sec. 4.3). After min-max normalisation every value is >= 0."""
    m, g = _pair(a, gt)
    flat, gflat = m.reshape(len(m), -1), g.reshape(len(g), -1)
    pos = np.clip(flat, 0.0, None)
    return (pos * gflat).sum(axis=1) / pos.sum(axis=1)


def complexity(a) -> np.ndarray:
    """Entropy (nats) of the normalised attribution as a distribution over pixels, p = |m| / sum |m|
    (Bhatt et al. 2020; [NEM-U] sec. 4.2). Lower is simpler; log(H*W) for a uniform map."""
    m = normalise_maps(a)
    flat = np.abs(m.reshape(len(m), -1))
    p = flat / flat.sum(axis=1, keepdims=True)
    # xlogy gives 0 * log 0 = 0, the entropy convention (Quantus adds 1e-12 inside the log instead).
    return -xlogy(p, p).sum(axis=1)


def sparseness(a) -> np.ndarray:
    """Gini index of |m| (Chalasani et al. 2020; [NEM-U] sec. 4.2): 0 for a uniform map, -> 1 for one
    pixel. Gini = sum_i (2i - n - 1) m_(i) / (n sum m) over the ascending sorted values."""
    m = normalise_maps(a)
    flat = np.sort(np.abs(m.reshape(len(m), -1)), axis=1)
    n = flat.shape[1]
    i = np.arange(1, n + 1)[None, :]
    return ((2 * i - n - 1) * flat).sum(axis=1) / (n * flat.sum(axis=1))


# -- faithfulness -------------------------------------------------------------------------------

Forward = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def fidelity(
    forward: Forward, x: torch.Tensor, a, *, kind: str = "encoder", targets=None, batch_size: int = 64
) -> np.ndarray:
    """The fidelity of each map ([NEM-U] sec. 3.1 and Appendix A, Table 3 "accuracy"), the same
    definition as Explain's fidelity option (handlers/fidelity.py): for a classifier (`forward`
    returns logits, `targets` the explained labels) softmax(Phi(x * m))_target; for an encoder
    cos(Phi(x), Phi(x * m)). m = the min-max normalised map broadcast over channels; x * m is pixel
    scaling in normalised space, so a removed pixel becomes the dataset mean (METHODS.md)."""
    m = torch.from_numpy(normalise_maps(a)).float()
    if x.ndim != 4 or x.shape[0] != m.shape[0] or tuple(x.shape[2:]) != tuple(m.shape[1:]):
        raise InvalidArgument(f"images {list(x.shape)} do not match maps {list(m.shape)}")
    if kind == "classifier":
        if targets is None:
            raise InvalidArgument("a classifier's fidelity needs the target labels")
        targets = np.asarray(targets, dtype=np.int64).reshape(-1)
        if len(targets) != x.shape[0]:
            raise InvalidArgument(f"{len(targets)} targets for {x.shape[0]} images")
    out = []
    for i in range(0, x.shape[0], batch_size):
        xb, mb = x[i : i + batch_size], m[i : i + batch_size, None].to(x.device)
        with torch.no_grad():
            h = forward(torch.cat([xb, xb * mb])).float().cpu().numpy()
        h0, h1 = h[: len(xb)], h[len(xb) :]
        out.append(fidelity_score(kind, h0, h1, None if targets is None else targets[i : i + batch_size]))
    return np.concatenate(out).astype(np.float64)


def fidelity_vs_random(
    forward: Forward,
    x: torch.Tensor,
    a,
    *,
    kind: str = "encoder",
    targets=None,
    fidelity_scores: np.ndarray | None = None,
    seed: int = 0,
    batch_size: int = 64,
) -> np.ndarray:
    """Fidelity of each map over the fidelity of a random map of the same area: the same normalised
    map with its pixels randomly permuted (identical values, so identical mean(m) and L1 area).
    The fidelity rewards area (METHODS.md, decision 2026-12); this ratio does not: 1 = no better than
    keeping the same amount of the image at random places, > 1 = the map's placement matters.
    Each image's fidelity is divided by the MEAN random fidelity over the images, so the mean of the
    result is the ratio of the means (a per-image ratio is heavy-tailed: a random map that keeps a
    near-zero target probability sends it to millions). `fidelity_scores` reuses already computed
    fidelity(forward, x, a) values."""
    maps = normalise_maps(a)
    n = len(maps)
    rng = np.random.default_rng(seed)
    flat = maps.reshape(n, -1)
    shuffled = np.stack([row[rng.permutation(row.size)] for row in flat]).reshape(maps.shape)
    own = (
        fidelity(forward, x, maps, kind=kind, targets=targets, batch_size=batch_size)
        if fidelity_scores is None
        else np.asarray(fidelity_scores, dtype=np.float64)
    )
    rand = fidelity(forward, x, shuffled, kind=kind, targets=targets, batch_size=batch_size)
    return own / max(float(rand.mean()), 1e-12)


BORDER_PX = 3


def border_band(h: int, w: int, width: int = BORDER_PX) -> np.ndarray:
    """[h, w] bool: the pixels within `width` px of the image border."""
    band = np.zeros((h, w), dtype=bool)
    band[:width], band[-width:], band[:, :width], band[:, -width:] = True, True, True, True
    return band


def border_chance(h: int, w: int, width: int = BORDER_PX) -> float:
    """The share of pixels within `width` px of the border: where a map's maximum falls by chance
    (0.179 at 64 x 64 with 3 px)."""
    return float(border_band(h, w, width).mean())


def border_argmax(a, width: int = BORDER_PX) -> np.ndarray:
    """Per map, the share of its maximal pixels (all tied maxima, as the pointing game) that lie within
    `width` px of the border. A decoder padding artefact shows as a share far above border_chance
    (measured on the served NEM-U: see docs/evaluation)."""
    maps = _as_maps(a)
    n, h, w = maps.shape
    band = border_band(h, w, width).reshape(-1)
    flat = maps.reshape(n, -1)
    top = flat >= flat.max(axis=1, keepdims=True)
    return (top & band[None]).sum(axis=1) / top.sum(axis=1)


def mask_size(a) -> np.ndarray:
    """L1 norm of the normalised mask per pixel, mean(m) in [0, 1] ([NEM-U] Table 3 "complexity":
    the naive mask that removes half of the pixels scores 0.50)."""
    return normalise_maps(a).reshape(len(_as_maps(a)), -1).mean(axis=1)


def accuracy_per_complexity(fidelity_scores: np.ndarray, a) -> np.ndarray:
    """[NEM-U] Appendix A, Table 3: score = accuracy / complexity, with accuracy = cos(Phi(x), Phi(x*m))
    (`fidelity`) and complexity = ||m||_1 / (H*W) (`mask_size`). Higher is better; a map of all ones
    scores its fidelity (1.0), a map that keeps 25% of the image with fidelity 0.87 scores 3.48."""
    size = mask_size(a)
    fid = np.asarray(fidelity_scores, dtype=np.float64)
    if fid.shape != size.shape:
        raise InvalidArgument(f"{fid.shape[0] if fid.ndim else 1} fidelity scores for {size.shape[0]} maps")
    # A mask that keeps nothing has no defined score (0/0 in the paper's formula).
    return np.where(size > 0, fid / np.maximum(size, 1e-12), np.nan)


@dataclass(frozen=True)
class MonotonicityConfig:
    """Nguyen & Martinez 2020 monotonicity ([RELAX] sec. 4.1, [NEM-U] Table 4, [NEMt] sec. 4.3).

    patch: side of the square features (all channels of a patch are one feature);
    baseline: "noise" replaces a feature by N(0, 1) draws in normalised space (the data distribution
    per channel, as RELAX's noise masking, [RELAX] Appendix A), "zero" by 0 (the dataset mean);
    n_samples: perturbation draws per feature ("zero" needs only one).
    """

    patch: int = 8
    baseline: str = "noise"
    n_samples: int = 4
    eps: float = 1e-5
    batch_size: int = 256
    seed: int = 0


def _check_monotonicity(cfg: MonotonicityConfig, h: int, w: int) -> None:
    if cfg.baseline not in ("noise", "zero"):
        raise InvalidArgument(f"monotonicity baseline {cfg.baseline!r}: use 'noise' or 'zero'")
    if cfg.patch < 1 or cfg.n_samples < 1:
        raise InvalidArgument("monotonicity patch and n_samples must be >= 1")
    if h % cfg.patch or w % cfg.patch:
        raise InvalidArgument(f"monotonicity patch {cfg.patch} must divide the image size {h}x{w}")


@torch.no_grad()
def perturbation_variance(
    classifier: Forward,
    x: torch.Tensor,
    target: torch.Tensor | np.ndarray,
    config: MonotonicityConfig = MonotonicityConfig(),
) -> np.ndarray:
    """Per image and feature (patch): E[(p(x) - p(x with the feature perturbed))^2] / p(x)^2, p the
    softmax probability of the target class (Nguyen & Martinez 2020). [B, n_features].

    It does not depend on the attribution: compute it once per image and score every method's map
    against it (`monotonicity(..., variance=...)`). The noise draws are seeded by config.seed."""
    cfg = config
    B, C, H, W = x.shape
    _check_monotonicity(cfg, H, W)
    target = torch.as_tensor(target, dtype=torch.long).reshape(-1)
    if target.numel() != B:
        raise InvalidArgument(f"{target.numel()} targets for {B} images")
    gh, gw = H // cfg.patch, W // cfg.patch
    n_feat = gh * gw
    # feature id of every pixel, row-major over the patch grid
    fid = torch.arange(n_feat).view(gh, gw).repeat_interleave(cfg.patch, 0).repeat_interleave(cfg.patch, 1)
    onehot = F.one_hot(fid.flatten(), n_feat).T.view(n_feat, 1, H, W).float()  # [F,1,H,W]
    samples = 1 if cfg.baseline == "zero" else cfg.n_samples
    gen = torch.Generator().manual_seed(cfg.seed)
    out = np.empty((B, n_feat))
    for b in range(B):
        xb = x[b : b + 1]
        p0 = torch.softmax(classifier(xb).float(), dim=1)[0, target[b]].item()
        inv = 1.0 / p0**2 if abs(p0) >= cfg.eps else 1.0
        sq = torch.zeros(n_feat, dtype=torch.float64)
        for _ in range(samples):
            for i in range(0, n_feat, cfg.batch_size):
                sel = onehot[i : i + cfg.batch_size].to(x.device)
                if cfg.baseline == "zero":
                    repl = torch.zeros(1, C, H, W, device=x.device)
                else:
                    repl = torch.randn(len(sel), C, H, W, generator=gen).to(x.device)
                xp = xb * (1 - sel) + repl * sel
                p = torch.softmax(classifier(xp).float(), dim=1)[:, target[b]].cpu().double()
                sq[i : i + len(sel)] += (p - p0) ** 2
        out[b] = (sq / samples).numpy() * inv
    return out


def monotonicity(
    classifier: Forward | None,
    x: torch.Tensor,
    a,
    target: torch.Tensor | np.ndarray | None = None,
    config: MonotonicityConfig = MonotonicityConfig(),
    *,
    variance: np.ndarray | None = None,
) -> np.ndarray:
    """Monotonicity correlation (Nguyen & Martinez 2020): Spearman correlation between each feature's
    attribution |a_i| (summed over the patch) and the normalised variance of the target-class
    probability when that feature alone is perturbed (`perturbation_variance`, or pass it precomputed).
    Higher is better: features with more attribution should move the prediction more."""
    cfg = config
    m = normalise_maps(a)
    B, C, H, W = x.shape
    if m.shape != (B, H, W):
        raise InvalidArgument(f"images {list(x.shape)} do not match maps {list(m.shape)}")
    _check_monotonicity(cfg, H, W)
    if variance is None:
        if classifier is None or target is None:
            raise InvalidArgument("monotonicity needs the classifier and targets, or a precomputed variance")
        variance = perturbation_variance(classifier, x, target, cfg)
    gh, gw = H // cfg.patch, W // cfg.patch
    if variance.shape != (B, gh * gw):
        raise InvalidArgument(f"variance {list(variance.shape)} does not fit {B} images of {gh * gw} patches")
    out = np.empty(B)
    for b in range(B):
        var = variance[b]
        att = np.abs(m[b]).reshape(gh, cfg.patch, gw, cfg.patch).sum(axis=(1, 3)).reshape(-1)
        # A constant map or a prediction no feature moves has no correlation: score it 0, not NaN.
        if np.ptp(att) == 0 or np.ptp(var) == 0:
            out[b] = 0.0
            continue
        rho = spearmanr(att, var).statistic
        out[b] = float(rho) if np.isfinite(rho) else 0.0
    return out


# -- faithfulness without ground truth: deletion and insertion ----------------------------------------

Score = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (batch, rows of x it came from) -> [B]


@torch.no_grad()
def deletion_insertion(
    score: Score, x: torch.Tensor, a, *, steps: int = 16, batch_size: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """Deletion and insertion curves (Petsiuk, Das and Saenko 2018, "RISE", sec. 4.1), as the area
    under each curve per image, for data without ground-truth masks.

    Pixels are ranked by the map (highest first). Deletion: the top k/steps of the pixels are set to
    0 in normalised space (the dataset mean, as every masking here) for k = 0..steps, and
    score(x_k) is recorded; insertion: the same fractions are revealed on an all-mean image. The
    area is the mean of the curve by the trapezoid rule over [0, 1]. A faithful map makes the
    score drop fast when deleting (low deletion AUC) and rise fast when inserting (high insertion
    AUC). `score(batch, idx)` says how much of image idx's decision a perturbed copy keeps: the
    target class probability for a classifier, the cosine to the original embedding for an encoder.
    Ties in a map are broken by pixel order (a constant map deletes in raster order)."""
    if steps < 1:
        raise InvalidArgument("deletion/insertion steps must be >= 1")
    maps = normalise_maps(a)
    n, h, w = maps.shape
    if x.ndim != 4 or x.shape[0] != n or tuple(x.shape[2:]) != (h, w):
        raise InvalidArgument(f"images {list(x.shape)} do not match maps {list(maps.shape)}")
    order = np.argsort(-maps.reshape(n, -1), axis=1, kind="stable")
    ranks = np.empty_like(order)
    rows = np.arange(n)[:, None]
    ranks[rows, order] = np.arange(h * w)[None, :]
    ranks_t = torch.from_numpy(ranks.reshape(n, 1, h, w))
    fracs = np.linspace(0.0, 1.0, steps + 1)
    curves = {"deletion": np.empty((n, steps + 1)), "insertion": np.empty((n, steps + 1))}
    jobs = [(i, j) for i in range(n) for j in range(steps + 1)]
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        idx = torch.tensor([i for i, _ in chunk])
        keep = torch.stack([ranks_t[i] >= int(round(fracs[j] * h * w)) for i, j in chunk]).to(
            x.dtype
        )  # 1 = not yet removed
        xb = x[idx]
        for name, batch in (("deletion", xb * keep), ("insertion", xb * (1 - keep))):
            vals = score(batch, idx).double().cpu().numpy()
            for (i, j), v in zip(chunk, vals):
                curves[name][i, j] = v
    auc = {
        k: np.trapezoid(c, fracs, axis=1) if hasattr(np, "trapezoid") else np.trapz(c, fracs, axis=1)
        for k, c in curves.items()
    }
    return auc["deletion"], auc["insertion"]


# -- everything at once ---------------------------------------------------------------------------

LOCALISATION = ("pointing_game", "top_k_intersection", "relevance_rank", "relevance_mass")
MAP_METRICS = LOCALISATION + ("complexity", "sparseness")


def map_scores(a, gt) -> dict[str, np.ndarray]:
    """The metrics that need only the maps and the ground truth, per image."""
    return {
        "pointing_game": pointing_game(a, gt),
        "top_k_intersection": top_k_intersection(a, gt),
        "relevance_rank": relevance_rank(a, gt),
        "relevance_mass": relevance_mass(a, gt),
        "complexity": complexity(a),
        "sparseness": sparseness(a),
    }
