"""Rebuild the torch module of a manifest entry, whatever its kind (`load_module`).

One dispatch on the model kind, above the families it dispatches to (nets, nem, denoise), so that no
family imports another through it: the frozen encoder/classifier for kinds encoder/classifier (from
`entry.arch` and `files["state_dict"]`, a user's TorchScript / torch.export file, or a user's ONNX
graph converted to torch (handlers.nets.onnx_torch)), the whole masking network (frozen model + trained decoder)
for kinds nem_u/nemt, the denoiser for kind denoiser. Every failure is a FailedPrecondition that
names the file and what to do.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from xaiserve.errors import FailedPrecondition
from xaiserve.handlers.denoise.export import load_denoiser
from xaiserve.handlers.nem.build import build_from_arch
from xaiserve.handlers.nets import frozen_spec_from_arch, load_into, load_state_dict_file


def converted_from_onnx(raw: dict) -> bool:
    """Whether a manifest entry's torch form is its ONNX graph converted at load (`torch_form.from: onnx`,
    written by `xaiserve models add` when the converted module could not be saved as a .pt2)."""
    tf = raw.get("torch_form")
    return isinstance(tf, dict) and tf.get("from") == "onnx"


def load_module(entry, store: Path) -> nn.Module:
    """Rebuild the torch module of a manifest entry (eval mode). See the module docstring."""
    store = Path(store)
    if entry.kind == "denoiser":
        return load_denoiser(entry, store)
    if entry.kind in ("encoder", "classifier") and "state_dict" not in entry.files:
        from xaiserve.handlers.nets.forms import TORCH_FILE_KEYS, load_torch_form

        key = next((k for k in TORCH_FILE_KEYS if k in entry.files), None)
        s = entry.input
        if key is not None:  # a user's own model: TorchScript or torch.export
            return load_torch_form(store / entry.files[key], key, channels=s.channels, height=s.height, width=s.width)
        if converted_from_onnx(entry.raw) and entry.files.get("onnx"):
            from xaiserve.handlers.nets.onnx_torch import convert_onnx

            return convert_onnx(
                store / entry.files["onnx"], channels=s.channels, height=s.height, width=s.width, io=entry.io
            )
    rel = entry.files.get("state_dict")
    if not rel:
        raise FailedPrecondition(
            f"model {entry.id} has no 'state_dict' file in its manifest entry; it can only be served via ONNX"
        )
    state = load_state_dict_file(store / rel, what=f"model {entry.id} weights")
    if entry.kind in ("encoder", "classifier"):
        spec = frozen_spec_from_arch(entry.arch, what=f"model {entry.id}")
        if (entry.kind == "classifier") != bool(spec.num_classes):
            raise FailedPrecondition(f"model {entry.id}: kind {entry.kind} but arch num_classes={spec.num_classes}")
        module = spec.build()
    elif entry.kind in ("nem_u", "nemt"):
        module = build_from_arch(entry.kind, entry.arch, what=f"model {entry.id}")
    else:
        raise FailedPrecondition(f"model {entry.id} of kind {entry.kind!r} has no torch module in handlers.nets")
    return load_into(module, state, f"model {entry.id}").eval()
