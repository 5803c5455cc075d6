"""The NEM-U and NEMt masking networks as torch modules (frozen model + trained decoder).

Both return the mask together with the frozen model's output from ONE forward pass of the frozen
model ([NEM-U], sec. 3.1: the mask is produced "in parallel" with the representation): the decoder
reads the pyramid taps of that same pass. H and W must be multiples of the encoder's deepest stride (8);
the served models take 64 x 64. Masking is applied to the normalised input (x * m, so a
masked-out pixel is the dataset mean), exactly as the server's fidelity check does.

- NemU ([NEM-U], sec. 3.3): image -> (mask [B,1,H,W], embedding [B,D]).
- NemT ([NEMt], sec. 3.2): image, target [B] int64 (-1 = the classifier's argmax)
  -> (mask [B,1,H,W], logits [B,K], label [B] int64). Either a bank of per-class decoders (one
  masking network per target label, as in the paper; all run, the label selects one) or one
  class-conditional decoder (FiLM). The mask goes through stochastic weighted neighbourhood averaging
  (random kernels in training, the expected box kernel in eval mode; see smoothing.py).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from xaiserve.errors import InvalidArgument
from xaiserve.handlers.nem.decoder import DecoderArch, UNetDecoder, bank_forward, logits_to_mask
from xaiserve.handlers.nem.smoothing import DEFAULT_SIZE, stochastic_smooth
from xaiserve.handlers.nets import require_pyramid


def _exporting() -> bool:
    exporting = getattr(torch.compiler, "is_exporting", lambda: False)
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling() or exporting()


def with_strides(arch: DecoderArch, frozen: nn.Module) -> DecoderArch:
    """The decoder arch with the frozen model's pyramid strides (`pyramid_strides` of a tapped user
    model, handlers.nets.forms.TappedModel); handlers.nets' pyramids (1, 2, 4, ...) keep the default."""
    strides = tuple(int(s) for s in getattr(frozen, "pyramid_strides", ()) or ())
    if arch.strides or not strides or strides == tuple(2**i for i in range(len(strides))):
        return arch
    return replace(arch, strides=strides)


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode (batch norm uses its running statistics) and no gradients for the parameters."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


class NemU(nn.Module):
    """NEM-U: the frozen encoder is the U-Net encoder, only `decoder` trains."""

    kind = "nem_u"

    def __init__(self, frozen: nn.Module, decoder_arch: DecoderArch = DecoderArch()):
        super().__init__()
        chans = require_pyramid(frozen, "the encoder NEM-U explains")
        self.frozen = freeze(frozen)
        self.decoder = UNetDecoder(chans, with_strides(decoder_arch, frozen))

    def train(self, mode: bool = True) -> "NemU":
        super().train(mode)
        self.frozen.eval()  # the frozen model always runs in eval mode
        return self

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, pyr = self.frozen.features(image)
        return logits_to_mask(self.decoder(pyr), self.decoder.stride), out


class NemT(nn.Module):
    """NEMt on a frozen classifier: a bank of per-class decoders, or one class-conditional decoder."""

    kind = "nemt"

    def __init__(
        self,
        frozen: nn.Module,
        decoder_arch: DecoderArch,
        *,
        num_classes: int,
        conditional: bool,
        smoothing: int = DEFAULT_SIZE,
    ):
        super().__init__()
        chans = require_pyramid(frozen, "the classifier NEMt explains")
        self.frozen = freeze(frozen)
        self.num_classes = int(num_classes)
        self.conditional = bool(conditional)
        self.smoothing = int(smoothing)
        if self.conditional:
            arch = DecoderArch(
                widths=decoder_arch.widths,
                num_classes=self.num_classes,
                norm=decoder_arch.norm,
                strides=with_strides(decoder_arch, frozen).strides,
            )
            self.decoders = nn.ModuleList([UNetDecoder(chans, arch)])
        else:
            arch = DecoderArch(
                widths=decoder_arch.widths,
                num_classes=0,
                norm=decoder_arch.norm,
                strides=with_strides(decoder_arch, frozen).strides,
            )
            self.decoders = nn.ModuleList([UNetDecoder(chans, arch) for _ in range(self.num_classes)])

    def train(self, mode: bool = True) -> "NemT":
        super().train(mode)
        self.frozen.eval()
        return self

    def resolve_label(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """-1 -> argmax of the logits; anything else must be a valid class index."""
        target = target.to(torch.int64).reshape(-1)
        if not _exporting():
            bad = (target < -1) | (target >= self.num_classes)
            if bool(bad.any()):
                raise InvalidArgument(
                    f"target label {int(target[bad][0])} is outside the classifier's range: use 0..{self.num_classes - 1}, "
                    "or -1 for the predicted class"
                )
        return torch.where(target < 0, logits.argmax(dim=1), target)

    def mask_logits(
        self, pyramid: Sequence[torch.Tensor], label: torch.Tensor, only: int | None = None
    ) -> torch.Tensor:
        """Decoder logits for `label`; `only` = train/evaluate one per-class decoder alone."""
        if self.conditional:
            return self.decoders[0](pyramid, label)
        if only is not None:
            return self.decoders[only](pyramid)
        every = bank_forward(self.decoders, pyramid)  # [B,K,h,w], all K networks fused
        # select with a one-hot weighted sum (no shape arithmetic in the exported graph)
        onehot = F.one_hot(label, self.num_classes).to(every.dtype)[:, :, None, None]
        return (every * onehot).sum(dim=1, keepdim=True)

    def mask_from(
        self,
        pyramid: Sequence[torch.Tensor],
        label: torch.Tensor,
        only: int | None = None,
        generator: torch.Generator | None = None,
        stochastic: bool | None = None,
    ) -> torch.Tensor:
        """Mask [B,1,H,W]: random smoothing kernels if `stochastic` (default: in training mode), else the box."""
        m = logits_to_mask(self.mask_logits(pyramid, label, only), self.decoders[0].stride)
        stochastic = self.training if stochastic is None else stochastic
        return stochastic_smooth(m, self.smoothing, training=stochastic, generator=generator)

    def forward(self, image: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, pyr = self.frozen.features(image)
        label = self.resolve_label(logits, target)
        return self.mask_from(pyr, label), logits, label
