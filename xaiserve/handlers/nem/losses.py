"""Training losses of the masking networks, as pure functions on tensors.

NEM-U ([NEM-U], eq. 5-9), per image x with mask m = Psi(x) and frozen model Phi:
    x_m = m * x (eq. 6), x_bar = (1 - m) * x (eq. 7),
    P_d = -cos(Phi(x), Phi(x_m)) (eq. 8), N_d = -cos(Phi(x_m), Phi(x_bar)) (eq. 9),
    L = (lambda1 - N_d) * P_d + lambda2 * ||m||_1 (eq. 5), lambda1 = 1.5, lambda2 = 1.
  ||m||_1 is taken as the mean over pixels (METHODS.md), so lambda2 does not depend on resolution,
  and the sum over the data set is taken as the batch mean (only the scale of the step changes).

NEMt ([NEMt], eq. 2 and the authors' code), target class c per image:
  - "preservation" (the authors' code, `Masking_Loss.supervised_loss`, inverse=False):
        L = ||m||_1 + w * (softmax(Phi(x*m))_c - softmax(Phi(x))_c)^2,  w = 2:
    keep the smallest region that preserves the target probability.
  - "deletion" (eq. 2: -(Phi(x)_c - Phi(x*Psi(x))_c)^2 + lambda1 ||Psi(x)||_1, lambda1 = 0.5).
    Taken literally, x * Psi(x) with a sparse Psi(x) deletes almost everything and the trivial mask
    m = 0 minimises both terms; the text's intent is "the smallest area that determines the label
    ... the smallest input perturbation yielding the largest output change". We therefore read the
    mask as the region that is deleted: the perturbed input is x * (1 - m), and
        L = -(softmax(Phi(x))_c - softmax(Phi(x*(1-m)))_c)^2 + lambda1 ||m||_1.
    On softmax probabilities, as the authors' "inverse" option (which inverts both terms of their
    probability loss; METHODS.md, decision 2026-12): the change term lies in [0, 1], so L lies in
    [-1, lambda1] and lambda1 = 0.5 weighs area against a bounded gain. Eq. 2 on raw logits is
    unbounded (-9999.95 for a target-logit drop of 100), so any L1 weight is meaningless there.
    With the mask complemented this is the authors' inverse option, and the served mask points at
    the evidence in both forms.
  - one_sided=True (beyond the papers; METHODS.md, NEMt on two-finding images): only a LOSS of the
    target probability counts, relu(p - p_m)^2 in the preservation form and relu(p - p_del)^2 in the
    deletion form. Why: with two lesions of different classes the classifier gives the target about
    0.5; keeping only lesion k raises it to ~0.94 and deleting the OTHER lesion raises it to ~0.95
    (measured on 100 two-finding validation images), so the squared two-sided terms reward keeping
    both lesions (preservation: 0.53 ~ p) or deleting the wrong one (deletion: change^2 0.17 vs 0.27).
    On single-lesion images p_c is near 1 already, so the two readings differ little there. Both
    stay bounded ([0, 1] for the probability term).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

NEMT_FORMS = ("preservation", "deletion")


@dataclass(frozen=True)
class NemULossConfig:
    """[NEM-U], sec. 4.1: lambda1 = 1.5, lambda2 = 1."""

    lambda1: float = 1.5
    lambda2: float = 1.0


@dataclass(frozen=True)
class NemTLossConfig:
    """form: "preservation" (weight 2 on the probability term, authors' code) or "deletion" (lambda1 = 0.5, eq. 2)."""

    form: str = "preservation"
    preservation_weight: float = 2.0
    deletion_lambda1: float = 0.5
    one_sided: bool = False  # only a drop of the target probability counts (see the module docstring)


def mask_l1(mask: torch.Tensor) -> torch.Tensor:
    """||m||_1 per image as the mean over pixels: [B,1,H,W] -> [B]."""
    return mask.abs().flatten(1).mean(dim=1)


def nemu_loss(
    z: torch.Tensor, z_m: torch.Tensor, z_bar: torch.Tensor, mask: torch.Tensor, cfg: NemULossConfig = NemULossConfig()
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Eq. 5-9 of [NEM-U]. z = Phi(x), z_m = Phi(m*x), z_bar = Phi((1-m)*x), each [B,D]; mask [B,1,H,W].

    Returns the batch-mean loss and its parts (per-batch means) for logging."""
    p_d = -F.cosine_similarity(z, z_m, dim=1)  # eq. 8
    n_d = -F.cosine_similarity(z_m, z_bar, dim=1)  # eq. 9
    l1 = mask_l1(mask)
    per = (cfg.lambda1 - n_d) * p_d + cfg.lambda2 * l1  # eq. 5
    return per.mean(), {"P_d": p_d.mean().detach(), "N_d": n_d.mean().detach(), "l1": l1.mean().detach()}


def _pick(t: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return t.gather(1, target.view(-1, 1).long()).squeeze(1)


def nemt_preservation_loss(
    logits: torch.Tensor,
    logits_m: torch.Tensor,
    mask: torch.Tensor,
    target: torch.Tensor,
    weight: float = 2.0,
    one_sided: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Authors' code: ||m||_1 + w (softmax(Phi(x*m))_c - softmax(Phi(x))_c)^2; logits of x and of x*m.
    one_sided: w relu(softmax(Phi(x))_c - softmax(Phi(x*m))_c)^2 (a gain of the target is free)."""
    p = _pick(F.softmax(logits, dim=1), target)
    p_m = _pick(F.softmax(logits_m, dim=1), target)
    dist = ((p - p_m).clamp_min(0) if one_sided else (p_m - p)) ** 2
    l1 = mask_l1(mask)
    per = l1 + weight * dist
    return per.mean(), {"dist": dist.mean().detach(), "l1": l1.mean().detach()}


def nemt_deletion_loss(
    logits: torch.Tensor,
    logits_del: torch.Tensor,
    mask: torch.Tensor,
    target: torch.Tensor,
    lambda1: float = 0.5,
    one_sided: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Eq. 2 of [NEMt] on probabilities (deletion reading, see module docstring), bounded in [-1, lambda1]:
    -(softmax(Phi(x))_c - softmax(Phi(x*(1-m)))_c)^2 + lambda1 ||m||_1; logits of x and of x*(1-m).
    one_sided: -relu(softmax(Phi(x))_c - softmax(Phi(x*(1-m)))_c)^2 + lambda1 ||m||_1 (only a drop counts)."""
    diff = _pick(F.softmax(logits, dim=1), target) - _pick(F.softmax(logits_del, dim=1), target)
    change = (diff.clamp_min(0) if one_sided else diff) ** 2
    l1 = mask_l1(mask)
    per = -change + lambda1 * l1
    return per.mean(), {"dist": change.mean().detach(), "l1": l1.mean().detach()}
