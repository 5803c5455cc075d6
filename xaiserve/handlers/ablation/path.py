"""Ablation-path representation and the projection onto the path axioms ([THESIS], Part II ch. 2).

A path is stored as a tensor `phi` of shape [T, h, w]: the T interior slices phi(t_k) at
t_k = k / (T + 1), k = 1..T (eq. 2.30); phi(0) = 0 and phi(1) = 1 are implicit (sec. 2.6.2A) and
treated as read-only neighbours by every step below. The masks live at a low resolution h x w
(default 64 x 64, sec. 2.6.1) and are upsampled bilinearly to the image for the classifier.

Axioms (Definition 1): boundary phi(0)=0, phi(1)=1; pointwise monotone in t; constant speed
mean(phi(t)) = t. The projection (Algorithm 2, lines 12-15) is

    clamp(monotone_envelope(phi), 0, 1)  ->  constant_speed(.)      (Lemma 7)

all as tensor operations (no per-pixel loops), so it runs on the GPU beside the classifier.
Every function here is pure: tensors in, tensors out.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def interior_times(num_slices: int, *, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """t_k = k / (T + 1), k = 1..T (eq. 2.30): the slices actually stored."""
    return torch.arange(1, num_slices + 1, dtype=dtype, device=device) / (num_slices + 1)


def all_times(num_slices: int, *, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """t_k = k / (T + 1), k = 0..T+1: the interior slices plus the implicit boundaries."""
    return torch.arange(0, num_slices + 2, dtype=dtype, device=device) / (num_slices + 1)


def affine_path(
    num_slices: int, height: int, width: int, *, dtype: torch.dtype = torch.float32, device=None
) -> torch.Tensor:
    """The start state phi(t, r) = t (eq. 2.17, Algorithm 2 line 1), shape [T, h, w]."""
    t = interior_times(num_slices, dtype=dtype, device=device)
    return t[:, None, None].expand(num_slices, height, width).clone()


def with_boundaries(phi: torch.Tensor) -> torch.Tensor:
    """[..., T, h, w] -> [..., T + 2, h, w] with the implicit phi(0) = 0 and phi(1) = 1 written in."""
    edge = phi[..., :1, :, :]
    return torch.cat([torch.zeros_like(edge), phi, torch.ones_like(edge)], dim=-3)


# -- monotonicity (sec. 2.6.2B) --------------------------------------------------------------------


def monotone_envelope(p: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """L-infinity-optimal non-decreasing approximation of p along `dim`, for every other index at once.

    Replaces the per-pixel Algorithm 1 of [THESIS] (sec. 2.6.2B, optimal by Lemma 6) with the
    midpoint of the two monotone envelopes: L = running maximum from the left (cummax, the
    smallest non-decreasing function >= p) and U = running minimum from the right (reverse
    cummin, the largest non-decreasing function <= p). Both are non-decreasing, so their mean is;
    and |(L + U)/2 - p|_inf = max_{i <= j} (p_i - p_j) / 2, which is a lower bound for the distance
    of any non-decreasing q (q_i <= q_j forces max(|q_i - p_i|, |q_j - p_j|) >= (p_i - p_j) / 2),
    hence optimal. On an already monotone input L = U = p (idempotent).

    The two scans run as T elementwise max/min operations over whole slices (what cummax and
    cummin compute): on CPU this is ~3x faster than torch.cummax along a non-last dimension,
    and on a GPU it is T small kernels. Not differentiable (the projection needs no gradient).
    """
    q = p.movedim(dim, 0)
    n = q.shape[0]
    left = q.clone()
    right = q.clone()
    for k in range(1, n):
        torch.maximum(left[k], left[k - 1], out=left[k])
        torch.minimum(right[n - 1 - k], right[n - k], out=right[n - 1 - k])
    return (0.5 * (left + right)).movedim(0, dim)


def linf_monotone_bound(p: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """max_{i <= j} (p_i - p_j) / 2 along `dim`: the smallest L-inf distance any monotone q can have.

    O(T^2) brute force over all ordered pairs, for tests and benchmarks only.
    """
    q = p.movedim(dim, 0)
    diff = q[:, None] - q[None, :]  # [i, j, ...] = p_i - p_j
    n = q.shape[0]
    upper = torch.triu(torch.ones(n, n, dtype=torch.bool, device=p.device))  # i <= j
    diff = diff.masked_fill(~upper.reshape(n, n, *([1] * (q.dim() - 1))), -math.inf)
    return diff.flatten(0, 1).amax(dim=0).clamp_min(0.0) / 2.0


def project_monotone_clamped(phi: torch.Tensor) -> torch.Tensor:
    """Algorithm 2 lines 12-14: monotone in t per pixel (envelope midpoint), then clamp to [0, 1]; phi [..., T, h, w].

    Clamping after the envelope keeps it monotone and stays L-inf optimal for the box-constrained
    problem 0 <= q_1 <= ... <= q_T <= 1 implied by the read-only boundaries phi(0)=0, phi(1)=1:
    a clamped entry moves towards p_i, or only by the box violation |p_i - clamp(p_i)|.
    """
    return monotone_envelope(phi, dim=-3).clamp(0.0, 1.0)


# -- constant speed (sec. 2.6.2C) ------------------------------------------------------------------


def constant_speed(phi: torch.Tensor) -> torch.Tensor:
    """Re-parametrise a monotone path so that mean(phi(t_k)) = t_k exactly (Lemma 7, [THESIS]).

    The discrete path is read as the continuous, piecewise-linear path through the slices
    phi(0)=0, phi(t_1), ..., phi(t_T), phi(1)=1. Its mass m(s) = mean(phi(s)) is non-decreasing,
    so for each target mass w = t_k a preimage segment [s_j, s_{j+1}] with m_j <= w <= m_{j+1}
    is found by a sorted search; the new slice is the linear interpolation on that segment with
    eta = (w - m_j) / (m_{j+1} - m_j) (the interpolation case of the proof; with eta in {0, 1} it
    is the "faithful" case and the mask occurs exactly in phi). Every output mask lies on the
    input's piecewise-linear path, the output is monotone and clamped values stay in [0, 1].
    Input: [..., T, h, w], already monotone in t with values in [0, 1] (project_monotone_clamped);
    leading dimensions (several paths) are handled at once.
    """
    T = phi.shape[-3]
    full = with_boundaries(phi)  # [..., T+2, h, w]
    mass = full.mean(dim=(-2, -1))  # [..., T+2]
    # Guard against float drift making the cumulative mass decrease by an ulp.
    mass = torch.cummax(mass, dim=-1).values
    mass[..., 0] = 0.0
    mass[..., -1] = torch.clamp(mass[..., -1], min=1.0)
    target = interior_times(T, dtype=mass.dtype, device=mass.device).expand(*mass.shape[:-1], T).contiguous()
    # index j with mass[j] <= w < mass[j+1] (right=True gives the first index with mass > w)
    upper = torch.searchsorted(mass.contiguous(), target, right=True).clamp(1, T + 1)
    lower = upper - 1
    m_lo, m_hi = torch.gather(mass, -1, lower), torch.gather(mass, -1, upper)
    span = m_hi - m_lo
    safe = torch.where(span > 0, span, torch.ones_like(span))
    eta = torch.where(span > 0, (target - m_lo) / safe, torch.zeros_like(span)).clamp(0.0, 1.0)[..., None, None]
    lo = torch.take_along_dim(full, lower[..., None, None], dim=-3)
    hi = torch.take_along_dim(full, upper[..., None, None], dim=-3)
    return (lo * (1.0 - eta) + hi * eta).clamp(0.0, 1.0)


def project(phi: torch.Tensor) -> torch.Tensor:
    """The full projection onto the ablation-path axioms (Algorithm 2, lines 12-15); phi [..., T, h, w]."""
    return constant_speed(project_monotone_clamped(phi))


# -- soft constraints (sec. 2.5) ------------------------------------------------------------------


def _reflect_index(i: torch.Tensor, n: int) -> torch.Tensor:
    """Half-sample symmetric reflection of integer offsets into [0, n) (any distance, periodic 2n)."""
    j = torch.remainder(i, 2 * n)
    return torch.where(j >= n, 2 * n - 1 - j, j)


def gaussian_blur_matrix(n: int, sigma: float, *, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """[n, n] matrix of a 1-D Gaussian blur (eq. 2.25) with half-sample symmetric boundaries.

    Symmetric reflection makes the matrix doubly stochastic: it preserves a mask's mass (the
    constant-speed axiom) and constants, and works for any sigma (sigma far above n, as for the
    blurred baseline of sec. 2.7.1, folds the kernel periodically). Applied as B @ X @ B^T.
    """
    radius = max(1, int(math.ceil(4.0 * sigma)))
    offsets = torch.arange(-radius, radius + 1, device=device)
    kernel = torch.exp(-(offsets.to(torch.float64) ** 2) / (2.0 * sigma * sigma))
    kernel = kernel / kernel.sum()
    rows = torch.arange(n, device=device)[:, None].expand(n, offsets.numel())
    cols = _reflect_index(rows + offsets[None, :], n)
    mat = torch.zeros(n, n, dtype=torch.float64, device=device)
    mat.index_put_((rows.reshape(-1), cols.reshape(-1)), kernel.repeat(n), accumulate=True)
    return mat.to(dtype)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Blur the last two axes of x (any leading shape) with a Gaussian of std `sigma` pixels (eq. 2.24)."""
    h, w = x.shape[-2], x.shape[-1]
    bh = gaussian_blur_matrix(h, sigma, dtype=x.dtype, device=x.device)
    bw = bh if w == h else gaussian_blur_matrix(w, sigma, dtype=x.dtype, device=x.device)
    return bh @ x @ bw.T


