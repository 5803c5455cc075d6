"""Torch layers of the spiral CNN and of its cartesian twin ([THESIS], sec. 7.3.2-7.3.3).

The spiral side keeps every resampling operator of `geometry.py` as buffers: (index, weight)
pairs applied by one `index_select` (ONNX Gather) and a weighted sum, and the ribbons as
GridSample grids (linear interpolation along the spiral), so the whole network exports to ONNX
with the operators as initialisers. Two forms of the same maps:
  `portable = True` (inference, the exported graph): gathers on the batch-folded samples-major
    layout, ribbon convolutions regrouped by `SpiralOps.ribbon_conv` (middle row exact, only the
    outer rows interpolated), batch norms folded into the convolutions;
  `portable = False` (training, `train.FastMode`): F.embedding_bag gathers for every map, the
    whole ribbon included, several times faster in torch on CPU, then one conv2d per ribbon.
Both sides expose the same small interface, "space ops", used by the shared U-Net in `networks.py`:

    encode(x [B,1,H,W]) -> features in the space    decode(features) -> [B,1,H,W]
    (spiral features are [B, C, 1, n]: 4-D, so that a ribbon convolution is an ordinary conv2d)
    down(level, f) / up(level, f)                    between resolutions
    make_conv(level, cin, cout) -> a conv module whose forward is conv(f, ops); f may be a list
                                   of feature maps, meaning their channel concatenation
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xaiserve.handlers.denoise import geometry as geo


def gather_apply(x: Tensor, index: Tensor, weight: Tensor) -> Tensor:
    """Sparse linear map on the last axis: out[b, c, m] = sum_k weight[m, k] * x[b, c, index[m, k]].

    x [B, C, N], index int64 [M, K], weight [M, K] -> [B, C, M]. The "portable" form used in the
    exported graph: the batch is folded into the channels and moved last ([N, B*C], one Transpose),
    so each tap of the Gather copies B*C contiguous values; the K taps of an output are then
    summed by a batched MatMul [M, 1, K] x [M, K, B*C], without elementwise passes over the
    gathered taps. For one channel (the cartesian <-> spiral maps) at batch 1 those M tiny
    MatMuls cost more than they save, so there a Mul and a ReduceSum sum the taps.
    Measured in ONNX Runtime (1 thread, batch 32, one profiling sitting): the level changes of the
    64 x 64 network took 54 ms per batch in this form, 74 ms in the channels-last
    Gather / Mul / ReduceSum form it replaces.
    """
    b, c, n = x.shape
    m, k = index.shape
    xt = x.reshape(b * c, n).t()
    if c == 1:  # taps-major: K slabs [M, B] summed (ReduceSum over a leading axis)
        g = xt.index_select(0, index.t().reshape(-1)).view(k, m, b)
        out = (g * weight.t().unsqueeze(-1)).sum(0)
    else:
        g = xt.index_select(0, index.reshape(-1)).view(m, k, b * c)
        out = torch.matmul(weight.unsqueeze(1), g).view(m, b * c)
    return out.t().reshape(b, c, m)


def ribbon_grid(positions: np.ndarray) -> Tensor:
    """GridSample grid [1, rows, n, 2] reading a [B,C,1,n] spiral at the fractional positions of
    the ribbon rows (align_corners=False: x = (2 p + 1) / n - 1); positions that are NaN (beyond
    the outermost winding) point far outside and read zero. The middle row (the spiral itself) is
    stored too: the reference form (`SpiralOps.ribbon`) and the training operator read it; the
    exported form reads the outer rows only (`SpiralOps.ribbon_conv`)."""
    n = positions.shape[1]
    p = positions
    gx = np.where(np.isfinite(p), (2.0 * np.nan_to_num(p) + 1.0) / n - 1.0, -10.0)
    return torch.from_numpy(np.stack([gx, np.zeros_like(gx)], -1)[None].astype(np.float32))


def grid_operator_from(grid: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """The rows x n ribbon grid as a 2-tap (index, weight) operator [rows*n, 2] computing what
    F.grid_sample(bilinear, zeros, align_corners=False) computes on it (to float32 rounding of the
    sample coordinate, ~1e-4 of a sample at n = 3217), for the training fast path."""
    gx = grid[0, :, :, 0]  # [rows, n]
    x = ((gx + 1) * n - 1) / 2
    j = torch.floor(x)
    f = x - j
    j = j.long()
    i0, i1 = j, j + 1
    w0 = torch.where((i0 >= 0) & (i0 < n), 1 - f, torch.zeros_like(f))
    w1 = torch.where((i1 >= 0) & (i1 < n), f, torch.zeros_like(f))
    idx = torch.stack([i0.clamp(0, n - 1), i1.clamp(0, n - 1)], -1).reshape(-1, 2)
    w = torch.stack([w0, w1], -1).reshape(-1, 2)
    return idx.contiguous(), w.contiguous()


def transpose_operator(index: Tensor, weight: Tensor, n_in: int) -> tuple[Tensor, Tensor]:
    """The adjoint map as padded (index [n_in, Kt], weight [n_in, Kt]), Kt = largest in-degree."""
    m, k = index.shape
    src = index.reshape(-1)
    dst = torch.arange(m, device=index.device).repeat_interleave(k)
    w = weight.reshape(-1)
    keep = w != 0
    src, dst, w = src[keep], dst[keep], w[keep]
    order = torch.argsort(src, stable=True)
    src, dst, w = src[order], dst[order], w[order]
    counts = torch.bincount(src, minlength=n_in)
    kt = max(int(counts.max()), 1)
    start = torch.cumsum(counts, 0) - counts
    pos = torch.arange(src.numel(), device=index.device) - start[src]
    t_index = torch.zeros(n_in, kt, dtype=torch.long, device=index.device)
    t_weight = torch.zeros(n_in, kt, dtype=weight.dtype, device=index.device)
    t_index[src, pos] = dst
    t_weight[src, pos] = w
    return t_index, t_weight


def _bag(x_cl: Tensor, index: Tensor, weight: Tensor) -> Tensor:
    """Channels-last gather: x_cl [B, N, C] contiguous -> [B, M, C] by F.embedding_bag over the
    [B*N, C] table (C contiguous values per tap); batch b's indices are offset by b*N."""
    b, n, c = x_cl.shape
    m, k = index.shape
    offs = (torch.arange(b, device=x_cl.device) * n).view(b, 1, 1)
    idx = (index.unsqueeze(0) + offs).reshape(b * m, k)
    out = F.embedding_bag(
        idx, x_cl.reshape(b * n, c), per_sample_weights=weight.expand(b, m, k).reshape(b * m, k), mode="sum"
    )
    return out.view(b, m, c)


