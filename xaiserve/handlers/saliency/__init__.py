"""Gradient baselines for encoders and classifiers ([RELAX] sec. 4.2, eq. 14-16; captum).

    attribute(method, module, x, *, kind, target=None) -> np.ndarray [B,H,W] float32 in [0,1]

method: "saliency", "guided_backprop", "smoothgrad" ([RELAX] eq. 14-16; representation versions for
encoders, target-class versions for classifiers), "integrated_gradients", "gradient_shap" (label-free
wrappers for encoders), "gradcam" (last conv block), and "label_free_saliency" (encoders: the
label-free Saliency baseline of [NEM-U] sec. 4.2, which weights dimensions by f(x) where eq. 14
weights them equally).

The method objects underneath (`METHOD_CLASSES`, captum style: construct with the module, call
`.attribute(x, target)`) return raw input-space attributions; this function reduces them.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from xaiserve.errors import InvalidArgument
from xaiserve.handlers.saliency.methods import (
    KINDS,
    METHOD_CLASSES,
    METHODS,
    SaliencyConfig,
    methods_for,
    module_lock,
)
from xaiserve.handlers.saliency.objectives import model_output
from xaiserve.handlers.saliency.reduce import to_map


def _as_batch(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Validate the input's shape, dtype and values (the copy happens under the attribution's grad mode)."""
    t = (
        x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    )  # host memory; moved to the module's device below
    if t.ndim == 3:
        t = t[None]
    if t.ndim != 4:
        raise InvalidArgument(f"x must be a normalised image [C,H,W] or batch [B,C,H,W]; got shape {list(t.shape)}")
    if not t.is_floating_point():
        raise InvalidArgument(f"x must be float (normalised per the model's manifest), got {t.dtype}")
    if not torch.isfinite(t).all():
        raise InvalidArgument("x contains NaN or infinite values")
    return t


def _targets(
    module: nn.Module, x: torch.Tensor, target: int | Sequence[int] | np.ndarray | torch.Tensor | None
) -> torch.Tensor:
    with torch.no_grad():
        logits = model_output(module, x)
    k = logits.shape[1]
    if target is None:
        return logits.argmax(1)
    t = (target if isinstance(target, torch.Tensor) else torch.from_numpy(np.asarray(target))).reshape(-1)
    if t.is_floating_point() or t.dtype == torch.bool:
        raise InvalidArgument(f"target must be an integer class index, got dtype {t.dtype}")
    t = t.to(torch.long)
    if t.numel() == 1:
        t = t.expand(x.shape[0])
    if t.numel() != x.shape[0]:
        raise InvalidArgument(f"{t.numel()} targets for a batch of {x.shape[0]} images; give one, or one per image")
    if (t < 0).any() or (t >= k).any():
        raise InvalidArgument(f"target {t.tolist()} is outside the classifier's classes 0..{k - 1}")
    return t.to(x.device).contiguous()


def attribute(
    method: str,
    module: nn.Module,
    x: np.ndarray | torch.Tensor,
    *,
    kind: str,
    target: int | Sequence[int] | np.ndarray | torch.Tensor | None = None,
    config: SaliencyConfig = SaliencyConfig(),
) -> np.ndarray:
    """Explain `module` (frozen, eval mode) at the normalised input x ([C,H,W] or [B,C,H,W]).

    kind: "encoder" (explain the representation; no target) or "classifier" (explain the logit of
    `target`, default the predicted class). Returns float32 [B,H,W] in [0,1]: the raw attribution
    reduced over channels by the mean of its absolute value (signs of R, G, B gradients do not cancel;
    [RELAX] does not say how it reduces channels), then min-max normalised per image (a map with no
    gradient at all is all zeros).
    """
    if kind not in KINDS:
        raise InvalidArgument(f"kind {kind!r} cannot be explained by gradient baselines; use one of {KINDS}")
    available = methods_for(kind)
    if method not in available:
        raise InvalidArgument(f"unknown saliency method {method!r} for a {kind}; available: {', '.join(available)}")
    try:
        device = next(module.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    xt = _as_batch(x)
    with module_lock(module), torch.inference_mode(False), torch.enable_grad():
        # a copy made outside inference mode: the caller may hold an inference or grad-tracking tensor
        xt = xt.detach().clone().to(device=device, dtype=torch.float32)
        if kind == "encoder":
            if target is not None:
                raise InvalidArgument("target is only for classifiers; an encoder's representation has no class")
            t = None
        else:
            t = _targets(module, xt, target)
        # captum asks for inputs that already require grad (it warns otherwise)
        raw = METHOD_CLASSES[method](module, kind, config).attribute(xt.requires_grad_(True), t)
    return to_map(raw)


__all__ = ["KINDS", "METHODS", "METHOD_CLASSES", "SaliencyConfig", "attribute", "methods_for"]
