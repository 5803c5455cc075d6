"""The default baseline image: the target blurred just enough to change the decision ([THESIS], sec. 2.7.1).

x_BL = gamma_sigma * x_Tg (eq. 2.32) with the smallest sigma in [4, 100] pixels for which
argmax F(x_BL) != argmax F(x_Tg). The blur is linear and preserves constants, so blurring the
normalised tensor equals normalising the blurred image.

Search: a geometric grid of sigmas from 4 to 100 is classified in batches, smallest first; at the
first grid point that changes the argmax, bisection between it and the previous grid point
narrows sigma to `tolerance` (relative). This assumes the decision does not flip back and forth
between two neighbouring grid points (ratio 1.15), which the grid spacing makes a mild assumption.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from xaiserve.handlers.ablation.path import gaussian_blur

SIGMA_MIN = 4.0
SIGMA_MAX = 100.0


@dataclass(frozen=True)
class BlurBaseline:
    image: torch.Tensor  # [C, H, W], normalised like the target
    sigma: float
    changes_class: bool  # False: no sigma up to sigma_max changed the argmax (image is the sigma_max blur)
    evaluations: int  # classifier forward passes (images) spent in the search


@torch.no_grad()
def _argmax(module: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    return module(images).argmax(dim=1)


@torch.no_grad()
def blur_baseline(
    module: torch.nn.Module,
    x: torch.Tensor,
    *,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    ratio: float = 1.15,
    tolerance: float = 0.01,
    batch_size: int = 8,
) -> BlurBaseline:
    """Blur x [C, H, W] with the smallest sigma in [sigma_min, sigma_max] that changes the argmax (eq. 2.32)."""
    reference = int(_argmax(module, x[None])[0])
    grid = [sigma_min]
    while grid[-1] < sigma_max:
        grid.append(min(grid[-1] * ratio, sigma_max))
    evaluations = 1
    previous = None
    found = None
    for start in range(0, len(grid), batch_size):
        sigmas = grid[start : start + batch_size]
        blurred = torch.stack([gaussian_blur(x, s) for s in sigmas])
        labels = _argmax(module, blurred)
        evaluations += len(sigmas)
        changed = torch.nonzero(labels != reference).flatten()
        if changed.numel():
            i = int(changed[0])
            found = sigmas[i]
            previous = sigmas[i - 1] if i > 0 else (grid[start - 1] if start > 0 else None)
            break
    if found is None:
        return BlurBaseline(gaussian_blur(x, sigma_max), sigma_max, False, evaluations)
    if previous is not None:
        lo, hi = previous, found  # lo keeps the class, hi changes it
        while hi / lo > 1.0 + tolerance:
            mid = (lo * hi) ** 0.5
            evaluations += 1
            if int(_argmax(module, gaussian_blur(x, mid)[None])[0]) != reference:
                hi = mid
            else:
                lo = mid
        found = hi
    return BlurBaseline(gaussian_blur(x, found), float(found), True, evaluations)