class _FastGather(torch.autograd.Function):
    """gather_apply for training: forward and backward are both channels-last embedding_bag
    gathers (the backward with the precomputed adjoint map, so it needs no index sort)."""

    @staticmethod
    def forward(ctx, x: Tensor, index: Tensor, weight: Tensor, t_index: Tensor, t_weight: Tensor) -> Tensor:
        ctx.save_for_backward(t_index, t_weight)
        out = _bag(x.transpose(1, 2).contiguous(), index, weight)
        return out.transpose(1, 2)  # [B, C, M] with channels-last strides (M*C, 1, C)

    @staticmethod
    def backward(ctx, grad: Tensor):
        t_index, t_weight = ctx.saved_tensors
        gx = _bag(grad.transpose(1, 2).contiguous(), t_index, t_weight).transpose(1, 2)
        return gx, None, None, None, None


def _buffers(module: nn.Module, prefix: str, make, cached: dict[str, Tensor] | None) -> None:
    """Register `prefix`_index / _weight: from the cache (a loaded state dict) or by `make()`."""
    if cached is not None and f"{prefix}_index" in cached and f"{prefix}_weight" in cached:
        index, weight = cached[f"{prefix}_index"].long(), cached[f"{prefix}_weight"].float()
    else:
        op = make()
        index, weight = torch.from_numpy(op.index.astype(np.int64)), torch.from_numpy(op.weight.astype(np.float32))
    module.register_buffer(f"{prefix}_index", index.contiguous())
    module.register_buffer(f"{prefix}_weight", weight.contiguous())


