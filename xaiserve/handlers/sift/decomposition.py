"""The reconstructible SIFT decomposition: feature cells around keypoints and the linear decoder
D_SIFT^{Delta,kappa} of [THESIS] sec. 4.1.3-4.2.4.

    dec = decompose(x, keypoints, DecompositionConfig(eta=4.0))   # x [C, H, W], any normalisation
    dec.decode(theta)        # theta [B, K] gains -> images [B, C, H, W]; dec.decode(ones) ~= x (eq. 4.14)
    dec.voronoi(theta)       # the scalar-field heatmap extraction I_SIFT (eq. 4.46-4.47)
    dec.metric_weights()     # W_j = ||D(e_j)|| (eq. 4.45)

Construction (all on the CPU, once per image; the decoder is then a few sparse products):

1. Scale layers (sec. 4.2.1-4.2.2): the sigma axis is tiled by M + 1 intervals Sigma_l, the first
   [0, b_1], then logarithmically spaced [b_l, b_{l+1}] (eq. 4.36, `layers_per_octave` per
   octave) up to R, and the last [R, inf). Their sub-integrals of Delta / sigma (eq. 4.29) are the
   differences of Gaussian low passes T_l = Gamma(b_l) - Gamma(b_{l+1}) with Gamma(0) = x and
   T_M = Gamma(R) (eq. 4.31), so sum_l T_l = x exactly (eq. 4.30, Lemma 8): the blur is the
   reflecting, doubly stochastic one of handlers.ablation.path, in float64.
2. Resolutions (Table 4.1): layers whose lower sigma is at least `resolution_sigmas[i]` pixels
   are stored at 1 / 2^(i+1) of the resolution (antialiased bilinear downsampling); the
   defaults 4.5 and 9 are 2.25 pixels of the reduced grid, the figure sec. 4.2.2 gives.
3. Feature cells (sec. 4.1.3B): every voxel (pixel centre, the layer's geometric-mean sigma)
   belongs to the keypoint nearest in d_{Z,eta} (eq. 4.18-4.19).
4. Smooth cells (sec. 4.1.3C, eq. 4.26-4.27): each cell's characteristic function is blurred with
   the layer's sigma, which keeps sum_i chi~_i = 1 (the blur preserves constants). All cells of a
   layer at once: the one-hot matrix of the labels [h w, K] goes through the separable blur as two
   sparse products (_smooth_cells), so the work per layer is a few bulk scipy calls, not a loop
   over its cells (the first version's per-cell loop took 13 s at 224 x 224; tests pin the bulk
   form to the per-cell definition).
5. Sparsity (sec. 4.2.3): the soft cutoff of eq. 4.37 with threshold s, then the missing mass is
   given back in proportion to what is left (eq. 4.38-4.39) with the denominator guarded by
   max(m, `guard`) (the 1e-3 of sec. 4.2.3B): where m >= guard the cells are again a partition of
   unity (Lemma 10), where m < guard the voxel is dropped from the reconstruction.
6. Per resolution, Z^rho = sum_{l at rho} chi~^{s,1}_{., l} * T_l is one sparse [C h w, K]
   matrix (eq. 4.40); decoding is D(theta) = sum_rho bilinear_{rho -> (H, W)}(Z^rho theta)
   (eq. 4.41): linear in theta, differentiable by autograd (torch CSR products), batched over
   the gains.

The reconstruction D(1) differs from x only by the resampling of the reduced-resolution layers and
by float32 storage; `reconstruction_error` reports the largest deviation, and the tests bound it.
The scalar field of eq. 4.46-4.47 uses the same cells with C(sigma) = 1 per layer, normalised by the
number of layers, so I_SIFT(1) = 1 everywhere.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np
import scipy.sparse
import torch
import torch.nn.functional as F
from scipy.spatial import cKDTree

from xaiserve.errors import InvalidArgument
from xaiserve.handlers.ablation.path import gaussian_blur
from xaiserve.handlers.sift.keypoints import Keypoints

_TRUNCATE = 4.0  # scipy's default Gaussian radius, in sigmas


@dataclass(frozen=True)
class DecompositionConfig:
    """Parameters of the feature cells and the grid; defaults from [THESIS] sec. 4.2 / Table 4.2."""

    eta: float = 4.0  # eq. 4.18 weight of the sigma axis (Table 4.2: eta = 4 points best)
    smooth: bool = True  # decoder version 2 (sec. 4.1.3C); False = version 1, hard cells (eq. 4.20)
    sparsity: float = 0.01  # s of eq. 4.37 ("typically chosen (much) lower than 0.1")
    guard: float = 1e-3  # max(m, guard) in eq. 4.39 (sec. 4.2.3B)
    layers_per_octave: int = 4  # rho_8ve of eq. 4.36
    sigma_first: float = 0.5  # b_1: the first layer is x - Gamma(b_1), the finest detail
    sigma_max: float = 0.0  # R (sec. 4.1.1C); 0 = half the longer image side
    resolution_sigmas: tuple[float, ...] = (4.5, 9.0)  # Table 4.1: 1/2 and 1/4 resolution from these sigmas
    min_side: int = 8  # never reduce a layer below this many pixels per side

    def check(self) -> None:
        """Raise InvalidArgument naming the first bad parameter."""
        if not (math.isfinite(self.eta) and self.eta > 0):
            raise InvalidArgument(
                f"eta is {self.eta}; the scale weight of the cell metric (eq. 4.18) must be > 0 "
                "(the thesis uses 1, 2 and 4)"
            )
        if not (math.isfinite(self.sparsity) and 0 <= self.sparsity < 1):
            raise InvalidArgument(
                f"sparsity is {self.sparsity}; the cutoff s of eq. 4.37 must be in [0, 1) (default 0.01)"
            )
        if not (math.isfinite(self.guard) and 0 < self.guard <= 1):
            raise InvalidArgument(f"guard is {self.guard}; it must be in (0, 1] (default 1e-3)")
        if not 1 <= self.layers_per_octave <= 16:
            raise InvalidArgument(f"layers_per_octave is {self.layers_per_octave}; use 1 to 16 (default 4)")
        if not (math.isfinite(self.sigma_first) and 0 < self.sigma_first <= 4):
            raise InvalidArgument(f"sigma_first is {self.sigma_first}; use a value in (0, 4] pixels (default 0.5)")
        if not (math.isfinite(self.sigma_max) and self.sigma_max >= 0):
            raise InvalidArgument(f"sigma_max is {self.sigma_max}; use 0 (half the image side) or a sigma in pixels")
        if list(self.resolution_sigmas) != sorted(self.resolution_sigmas) or any(
            s <= 0 for s in self.resolution_sigmas
        ):
            raise InvalidArgument(f"resolution_sigmas {self.resolution_sigmas} must be increasing and positive")
        if self.min_side < 2:
            raise InvalidArgument(f"min_side is {self.min_side}; use at least 2")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Layer:
    """One interval Sigma_l = [lower, upper) of the sigma axis (upper = inf for the last)."""

    lower: float
    upper: float
    sigma: float  # the representative sigma of its voxels (geometric mean of the interval)
    factor: int  # resolution reduction: 1, 2, 4, ...
    shape: tuple[int, int]  # (h, w) of its grid


def scale_layers(height: int, width: int, config: DecompositionConfig) -> list[Layer]:
    """The tiling of the sigma axis (eq. 4.29-4.31, 4.36) with each layer's grid (Table 4.1)."""
    cfg = config
    R = cfg.sigma_max or max(height, width) / 2.0
    if R <= cfg.sigma_first:
        raise InvalidArgument(f"sigma_max {R:g} must exceed sigma_first {cfg.sigma_first:g}")
    n = max(1, math.ceil(cfg.layers_per_octave * math.log2(R / cfg.sigma_first)))
    q = (R / cfg.sigma_first) ** (1.0 / n)
    bounds = [0.0] + [cfg.sigma_first * q**k for k in range(n + 1)] + [math.inf]
    bounds[-2] = R
    out = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if lo == 0.0:
            sigma = hi / math.sqrt(q)  # the log grid continued one step down
        elif math.isinf(hi):
            sigma = lo * math.sqrt(q)
        else:
            sigma = math.sqrt(lo * hi)
        factor = 1
        for i, s in enumerate(cfg.resolution_sigmas):
            f = 2 ** (i + 1)
            if lo >= s and min(height, width) / f >= cfg.min_side:
                factor = f
        shape = (height, width) if factor == 1 else (math.ceil(height / factor), math.ceil(width / factor))
        out.append(Layer(lo, hi, sigma, factor, shape))
    return out


