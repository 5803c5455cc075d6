"""Gradient baselines as method objects with one verb, `attribute(x, target) -> raw attribution`.

Raw attributions are [B,C,H,W] input-space tensors (GradCAM: [B,1,H,W] upsampled); reduction to a
[B,H,W] map in [0,1] happens in `handlers.saliency.attribute` (reduce.py).

Encoders (representations):
- Saliency          [RELAX] eq. 14: (1/D) sum_d grad f_d(x), one backward pass of the mean.
- GuidedBackprop    [RELAX] eq. 15: eq. 14 with negative gradients zeroed at every ReLU (and every
  capped rectifier: ReLU6, Clip(0, hi); other activations keep their ordinary gradient).
- SmoothGrad        [RELAX] eq. 16: eq. 14 averaged over M noisy copies x + N(0, sigma^2).
- IntegratedGradients, GradientShap, LabelFreeSaliency: captum methods on the label-free objective
  g(x) = <f(x), f(x0)>, x0 = x (Crabbe & van der Schaar 2022; [NEM-U] sec. 4.2 baselines).
- GradCam           captum LayerGradCam on the last conv block, label-free objective ([SSL-XAI]'s
  "Grad-CAM for similarity").
Classifiers: the same methods on the target-class logit (the classic supervised versions).

Baselines: "absent" in normalised input space is 0, the dataset mean, the same convention as the
masking (x * m) used by RELAX and NEM. SmoothGrad noise is sigma = 0.15 x (max - min) of each image
(Smilkov et al. 2017's recommended 10-20%); [RELAX] does not state M or sigma.
"""

from __future__ import annotations

import threading
import weakref
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from xaiserve.errors import FailedPrecondition, InvalidArgument
from xaiserve.handlers.saliency.objectives import LabelFree, RepresentationMean, TargetLogit, model_output
from xaiserve.methods import FROZEN_KINDS
from xaiserve.methods import METHODS as METHODS_TABLE

KINDS = FROZEN_KINDS  # the kinds gradient baselines explain (xaiserve.methods)