def spiral_levels(size: int, n_wind: int, n_spls: int, levels: int) -> list[geo.SpiralSpec]:
    """Spirals of a multi-scale network: level l has n_wind / 2^l windings and n_spls / 4^l samples,
    keeping the isotropy (winding distance = sample spacing) of level 0 at every level."""
    spec0 = geo.default_spiral(size)
    n_wind = n_wind or spec0.n_wind
    n_spls = n_spls or int(round(math.pi * n_wind * n_wind))
    specs = []
    for lev in range(levels):
        w = n_wind // (2**lev)
        if w < 2:
            raise ValueError(f"{levels} levels need n_wind >= {2**levels}, got {n_wind}")
        specs.append(geo.SpiralSpec(n_wind=w, n_spls=int(round(n_spls / 4**lev))))
    return specs


class SpiralOps(nn.Module):
    """All fixed geometry of a spiral network: cartesian <-> spiral, ribbons, between levels.

    Buffers (in the state dict and ONNX initialisers): `enc_*` cartesian -> level-0 spiral,
    `dec_*` level-0 spiral -> cartesian, `rib{l}_grid` the GridSample grid of the level-l ribbon,
    `down{l}_*` level l -> l+1 and `up{l}_*` level l+1 -> l.

    Each ribbon row is a linear interpolation along the spiral (geometry.ribbon_positions), so the
    exported graph reads it with GridSample over the spiral seen as a 1 x n image: 1.6x faster in
    ONNX Runtime than the best gather form (measured at batch 32, 12 channels, n = 3217).
    """

    kind = "spiral"

    @property
    def fold_norm(self) -> bool:
        """Fold batch norms into the convolutions (inference form only, see ConvUnit)."""
        return self.portable

    def __init__(
        self,
        size: int,
        specs: list[geo.SpiralSpec],
        rows: int,
        operators: dict[str, Tensor] | None = None,
        encode_sigma: float = 0.0,
    ):
        """`operators`: previously computed buffers (e.g. from a state dict) to reuse instead of
        triangulating again (about a second at 64 x 64)."""
        super().__init__()
        self.size = size
        self.rows = rows
        self.specs = list(specs)
        self.n = [s.n_spls for s in specs]
        # portable=True: gathers and GridSample (exportable). False: _FastGather (training speed,
        # 5-10x faster on CPU, no ONNX form); train.FastMode switches it on and off again.
        self.portable = True
        self._adjoints: dict[str, tuple[Tensor, ...]] = {}
        self._n_in = {"enc": size * size, "dec": specs[0].n_spls}
        for lev in range(len(specs) - 1):
            self._n_in[f"down{lev}"] = specs[lev].n_spls
            self._n_in[f"up{lev}"] = specs[lev + 1].n_spls
        c = operators
        _buffers(self, "enc", lambda: geo.cartesian_to_spiral(size, size, specs[0], encode_sigma), c)
        _buffers(self, "dec", lambda: geo.spiral_to_cartesian(specs[0], size, size), c)
        for lev, spec in enumerate(specs):
            key = f"rib{lev}_grid"
            grid = c[key].float() if c is not None and key in c else ribbon_grid(geo.ribbon_positions(spec, rows))
            self.register_buffer(key, grid.contiguous())
        for lev in range(len(specs) - 1):
            a, b = specs[lev], specs[lev + 1]
            _buffers(self, f"down{lev}", lambda a=a, b=b: geo.spiral_to_spiral(a, b, smooth=True), c)
            _buffers(self, f"up{lev}", lambda a=a, b=b: geo.spiral_to_spiral(b, a, smooth=False), c)

    def _resample(self, f: Tensor, name: str) -> Tensor:
        # not `_apply`: that name is nn.Module._apply(fn), which .to(device) and .float() call
        index, weight = getattr(self, f"{name}_index"), getattr(self, f"{name}_weight")
        if self.portable:
            return gather_apply(f, index, weight)
        return self._fast(f, name, index, weight, self._n_in[name])

    def _fast(self, f: Tensor, name: str, index: Tensor, weight: Tensor, n_in: int) -> Tensor:
        adj = self._adjoints.get(name)
        if adj is None or adj[0].device != index.device:
            adj = transpose_operator(index, weight, n_in)
            self._adjoints[name] = adj
        return _FastGather.apply(f, index, weight, *adj)

    def encode(self, x: Tensor) -> Tensor:
        """[B,C,H,W] -> [B,C,1,n0]: interpolate the image at the spiral samples."""
        return self._resample(x.flatten(-2), "enc").unsqueeze(2)

    def decode(self, f: Tensor) -> Tensor:
        """[B,C,1,n0] -> [B,C,H,W]: interpolate the spiral at the pixel centres (zero off the disc)."""
        return self._resample(f.squeeze(2), "dec").unflatten(-1, (self.size, self.size))

    def ribbon(self, level: int, f: Tensor) -> Tensor:
        """[B,C,1,n] -> [B,C,rows,n]: the ribbon across neighbouring windings (sec. 7.3.2).

        The reference form: portable, one GridSample over all rows; training, the 2-tap operator
        of the same grid through embedding_bag. The exported network does not build the ribbon
        (see `ribbon_conv`)."""
        n = self.n[level]
        grid = getattr(self, f"rib{level}_grid")
        if self.portable:
            b = f.shape[0]
            return F.grid_sample(
                f, grid.expand(b, -1, -1, -1), mode="bilinear", padding_mode="zeros", align_corners=False
            )
        key = f"rib{level}_full"
        full = self._adjoints.get(key)
        if full is None or full[0].device != grid.device:
            full = grid_operator_from(grid, n)
            self._adjoints[key] = full
        return self._fast(f.squeeze(2), f"rib{level}", full[0], full[1], n).unflatten(-1, (self.rows, n))

    def ribbon_conv(self, level: int, parts: list[Tensor], weight: Tensor, bias: Tensor | None) -> Tensor:
        """conv2d(ribbon(cat(parts)), weight [cout, cin, rows, k], bias), 'valid' across the rows and
        zero-padded along the spiral, computed without building the whole ribbon (the exported form).

        The same linear map regrouped (sec. 7.3.2's ribbon convolution, exactly):
          - the middle ribbon row is the spiral itself, so its share is a plain 1 x k convolution
            of the features; only the rows - 1 outer rows are interpolated (GridSample at the
            stored ribbon positions) and convolved with the outer rows of the filter;
          - a convolution over a channel concatenation is the sum of the convolutions over its
            parts, so the decoder's concatenated skip is never materialised;
          - the interpolation runs on the batch folded into the channels ([1, B*C, 1, n]): ONNX
            Runtime's GridSample pays ~11 ns per output position for the coordinates besides
            ~2 ns per channel, so one position for all B*C channels instead of B of them.
        The terms are summed conv by conv, which ONNX Runtime fuses into its NCHWc convolutions
        (Sum input), with the ReLU after them. Equal to the reference form up to float32 rounding,
        except that the reference reads the middle row by GridSample too, whose float32 sample
        coordinate can sit up to 2.4e-4 of a sample off the integer at n = 3217; here it is exact.
        """
        if not parts:
            raise ValueError("ribbon_conv needs at least one feature map")
        rows, k = weight.shape[2], weight.shape[3]
        mid, pad = rows // 2, k // 2
        outer = [r for r in range(rows) if r != mid]
        grid = getattr(self, f"rib{level}_grid")[:, outer]  # [1, rows - 1, n, 2]
        out = None
        lo = 0
        for p in parts:
            b, c, _, n = p.shape
            w = weight[:, lo : lo + c]
            lo += c
            rib = F.grid_sample(
                p.reshape(1, b * c, 1, n), grid, mode="bilinear", padding_mode="zeros", align_corners=False
            )
            t_outer = F.conv2d(rib.view(b, c, len(outer), n), w[:, :, outer], None, padding=(0, pad))
            t_mid = F.conv2d(p, w[:, :, mid : mid + 1], bias if out is None else None, padding=(0, pad))
            out = t_mid if out is None else t_mid + out
            out = t_outer + out
        return out

    def down(self, level: int, f: Tensor) -> Tensor:
        return self._resample(f.squeeze(2), f"down{level}").unsqueeze(2)

    def up(self, level: int, f: Tensor) -> Tensor:
        return self._resample(f.squeeze(2), f"up{level}").unsqueeze(2)

    def make_conv(self, level: int, cin: int, cout: int, kernel: int, bias: bool) -> nn.Module:
        return SpiralConv(level, cin, cout, kernel, self.rows, bias)

    def make_norm(self, c: int) -> nn.Module:
        return nn.BatchNorm2d(c)  # on [B, C, 1, n]; same state dict entries as BatchNorm1d


