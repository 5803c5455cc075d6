"""Per-pixel loop port of the thesis's monotonisation ([THESIS], sec. 2.6.2B, Algorithm 1).

Reference only, for tests and bench/bench_ablation.py: serving uses the vectorised
`path.monotone_envelope`, which is L-infinity-optimal too and orders of magnitude faster.

Algorithm 1, discretised on the t grid of one pixel:
  1. find the maximal runs [l, r] where p decreases ("p'(t) <= 0");
  2. for each, the centre line m = (p(l) + p(r)) / 2, grown to the left while p > m and to the
     right while p < m (the nearest points that meet the centre line non-decreasingly), with m
     recomputed as the interval widens (the thesis leaves this implicit; without it the result
     can miss L-inf optimality, found by the brute-force comparison in the tests);
  3. merge intervals that overlap, then those that touch with the left centre above the right
     one; recompute the centre of the union (midpoint of its largest and smallest value) and grow
     again, until nothing changes;
  4. replace p on each interval by its centre.
"""

from __future__ import annotations

import numpy as np


def _grow(p: np.ndarray, l: int, r: int) -> tuple[int, int, float]:
    """Centre line of p[l..r] grown until it meets p non-decreasingly on both sides.

    Each added point can widen the interval's range, so the centre (midpoint of the largest and
    smallest value, i.e. (p(l_i) + p(r_i)) / 2 of Algorithm 1) is recomputed after every step.
    """
    n = p.shape[0]
    hi, lo = float(p[l : r + 1].max()), float(p[l : r + 1].min())
    while True:
        m = 0.5 * (hi + lo)
        if l > 0 and p[l - 1] > m:
            l -= 1
            hi = max(hi, float(p[l]))
        elif r < n - 1 and p[r + 1] < m:
            r += 1
            lo = min(lo, float(p[r]))
        else:
            return l, r, m


def algorithm1(p: np.ndarray) -> np.ndarray:
    """Non-decreasing, L-inf-optimal approximation of a 1-D sequence (Algorithm 1, Lemma 6)."""
    p = np.asarray(p, dtype=np.float64)
    n = p.shape[0]
    runs: list[tuple[int, int]] = []
    k = 0
    while k < n - 1:
        if p[k + 1] < p[k]:
            l = k
            while k < n - 1 and p[k + 1] <= p[k]:
                k += 1
            runs.append((l, k))
        else:
            k += 1
    blocks = [_grow(p, l, r) for l, r in runs]
    merged = True
    while merged:
        merged = False
        # overlapping intervals first (they are one decreasing region), then touching ones whose
        # centres are out of order; each merge recomputes the centre and grows again
        for touching in (False, True):
            blocks.sort()
            out: list[tuple[int, int, float]] = []
            for b in blocks:
                if out:
                    l0, r0, m0 = out[-1]
                    l1, r1, m1 = b
                    if l1 <= r0 or (touching and l1 == r0 + 1 and m0 > m1):
                        out[-1] = _grow(p, min(l0, l1), max(r0, r1))
                        merged = True
                        continue
                out.append(b)
            blocks = out
    q = p.copy()
    for l, r, m in blocks:
        q[l : r + 1] = m
    return q


def monotonise_loop(phi: np.ndarray) -> np.ndarray:
    """Algorithm 1 applied pixel by pixel to a path [T, h, w] (Algorithm 2 lines 12-13)."""
    phi = np.asarray(phi, dtype=np.float64)
    T, h, w = phi.shape
    out = np.empty_like(phi)
    for i in range(h):
        for j in range(w):
            out[:, i, j] = algorithm1(phi[:, i, j])
    return out
