"""Score functions of ablation paths ([THESIS], sec. 2.3, eq. 2.13-2.16).

F(x) is the classifier's softmax probability of the target class. The image along a path is
`(1 - phi(t)) * x_target + phi(t) * x_baseline` on the normalised tensor (METHODS.md; the
interpolation of eq. 2.2 / Algorithm 2 line 4): phi = 0 keeps the target, phi = 1 is ablated.

The t-integrals use the trapezoid rule on t_k = k / (T + 1), k = 0..T+1, with the implicit
boundary values F(x_target) (t = 0) and F(x_baseline) (t = 1) as constants:

    integral F dt ~= ( (F_0 + F_{T+1}) / 2 + sum_{k=1..T} F_k ) / (T + 1).

All slices a score needs (T, or 2T for contrastive and straddling) go through the classifier as
one batch, so one forward and one backward pass give the score and its gradient for every slice.
When that batch does not fit in the device's memory, `evaluate_with_grad` runs it in chunks of
slices: every score is affine in the slices' probabilities, value = c + sum_k w_k F_k, so the
gradient is the sum of the chunks' gradients of sum_k w_k F_k (exact; the weights w_k come from
autograd through `score_value`, so no score needs its own chunked form). A chunk that runs out
of memory is halved (xaiserve.devices.run_chunked) and the iteration goes on.
"""

from __future__ import annotations

import torch

from xaiserve.devices import ChunkSize, run_chunked
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
        return trapezoid(f[:T], f_target, f_baseline) + 1.0 - trapezoid(f[T : 2 * T], f_target, f_baseline)
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


def _affine_form(
    score: str, num_slices: int, count: int, f_target: float, f_baseline: float, like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(c, w) with score_value(f) = c + w . f for the `count` evaluated slices (autograd at f = 0)."""
    f = torch.zeros(count, dtype=like.dtype, device=like.device, requires_grad=True)
    value = score_value(score, f, f_target, f_baseline, num_slices)
    (w,) = torch.autograd.grad(value, f)
    return value.detach(), w


def evaluate_with_grad(
    score: str,
    module: torch.nn.Module,
    x_target: torch.Tensor,
    x_baseline: torch.Tensor,
    paths: torch.Tensor,
    target: int,
    f_target: float,
    f_baseline: float,
    chunk: ChunkSize | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(score, class probabilities [B, K], d score / d paths) at the path state `paths` [P, T, h, w].

    One forward + backward pass of all B slices when `chunk` is None or holds at least B; else (or
    after an out-of-memory error) chunks of chunk.size slices, each its own forward + backward."""
    H, W = x_target.shape[-2:]
    count = slice_masks(score, paths).shape[0]
    form: list[tuple[torch.Tensor, torch.Tensor]] = []

    def part(a: int, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        state = paths.detach().clone().requires_grad_(True)
        if (a, b) == (0, count):  # the whole batch: the score itself, as evaluate() computes it
            value, probs = evaluate(score, module, x_target, x_baseline, state, target, f_target, f_baseline)
            (g,) = torch.autograd.grad(value, state)
            return value.detach(), probs.detach(), g
        masks = slice_masks(score, state)[a:b]
        probs = class_probabilities(module, interpolate(x_target, x_baseline, upsample(masks, H, W)))
        if not form:
            form.append(_affine_form(score, paths.shape[1], count, f_target, f_baseline, probs))
        value = (form[0][1][a:b] * probs[:, target]).sum()
        (g,) = torch.autograd.grad(value, state)
        return value.detach(), probs.detach(), g

    chunk = chunk if chunk is not None else ChunkSize(count)
    chunk.size = min(chunk.size, count)  # a halving must make the chunk smaller than the batch
    with torch.enable_grad():
        parts = run_chunked(part, count, chunk)
    if len(parts) == 1 and not form:
        return parts[0]
    value = form[0][0] + torch.stack([v for v, _, _ in parts]).sum()
    grad = parts[0][2]
    for _, _, g in parts[1:]:
        grad = grad + g
    return value, torch.cat([p for _, p, _ in parts]), grad


def evaluate_chunked(
    score: str,
    module: torch.nn.Module,
    x_target: torch.Tensor,
    x_baseline: torch.Tensor,
    paths: torch.Tensor,
    target: int,
    f_target: float,
    f_baseline: float,
    chunk: ChunkSize | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """evaluate() without gradients, its forward pass in chunks of chunk.size slices (halved on OOM)."""
    masks = slice_masks(score, paths)
    if chunk is None or chunk.size >= masks.shape[0]:
        try:
            return evaluate(score, module, x_target, x_baseline, paths, target, f_target, f_baseline)
        except Exception as e:  # noqa: BLE001 - only an allocation failure falls through to chunks
            from xaiserve.devices import is_out_of_memory

            if not is_out_of_memory(e) or masks.shape[0] <= 1:
                raise
        chunk = chunk if chunk is not None else ChunkSize(masks.shape[0])
        chunk.size = min(chunk.size, masks.shape[0])
        chunk.halve()
    H, W = x_target.shape[-2:]
    images = interpolate(x_target, x_baseline, upsample(masks, H, W))
    probs = torch.cat(run_chunked(lambda a, b: class_probabilities(module, images[a:b]), masks.shape[0], chunk))
    return score_value(score, probs[:, target], f_target, f_baseline, paths.shape[1]), probs