class SpiralConv(nn.Module):
    """Convolution on the spiral ribbon (sec. 7.3.2, Fig. 7.4): gather the rows x n ribbon, run an
    ordinary conv2d with a rows x kernel filter, valid across the ribbon rows (so one row comes out,
    back on the spiral: [B, C, 1, n]) and zero-padded along it.

    `forward` takes one feature map or a list of them (their channel concatenation, e.g. a U-Net
    skip beside the upsampled features) and optionally a per-channel affine (scale, shift) applied
    to the output, a folded batch norm. Two forms of the same linear map:
      reference (`ops.portable` False, training): concatenate, build the whole ribbon
        (`SpiralOps.ribbon`) and run one conv2d;
      inference (`ops.portable` True, the ONNX graph): `SpiralOps.ribbon_conv`, which uses that the
        middle ribbon row is the spiral itself (see there).
    """

    def __init__(self, level: int, cin: int, cout: int, kernel: int, rows: int, bias: bool = True):
        super().__init__()
        self.level = level
        self.conv = nn.Conv2d(cin, cout, (rows, kernel), padding=(0, kernel // 2), bias=bias)

    def folded(self, scale: Tensor | None = None, shift: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """(weight, bias) with the per-channel affine (scale, shift) applied to the output folded in."""
        weight, bias = self.conv.weight, self.conv.bias
        if scale is not None:
            weight = weight * scale.view(-1, 1, 1, 1)
            bias = shift if bias is None else bias * scale + shift
        return weight, bias

    def forward(
        self, f: Tensor | list[Tensor], ops: "SpiralOps", scale: Tensor | None = None, shift: Tensor | None = None
    ) -> Tensor:
        parts = list(f) if isinstance(f, (list, tuple)) else [f]
        weight, bias = self.folded(scale, shift)
        if ops.portable:
            return ops.ribbon_conv(self.level, parts, weight, bias)
        x = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
        return F.conv2d(ops.ribbon(self.level, x), weight, bias, padding=self.conv.padding)


class CartesianOps(nn.Module):
    """The cartesian twin: the image itself is the feature map; 2x2 average pooling down,
    bilinear x2 up (the counterparts of the spiral Gaussian averaging / barycentric upsampling)."""

    kind = "cartesian"

    def __init__(self, size: int, levels: int, encode_sigma: float = 0.0):
        """encode_sigma > 0: a fixed Gaussian blur of the input (pixels), the counterpart of the
        spiral's Gaussian input resampling, for ablations; 0 = the plain baseline."""
        super().__init__()
        if size % (2 ** (levels - 1)):
            raise ValueError(f"image size {size} is not divisible by 2^{levels - 1} for {levels} levels")
        self.size = size
        self.blur_radius = 0
        if encode_sigma > 0:
            r = int(math.ceil(3 * encode_sigma))
            k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float64) / encode_sigma) ** 2)
            self.register_buffer("blur", (k / k.sum()).float())
            self.blur_radius = r

    def encode(self, x: Tensor) -> Tensor:
        if not self.blur_radius:
            return x
        r = self.blur_radius
        c = x.shape[1]
        x = F.conv2d(x, self.blur.view(1, 1, 1, -1).expand(c, 1, 1, -1), padding=(0, r), groups=c)
        return F.conv2d(x, self.blur.view(1, 1, -1, 1).expand(c, 1, -1, 1), padding=(r, 0), groups=c)

    def decode(self, f: Tensor) -> Tensor:
        return f

    def down(self, level: int, f: Tensor) -> Tensor:
        return F.avg_pool2d(f, 2)

    def up(self, level: int, f: Tensor) -> Tensor:
        return F.interpolate(f, scale_factor=2.0, mode="bilinear", align_corners=False)

    def make_conv(self, level: int, cin: int, cout: int, kernel: int, bias: bool) -> nn.Module:
        return CartesianConv(cin, cout, kernel, bias)

    def make_norm(self, c: int) -> nn.Module:
        return nn.BatchNorm2d(c)


class CartesianConv(nn.Module):
    """kernel x kernel conv2d, zero padded ('same'); same parameter count as SpiralConv with
    rows = kernel."""

    def __init__(self, cin: int, cout: int, kernel: int, bias: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=bias)

    def forward(self, f: Tensor | list[Tensor], ops: CartesianOps) -> Tensor:
        return self.conv(torch.cat(f, 1) if isinstance(f, (list, tuple)) else f)
