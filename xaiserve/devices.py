"""Where torch work runs: the device setting, out-of-memory recovery, batch sizes from free memory, autocast.

One setting names the device of every torch module, mask batch, path and gradient of a process:

    cpu | cuda | cuda:N | auto      (auto: the first CUDA device when torch sees one, else the CPU)

`resolve_device` turns it into a torch.device once, at start (a gateway, a worker, a training run),
and fails there, not in the first job, when CUDA is asked for and absent. Everything below is pure
torch (no service imports): the method families and the training loops use it alike.

Out of memory: `run_chunked` evaluates a batch in chunks; when a chunk raises an out-of-memory
error (torch.OutOfMemoryError on CUDA, the CPU allocator's "can't allocate memory"), the chunk
size is halved (down to 1), the same chunk is tried again and the run goes on; `on_oom` is told
(old, new) so the caller can count the event. Chunks of a frozen model in eval mode are
independent, so the result does not depend on where the batch was cut.

Batch sizes from memory: on CUDA, `per_item_bytes` measures the peak memory of a small probe
batch and `batch_for_memory` fits a power of two into a fraction of the free memory; on the CPU
there is no free-memory reading that means anything to a shared host, and the configured size stays.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from xaiserve.errors import FailedPrecondition, InvalidArgument, quote

if TYPE_CHECKING:
    import torch

# torch is imported inside the functions: the configuration checks the setting's form
# (check_device_setting) without paying for the torch import

DEVICE_SETTINGS = ("auto", "cpu", "cuda", "cuda:N")
_SETTING = re.compile(r"^(auto|cpu|cuda(:\d{1,3})?)$")
PRECISIONS = ("auto", "float32", "bfloat16", "float16")

T = TypeVar("T")


class DeviceUnavailable(FailedPrecondition):
    """The device setting names a device this machine does not have (raised at start; a RuntimeError)."""


def check_device_setting(text: str) -> str:
    """The setting normalised ("CUDA:0 " -> "cuda:0"); InvalidArgument (a ValueError) naming the accepted forms."""
    s = str(text).strip().lower()
    if not _SETTING.match(s):
        raise InvalidArgument(f"device {quote(text)} is not one of cpu, cuda, cuda:N (N = a device index) or auto")
    return s


def resolve_device(setting: str = "auto") -> torch.device:
    """The torch.device a setting names on this machine. DeviceUnavailable when it names a CUDA
    device that torch cannot use (no CUDA build, no driver, or an index beyond the devices present)."""
    import torch

    s = check_device_setting(setting)
    if s == "cpu":
        return torch.device("cpu")
    available = torch.cuda.is_available()
    if s == "auto":
        return torch.device("cuda", 0) if available else torch.device("cpu")
    if not available:
        raise DeviceUnavailable(
            f"device {s}: torch {torch.__version__} sees no CUDA device (a CPU build of torch, no NVIDIA "
            "driver, or CUDA_VISIBLE_DEVICES empty); use --device cpu or auto"
        )
    index = int(s.partition(":")[2] or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise DeviceUnavailable(f"device {s}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
    return torch.device("cuda", index)


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer (the CPU for a module with neither)."""
    import torch

    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def forward_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for forwards of frozen models, or None for float32.

    "auto": bfloat16 on CUDA devices that support it, float32 on the CPU (docs/METHODS.md, "Devices
    and precision": bf16 is 1.3-1.5x faster on a CPU with AMX and emulated, slower, on one without,
    so a CPU host opts in with "bfloat16"). float16 is only taken when asked for explicitly."""
    import torch

    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "float32":
        return None
    if precision == "bfloat16":
        return torch.bfloat16
    if precision == "float16":
        return torch.float16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """torch.autocast for `dtype` on `device`, or a no-op for float32 (dtype None)."""
    import torch

    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# -- out of memory -----------------------------------------------------------------------------------
_CPU_OOM = ("DefaultCPUAllocator: can't allocate memory", "DefaultCPUAllocator: not enough memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """True for an allocation failure the caller can recover from by using less memory."""
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(s in str(exc) for s in _CPU_OOM)


def release_cached(device: torch.device) -> None:
    """Give the caching allocator's free blocks back after an OOM (the retry needs contiguous memory)."""
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()


@dataclass
class ChunkSize:
    """The current chunk size of a halving run; `on_oom(old, new)` is called on every halving."""

    size: int
    device: "torch.device | None" = None  # None: the CPU
    on_oom: Callable[[int, int], None] | None = None
    halvings: int = 0

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"chunk size must be >= 1, got {self.size}")

    def halve(self) -> None:
        old = self.size
        self.size = max(1, old // 2)
        self.halvings += 1
        if self.device is not None:
            release_cached(self.device)
        if self.on_oom is not None:
            self.on_oom(old, self.size)


def run_chunked(fn: Callable[[int, int], T], n: int, chunk: ChunkSize) -> list[T]:
    """[fn(0, k), fn(k, 2k), ...] over n items in chunks of chunk.size; an out-of-memory error
    halves the size and retries the same start (re-raised when the size is already 1).

    The halved size stays for the rest of the run (and for later calls with the same ChunkSize):
    memory that did not fit once will not fit on the next batch either."""
    out: list[T] = []
    i = 0
    while i < n:
        k = min(chunk.size, n - i)
        oom = False
        try:
            out.append(fn(i, i + k))
        except Exception as e:  # noqa: BLE001 - only allocation failures are handled, the rest re-raised
            if not is_out_of_memory(e) or chunk.size <= 1:
                raise
            oom = True  # halve outside the handler: the traceback's frames still hold the failed chunk's tensors
        if oom:
            chunk.halve()
            continue
        i += k
    return out


# -- batch sizes from free memory ------------------------------------------------------------------
def free_memory(device: torch.device) -> int | None:
    """Free bytes on a CUDA device (driver's view, other processes included); None on the CPU."""
    import torch

    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def batch_for_memory(
    free_bytes: int, per_item_bytes: float, *, fraction: float = 0.5, lo: int = 1, hi: int = 4096
) -> int:
    """The largest b = lo * 2^k <= hi with b * per_item_bytes <= fraction * free_bytes (lo when none fits).

    A fraction below 1 leaves room for the allocator's fragmentation, other models on the same
    device and the concurrent jobs of the worker."""
    if per_item_bytes <= 0 or free_bytes <= 0:
        return lo
    fit = int(fraction * free_bytes // per_item_bytes)
    b = lo
    while b * 2 <= min(fit, hi):
        b *= 2
    return max(lo, min(b, hi))


def per_item_bytes(run: Callable[[int], Any], device: torch.device, probe: int = 2) -> float | None:
    """Peak CUDA memory per item of `run(probe)` (a forward, or forward + backward, of `probe`
    items), above what was allocated before; None on the CPU."""
    import torch

    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    run(probe)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    return max(1.0, peak / probe)


def memory_batch(
    run: Callable[[int], Any], device: torch.device, default: int, *, lo: int = 1, hi: int = 4096, fraction: float = 0.5
) -> int:
    """A batch size chosen from free memory: on CUDA what fits in `fraction` of the free memory by a
    probe of `run` (in [lo, hi]); on the CPU `default`. Callers use it only when no size was configured."""
    per = per_item_bytes(run, device)
    free = free_memory(device)
    if per is None or free is None:
        return default
    return batch_for_memory(free, per, fraction=fraction, lo=lo, hi=hi)