@dataclass
class Level:
    """The decoder's matrices at one resolution (eq. 4.40): Z^rho [C h w, K] and the scalar-field
    cells [h w, K] of eq. 4.46, both float32 CSR."""

    factor: int
    shape: tuple[int, int]
    delta: torch.Tensor
    cells: torch.Tensor
    delta_t: torch.Tensor | None = None  # CSR transposes for the backward pass (None for dense levels)
    cells_t: torch.Tensor | None = None


def _resample(y: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The bilinear resampling r_{rho -> (H, W)} of eq. 4.41 (weights sum to 1: partitions of unity survive)."""
    if tuple(y.shape[-2:]) == (height, width):
        return y
    return F.interpolate(y, size=(height, width), mode="bilinear", align_corners=False)


@dataclass
class SiftDecoder:
    """D_SIFT^{Delta,kappa} of one image: linear in the K keypoint gains (eq. 4.28, 4.41)."""

    keypoints: Keypoints
    image_shape: tuple[int, int, int]  # (C, H, W)
    levels: list[Level]
    layers: list[Layer]
    config: DecompositionConfig
    reconstruction_error: float = math.nan  # max |D(1) - x| over pixels and channels
    seconds: float = 0.0  # time decompose() took (keypoint detection excluded)
    dropped_voxels: int = 0  # voxels where m < guard (eq. 4.39): left out of the reconstruction
    cells_per_layer: list[int] = field(default_factory=list)

    @property
    def num_keypoints(self) -> int:
        return len(self.keypoints)

    @property
    def nnz(self) -> int:
        return int(sum(lv.delta.values().numel() for lv in self.levels))

    def _apply(self, theta: torch.Tensor, which: str, channels: int) -> torch.Tensor:
        K = self.num_keypoints
        if theta.shape[-1] != K:
            raise ValueError(f"theta has {theta.shape[-1]} gains; this image has {K} keypoints")
        th = theta.reshape(-1, K).to(torch.float32)
        B = th.shape[0]
        _, H, W = self.image_shape
        out = None
        for lv in self.levels:
            h, w = lv.shape
            mat, mat_t = (lv.delta, lv.delta_t) if which == "delta" else (lv.cells, lv.cells_t)
            # eq. 4.40: one sparse product per resolution
            prod = _SparseLinear.apply(th.T, mat, mat_t) if mat_t is not None else mat @ th.T
            y = prod.T.reshape(B, channels, h, w)
            y = _resample(y, H, W)  # eq. 4.41
            out = y if out is None else out + y
        assert out is not None
        return out

    def decode(self, theta: torch.Tensor) -> torch.Tensor:
        """D(theta) [B, C, H, W] for gains theta [B, K] (or [K] -> [1, C, H, W]); eq. 4.33-4.34, 4.41."""
        return self._apply(theta, "delta", self.image_shape[0])

    def voronoi(self, theta: torch.Tensor) -> torch.Tensor:
        """I_SIFT^kappa(theta) [B, H, W] (eq. 4.46-4.47): the decoder on the homogeneous field C(sigma) = 1."""
        return self._apply(theta, "cells", 1)[:, 0]

    def dense(self) -> "SiftDecoder":
        """The same decoder with dense matrices (for tests and benchmarks: sparse and dense must agree)."""
        levels = [Level(lv.factor, lv.shape, lv.delta.to_dense(), lv.cells.to_dense()) for lv in self.levels]
        return SiftDecoder(
            self.keypoints,
            self.image_shape,
            levels,
            self.layers,
            self.config,
            self.reconstruction_error,
            self.seconds,
            self.dropped_voxels,
            list(self.cells_per_layer),
        )

    @torch.no_grad()
    def metric_weights(self, batch: int = 128) -> torch.Tensor:
        """W_j = ||D(e_j)||_2 [K] (eq. 4.45): the L2 norm of each feature decoded alone."""
        K = self.num_keypoints
        out = []
        for start in range(0, K, batch):
            eye = torch.zeros(min(batch, K - start), K)
            eye[torch.arange(eye.shape[0]), torch.arange(start, start + eye.shape[0])] = 1.0
            out.append(self.decode(eye).flatten(1).norm(dim=1))
        return torch.cat(out)


def _nearest_keypoint(ys: np.ndarray, xs: np.ndarray, sigma: float, tree: cKDTree, eta: float) -> np.ndarray:
    """[h, w] index of the d_{Z,eta}-nearest keypoint of every voxel (eq. 4.18-4.19).

    d_{Z,eta} is the Euclidean distance after scaling the sigma axis by eta, so a k-d tree over
    (row, col, eta sigma_i) answers every voxel of a layer in one query."""
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    q = np.stack([yy.ravel(), xx.ravel(), np.full(yy.size, eta * sigma)], axis=1)
    _, idx = tree.query(q, k=1)
    return np.asarray(idx, dtype=np.int64).reshape(yy.shape)


def _blur_matrix(n: int, sigma: float) -> scipy.sparse.csr_matrix:
    """[n, n] CSR matrix of scipy.ndimage.gaussian_filter1d(mode="reflect", truncate=4): the same
    kernel (radius int(4 sigma + 0.5), normalised to sum 1) and the half-sample symmetric boundary,
    folded periodically when the kernel is wider than the grid. Rows sum to 1 (constants survive)."""
    radius = int(_TRUNCATE * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 / (sigma * sigma) * offsets.astype(np.float64) ** 2)
    kernel /= kernel.sum()
    rows = np.repeat(np.arange(n), offsets.size)
    j = np.remainder(rows + np.tile(offsets, n), 2 * n)
    cols = np.where(j >= n, 2 * n - 1 - j, j)
    return scipy.sparse.csr_matrix((np.tile(kernel, n), (rows, cols)), shape=(n, n))  # duplicates summed


def _smooth_cells(labels: np.ndarray, blur: float, smooth: bool, s: float, guard: float, K: int):
    """chi~^{s,1} of every cell of one layer as one CSR matrix [h w, K] (eq. 4.27, 4.37-4.39), the
    cells present and the voxels dropped by the guard.

    The blur of all K characteristic functions at once is the separable blur as two sparse products,
    B_w on the one-hot labels laid out [w, h K], then B_h on the result laid out [h, w K]: the
    whole-grid blur with scipy's reflecting boundary, which is what eq. 4.27 asks for (and what the
    per-cell crops of the first version computed, cell by cell)."""
    h, w = labels.shape
    n = h * w
    if smooth and blur > 0:
        # x pass: the one-hot labels as [w, h K] (row x, column y K + k), blurred by B_w from the left
        one_hot = scipy.sparse.csr_matrix(
            (np.ones(n), (np.arange(h) * K + labels.T).ravel(), np.arange(0, n + 1, h)), shape=(w, h * K)
        )
        r1 = (_blur_matrix(w, blur) @ one_hot).T.tocsr()  # [h K, w]: row y K + k, column x'
        # y pass: laid out [h, w K] (row y, column x' K + k), blurred by B_h from the left
        k1 = np.repeat(np.tile(np.arange(K), h), np.diff(r1.indptr))
        mid = scipy.sparse.csr_matrix((r1.data, r1.indices * K + k1, r1.indptr[::K]), shape=(h, w * K))
        # [h, w K]: row y', column x' K + k; the round trip through CSC sorts each row (by x', then k)
        # in two linear passes
        r2 = (_blur_matrix(h, blur) @ mid).tocsc().tocsr()
        x2, k2 = np.divmod(r2.indices, K)
        pix = np.repeat(np.arange(h) * w, np.diff(r2.indptr)) + x2
        indptr = np.concatenate([[0], np.cumsum(np.bincount(pix, minlength=n))])
        chi = scipy.sparse.csr_matrix((r2.data, k2, indptr), shape=(n, K))
    else:
        chi = scipy.sparse.csr_matrix((np.ones(n), labels.ravel(), np.arange(n + 1)), shape=(n, K))
    if s > 0:  # eq. 4.37
        chi.data = np.where(chi.data > s, (chi.data - s) / (1.0 - s), 0.0)
    chi.eliminate_zeros()
    # eq. 4.38-4.39: chi~^{s,1} = chi~^s (1 + w~ / max(m~, guard)), w~ = 1 - m~
    m = np.asarray(chi.sum(axis=1)).ravel()
    gain = 1.0 + (1.0 - m) / np.maximum(m, guard)
    chi.data *= np.repeat(gain, np.diff(chi.indptr))
    present = int(np.count_nonzero(np.bincount(chi.indices, minlength=K)))
    return chi, present, int((m < guard).sum())


class _SparseLinear(torch.autograd.Function):
    """y = Z theta for a CSR matrix Z, with the backward product by a stored CSR Z^T: the decoder is
    linear, so its Jacobian is Z itself (sec. 4.2.4), and a stored transpose avoids converting Z
    on every backward pass."""

    @staticmethod
    def forward(ctx, theta_t: torch.Tensor, mat: torch.Tensor, mat_t: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.mat_t = mat_t
        return mat @ theta_t

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return ctx.mat_t @ grad, None, None


def _layer_matrices(
    band: np.ndarray,
    lay_sigma: float,
    image_hw: tuple[int, int],
    tree: cKDTree,
    cfg: DecompositionConfig,
    K: int,
) -> tuple[scipy.sparse.csr_matrix, scipy.sparse.csr_matrix, int, int]:
    """One layer on its grid (band [C, h, w]): its part of Z^rho [C h w, K] (eq. 4.40: the colour of
    the layer times the cells, channel blocks stacked) and its cells chi~^{s,1} [h w, K], the number
    of cells present and the voxels dropped by the guard."""
    C, h, w = band.shape
    H, W = image_hw
    sy, sx = H / h, W / w
    # voxel centres in input pixels (the grid F.interpolate resamples with, align_corners=False)
    ys = (np.arange(h) + 0.5) * sy - 0.5
    xs = (np.arange(w) + 0.5) * sx - 0.5
    labels = _nearest_keypoint(ys, xs, lay_sigma, tree, cfg.eta)
    chi, present, dropped = _smooth_cells(
        labels, lay_sigma / math.sqrt(sy * sx), cfg.smooth, cfg.sparsity, cfg.guard, K
    )
    n, nnz = h * w, chi.nnz
    pix = np.repeat(np.arange(n), np.diff(chi.indptr))
    colour = band.reshape(C, n)[:, pix]  # [C, nnz]
    z = scipy.sparse.csr_matrix(
        (
            (colour * chi.data[None, :]).ravel(),
            np.tile(chi.indices, C),
            np.concatenate([c * nnz + chi.indptr[:-1] for c in range(C)] + [[C * nnz]]),
        ),
        shape=(C * n, K),
    )
    return z, chi, present, dropped


def _torch_csr(m: scipy.sparse.csr_matrix) -> torch.Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the products used here are tested
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(
            torch.from_numpy(m.indptr.astype(np.int64)),
            torch.from_numpy(m.indices.astype(np.int64)),
            torch.from_numpy(m.data.astype(np.float32)),
            size=m.shape,
            check_invariants=False,
        )


def decompose(x: torch.Tensor, keypoints: Keypoints, config: DecompositionConfig | None = None) -> SiftDecoder:
    """The SIFT decoder of image x [C, H, W] around its keypoints ([THESIS] sec. 4.1.3-4.2.4).

    Beyond the thesis: the resampling residual of each reduced-resolution level (its layers' sum
    minus what the bilinear upsampling of their reduced grids gives back, a few per cent of those
    layers' amplitude at 2.25 pixels per sigma) is kept as one extra full-resolution layer, split
    into the cells of that level's finest layer. The thesis accepts the decimation error (sec.
    4.2.2); keeping it makes D(1) = x to float32 rounding, and the extra layer, like every other,
    belongs to the keypoints through their cells.
    """
    cfg = config or DecompositionConfig()
    cfg.check()
    t0 = time.perf_counter()
    if x.dim() != 3:
        raise InvalidArgument(f"x has shape {tuple(x.shape)}; give one image [C, H, W]")
    if len(keypoints) == 0:
        raise InvalidArgument("there are no keypoints to build feature cells around")
    C, H, W = (int(v) for v in x.shape)
    K = len(keypoints)
    xd = x.detach().to(torch.float64).cpu()
    layers = scale_layers(H, W, cfg)
    # eq. 4.29-4.31: T_l = Gamma(b_l) - Gamma(b_{l+1}), Gamma(0) = x, T_M = Gamma(R); telescopes to x
    lows = [xd] + [gaussian_blur(xd, lay.upper) for lay in layers[:-1]]
    bands = [lows[i] - lows[i + 1] for i in range(len(layers) - 1)] + [lows[-1]]
    c_field = 1.0 / len(layers)  # C(sigma) of eq. 4.47, uniform over the layers
    tree = cKDTree(np.c_[keypoints.positions, cfg.eta * keypoints.sigmas])

    # per resolution (eq. 4.40): Z^rho = sum of its layers' matrices, cells = C(sigma) sum of their cells
    deltas: dict[int, list[scipy.sparse.csr_matrix]] = {}
    cells: dict[int, list[scipy.sparse.csr_matrix]] = {}
    shapes: dict[int, tuple[int, int]] = {}
    dropped = 0
    cells_per_layer = []
    for lay, band in zip(layers, bands):
        if lay.factor > 1:
            band = F.interpolate(band[None], size=lay.shape, mode="bilinear", antialias=True, align_corners=False)[0]
        z, chi, n_cells, d = _layer_matrices(band.numpy(), lay.sigma, (H, W), tree, cfg, K)
        f = lay.factor
        deltas.setdefault(f, []).append(z)
        cells.setdefault(f, []).append(chi)
        shapes[f] = lay.shape
        cells_per_layer.append(n_cells)
        dropped += d
    sums = {f: _sum(v) for f, v in deltas.items()}
    # the resampling residual of each reduced level, as a full-resolution layer (see the docstring)
    for factor in sorted(f for f in sums if f > 1):
        h, w = shapes[factor]
        approx = F.interpolate(
            torch.from_numpy(np.asarray(sums[factor].sum(axis=1)).reshape(1, C, h, w)),
            size=(H, W),
            mode="bilinear",
            align_corners=False,
        )[0]
        exact = sum(b for lay, b in zip(layers, bands) if lay.factor == factor)
        finest = min((lay for lay in layers if lay.factor == factor), key=lambda lay: lay.sigma)
        z, _, _, d = _layer_matrices((exact - approx).numpy(), finest.sigma, (H, W), tree, cfg, K)
        sums[1] = sums[1] + z if 1 in sums else z
        shapes[1] = (H, W)
        dropped += d
    levels = []
    for factor in sorted(sums):
        h, w = shapes[factor]
        delta = sums[factor]
        cell = _sum(cells[factor]) * c_field if factor in cells else scipy.sparse.csr_matrix((h * w, K))
        levels.append(
            Level(factor, (h, w), _torch_csr(delta), _torch_csr(cell), _torch_csr(_t(delta)), _torch_csr(_t(cell)))
        )
    dec = SiftDecoder(
        keypoints, (C, H, W), levels, layers, cfg, dropped_voxels=dropped, cells_per_layer=cells_per_layer
    )
    with torch.no_grad():
        dec.reconstruction_error = float((dec.decode(torch.ones(K))[0].double() - xd).abs().max())
    dec.seconds = time.perf_counter() - t0
    return dec


def _sum(ms: list[scipy.sparse.csr_matrix]) -> scipy.sparse.csr_matrix:
    """The sum of sparse matrices of one shape, pairwise (log2(n) merges of every entry, not n)."""
    while len(ms) > 1:
        ms = [ms[i] + ms[i + 1] if i + 1 < len(ms) else ms[i] for i in range(0, len(ms), 2)]
    return ms[0]


def _t(m: scipy.sparse.csr_matrix) -> scipy.sparse.csr_matrix:
    """The CSR transpose, built once (for the backward products), in canonical form."""
    t = m.T.tocsr()
    t.sum_duplicates()
    return t
