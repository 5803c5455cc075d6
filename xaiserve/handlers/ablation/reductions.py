"""Heatmap reductions of ablation paths ([THESIS], sec. 2.7.2, eq. 2.33-2.37).

Orientation (a decision, written here because the thesis is not consistent about it): our paths
run from the target (phi = 0) to the baseline (phi = 1), so a retaining path keeps the evidence
for the target class longest: its evidence has *small* phi. Every heatmap below is oriented so
that HIGH = evidence for the target class:

  retaining, contrastive, straddling (phi_up):  the kept part 1 - phi
  dissipating:                                  the removed part phi (it removes the evidence first)

Signed reductions (influence-weighted, contrastive averaging) can be negative where a change
works against the target class; `to_unit` maps them to [0, 1] with 0.5 = no influence.
All functions are pure; paths are [T, h, w] interior slices, probabilities [T + 2, K] along
t_k = k / (T + 1), k = 0..T+1 (boundaries included).
"""

from __future__ import annotations

import math

import torch

from xaiserve.handlers.ablation.path import with_boundaries

REDUCTIONS = ("transition", "average", "influence", "contrastive")
# The authors' class transition never reads a slice below 25 % of the path (METHODS.md, 2026-12).
TRANSITION_FLOOR = 0.25
SIGNED = ("influence", "contrastive")


def average(phi: torch.Tensor, *, dissipating: bool = False) -> torch.Tensor:
    """Theta_avg = integral_0^1 phi(t) dt (eq. 2.33), trapezoid rule with phi(0)=0, phi(1)=1.

    Oriented: 1 - Theta_avg for retaining-type paths (time each pixel is kept), Theta_avg for
    dissipating ones.
    """
    T = phi.shape[0]
    avg = (phi.sum(dim=0) + 0.5) / (T + 1)
    return avg if dissipating else 1.0 - avg


def transition_index(probs: torch.Tensor, target: int, *, dissipating: bool = False, floor: float = 0.0) -> int:
    """The slice index k in 1..T at which the class transition is read off (sec. 2.7.2B).

    Retaining-type paths: the largest interior t whose image is still dominated by the target
    class (the target ranks above every other class), i.e. the most confined mask that keeps
    the classification; if no interior slice is dominated, argmax_t F (the thesis's fallback).
    Dissipating paths (our symmetric reading, a deviation: the thesis states only the
    retaining rule, which on a well-optimised dissipating path picks t = 0, an empty mask): the
    smallest interior t whose image is no longer dominated by the target, i.e. the smallest
    removal that changes the class; if every slice is still dominated, argmin_t F.
    floor: the authors' rule that the transition is never read below this share of the path
    (t_k >= floor, k >= ceil(floor (T + 1))): a retaining mask keeps at most 1 - floor of the image.
    Dissipating paths mirror it (t_k <= 1 - floor: at most 1 - floor of the image removed).
    """
    T = probs.shape[0] - 2
    interior = probs[1 : T + 1]
    dominated = interior.argmax(dim=1) == target
    f = interior[:, target]
    if not dissipating:
        idx = torch.nonzero(dominated).flatten()
        k = int(idx.max()) if idx.numel() else int(torch.argmax(f))
    else:
        idx = torch.nonzero(~dominated).flatten()
        k = int(idx.min()) if idx.numel() else int(torch.argmin(f))
    k += 1
    lo = min(T, max(1, math.ceil(floor * (T + 1) - 1e-9)))
    return max(k, lo) if not dissipating else min(k, T + 1 - lo)


def transition(
    phi: torch.Tensor, probs: torch.Tensor, target: int, *, dissipating: bool = False, floor: float = 0.0
) -> tuple[torch.Tensor, int]:
    """Theta_clt = phi(t_clt) (eq. 2.34), oriented; returns (heatmap, k) with t_clt = k / (T + 1)."""
    k = transition_index(probs, target, dissipating=dissipating, floor=floor)
    mask = phi[k - 1]
    return (mask if dissipating else 1.0 - mask), k


