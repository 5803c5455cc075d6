"""RELAX / RISE mask distribution ([RELAX], sec. 3.1, "Masking distribution").

N binary grids of h x w cells, each cell kept with probability p, are upsampled bilinearly to
(h+1)*C_H x (w+1)*C_W with C_H x C_W = floor(H/h) x floor(W/w) the cell size, and an H x W window
is cropped from each at a random offset inside one cell. Masks are generated a whole batch at a
time (one rand, two batched matrix products) from a torch.Generator, so a seed fixes them and a
saved generator state replays them (the two-pass estimator does that).

Deviations, both only for sizes the paper never used (it uses 224 = 7 * 32):
- When H is not a multiple of h, floor(H/h) can make the upsampled grid smaller than the image
  (e.g. H=20, h=7: (7+1)*2 = 16 < 20); we then use ceil(H/h) so the crop always fits.
- The crop offset is uniform in [0, C) as in RISE, but capped so the window stays inside the
  upsampled grid ((h+1)*C - H + 1 positions when H mod h > 1).
- torch's bilinear interpolation (align_corners=False) clamps at the border where RISE's
  skimage.resize reflects; this changes values only within half a cell of the upsampled border,
  which the crop mostly discards.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class MaskGeometry:
    """Sizes of one mask distribution: grid cells, cell size, upsampled size, crop offsets."""

    height: int
    width: int
    cells_h: int
    cells_w: int
    cell_h: int
    cell_w: int
    up_h: int
    up_w: int
    offsets_h: int  # number of distinct crop offsets along H
    offsets_w: int


def _axis(size: int, cells: int) -> tuple[int, int, int]:
    cell = size // cells
    if (cells + 1) * cell < size:  # floor is too small for a crop to fit (see module docstring)
        cell = -(-size // cells)
    up = (cells + 1) * cell
    return cell, up, min(cell, up - size + 1)


def mask_geometry(height: int, width: int, cells: int | tuple[int, int] = 7) -> MaskGeometry:
    """The sec. 3.1 geometry for an H x W image and an h x w grid; raises ValueError if impossible."""
    ch, cw = (cells, cells) if isinstance(cells, int) else cells
    if height < 1 or width < 1:
        raise ValueError(f"image size {height} x {width} must be positive")
    if not (1 <= ch <= height and 1 <= cw <= width):
        raise ValueError(
            f"a {ch} x {cw} grid does not fit a {height} x {width} image; use 1..{min(height, width)} cells"
        )
    cell_h, up_h, off_h = _axis(height, ch)
    cell_w, up_w, off_w = _axis(width, cw)
    return MaskGeometry(height, width, ch, cw, cell_h, cell_w, up_h, up_w, off_h, off_w)


def interpolation_matrix(
    cells: int, up: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> torch.Tensor:
    """[up, cells]: column j is the linear upsampling (align_corners=False) of the j-th unit vector."""
    eye = torch.eye(cells, dtype=dtype, device=device)[None]  # [1, cells (channels), cells (length)]
    return F.interpolate(eye, size=up, mode="linear", align_corners=False)[0].T.contiguous()


def generate_masks(
    n: int,
    geometry: MaskGeometry,
    *,
    p_keep: float = 0.5,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """n masks [n, H, W] in [0, 1] ([RELAX] sec. 3.1), drawn from `generator` in a fixed order:
    first the n grids, then the n row offsets, then the n column offsets.

    The masks are made on `device` (default: the generator's device, else the CPU), drawn there
    from the generator: a CUDA generator gives other masks than a CPU one with the same seed, and
    each is reproducible on its own device.

    Bilinear upsampling is separable and linear, so the cropped upsampled mask is
    A_h[rows] @ grid @ A_w[cols]^T with the 1-D interpolation matrices A: two small batched matrix
    products instead of interpolating the whole (h+1)C x (w+1)C grid and gathering the crop
    (same numbers as F.interpolate(mode="bilinear") + crop up to rounding, ~8x faster).
    """
    g = geometry
    dev = (
        torch.device(device)
        if device is not None
        else (generator.device if generator is not None else torch.device("cpu"))
    )
    grid = (torch.rand(n, g.cells_h, g.cells_w, generator=generator, device=dev) < p_keep).to(dtype)
    off_h = torch.randint(0, g.offsets_h, (n,), generator=generator, device=dev)
    off_w = torch.randint(0, g.offsets_w, (n,), generator=generator, device=dev)
    rows, cols = torch.arange(g.height, device=dev), torch.arange(g.width, device=dev)
    a_h = interpolation_matrix(g.cells_h, g.up_h, dtype, dev)[off_h[:, None] + rows[None, :]]  # [n, H, h]
    a_w = interpolation_matrix(g.cells_w, g.up_w, dtype, dev)[off_w[:, None] + cols[None, :]]  # [n, W, w]
    return torch.bmm(torch.bmm(a_h, grid), a_w.transpose(1, 2)).clamp_(0.0, 1.0)
