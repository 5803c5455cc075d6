"""Manifest `arch` <-> masking-network modules (used by handlers.nets.load_module and the exporter).

arch of a mask model:
    {"type": "nem_u" | "nemt", "frozen": <arch of the frozen model>, "decoder": {"widths": [...]},
     nemt only: "num_classes": K, "conditional": bool, "smoothing": 21, "loss_form": "preservation" | "deletion"}
"""

from __future__ import annotations

from typing import Any

from torch import nn

from xaiserve.errors import FailedPrecondition
from xaiserve.handlers.nem.decoder import DecoderArch
from xaiserve.handlers.nem.models import NemT, NemU
from xaiserve.handlers.nets import frozen_spec_from_arch


def arch_of(module: nn.Module, frozen_arch: dict[str, Any], **extra: Any) -> dict[str, Any]:
    if isinstance(module, NemU):
        return {"type": "nem_u", "frozen": frozen_arch, "decoder": module.decoder.arch.to_dict(), **extra}
    if isinstance(module, NemT):
        return {
            "type": "nemt",
            "frozen": frozen_arch,
            "decoder": {"widths": list(module.decoders[0].arch.widths), "norm": module.decoders[0].arch.norm},
            "num_classes": module.num_classes,
            "conditional": module.conditional,
            "smoothing": module.smoothing,
            **extra,
        }
    raise TypeError(f"not a masking network: {type(module).__name__}")


def build_from_arch(kind: str, arch: dict[str, Any], what: str = "model") -> nn.Module:
    if arch.get("type") != kind or "frozen" not in arch or "decoder" not in arch:
        raise FailedPrecondition(
            f"{what}: arch {sorted(arch)} is not a {kind} arch (needs type, frozen, decoder); re-export it"
        )
    frozen = frozen_spec_from_arch(arch["frozen"], what=f"{what} (frozen model)").build()
    try:
        dec = DecoderArch.from_dict(arch["decoder"])
    except (KeyError, TypeError, ValueError) as e:
        raise FailedPrecondition(f"{what}: decoder arch {arch['decoder']} is malformed ({e}); re-export it") from None
    if kind == "nem_u":
        return NemU(frozen, dec)
    return NemT(
        frozen,
        dec,
        num_classes=int(arch["num_classes"]),
        conditional=bool(arch.get("conditional", False)),
        smoothing=int(arch.get("smoothing", 21)),
    )
