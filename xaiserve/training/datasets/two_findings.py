"""Two-finding lesions: SYNTHETIC images with two lesions of different classes (plus the single-lesion
set's distractors: hairs, ruler marks, vignette), ground truth per lesion. They test a targeted
explanation's answer to "where is class k" when another class is in the same image ([NEMt]; METHODS.md,
decision 2026-12): for target k the relevance should lie on the lesion of class k, not the other.

Each lesion is drawn by the single-lesion generator (lesions.py: class-specific shape and colour) at
0.7 of its radius, one in each half of the image (left/right or top/bottom, chosen per image); where
the two overlap the second is drawn on top, and the first lesion's ground truth loses those pixels.
A pixel is in lesion j's mask iff lesion j is what was drawn there (distractors drawn afterwards may
cover lesion pixels; those stay in the mask, as in lesions.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xaiserve.training.datasets.base import Rendered, pixel_grid
from xaiserve.training.datasets.lesions import LESION_LABELS, Lesions, LesionsConfig

SCALE = 0.7  # lesion radius relative to the single-lesion set
_SPLIT_CODE = {"train": 0, "val": 1, "test": 2}


@dataclass
class TwoFindings:
    """images [n,3,S,S] float in [0, 1]; labels [n,2] (two different classes); masks [n,2,S,S] bool
    (disjoint); cover [n,S,S] bool: distractor pixels (drawn over everything)."""

    images: np.ndarray
    labels: np.ndarray
    masks: np.ndarray
    cover: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def uint8(self) -> np.ndarray:
        return (self.images * 255 + 0.5).astype(np.uint8)


def render_two_findings(
    n: int, split: str = "test", *, seed: int = 0, size: int = 64, draw_objects: bool = True
) -> TwoFindings:
    """n images of one split, deterministic in (seed, split); draw_objects=False gives the same skin,
    distractors and vignette without the lesions (for ground-truth checks)."""
    ds = Lesions(LesionsConfig(seed=seed, size=size))
    rng = np.random.default_rng([seed, _SPLIT_CODE[split], 0x2F1D])
    return render_pairs(ds, rng, n, draw_objects=draw_objects)


def render_pairs(ds: Lesions, rng: np.random.Generator, n: int, *, draw_objects: bool = True) -> TwoFindings:
    """n two-finding images drawn with `rng` by the single-lesion generator `ds`."""
    s = ds.size
    first = rng.integers(0, len(LESION_LABELS), n)
    second = (first + rng.integers(1, len(LESION_LABELS), n)) % len(LESION_LABELS)
    labels = np.stack([first, second], axis=1)
    skin = ds.skin(rng, n)
    vertical = rng.random(n) < 0.5  # split top/bottom instead of left/right
    off = rng.uniform(0.22, 0.28, n) * s
    along = s / 2 + rng.uniform(-0.12, 0.12, (2, n)) * s
    img = skin.copy()
    masks = np.zeros((n, 2, s, s), dtype=bool)
    for j, sign in enumerate((-1.0, 1.0)):
        across = s / 2 + sign * off
        cy = np.where(vertical, across, along[j])
        cx = np.where(vertical, along[j], across)
        shape = ds.lesion_shape(rng, n, labels[:, j], centre=(cy, cx), scale=SCALE)
        colour = ds.lesion_colour(rng, n, labels[:, j], shape)
        lesion = 0.85 * colour + 0.15 * skin
        if draw_objects:
            img = np.where(shape[:, None], lesion, img)
        masks[:, j] = shape
    masks[:, 0] &= ~masks[:, 1]  # the second lesion is drawn on top
    dcol, dcov = ds.distractors(rng, n)
    img = np.where(dcov[:, None], dcol, img)
    yy, xx = pixel_grid(s)
    vr = rng.uniform(0.55, 0.9, (n, 1, 1)) * s
    vig = np.sqrt((yy - s / 2) ** 2 + (xx - s / 2) ** 2) > vr
    use_vig = rng.random((n, 1, 1)) < 0.5
    img = np.where((vig & use_vig)[:, None], img * 0.15, img)
    return TwoFindings(np.clip(img, 0, 1).astype(np.float32), labels.astype(np.int64), masks, dcov)


@dataclass(frozen=True)
class MixedConfig(LesionsConfig):
    two_findings: float = 0.5  # share of two-finding images per chunk


class LesionsWithTwoFindings(Lesions):
    """The lesions set with a share of two-finding images, for training targeted masks (NEMt).

    A two-finding row carries ONE of its two classes as the label (drawn per image) and that lesion
    as its ground truth, so a target taken from the label asks "where is class k" with the other
    class in the image. Normalisation statistics are those of the single-lesion set (the classifier's),
    and the splits are fixed by (seed, split, chunk) as everywhere; they do not overlap
    render_two_findings' evaluation images (another random stream)."""

    config: MixedConfig

    def __init__(self, config: MixedConfig = MixedConfig()):
        super().__init__(config)
        self._base = Lesions(LesionsConfig(size=config.size, seed=config.seed, sizes=config.sizes))

    def stats(self):
        return self._base.stats()

    def render(self, rng: np.random.Generator, n: int, split: str, chunk: int, *, draw_objects: bool = True):
        n2 = int(round(n * self.config.two_findings))
        one = super().render(rng, n - n2, split, chunk, draw_objects=draw_objects)
        if n2 == 0:
            return one
        two = render_pairs(self, rng, n2, draw_objects=draw_objects)
        j = rng.integers(0, 2, n2)
        rows = np.arange(n2)
        images = np.concatenate([one.images, two.images])
        labels = np.concatenate([one.labels, two.labels[rows, j]])
        masks = np.concatenate([one.masks, two.masks[rows, j]])
        order = rng.permutation(n)
        return Rendered(images[order], labels[order], masks[order], {"two_findings": (order >= n - n2)})

    def describe(self) -> dict:
        return {**super().describe(), "two_findings": self.config.two_findings}


def lesions_with_two_findings(
    *, seed: int = 0, size: int = 64, sizes: dict[str, int] | None = None, share: float = 0.5
) -> LesionsWithTwoFindings:
    return LesionsWithTwoFindings(
        MixedConfig(seed=seed, size=size, sizes=sizes or LesionsConfig().sizes, two_findings=share)
    )
