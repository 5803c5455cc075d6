"""The fidelity check of a mask, one definition for Explain and the evaluation ([NEM-U] sec. 3.1,
last paragraph; METHODS.md, decision 2026-12).

    fidelity = softmax(Phi(x * m))_target          for a classifier (logits -> probabilities)
             = cos(Phi(x), Phi(x * m))             for an encoder (embeddings)

with m the min-max normalised map ([NEM-U] sec. 4.2; a constant map becomes all ones, as
training.metrics.normalise_maps) and x * m pixel scaling in normalised space (a removed pixel
becomes the dataset mean). Raw logits are never compared: their cosine can be negative (-0.75
was seen) and is not what the evaluation reports. The score rewards mask area (a random map of
larger area scores higher), so the evaluation reports it beside deletion / insertion AUC.
Pure numpy: the server (service/fastpath.py) and training/metrics.py both call it.
"""

from __future__ import annotations

import numpy as np

KINDS = ("classifier", "encoder")


def normalise_map(m: np.ndarray) -> np.ndarray:
    """Min-max normalise one map [H, W] to [0, 1]; a constant map becomes all ones (uniform attribution)."""
    m = np.asarray(m, dtype=np.float64)
    lo, hi = float(m.min()), float(m.max())
    if hi - lo <= 0:
        return np.ones_like(m)
    return (m - lo) / (hi - lo)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of [B, K] logits, in float64 (shifted by the row maximum, so it never overflows)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of [B, ...] arrays (flattened per row); 0 where a row is all zeros."""
    a = np.asarray(a, dtype=np.float64).reshape(len(a), -1)
    b = np.asarray(b, dtype=np.float64).reshape(len(b), -1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(axis=1) / np.maximum(den, 1e-12)


def fidelity(kind: str, original: np.ndarray, masked: np.ndarray, targets: np.ndarray | None = None) -> np.ndarray:
    """Fidelity per row from the frozen model's outputs on x [B, D] and on x * m [B, D].

    kind "classifier": outputs are logits and `targets` [B] the explained labels; the target's
    softmax probability on x * m. kind "encoder": the cosine of the two embeddings.
    """
    if kind == "classifier":
        if targets is None:
            raise ValueError("a classifier's fidelity needs the target labels")
        p = softmax(masked)
        t = np.asarray(targets, dtype=np.int64).reshape(-1)
        return p[np.arange(len(p)), t]
    if kind == "encoder":
        return cosine(original, masked)
    raise ValueError(f"fidelity is defined for {' and '.join(KINDS)} models, not {kind!r}")
