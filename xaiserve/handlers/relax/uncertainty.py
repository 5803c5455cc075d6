"""U-RELAX: uncertainty-filtered importance ([RELAX], eq. 10-11) and the mask-count bound (Theorem 1).

eq. 10:  R'_ij = R_ij if U_ij < eps, else 0
eq. 11:  eps = gamma / (H W) * sum_ij U_ij     ("mean" rule), or eps = gamma * median(U) ("median")
The paper's default is the median with gamma = 1 (METHODS.md).

Pixels whose uncertainty is +inf (no identifiable variance, see estimator.variance) never pass the
filter and are left out of the mean / median.
"""

from __future__ import annotations

import math

import torch

THRESHOLD_RULES = ("median", "mean")


def _median(v: torch.Tensor) -> torch.Tensor:
    """The conventional median (mean of the two middle values for an even count)."""
    s, _ = torch.sort(v)
    n = s.numel()
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def threshold(uncertainty: torch.Tensor, rule: str = "median", gamma: float = 1.0) -> float:
    """eps for U-RELAX: gamma * mean(U) (eq. 11) or gamma * median(U), over the finite values."""
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"unknown threshold rule {rule!r}; use one of {THRESHOLD_RULES}")
    if not gamma > 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    u = uncertainty.reshape(-1)
    u = u[torch.isfinite(u)]
    if u.numel() == 0:
        return math.inf
    centre = u.mean() if rule == "mean" else _median(u)
    return float(gamma * centre)


def u_relax(importance: torch.Tensor, uncertainty: torch.Tensor, eps: float) -> torch.Tensor:
    """eq. 10: keep the importance where the uncertainty is strictly below eps, zero elsewhere."""
    return torch.where(uncertainty < eps, importance, torch.zeros_like(importance))


def hoeffding_num_masks(t: float, delta: float) -> int:
    """Theorem 1 (eq. 4): the smallest N with N >= -ln(delta/2) / (2 t^2).

    For t = 0.01, delta = 0.01 this is 26,492; the paper's N = 3000 corresponds to t ~ 0.03.
    """
    if not (t > 0 and 0 < delta < 1):
        raise ValueError("need t > 0 and 0 < delta < 1")
    return math.ceil(-math.log(delta / 2) / (2 * t * t))


def hoeffding_error(n: int, delta: float) -> float:
    """Theorem 1 inverted: the t guaranteed with probability 1 - delta by N = n masks."""
    if not (n >= 1 and 0 < delta < 1):
        raise ValueError("need n >= 1 and 0 < delta < 1")
    return math.sqrt(-math.log(delta / 2) / (2 * n))
