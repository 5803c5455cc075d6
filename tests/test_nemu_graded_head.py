"""The graded NEM-U head (DecoderArch.head_slope, docs/METHODS.md NEM-U decision 2026-12).

With a ReLU in the last decoder block, every pixel whose last-block units are all cut to 0 gets the head's
bias as its logit: one exact plateau. After one epoch of the families recipe this plateau held the
mask's maximum on every validation image (median 660 tied pixels), so the pointing game scored the
plateau, not a maximum. The graded head ends the last block in a leaky ReLU: no such plateau.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xaiserve.handlers.nem.decoder import DecoderArch, UNetDecoder
from xaiserve.training import metrics as M

CHANS = (16, 32, 64, 128)


def _pyramid(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, c, 64 // 2**i, 64 // 2**i, generator=g) for i, c in enumerate(CHANS)]


def _dead_last_block(arch: DecoderArch) -> UNetDecoder:
    """A decoder whose last block is cut to <= 0 everywhere (batch-norm shift -20): the ReLU head sees zeros."""
    dec = UNetDecoder(CHANS, arch).eval()
    with torch.no_grad():
        dec.norms[-1].bias.fill_(-20.0)
        dec.head.weight.fill_(-0.1)
        dec.head.bias.fill_(0.5)
    return dec


def test_relu_head_on_dead_units_is_one_plateau_at_the_bias():
    dec = _dead_last_block(DecoderArch(widths=(32, 16, 8), pad="replicate", logit_bound=6.0))
    with torch.no_grad():
        raw = dec.head_logits(_pyramid())
    assert torch.equal(raw, torch.full_like(raw, 0.5))  # every pixel tied at the head's bias


def test_graded_head_has_no_plateau_and_a_unique_maximum():
    arch = DecoderArch(widths=(32, 16, 8), pad="replicate", logit_bound=6.0, head_slope=0.1)
    dec = _dead_last_block(arch)
    with torch.no_grad():
        logits = dec(_pyramid())
    flat = logits.flatten(1)
    assert (
        float(flat.std(dim=1).min()) > 1e-3
    )  # graded (the ReLU head: exactly 0): spread over the image, not one value
    # the maximum is unique (ties as the pointing game counts them, after min-max normalisation)
    norm = M.normalise_maps(logits[:, 0].numpy())
    ties = (norm >= 1 - 1e-6).reshape(len(norm), -1).sum(axis=1)
    assert ties.max() == 1
    # bounded as before: b tanh(l / b)
    assert float(logits.abs().max()) <= 6.0
    with torch.no_grad():
        torch.testing.assert_close(logits, dec.bound(dec.head_logits(_pyramid())))


def test_head_slope_round_trips_and_old_entries_load_as_relu():
    arch = DecoderArch(widths=(32, 16, 8), pad="replicate", logit_bound=6.0, head_slope=0.1)
    d = arch.to_dict()
    assert d["head_slope"] == 0.1 and DecoderArch.from_dict(d) == arch
    old = {"widths": [32, 16, 8], "num_classes": 0, "norm": True}
    assert DecoderArch.from_dict(old).head_slope == 0.0
    assert "head_slope" not in DecoderArch.from_dict(old).to_dict()


def test_graded_head_exports_to_onnx(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    dec = _dead_last_block(DecoderArch(widths=(32, 16, 8), pad="replicate", logit_bound=6.0, head_slope=0.1))
    pyr = _pyramid(1)

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.dec = dec

        def forward(self, a, b, c, d):
            return self.dec([a, b, c, d])

    path = tmp_path / "dec.onnx"
    torch.onnx.export(Wrap().eval(), tuple(pyr), str(path), input_names=list("abcd"), output_names=["l"], dynamo=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}  # the unused shallowest tap is pruned
    got = sess.run(None, {k: t.numpy() for k, t in zip("abcd", pyr) if k in names})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, dec(pyr).numpy(), atol=1e-4)