def saturate(phi: torch.Tensor, zeta: float) -> torch.Tensor:
    """Artificial saturation Pi_sat (eq. 2.26): 0 and 1 attract, 1/2 repels; identity as zeta -> 0."""
    if zeta <= 0.0:
        return phi
    return 0.5 * (torch.tanh((2.0 * phi - 1.0) * zeta) / math.tanh(zeta) + 1.0)


def pinch(phi_up: torch.Tensor, phi_down: torch.Tensor, zeta_pinch: float) -> torch.Tensor:
    """Boundary pinching (eq. 2.27-2.29): phi_down <- phi_up + Pi_pinch(phi_down - phi_up).

    Pi_pinch(d) = d (1 - zeta) + d^2 zeta has an attracting fixpoint at d = 0 (small contrasts
    between the two paths are squelched) and a repelling one at d = 1 (features that the
    dissipating path removes and the retaining path keeps survive). phi_up is not changed.
    """
    d = phi_down - phi_up
    return phi_up + d * (1.0 - zeta_pinch) + d * d * zeta_pinch


def saturation(phi: torch.Tensor) -> torch.Tensor:
    """Saturation level (eq. 2.31): integral over t and r of 2 |phi - 1/2|, in [0, 1].

    The t-integral is the trapezoid rule on t_k = k/(T+1) with the boundary slices (saturation 1)
    included, the same quadrature as the scores.
    phi: [..., T, h, w] -> [...] (a scalar for one path).
    """
    per_slice = (2.0 * (phi - 0.5).abs()).mean(dim=(-2, -1))  # [..., T]
    T = phi.shape[-3]
    return (per_slice.sum(dim=-1) + 1.0) / (T + 1)  # boundaries contribute (1/2 + 1/2) * 1


def upsample(phi: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear upsampling of [T, h, w] masks to the image (sec. 2.6.1); keeps [0, 1] and monotonicity.

    Bilinear weights are non-negative and sum to one, so pointwise order in t and the range are
    preserved; the mean is preserved up to the border treatment (within ~1/h of the mask mass).
    """
    if phi.shape[-2:] == (height, width):
        return phi
    return F.interpolate(phi[:, None], size=(height, width), mode="bilinear", align_corners=False)[:, 0]
