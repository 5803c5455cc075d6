"""Spiral geometry and the fixed resampling operators of the spiral CNN ([THESIS], sec. 7.3).

Coordinates: the particle lives on the unit disc D^2 (eq. 7.1-7.2). An H x W pixel grid spans the
square [-1, 1]^2 with pixel centres at x_j = (2 j + 1 - W) / W (so the disc touches the image edge),
y increasing with the row index.

Spiral sampling (sec. 7.3.1): the Archimedean spiral with r'(t) = 1 / (2 pi r) (eq. 7.4), i.e.
    r(t) = sqrt(t / pi)                                   (eq. 7.5)
    theta(t) = 2 pi n_wind r(t) = 2 n_wind sqrt(pi t)    (eq. 7.6)
    t_i = i pi / n_spls, i = 0 .. n_spls - 1             (eq. 7.7)
Uniform t is uniform area (pi r^2 = t), so every sample owns the area pi / n_spls. Neighbouring
windings are 1 / n_wind apart radially and samples are ~ pi n_wind / n_spls apart along the spiral;
`default_spiral` picks n_spls = round(pi n_wind^2) so both spacings agree (isotropic sampling).

Ribbon (sec. 7.3.2): rows k = -K .. K offset from each spiral sample along the curve's normal by
k * row_spacing (default 1 / n_wind, the winding distance: the ribbon edges then lie on the
neighbouring windings, as footnote 4 of sec. 7.3.3 describes). Row 0 is the spiral itself.

Every resampling (cartesian -> spiral, spiral -> ribbon, spiral -> cartesian, and between the
spirals of a multi-scale network) is a fixed sparse linear map stored as `(index [M, K], weight
[M, K])`: out[m] = sum_k weight[m, k] * in[index[m, k]]. `interpolation_operator` builds it from a
Delaunay triangulation of the source points (scipy.spatial) with barycentric weights, the generic
method the thesis uses (sec. 7.3.2). The maps are computed once in numpy here and stored by the
network as buffers, so they travel in the state dict and as ONNX initialisers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.spatial import Delaunay, cKDTree


@dataclass(frozen=True)
class SpiralSpec:
    """One spiral sampling: n_wind windings over the unit disc with n_spls samples (eq. 7.5-7.7)."""

    n_wind: int
    n_spls: int

    def __post_init__(self) -> None:
        if self.n_wind < 1 or self.n_spls < 8:
            raise ValueError(f"spiral needs n_wind >= 1 and n_spls >= 8, got {self.n_wind}, {self.n_spls}")


def default_spiral(size: int) -> SpiralSpec:
    """The isotropic spiral for a size x size image: winding distance = pixel pitch 2 / size.

    n_wind = size / 2 windings, n_spls = round(pi n_wind^2) samples (about the number of pixels in
    the inscribed disc), so spacing along and across the windings is one pixel.
    """
    n_wind = max(1, size // 2)
    return SpiralSpec(n_wind=n_wind, n_spls=int(round(math.pi * n_wind * n_wind)))


def spiral_params(spec: SpiralSpec) -> tuple[np.ndarray, np.ndarray]:
    """(r_i, theta_i) of the spiral samples, eq. 7.5-7.7."""
    t = np.arange(spec.n_spls, dtype=np.float64) * math.pi / spec.n_spls  # eq. 7.7
    r = np.sqrt(t / math.pi)  # eq. 7.5
    theta = 2.0 * spec.n_wind * np.sqrt(math.pi * t)  # eq. 7.6
    return r, theta


def spiral_points(spec: SpiralSpec) -> np.ndarray:
    """Sample points [n_spls, 2] (x, y) of the spiral, eq. 7.5-7.7."""
    r, theta = spiral_params(spec)
    return np.stack([r * np.cos(theta), r * np.sin(theta)], axis=1)


def spiral_normals(spec: SpiralSpec) -> np.ndarray:
    """Unit normals [n_spls, 2] of the spiral curve at its samples, pointing outwards.

    With p(r) = r e_r(theta), theta = 2 pi n_wind r: dp/dr = e_r + 2 pi n_wind r e_theta, so the
    normal is (2 pi n_wind r e_r - e_theta) / norm. It tends to the radial direction as r grows;
    near the centre it turns sideways, where the ribbon flexes (the symmetry breaks down there,
    as sec. 7.3.2 notes).
    """
    r, theta = spiral_params(spec)
    a = 2.0 * math.pi * spec.n_wind * r
    er = np.stack([np.cos(theta), np.sin(theta)], axis=1)
    et = np.stack([-np.sin(theta), np.cos(theta)], axis=1)
    n = a[:, None] * er - et
    return n / np.linalg.norm(n, axis=1, keepdims=True)


def ribbon_offsets(rows: int) -> np.ndarray:
    """Row offsets -K..K (in units of the row spacing) of a ribbon with `rows` = 2K + 1 rows."""
    if rows < 1 or rows % 2 == 0:
        raise ValueError(f"ribbon rows must be odd (3 or 5 in the thesis), got {rows}")
    k = rows // 2
    return np.arange(-k, k + 1, dtype=np.float64)


def ribbon_points(spec: SpiralSpec, rows: int, row_spacing: float | None = None) -> np.ndarray:
    """Ribbon sample points [rows, n_spls, 2] across neighbouring windings (sec. 7.3.2, Fig. 7.4)."""
    h = 1.0 / spec.n_wind if row_spacing is None else float(row_spacing)
    p = spiral_points(spec)
    n = spiral_normals(spec)
    return np.stack([p + k * h * n for k in ribbon_offsets(rows)], axis=0)


def pixel_centres(height: int, width: int) -> np.ndarray:
    """Pixel centres [H*W, 2] (x, y) in row-major order, the grid spanning [-1, 1]^2."""
    ys = (2.0 * np.arange(height) + 1.0 - height) / height
    xs = (2.0 * np.arange(width) + 1.0 - width) / width
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([xx.ravel(), yy.ravel()], axis=1)


def disc_mask(height: int, width: int, radius: float = 1.0) -> np.ndarray:
    """Boolean [H, W]: pixel centre inside the disc of the given radius (unit disc = eq. 7.2)."""
    c = pixel_centres(height, width)
    return (np.hypot(c[:, 0], c[:, 1]) <= radius).reshape(height, width)


@dataclass(frozen=True)
class Operator:
    """A sparse linear map out[m] = sum_k weight[m, k] * in[index[m, k]] (M outputs, K taps)."""

    index: np.ndarray  # int64 [M, K]
    weight: np.ndarray  # float32 [M, K]
    n_in: int

    @property
    def n_out(self) -> int:
        return int(self.index.shape[0])

    def apply(self, values: np.ndarray) -> np.ndarray:
        """Apply to values [..., n_in] (numpy reference for tests and offline use)."""
        return (values[..., self.index] * self.weight).sum(-1)

    def dense(self) -> np.ndarray:
        """The dense [M, n_in] matrix (tests only; it is big)."""
        m = np.zeros((self.n_out, self.n_in), np.float64)
        np.add.at(m, (np.repeat(np.arange(self.n_out), self.index.shape[1]), self.index.ravel()), self.weight.ravel())
        return m


def interpolation_operator(
    src: np.ndarray,
    dst: np.ndarray,
    *,
    outside: str = "zero",
    valid: np.ndarray | None = None,
    prune: float = 1e-6,
    taps: int = 3,
) -> Operator:
    """Linear interpolation src -> dst by barycentric weights in a Delaunay triangulation of src.

    sec. 7.3.2: "using the Delauney triangulation of the preceding layer's output sample point, and
    linear interpolation in the barycentric coordinates of the source triangle containing the point".
    Points outside the triangulated hull get `outside`: "zero" (all weights 0, like zero padding of a
    convolution; Remark 31 calls the behaviour there undefined) or "nearest" (copy the nearest
    source sample). `valid` (bool [M]) forces zero output where False. Weights below `prune` are
    dropped and only the `taps` largest weights kept (renormalised to sum 1): footnote 4 of
    sec. 7.3.3 notes that the ribbon edges lie on the neighbouring windings, so mostly two of the
    three barycentric weights matter, and that such cutoffs reduce the work further.
    """
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    tri = Delaunay(src)
    # bruteforce: scipy's directed walk was measured to take from 0.1 s to 35 s on the same input
    # when many query points lie on triangle edges (ribbon points lie on the windings); the
    # brute-force search is predictable (0.5 s for a 64 x 64 ribbon).
    simplex = tri.find_simplex(dst, bruteforce=True)
    inside = simplex >= 0
    m = dst.shape[0]
    index = np.zeros((m, 3), np.int64)
    weight = np.zeros((m, 3), np.float64)
    s = simplex[inside]
    trans = tri.transform[s]  # [m_in, 3, 2]: affine map to barycentric coordinates
    b = np.einsum("mij,mj->mi", trans[:, :2, :], dst[inside] - trans[:, 2, :])
    bary = np.concatenate([b, 1.0 - b.sum(1, keepdims=True)], axis=1)
    index[inside] = tri.simplices[s]
    weight[inside] = bary
    if outside == "nearest" and (~inside).any():
        _, nn = cKDTree(src).query(dst[~inside])
        index[~inside, 0] = nn
        weight[~inside, 0] = 1.0
    elif outside != "zero" and outside != "nearest":
        raise ValueError(f"outside must be 'zero' or 'nearest', got {outside!r}")
    if valid is not None:
        weight[~np.asarray(valid, bool)] = 0.0
    weight[np.abs(weight) < prune] = 0.0
    if taps < 3:
        order = np.argsort(-weight, axis=1)[:, :taps]
        index = np.take_along_axis(index, order, axis=1)
        weight = np.take_along_axis(weight, order, axis=1)
    # Renormalise the kept taps so constants are reproduced exactly where any tap is left.
    tot = weight.sum(1, keepdims=True)
    weight = np.where(tot > 0, weight / np.where(tot > 0, tot, 1.0), 0.0)
    index[weight == 0] = 0
    return Operator(index=index, weight=weight.astype(np.float32), n_in=int(src.shape[0]))


def smoothing_operator(src: np.ndarray, dst: np.ndarray, sigma: float, k: int = 7) -> Operator:
    """Normalised Gaussian average of the k nearest src samples around each dst point.

    Used to go from a spiral to a coarser one (the multi-scale network of this implementation,
    beyond the thesis): averaging before subsampling suppresses aliasing, and an isotropic Gaussian
    weight keeps it rotation-friendly; the cartesian baseline's counterpart is 2 x 2 average pooling.
    """
    d, idx = cKDTree(src).query(dst, k=k)
    w = np.exp(-0.5 * (d / sigma) ** 2)
    w /= w.sum(1, keepdims=True)
    return Operator(index=idx.astype(np.int64), weight=w.astype(np.float32), n_in=int(src.shape[0]))


def grid_operator(height: int, width: int, dst: np.ndarray) -> Operator:
    """Barycentric interpolation from the pixel grid, in an explicit Delaunay triangulation of it.

    All four corners of a pixel cell are cocircular, so both diagonals give a Delaunay
    triangulation; scipy's (qhull's) choice on such a degenerate input is arbitrary, and its point
    location walk on it was measured to take from 0.1 s to 35 s for the same 64 x 64 grid. Here each
    cell is split along alternating diagonals (checkerboard), which is one of the Delaunay
    triangulations and has no preferred direction on average. Points beyond the outer pixel
    centres take the nearest pixel.
    """
    dst = np.asarray(dst, np.float64)
    u = np.clip((dst[:, 0] * width + width - 1) / 2.0, 0.0, width - 1.0)  # column coordinate
    v = np.clip((dst[:, 1] * height + height - 1) / 2.0, 0.0, height - 1.0)  # row coordinate
    j0 = np.minimum(np.floor(u).astype(np.int64), width - 2)
    i0 = np.minimum(np.floor(v).astype(np.int64), height - 2)
    fu, fv = u - j0, v - i0
    a, b, c, d = i0 * width + j0, i0 * width + j0 + 1, (i0 + 1) * width + j0, (i0 + 1) * width + j0 + 1
    even = (i0 + j0) % 2 == 0
    index = np.zeros((dst.shape[0], 3), np.int64)
    weight = np.zeros((dst.shape[0], 3), np.float64)
    # even cells: diagonal a-d
    lo = even & (fu >= fv)
    index[lo] = np.stack([a[lo], b[lo], d[lo]], 1)
    weight[lo] = np.stack([1 - fu[lo], fu[lo] - fv[lo], fv[lo]], 1)
    up = even & (fu < fv)
    index[up] = np.stack([a[up], c[up], d[up]], 1)
    weight[up] = np.stack([1 - fv[up], fv[up] - fu[up], fu[up]], 1)
    # odd cells: diagonal b-c
    tl = ~even & (fu + fv <= 1)
    index[tl] = np.stack([a[tl], b[tl], c[tl]], 1)
    weight[tl] = np.stack([1 - fu[tl] - fv[tl], fu[tl], fv[tl]], 1)
    br = ~even & (fu + fv > 1)
    index[br] = np.stack([d[br], b[br], c[br]], 1)
    weight[br] = np.stack([fu[br] + fv[br] - 1, 1 - fv[br], 1 - fu[br]], 1)
    weight[np.abs(weight) < 1e-12] = 0.0
    index[weight == 0] = 0
    return Operator(index=index, weight=weight.astype(np.float32), n_in=height * width)


def cartesian_to_spiral(height: int, width: int, spec: SpiralSpec, sigma_px: float = 0.0) -> Operator:
    """Pixel grid -> spiral samples.

    sigma_px = 0: barycentric interpolation in a Delaunay triangulation of the pixel centres
    (sec. 7.3.2's generic method, `grid_operator`). sigma_px > 0: a normalised Gaussian average of
    the nearby pixels (sigma in pixels), an anti-aliasing resampler: linear interpolation of pixel
    noise has a variance that depends on where the sample falls between pixel centres (1 on a
    centre, 1/3 at a triangle's centroid), a pattern fixed to the pixel grid that does not rotate
    with the particle; the Gaussian average makes it nearly uniform.
    """
    if sigma_px <= 0:
        return grid_operator(height, width, spiral_points(spec))
    k = int(np.ceil(np.pi * (3 * sigma_px) ** 2)) + 4
    return smoothing_operator(pixel_centres(height, width), spiral_points(spec), sigma=sigma_px * 2.0 / width, k=k)


def ribbon_positions(spec: SpiralSpec, rows: int, row_spacing: float | None = None) -> np.ndarray:
    """Fractional sample index along the spiral of every ribbon point, [rows, n_spls] float64;
    NaN where the point lies beyond the outermost winding (read as zero, like zero padding).

    Built from the Delaunay triangulation of the spiral samples (sec. 7.3.2): the ribbon point's
    two largest barycentric weights (footnote 4 of sec. 7.3.3: the ribbon edges lie on the
    neighbouring windings, so mostly two of the three weights matter; at 64 x 64 the dropped
    third one is below 0.02 for 97 % of the points, the bulge of the winding arc over its chord)
    belong to consecutive samples j, j+1 of the neighbouring winding for 99.9 % of the points,
    which gives the position p = j + w_{j+1} / (w_j + w_{j+1}). For the rest (at the tightly curved
    centre) p is the projection of the point onto the nearest segment of the spiral polyline. So
    every ribbon row is a linear interpolation *along the spiral*, which runs as one GridSample in
    the exported graph instead of a gather over irregular taps.
    """
    p = spiral_points(spec)
    n = spec.n_spls
    pts = ribbon_points(spec, rows, row_spacing).reshape(-1, 2)
    op = interpolation_operator(p, pts, outside="zero", taps=2)
    i0, i1 = op.index[:, 0], op.index[:, 1]
    w0, w1 = op.weight[:, 0].astype(np.float64), op.weight[:, 1].astype(np.float64)
    valid = (w0 + w1) > 0
    pos = np.full(pts.shape[0], np.nan)
    single = valid & (w1 == 0)
    pos[single] = i0[single]
    lo, hi = np.minimum(i0, i1), np.maximum(i0, i1)
    cons = valid & (w1 > 0) & (hi - lo == 1)
    w_hi = np.where(i0 == hi, w0, w1)
    pos[cons] = lo[cons] + w_hi[cons] / (w0[cons] + w1[cons])
    rest = np.flatnonzero(valid & ~single & ~cons)
    if rest.size:
        pos[rest] = _project_on_polyline(p, pts[rest])
    pos = pos.reshape(rows, n)
    pos[rows // 2] = np.arange(n)  # the middle row is the spiral itself
    return pos


def _project_on_polyline(p: np.ndarray, q: np.ndarray, k: int = 8) -> np.ndarray:
    """Fractional index of the closest point to each q on the polyline through p (near segments)."""
    _, near = cKDTree(p).query(q, k=k)
    best = np.full(q.shape[0], np.inf)
    pos = np.zeros(q.shape[0])
    for j in range(k):
        for a in (near[:, j] - 1, near[:, j]):
            a = np.clip(a, 0, len(p) - 2)
            seg = p[a + 1] - p[a]
            t = np.clip(((q - p[a]) * seg).sum(1) / np.maximum((seg * seg).sum(1), 1e-30), 0.0, 1.0)
            d = np.linalg.norm(p[a] + t[:, None] * seg - q, axis=1)
            better = d < best
            best[better], pos[better] = d[better], (a + t)[better]
    return pos


def positions_operator(pos: np.ndarray, n: int) -> Operator:
    """Linear interpolation at fractional indices `pos` [M] (NaN = zero) as a 2-tap Operator."""
    pos = np.asarray(pos, np.float64).ravel()
    valid = np.isfinite(pos)
    p = np.where(valid, np.clip(pos, 0, n - 1), 0.0)
    j = np.minimum(np.floor(p).astype(np.int64), n - 2)
    f = p - j
    index = np.stack([j, j + 1], 1)
    weight = np.where(valid[:, None], np.stack([1 - f, f], 1), 0.0)
    return Operator(index=index, weight=weight.astype(np.float32), n_in=n)


def spiral_to_ribbon(spec: SpiralSpec, rows: int, row_spacing: float | None = None) -> Operator:
    """Spiral samples -> ribbon rows [rows * n_spls] (row-major: row, then sample), sec. 7.3.2:
    linear interpolation along the spiral at `ribbon_positions`; zero beyond the outermost winding."""
    return positions_operator(ribbon_positions(spec, rows, row_spacing), spec.n_spls)


def spiral_to_cartesian(spec: SpiralSpec, height: int, width: int) -> Operator:
    """Spiral samples -> pixel grid, barycentric; pixels outside the unit disc are zero, disc pixels
    just beyond the outermost winding copy the nearest sample (the rim, excluded from metrics)."""
    return interpolation_operator(
        spiral_points(spec), pixel_centres(height, width), outside="nearest", valid=disc_mask(height, width).ravel()
    )


def spiral_to_spiral(src: SpiralSpec, dst: SpiralSpec, *, smooth: bool) -> Operator:
    """Between two spirals: Gaussian averaging to a coarser one (smooth=True, sigma = half the
    destination spacing), barycentric interpolation to a finer one (smooth=False)."""
    sp, dp = spiral_points(src), spiral_points(dst)
    if smooth:
        return smoothing_operator(sp, dp, sigma=0.5 / dst.n_wind, k=9)
    return interpolation_operator(sp, dp, outside="nearest")


def nearest_neighbour_distances(points: np.ndarray) -> np.ndarray:
    """Distance of each point to its nearest other point."""
    d, _ = cKDTree(points).query(points, k=2)
    return d[:, 1]
