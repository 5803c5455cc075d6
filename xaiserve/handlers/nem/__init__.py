"""NEM-U and NEMt masking networks: decoder, losses, smoothing, modules, export ([NEM-U] and [NEMt])."""

from xaiserve.handlers.nem.decoder import DecoderArch, UNetDecoder
from xaiserve.handlers.nem.losses import (
    NEMT_FORMS,
    NemTLossConfig,
    NemULossConfig,
    nemt_deletion_loss,
    nemt_preservation_loss,
    nemu_loss,
)
from xaiserve.handlers.nem.models import NemT, NemU, freeze
from xaiserve.handlers.nem.smoothing import box_smooth, random_kernels, scaled_size, smooth_with, stochastic_smooth

__all__ = [
    "DecoderArch",
    "UNetDecoder",
    "NEMT_FORMS",
    "NemTLossConfig",
    "NemULossConfig",
    "nemt_deletion_loss",
    "nemt_preservation_loss",
    "nemu_loss",
    "NemT",
    "NemU",
    "freeze",
    "box_smooth",
    "random_kernels",
    "smooth_with",
    "scaled_size",
    "stochastic_smooth",
]
