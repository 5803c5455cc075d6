"""Checks that catch device mistakes on a machine without a GPU.

Two instruments, both torch-function modes (they see every torch call of the thread they run in):

- `wrong_default_device()`: makes "meta" the default device. A tensor created without an explicit
  device (torch.zeros(...), torch.rand(..., generator=cpu_generator), torch.as_tensor(ndarray)) then
  lands on meta instead of beside the module: on a GPU worker it would land on the CPU. Mixing it
  with the real tensors fails, and `DeviceRecorder` lists the calls that made one.
- `DeviceRecorder(root)`: records (a) every non-empty tensor a torch call returns whose device is
  not `expected`, with the call and the caller's file and line, and (b) factory calls and host copies
  (Tensor.cpu / .numpy) made from code under `root` (the package), which on a GPU would create a
  tensor off the device or copy a tensor to the host inside a method; `allowed` names the
  (file, function) pairs that are adapter boundaries (a method that returns numpy by contract).

Library internals (captum) are outside `root`: captum's own small CPU tensors (e.g. Integrated
Gradients' step sizes, moved to the gradient's device right away) are its maintainers' business,
so saliency is checked with the recorder's (b) only, RELAX and ablation paths with both.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from torch.overrides import TorchFunctionMode

ROOT = Path(__file__).resolve().parents[1] / "xaiserve"

FACTORIES = {
    torch.zeros,
    torch.ones,
    torch.full,
    torch.empty,
    torch.rand,
    torch.randn,
    torch.randint,
    torch.randperm,
    torch.arange,
    torch.linspace,
    torch.logspace,
    torch.eye,
    torch.tensor,
    torch.as_tensor,
    torch.scalar_tensor,
    torch.empty_strided,
}
HOST_COPIES = {torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.tolist}


@dataclass
class Finding:
    what: str
    call: str
    where: str


@dataclass
class DeviceRecorder(TorchFunctionMode):
    expected: str = "cpu"
    root: Path = ROOT
    allowed: set[tuple[str, str]] = field(default_factory=set)  # (file name, function or "*") boundaries
    findings: list[Finding] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__()

    def _caller(self) -> tuple[str, str, str]:
        f = sys._getframe(2)  # 0: _caller, 1: __torch_function__, 2: the code that called torch
        return (
            f.f_code.co_filename,
            f.f_code.co_name,
            f"{Path(f.f_code.co_filename).name}:{f.f_lineno} ({f.f_code.co_name})",
        )

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        path, fn, where = self._caller()
        name_ = Path(path).name
        ours = path.startswith(str(self.root)) and (name_, fn) not in self.allowed and (name_, "*") not in self.allowed
        name = getattr(func, "__qualname__", getattr(func, "__name__", str(func)))
        if ours and func in FACTORIES and kwargs.get("device") is None:
            self.findings.append(Finding("factory without device", name, where))
        if ours and func in HOST_COPIES:
            self.findings.append(Finding("host copy", name, where))
        out = func(*args, **kwargs)
        stack = [out]
        while stack:
            o = stack.pop()
            if isinstance(o, (tuple, list)):
                stack.extend(o)
            elif isinstance(o, torch.Tensor) and o.numel() > 0 and o.device.type != self.expected:
                self.findings.append(Finding(f"tensor on {o.device}", name, where))
        return out

    def report(self) -> str:
        seen: dict[tuple[str, str, str], int] = {}
        for f in self.findings:
            seen[(f.what, f.call, f.where)] = seen.get((f.what, f.call, f.where), 0) + 1
        return "\n".join(f"{n}x {w}: {c} at {loc}" for (w, c, loc), n in sorted(seen.items()))


@contextlib.contextmanager
def wrong_default_device() -> Iterator[None]:
    """Tensors created without a device go to "meta" (see the module docstring)."""
    with torch.device("meta"):
        yield
