"""Client-side particle stack I/O for `xaiserve denoise STACK.mrcs --out denoised.mrcs`.

read_stack(path) -> float32 [N, H, W]; write_stack(path, arr) writes an MRC image stack (mode 2).
Errors are ValueError / FileNotFoundError with the path and what is wrong, for the CLI to print.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from xaiserve.handlers.denoise import mrc


def read_stack(path: str | Path) -> np.ndarray:
    """Read an MRC image (.mrc) or particle stack (.mrcs) as float32 [N, H, W]."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such particle stack (expected an .mrcs / .mrc file)")
    return mrc.read_stack(p)


def write_stack(path: str | Path, arr: np.ndarray, voxel_size: float = 1.0) -> None:
    """Write [N, H, W], [N, 1, H, W] or [H, W] float data to `path` as an MRC image stack.

    The parent directory is created if needed; an existing file is replaced.
    """
    a = np.asarray(arr)
    if a.ndim == 4 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim not in (2, 3) or a.size == 0:
        raise ValueError(f"write_stack takes [N, H, W], [N, 1, H, W] or [H, W]; got shape {list(a.shape)}")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    mrc.write_stack(p, a, voxel_size=voxel_size)
