"""Scalar objectives whose input gradients the gradient baselines explain (pure torch).

- Representation mean ([RELAX] eq. 14): s(x) = (1/D) sum_d f_d(x). Its gradient is the mean over
  embedding dimensions of d f_d / dx, obtained with ONE backward pass instead of D (the gradient of
  a sum is the sum of the gradients).
- Label-free (Crabbe & van der Schaar 2022, "Label-free explainability for unsupervised models",
  used by [NEM-U] sec. 4.2): g(x) = <f(x), f(x0)> with f(x0) held fixed and evaluated at x0 = x, so
  the attribution of x explains the direction of its own representation.
- Target class (classifiers): the logit of class c.

Each objective is an nn.Module returning [B, 1] so that captum (which hooks nn.Modules for guided
backprop and needs a module tree for layer methods) can use it with target=0.
"""

from __future__ import annotations

import torch
from torch import nn

from xaiserve.errors import FailedPrecondition


def model_output(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The frozen model's output [B, D] (embedding or logits); anything else is a clear error."""
    out = module(x)
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != x.shape[0]:
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise FailedPrecondition(
            f"the frozen model must map [B,C,H,W] to [B,D] (an embedding or logits); it returned {shape}"
        )
    return out


class RepresentationMean(nn.Module):
    """s(x) = (1/D) sum_d f_d(x) ([RELAX] eq. 14-16: the gradient of s is the mean gradient)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return model_output(self.module, x).mean(dim=1, keepdim=True)


class LabelFree(nn.Module):
    """g(x) = <f(x), h0> with h0 = f(x0) passed in (captum expands it along with the inputs)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
        return (model_output(self.module, x) * h0).sum(dim=1, keepdim=True)


class TargetLogit(nn.Module):
    """The logit of the target class for each sample (target passed in as an int64 [B] argument)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return model_output(self.module, x).gather(1, target.view(-1, 1))
