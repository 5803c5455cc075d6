"""Score functions of ablation paths ([THESIS], sec. 2.3, eq. 2.13-2.16).

F(x) is the classifier's softmax probability of the target class. The image along a path is
`(1 - phi(t)) * x_target + phi(t) * x_baseline` on the normalised tensor (METHODS.md; the
interpolation of eq. 2.2 / Algorithm 2 line 4): phi = 0 keeps the target, phi = 1 is ablated.

The t-integrals use the trapezoid rule on t_k = k / (T + 1), k = 0..T+1, with the implicit
boundary values F(x_target) (t = 0) and F(x_baseline) (t = 1) as constants:

    integral F dt ~= ( (F_0 + F_{T+1}) / 2 + sum_{k=1..T} F_k ) / (T + 1).

All slices a score needs (T, or 2T for contrastive and straddling) go through the classifier as
one batch, so one forward and one backward pass give the score and its gradient for every slice.
"""
from __future__ import annotations

import torch

from xaiserve.handlers.ablation.path import upsample

SCORES = ("retaining", "dissipating", "contrastive", "straddling")


def num_paths(score: str) -> int:
    """Paths optimised together: two for boundary straddling (phi_up, phi_down), else one."""
    return 2 if score == "straddling" else 1


def is_dissipating(score: str) -> bool:
    """Whether the (first) path is optimised to lose the target class early (eq. 2.14)."""
    return score == "dissipating"


def slice_masks(score: str, paths: torch.Tensor) -> torch.Tensor:
    """The masks to evaluate for a score, [B, h, w], from the path state [P, T, h, w].

    retaining / dissipating: phi; contrastive: phi and its complement 1 - phi (eq. 2.15);
    straddling: phi_up and phi_down (eq. 2.16).
    """
    if score in ("retaining", "dissipating"):
        return paths[0]
    if score == "contrastive":
        return torch.cat([paths[0], 1.0 - paths[0]], dim=0)
    if score == "straddling":
        return torch.cat([paths[0], paths[1]], dim=0)
    raise ValueError(f"unknown score {score!r}; use one of {SCORES}")


def interpolate(x_target: torch.Tensor, x_baseline: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Images along the path (eq. 2.2): (1 - m) * x_target + m * x_baseline, masks [B, H, W] -> [B, C, H, W]."""
    m = masks[:, None]
    return x_target[None] + m * (x_baseline - x_target)[None]


def class_probabilities(module: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """softmax(logits) [B, K] of the classifier, float32.

    Computed as exp(log_softmax) in float64: a confident classifier (logit gap above ~100) has a
    float32 softmax of exactly 1 and 0, whose gradient vanishes; in float64 it stays a tiny but
    usable direction (the step is L-inf-normalised, so its size does not matter).
    """
    logits = module(images)
    if logits.dim() != 2:
        raise ValueError(f"the classifier returned shape {tuple(logits.shape)}; a classifier must return logits [B, K]")
    return torch.log_softmax(logits.double(), dim=1).exp().float()


def trapezoid(interior: torch.Tensor, at_zero: float | torch.Tensor, at_one: float | torch.Tensor) -> torch.Tensor:
    """integral_0^1 f dt by the trapezoid rule, f given at the T interior slices and both ends."""
    T = interior.shape[0]
    return (interior.sum(dim=0) + 0.5 * (at_zero + at_one)) / (T + 1)


def score_value(score: str, f: torch.Tensor, f_target: float, f_baseline: float, num_slices: int) -> torch.Tensor:
    """The score from the target-class probabilities f [B] of the slices from `slice_masks`.

    retaining    P_up(phi)      = integral F(phi(t)) dt                          (eq. 2.13)
    dissipating  P_down(phi)    = 1 - integral F(phi(t)) dt                      (eq. 2.14)
    contrastive  P_up(phi) + P_down(1 - phi)                                     (eq. 2.15)
    straddling   P_up(phi_up) + P_down(phi_down); the distance term of eq. 2.16 is realised
                 by the pinching step (eq. 2.27), as in the thesis's implementation (sec. 2.5.3).
    The path 1 - phi runs from the baseline (t = 0) to the target (t = 1): its boundary values
    are swapped, which the symmetric trapezoid weights make irrelevant.
    """
    T = num_slices
    if score == "retaining":
        return trapezoid(f[:T], f_target, f_baseline)
    if score == "dissipating":
        return 1.0 - trapezoid(f[:T], f_target, f_baseline)
    if score in ("contrastive", "straddling"):
        return trapezoid(f[:T], f_target, f_baseline) + 1.0 - trapezoid(f[T:2 * T], f_target, f_baseline)
    raise ValueError(f"unknown score {score!r}; use one of {SCORES}")


def evaluate(
    score: str,
    module: torch.nn.Module,
    x_target: torch.Tensor,
    x_baseline: torch.Tensor,
    paths: torch.Tensor,
    target: int,
    f_target: float,
    f_baseline: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One batched forward pass: (score, class probabilities [B, K] of the evaluated slices).

    `paths` [P, T, h, w] may require grad; the score is differentiable with respect to it
    through the bilinear upsampling, the interpolation and the classifier.
    """
    masks = slice_masks(score, paths)
    H, W = x_target.shape[-2:]
    images = interpolate(x_target, x_baseline, upsample(masks, H, W))
    probs = class_probabilities(module, images)
    value = score_value(score, probs[:, target], f_target, f_baseline, paths.shape[1])
    return value, probs
