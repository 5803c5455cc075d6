"""Embed functions for RELAX (relax.Embed: a float32 batch [B,C,H,W] in, embeddings [B,D] out) on a device.

- `torch_embed(module, forward_dtype)`: a frozen torch encoder where it lives, its forward under
  autocast when a dtype is given (bf16 / fp16: the forward only; the embedding comes back as
  float32 and the cosine similarity and the float64 statistics are computed as without it).
- `ort_iobinding_embed(session, input_name, output_name, device)`: an ONNX Runtime session whose
  input and output are bound to torch tensors on `device` (IOBinding with the tensors' memory): a
  batch masked on the GPU goes to ONNX Runtime's CUDA provider and the embedding comes back
  without host copies. The CPU provider with CPU tensors runs the same code.

Pure torch and numpy: the session is passed in (this module does not import onnxruntime).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from xaiserve.devices import autocast, module_device

Embed = Callable[[torch.Tensor], torch.Tensor]


def torch_embed(module: torch.nn.Module, forward_dtype: torch.dtype | None = None) -> Embed:
    """An embed function over a torch encoder (its output, or the first of a tuple), float32 out."""
    device = module_device(module)

    def embed(batch: torch.Tensor) -> torch.Tensor:
        with autocast(device, forward_dtype):
            out = module(batch)
        out = out[0] if isinstance(out, (tuple, list)) else out
        return out.float()

    return embed


def ort_iobinding_embed(session: Any, input_name: str, output_name: str, device: torch.device) -> Embed:
    """An embed function over an onnxruntime.InferenceSession reading and writing torch tensors on `device`."""
    kind, index = device.type, device.index or 0
    width: list[int] = []  # the embedding size, learnt from the first call

    def embed(batch: torch.Tensor) -> torch.Tensor:
        x = batch.detach().to(device=device, dtype=torch.float32).contiguous()
        binding = session.io_binding()
        binding.bind_input(input_name, kind, index, np.float32, list(x.shape), x.data_ptr())
        out = torch.empty((x.shape[0], width[0]), dtype=torch.float32, device=device) if width else None
        if out is not None:
            binding.bind_output(output_name, kind, index, np.float32, list(out.shape), out.data_ptr())
        else:
            binding.bind_output(output_name, kind, index)
        if kind == "cuda":
            torch.cuda.current_stream(device).synchronize()  # torch's writes of x land before ONNX Runtime reads it
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        if out is None:  # first call: ONNX Runtime allocated the output; one small copy teaches the width
            arr = binding.copy_outputs_to_cpu()[0]
            width.append(int(np.prod(arr.shape[1:])))
            out = torch.from_numpy(np.ascontiguousarray(arr).reshape(arr.shape[0], -1)).to(device)
        return out

    return embed