@dataclass(frozen=True)
class SaliencyConfig:
    """Defaults for the stochastic / path methods (not fixed by [RELAX]; Smilkov et al. 2017 for SmoothGrad)."""

    smoothgrad_samples: int = 16  # M in eq. 16
    smoothgrad_noise: float = 0.15  # sigma as a fraction of each image's value range
    ig_steps: int = 32  # Riemann steps of Integrated Gradients (captum default 50)
    shap_samples: int = 16  # GradientShap draws per image
    shap_stdev: float = 0.1  # GradientShap input noise, normalised units
    shap_baselines: int = 8  # baseline distribution: 0 (dataset mean) + N(0,1) images in normalised space
    internal_batch: int = 256  # largest batch of expanded inputs per forward/backward
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("smoothgrad_samples", "ig_steps", "shap_samples", "shap_baselines", "internal_batch"):
            if getattr(self, name) < 1:
                raise InvalidArgument(f"saliency {name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.smoothgrad_noise <= 1 or self.shap_stdev < 0:
            raise InvalidArgument("smoothgrad_noise must be in [0, 1] and shap_stdev >= 0")


# A module is shared (the registry caches one per model): captum's LayerGradCam (and the layer search)
# register forward hooks on it, which would leak into a concurrent call. One lock per module
# serialises attributions on that module.
_LOCKS: "weakref.WeakKeyDictionary[nn.Module, threading.Lock]" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def module_lock(module: nn.Module) -> threading.Lock:
    with _LOCKS_GUARD:
        lock = _LOCKS.get(module)
        if lock is None:
            lock = _LOCKS[module] = threading.Lock()
        return lock


class _Method(ABC):
    """Base: holds the frozen module, the kind and the config; subclasses implement `attribute`."""

    name = ""

    def __init__(self, module: nn.Module, kind: str, config: SaliencyConfig = SaliencyConfig()):
        self.module = module
        self.kind = kind
        self.config = config

    def objective(self, x: torch.Tensor, target: torch.Tensor | None) -> tuple[nn.Module, tuple]:
        """(objective module returning [B,1], its extra forward args) for this kind.

        Encoders use the label-free objective unless a subclass says eq. 14's mean."""
        if self.kind == "classifier":
            return TargetLogit(self.module), (target,)
        with torch.no_grad():
            h0 = model_output(self.module, x).detach()
        return LabelFree(self.module), (h0,)

    @abstractmethod
    def attribute(self, x: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        """Raw attribution for a normalised batch x [B,C,H,W] (target: int64 [B] for classifiers)."""


def _grad(fn: Callable[..., torch.Tensor], x: torch.Tensor, extra: tuple) -> torch.Tensor:
    """d sum_b fn(x)_b / dx: samples are independent (eval mode), so this is the per-sample gradient."""
    x = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(x, *extra).sum(), x)
    return g


class Saliency(_Method):
    """Encoders: [RELAX] eq. 14, S = (1/D) sum_d grad f_d(X); classifiers: grad of the target logit."""

    name = "saliency"

    def objective(self, x, target):
        if self.kind == "encoder":
            return RepresentationMean(self.module), ()
        return super().objective(x, target)

    def attribute(self, x, target=None):
        from captum.attr import Saliency as CaptumSaliency

        obj, extra = self.objective(x, target)
        return CaptumSaliency(obj).attribute(x, target=0, abs=False, additional_forward_args=extra or None)


class LabelFreeSaliency(_Method):
    """Encoders only: captum Saliency of g(x) = <f(x), f(x0)> at x0 = x (Crabbe & van der Schaar 2022)."""

    name = "label_free_saliency"

    def attribute(self, x, target=None):
        from captum.attr import Saliency as CaptumSaliency

        obj, extra = self.objective(x, target)
        return CaptumSaliency(obj).attribute(x, target=0, abs=False, additional_forward_args=extra)


class _GuidedReLU(torch.autograd.Function):
    """ReLU whose backward also zeroes negative incoming gradients (Springenberg et al. 2015)."""

    @staticmethod
    def forward(ctx, x):
        y = x.clamp(min=0)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g.clamp(min=0) * (y > 0).to(g.dtype)


class _GuidedReLU6(torch.autograd.Function):
    """A rectifier capped at `hi` (ReLU6 = clamp(x, 0, 6), ONNX Clip(0, hi), Hardtanh(0, hi)), guided
    like a ReLU: the backward passes positive incoming gradients where the unit is in its linear
    range 0 < x < hi (where its own derivative is 1) and zeroes the rest."""

    @staticmethod
    def forward(ctx, x, hi):
        ctx.save_for_backward(x)
        ctx.hi = hi
        return x.clamp(min=0, max=hi)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g.clamp(min=0) * ((x > 0) & (x < ctx.hi)).to(g.dtype), None


# the aten overloads are what torch.export graphs (handlers.nets.forms.GraphForm) call
_RELUS = {
    F.relu,
    F.relu_,
    torch.relu,
    torch.relu_,
    torch.Tensor.relu,
    torch.Tensor.relu_,
    torch.ops.aten.relu.default,
    torch.ops.aten.relu_.default,
}
# clamps: guided when their lower bound is 0 (a rectifier: ReLU6, Clip(0, 6), clamp(min=0)); any
# other clamp keeps its ordinary gradient. (name of the lower / upper bound argument, its default)
_HARDTANH = (("min_val", -1.0), ("max_val", 1.0))
_CLAMP = (("min", None), ("max", None))
_CLAMPS = {
    F.hardtanh: _HARDTANH,
    F.hardtanh_: _HARDTANH,
    torch.ops.aten.hardtanh.default: _HARDTANH,
    torch.ops.aten.hardtanh_.default: _HARDTANH,
    F.relu6: None,  # always (0, 6)
    torch.clamp: _CLAMP,
    torch.clamp_: _CLAMP,
    torch.clip: _CLAMP,
    torch.clip_: _CLAMP,
    torch.Tensor.clamp: _CLAMP,
    torch.Tensor.clamp_: _CLAMP,
    torch.Tensor.clip: _CLAMP,
    torch.Tensor.clip_: _CLAMP,
    torch.ops.aten.clamp.default: _CLAMP,
    torch.ops.aten.clamp_.default: _CLAMP,
    torch.ops.aten.clip.default: _CLAMP,
}


def _rectifier_cap(func, args, kwargs) -> tuple[bool, float | None]:
    """(whether this clamp call is a rectifier, i.e. its lower bound is 0, its upper bound or None)."""
    spec = _CLAMPS[func]
    if spec is None:
        return True, 6.0
    vals = []
    for i, (name, default) in enumerate(spec, start=1):
        v = args[i] if len(args) > i else kwargs.get(name, default)
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = float(v)
        if v is not None and not isinstance(v, (int, float)):
            return False, None  # tensor bounds: not a fixed rectifier
        vals.append(v)
    lo, hi = vals
    return (lo is not None and float(lo) == 0.0 and (hi is None or float(hi) > 0.0)), hi


def _refuse_opaque(module: nn.Module, method: str) -> None:
    """Compiled TorchScript hides its layers and ReLUs: hooks and torch-function modes cannot reach them."""
    if getattr(module, "opaque", False) or isinstance(module, torch.jit.ScriptModule):
        why = getattr(module, "reason", "")
        raise FailedPrecondition(
            f"{method} needs the model's layers, and its TorchScript could not be converted to a graph"
            + (f" ({why})" if why else "")
            + "; add the model as a torch.export ExportedProgram (.pt2) "
            "(`xaiserve models add NAME model.onnx --torch model.pt2`)"
        )


class _GuidedMode(TorchFunctionMode):
    """Routes every ReLU (nn.ReLU, F.relu, torch.relu, Tensor.relu, in-place or not) through _GuidedReLU,
    and every capped rectifier (nn.ReLU6, F.relu6, Hardtanh / clamp / clip with lower bound 0, the
    aten ops of exported graphs) through _GuidedReLU6.

    Other activations (HardSwish, HardSigmoid, Sigmoid, SiLU, GELU, LeakyReLU, clamps whose lower
    bound is not 0) are not rectifiers and keep their ordinary gradient: guided backprop zeroes
    negative gradients at the rectifiers only (Springenberg et al. 2015; captum's GuidedBackprop
    likewise modifies nn.ReLU only). A MobileNet v3 whose every activation is HardSwish therefore
    gets (nearly) plain saliency from guided_backprop.

    captum's GuidedBackprop hooks nn.ReLU modules only, and handlers.nets' residual blocks call F.relu:
    captum would silently guide the stem alone. A torch-function mode is thread-local and sees them all.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _RELUS:
            return _GuidedReLU.apply(args[0])
        if func in _CLAMPS and args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
            rect, hi = _rectifier_cap(func, args, kwargs)
            if rect:
                return _GuidedReLU.apply(args[0]) if hi is None else _GuidedReLU6.apply(args[0], float(hi))
        return func(*args, **kwargs)


class GuidedBackprop(Saliency):
    """[RELAX] eq. 15: S_GB = (1/D) sum_d grad_GB f_d(X), eq. 14 with negative gradients zeroed at
    every ReLU in the backward pass (classifiers: the guided gradient of the target logit)."""

    name = "guided_backprop"

    def attribute(self, x, target=None):
        _refuse_opaque(self.module, self.name)
        obj, extra = self.objective(x, target)
        with _GuidedMode():
            return _grad(obj, x, extra)


class SmoothGrad(Saliency):
    """[RELAX] eq. 16: S_SG = (1/M) sum_m (1/D) sum_d grad f_d(X_m), X_m = X + N(0, sigma^2),
    sigma = smoothgrad_noise x (max X - min X) per image. The M copies of a batch run in chunks of
    `internal_batch` images (one forward/backward per chunk)."""

    name = "smoothgrad"

    def attribute(self, x, target=None):
        cfg = self.config
        obj, extra = self.objective(x, target)
        B, M = x.shape[0], cfg.smoothgrad_samples
        # drawn on x's device (the module's): the same seed gives other noise on a GPU than on the CPU
        gen = torch.Generator(device=x.device).manual_seed(cfg.seed)
        x = x.detach()
        span = (x.flatten(1).amax(1) - x.flatten(1).amin(1)).view(B, 1, 1, 1)
        sigma = (cfg.smoothgrad_noise * span).repeat_interleave(M, 0)
        xs = x.detach().repeat_interleave(M, 0)
        xs = xs + sigma * torch.randn(xs.shape, generator=gen, device=x.device)
        ext = tuple(e.repeat_interleave(M, 0) for e in extra)
        grads = []
        for i in range(0, xs.shape[0], cfg.internal_batch):
            sl = slice(i, i + cfg.internal_batch)
            grads.append(_grad(obj, xs[sl], tuple(e[sl] for e in ext)))
        return torch.cat(grads).view(B, M, *x.shape[1:]).mean(1)


class IntegratedGradients(_Method):
    """captum IntegratedGradients from the baseline 0 (the dataset mean), label-free for encoders."""

    name = "integrated_gradients"

    def attribute(self, x, target=None):
        from captum.attr import IntegratedGradients as CaptumIG

        obj, extra = self.objective(x, target)
        ig = CaptumIG(obj)
        return ig.attribute(
            x,
            baselines=torch.zeros_like(x),
            target=0,
            additional_forward_args=extra,
            n_steps=self.config.ig_steps,
            internal_batch_size=self.config.internal_batch,
        )


class GradientShap(_Method):
    """captum GradientShap; baselines: 0 (dataset mean) and N(0,1) images in normalised space
    (a draw from each channel's data distribution, as RELAX's noise masking, [RELAX] App. A)."""

    name = "gradient_shap"

    def attribute(self, x, target=None):
        from captum.attr import GradientShap as CaptumGS

        cfg = self.config
        obj, extra = self.objective(x, target)
        gen = torch.Generator(device=x.device).manual_seed(cfg.seed)
        base = torch.randn((cfg.shap_baselines, *x.shape[1:]), generator=gen, device=x.device)
        base[0] = 0.0
        # captum draws the noise and baseline choice from torch's global RNG and the path coefficients
        # from numpy's: seed both and restore them, so the result is reproducible and the caller's RNG
        # state is untouched.
        np_state = np.random.get_state()
        try:
            # captum draws on x's device: fork (and so restore) that generator too
            with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
                torch.manual_seed(cfg.seed)
                np.random.seed(cfg.seed % 2**32)
                return CaptumGS(obj).attribute(
                    x,
                    baselines=base,
                    n_samples=cfg.shap_samples,
                    stdevs=cfg.shap_stdev,
                    target=0,
                    additional_forward_args=extra,
                )
        finally:
            np.random.set_state(np_state)


class GradCam(_Method):
    """captum LayerGradCam on the last conv block, ReLU of the weighted sum, bilinear upsampling.

    The layer is `module.gradcam_layer` when the model names one, else the last module whose output
    is a 4-D feature map in a forward pass (the last conv block before pooling)."""

    name = "gradcam"

    def attribute(self, x, target=None):
        from captum.attr import LayerAttribution, LayerGradCam

        layer = gradcam_layer(self.module, x)
        obj, extra = self.objective(x, target)
        cam = LayerGradCam(obj, layer).attribute(x, target=0, additional_forward_args=extra, relu_attributions=True)
        return LayerAttribution.interpolate(cam, tuple(x.shape[2:]), interpolate_mode="bilinear")


_LAYER_CACHE: "weakref.WeakKeyDictionary[nn.Module, nn.Module]" = weakref.WeakKeyDictionary()


def gradcam_layer(module: nn.Module, x: torch.Tensor) -> nn.Module:
    """`module.gradcam_layer` when the model names one (graph forms name a tap after their last
    convolution), else the last conv block: the last module to finish whose output is a 4-D map
    larger than 1x1 and that is or contains an nn.Conv2d (not a global pool's [B,C,1,1])."""
    _refuse_opaque(module, "gradcam")
    named = getattr(module, "gradcam_layer", None)
    if isinstance(named, nn.Module):
        return named
    if module in _LAYER_CACHE:
        return _LAYER_CACHE[module]
    from xaiserve.handlers.nets.forms import last_conv_module

    layer = last_conv_module(module, x)
    if layer is None:
        raise FailedPrecondition("gradcam needs a convolutional feature map; the model has no Conv2d with a 4-D output")
    _LAYER_CACHE[module] = layer
    return layer


METHOD_CLASSES: dict[str, type[_Method]] = {
    c.name: c
    for c in (Saliency, GuidedBackprop, SmoothGrad, IntegratedGradients, GradientShap, LabelFreeSaliency, GradCam)
}
METHODS = tuple(METHOD_CLASSES)


def methods_for(kind: str) -> tuple[str, ...]:
    """The gradient methods for a model kind, as the methods table (xaiserve.methods) declares them."""
    return tuple(n for n in METHOD_CLASSES if n in METHODS_TABLE and kind in METHODS_TABLE[n].kinds)