def influence(phi: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Theta_iwa = - integral (d phi/dt) (d F/dt) dt (eq. 2.35), finite differences on the t grid.

    f: [T + 2] target-class probabilities along the path (boundaries included). With
    dt = 1 / (T + 1): - sum_k (phi_{k+1} - phi_k) (F_{k+1} - F_k) / dt. Positive where ablating a
    pixel lowers F (evidence for the target), negative where it raises F; the same sign for
    retaining and dissipating paths.
    """
    full = with_boundaries(phi)
    dphi = full[1:] - full[:-1]  # [T+1, h, w]
    df = (f[1:] - f[:-1]).to(phi.dtype)  # [T+1]
    T = phi.shape[0]
    return -(dphi * df[:, None, None]).sum(dim=0) * (T + 1)


def contrastive(phi_up: torch.Tensor, phi_down: torch.Tensor) -> torch.Tensor:
    """Contrastive averaging for boundary-straddling paths (eq. 2.36), oriented.

    The thesis writes integral (phi_up - phi_down) dt; with our orientation (phi = 1 ablated) the
    evidence is what phi_down removes and phi_up keeps, so we return integral (phi_down - phi_up)
    dt (trapezoid; both boundaries contribute 0).
    """
    T = phi_up.shape[0]
    return (phi_down - phi_up).sum(dim=0) / (T + 1)


def window(heat: torch.Tensor, size: int) -> torch.Tensor:
    """Boundary-suppressing window (eq. 2.37), generalised to a taper width `size` in pixels.

    Eq. 2.37 multiplies by sqrt(sin(pi x) sin(pi y)) with x, y in (0, 1). We multiply by
    sqrt(w(x) w(y)) with w = sin(pi/2 * min(1, d / s)), d the distance of the pixel centre from the
    nearest border and s = min(size, side / 2): s = side / 2 (any size >= half the image side)
    reproduces eq. 2.37 exactly; a smaller size tapers only a border of that width. size 0 = off.
    """
    if size <= 0:
        return heat
    H, W = heat.shape[-2:]

    def axis(n: int) -> torch.Tensor:
        s = min(float(size), n / 2.0)
        c = torch.arange(n, dtype=heat.dtype, device=heat.device) + 0.5
        d = torch.minimum(c, n - c)
        return torch.sin(0.5 * math.pi * torch.clamp(d / s, max=1.0))

    return heat * torch.sqrt(axis(H)[:, None] * axis(W)[None, :])


def to_unit(heat: torch.Tensor, *, signed: bool) -> torch.Tensor:
    """Values for the [0, 1] heatmap field: unsigned maps are clamped; signed ones map v -> 1/2 + v / (2 max|v|)."""
    if not signed:
        return heat.clamp(0.0, 1.0)
    scale = heat.abs().max()
    if float(scale) == 0.0:
        return torch.full_like(heat, 0.5)
    return 0.5 + 0.5 * heat / scale


def reduce(
    reduction: str,
    score: str,
    paths: torch.Tensor,
    probs: torch.Tensor,
    target: int,
    *,
    floor: float = 0.0,
) -> tuple[torch.Tensor, int]:
    """The heatmap of a path result at the paths' resolution; returns (heatmap, transition index or -1).

    paths: [P, T, h, w] (P = 2 for straddling: phi_up, phi_down); probs: [P, T + 2, K].
    Straddling: "transition" and "average" read phi_up; "influence" averages both paths' maps;
    "contrastive" (eq. 2.36) needs both paths and only exists for straddling.
    """
    dissipating = score == "dissipating"
    if reduction == "transition":
        heat, k = transition(paths[0], probs[0], target, dissipating=dissipating, floor=floor)
        return heat, k
    if reduction == "average":
        return average(paths[0], dissipating=dissipating), -1
    if reduction == "influence":
        maps = [influence(paths[i], probs[i, :, target]) for i in range(paths.shape[0])]
        return torch.stack(maps).mean(dim=0), -1
    if reduction == "contrastive":
        if paths.shape[0] != 2:
            raise ValueError("the contrastive reduction (eq. 2.36) needs the two paths of the straddling score")
        return contrastive(paths[0], paths[1]), -1
    raise ValueError(f"unknown reduction {reduction!r}; use one of {REDUCTIONS}")
