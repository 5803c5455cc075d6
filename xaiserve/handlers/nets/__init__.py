"""Frozen models in plain torch (encoder with a feature pyramid, classifier) and the helpers that
load their weights: `frozen_spec_from_arch`, `load_state_dict_file`, `load_into`. Rebuilding a
manifest entry of any kind is `xaiserve.handlers.loading.load_module`. Every failure is a
FailedPrecondition that names the file and what to do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from xaiserve.errors import FailedPrecondition
from xaiserve.handlers.nets.encoder import ARCH_TYPE, EncoderArch, FrozenSpec, PyramidClassifier, PyramidEncoder

__all__ = [
    "ARCH_TYPE",
    "EncoderArch",
    "FrozenSpec",
    "PyramidClassifier",
    "PyramidEncoder",
    "frozen_spec_from_arch",
    "load_into",
    "load_state_dict_file",
    "require_pyramid",
]


def frozen_spec_from_arch(arch: dict[str, Any], what: str = "model") -> FrozenSpec:
    """Parse a manifest `arch` dict of a frozen model; clear errors for unknown or pyramid-less archs."""
    kind = arch.get("type")
    if kind != ARCH_TYPE:
        raise FailedPrecondition(
            f"{what}: arch type {kind!r} is not supported by handlers.nets (expected {ARCH_TYPE!r}); "
            "export the model with `xaiserve export encoder|classifier`, or serve it through ONNX only"
        )
    if not arch.get("pyramid"):
        raise FailedPrecondition(
            f"{what}: arch has no feature pyramid ('pyramid' is missing or empty); NEM-U/NEMt need the encoder's "
            "skip taps: retrain it with `xaiserve train encoder|classifier`"
        )
    try:
        enc = EncoderArch.from_dict(arch)
    except (KeyError, TypeError, ValueError) as e:
        raise FailedPrecondition(f"{what}: arch {arch} is malformed ({e}); re-export the model") from None
    if list(enc.pyramid_channels) != [int(c) for c in arch["pyramid"]]:
        raise FailedPrecondition(
            f"{what}: arch pyramid {arch['pyramid']} does not match stem/widths {list(enc.pyramid_channels)}"
        )
    return FrozenSpec(encoder=enc, num_classes=int(arch.get("num_classes", 0)))


def require_pyramid(module: nn.Module, what: str = "frozen model") -> tuple[int, ...]:
    """The pyramid channels of a frozen model, or FailedPrecondition if it exposes no feature pyramid."""
    chans = getattr(module, "pyramid_channels", None)
    if not callable(getattr(module, "features", None)) or not chans:
        raise FailedPrecondition(
            f"{what} ({type(module).__name__}) does not expose a feature pyramid (features(x) -> (output, pyramid)); "
            "NEM-U/NEMt need an encoder from handlers.nets (train one with `xaiserve train encoder|classifier`)"
        )
    return tuple(int(c) for c in chans)


def load_state_dict_file(path: Path, what: str = "checkpoint") -> dict[str, Any]:
    """torch.load a state dict (weights only); corrupt or foreign files give FailedPrecondition."""
    path = Path(path)
    if not path.exists():
        raise FailedPrecondition(f"{what} {path} is missing; re-run `xaiserve export ...` to write it")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load raises many types on foreign bytes (IndexError, UnpicklingError, ...)
        raise FailedPrecondition(
            f"{what} {path} is corrupt or not a torch state dict ({e.__class__.__name__}: {str(e)[:120]}); "
            "delete it and re-run `xaiserve export ...` (or `xaiserve train ...` for a training checkpoint)"
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise FailedPrecondition(f"{what} {path} does not hold a state dict of tensors; re-run `xaiserve export ...`")
    return obj


def load_into(module: nn.Module, state: dict[str, Any], what: str) -> nn.Module:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise FailedPrecondition(
            f"{what}: weights do not fit the architecture in the manifest ({str(e).splitlines()[0][:200]}); "
            "the manifest entry and weights.pt come from different exports: re-run `xaiserve export ...`"
        ) from None
    return module
