"""lesions: SYNTHETIC, procedurally generated dermoscopy-like images (not real patient data).

Each image shows textured skin with one lesion whose class is carried by its shape, border and
colour pattern, plus class-independent distractors (hairs, ruler marks, a dermoscope vignette):

- nevus: round or slightly oval, smooth regular border, uniform brown with a darker centre;
- melanoma: asymmetric, irregular ragged border, several colours (brown, black blotches, blue-grey veil);
- seborrheic keratosis: elongated oval, sharp border, light tan with bright dots and dark pits;
- vascular: red-purple lobules (a cluster of small round lacunae) with darker red lagoons.

The ground truth is the lesion mask, pixel-exact: the lesion is composited with a binary alpha, so a
pixel is in the mask iff the lesion was drawn there (hairs and ruler marks may cover lesion pixels
afterwards; those pixels stay in the mask, as an annotator would draw them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from xaiserve.training.datasets.base import Rendered, SyntheticDataset, pixel_grid, smooth_noise

LESION_LABELS = ("nevus", "melanoma", "seborrheic keratosis", "vascular")


@dataclass(frozen=True)
class LesionsConfig:
    size: int = 64
    seed: int = 0
    sizes: dict[str, int] = field(default_factory=lambda: {"train": 4000, "val": 1000, "test": 1000})
    max_hairs: int = 5
    ruler_prob: float = 0.4


class Lesions(SyntheticDataset):
    name = "lesions"
    labels = LESION_LABELS

    def __init__(self, config: LesionsConfig = LesionsConfig()):
        super().__init__(size=config.size, seed=config.seed, sizes=config.sizes)
        self.config = config

    def skin(self, rng: np.random.Generator, n: int) -> np.ndarray:
        s = self.size
        tone = rng.uniform(0, 1, (n, 1, 1, 1)).astype(np.float32)
        light = np.array([0.93, 0.78, 0.70], np.float32).reshape(1, 3, 1, 1)
        dark = np.array([0.62, 0.44, 0.33], np.float32).reshape(1, 3, 1, 1)
        base = light + (dark - light) * tone
        shade = 0.12 * (smooth_noise(rng, n, 1, 4, s) - 0.5)
        texture = 0.05 * (smooth_noise(rng, n, 3, 24, s) - 0.5)
        pores = rng.normal(0, 0.02, (n, 1, s, s)).astype(np.float32)
        return base + shade + texture + pores

    def lesion_shape(
        self,
        rng: np.random.Generator,
        n: int,
        label: np.ndarray,
        *,
        centre: tuple[np.ndarray, np.ndarray] | None = None,
        scale: float = 1.0,
    ) -> np.ndarray:
        """Binary lesion masks [n,S,S] from a polar radius function r(theta), class-specific harmonics.

        centre (cy, cx) [n] in pixels and scale (of the radius) place smaller lesions elsewhere (the
        two-finding set); the random draws are the same either way, so the default is unchanged."""
        s = self.size
        yy, xx = pixel_grid(s)
        cy = s / 2 + rng.uniform(-0.1, 0.1, (n, 1, 1)) * s
        cx = s / 2 + rng.uniform(-0.1, 0.1, (n, 1, 1)) * s
        R = rng.uniform(0.15, 0.26, (n, 1, 1)) * s * scale
        if centre is not None:
            cy = np.asarray(centre[0], dtype=np.float64).reshape(n, 1, 1)
            cx = np.asarray(centre[1], dtype=np.float64).reshape(n, 1, 1)
        dy, dx = yy - cy, xx - cx
        rho = np.sqrt(dy**2 + dx**2)
        th = np.arctan2(dy, dx)
        k = np.arange(1, 17).reshape(1, 16, 1, 1)
        amp = np.zeros((n, 16, 1, 1))
        ph = rng.uniform(0, 2 * np.pi, (n, 16, 1, 1))
        base_amp = rng.uniform(0, 1, (n, 16, 1, 1))
        nev, mel, sk = label == 0, label == 1, label == 2
        amp[nev, 1] = 0.10 * base_amp[nev, 1]  # slightly oval, smooth
        amp[mel, 1:7] = 0.08 + 0.14 * base_amp[mel, 1:7]  # asymmetric, irregular
        amp[mel, 10:16] = 0.04 * base_amp[mel, 10:16]  # ragged border
        amp[sk, 1] = 0.22 + 0.12 * base_amp[sk, 1]  # elongated oval
        r = R * (1 + (amp * np.cos(k * th[:, None] + ph)).sum(1))
        shape = rho < r
        # vascular: a cluster of 3-6 round lobules around the centre
        vas = label == 3
        if vas.any():
            nv = int(vas.sum())
            lob_n = rng.integers(3, 7, nv)
            ang = rng.uniform(0, 2 * np.pi, (nv, 6, 1, 1))
            dist = rng.uniform(0.2, 0.7, (nv, 6, 1, 1)) * R[vas][:, None]
            lr = rng.uniform(0.35, 0.6, (nv, 6, 1, 1)) * R[vas][:, None]
            ly = cy[vas][:, None] + dist * np.sin(ang)
            lx = cx[vas][:, None] + dist * np.cos(ang)
            lobes = ((yy - ly) ** 2 + (xx - lx) ** 2) < lr**2
            lobes &= (np.arange(6)[None, :] < lob_n[:, None])[:, :, None, None]
            shape[vas] = lobes.any(1)
        return shape

    def lesion_colour(self, rng: np.random.Generator, n: int, label: np.ndarray, shape: np.ndarray) -> np.ndarray:
        """Lesion colour pattern [n,3,S,S] (only read inside the lesion mask)."""
        s = self.size
        yy, xx = pixel_grid(s)
        area = shape.sum((1, 2)).clip(1)
        cy = (shape * yy).sum((1, 2)) / area
        cx = (shape * xx).sum((1, 2)) / area
        rad = np.sqrt((yy - cy[:, None, None]) ** 2 + (xx - cx[:, None, None]) ** 2) / (
            np.sqrt(area / np.pi)[:, None, None] + 1e-6
        )
        rad = np.clip(rad, 0, 1.2).astype(np.float32)[:, None]
        jit = (rng.uniform(-0.07, 0.07, (n, 1, 1, 1)) + rng.uniform(-0.02, 0.02, (n, 3, 1, 1))).astype(np.float32)
        blotch = smooth_noise(rng, n, 3, 7, s)
        dots = rng.random((n, 2, s, s)).astype(np.float32)

        def c(rgb):
            return np.array(rgb, np.float32).reshape(1, 3, 1, 1)

        brown = c([0.45, 0.28, 0.16]) + jit
        out = np.empty((n, 3, s, s), np.float32)
        # nevus: uniform brown, darker in the centre
        nevus = brown * (0.85 + 0.25 * rad)
        # melanoma: brown base, black blotches, blue-grey veil
        mel = np.where(blotch[:, :1] > 0.6, c([0.12, 0.08, 0.07]), brown * 0.9)
        mel = np.where(blotch[:, 1:2] > 0.65, c([0.38, 0.42, 0.55]), mel)
        mel = np.where(blotch[:, 2:3] < 0.3, c([0.60, 0.40, 0.25]), mel)
        # seborrheic keratosis: light tan with bright milia and dark pits
        sk = c([0.72, 0.56, 0.40]) + jit
        sk = np.where(dots[:, :1] > 0.93, c([0.95, 0.92, 0.80]), sk)
        sk = np.where(dots[:, 1:2] > 0.95, c([0.25, 0.18, 0.12]), sk)
        # vascular: red-purple with darker lagoons
        vas = c([0.62, 0.12, 0.25]) + jit * 0.5
        vas = np.where(blotch[:, :1] > 0.55, c([0.40, 0.05, 0.18]), vas)
        for lab, img in ((0, nevus), (1, mel), (2, sk), (3, vas)):
            sel = label == lab
            out[sel] = np.broadcast_to(img, (n, 3, s, s))[sel]
        return out

    def distractors(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Hairs (dark quadratic curves) and ruler marks: colour [n,3,S,S] and coverage mask [n,S,S]."""
        s, cfg = self.size, self.config
        yy, xx = pixel_grid(s)
        h = cfg.max_hairs
        count = rng.integers(0, h + 1, n)
        p = rng.uniform(-0.2, 1.2, (n, h, 3, 2)) * s  # three control points per hair
        t = np.linspace(0, 1, 96).reshape(1, 1, -1, 1)
        pts = ((1 - t) ** 2) * p[:, :, None, 0] + 2 * (1 - t) * t * p[:, :, None, 1] + (t**2) * p[:, :, None, 2]
        iy = np.floor(pts[..., 0]).astype(int)
        ix = np.floor(pts[..., 1]).astype(int)
        ok = (iy >= 0) & (iy < s) & (ix >= 0) & (ix < s)
        ok &= np.arange(h)[None, :, None] < count[:, None, None]
        cover = np.zeros((n, s, s), bool)
        rows = np.broadcast_to(np.arange(n)[:, None, None], iy.shape)
        cover[rows[ok], iy[ok], ix[ok]] = True
        # ruler: a line along one border with ticks every 4 px
        ruler = rng.random(n) < cfg.ruler_prob
        side = rng.integers(0, 4, n)
        off = rng.integers(2, 6, n)
        tick = np.arange(s) % 4 == 0
        yi, xi = yy.astype(int), xx.astype(int)
        for sd in range(4):
            sel = ruler & (side == sd)
            if not sel.any():
                continue
            o = off[sel][:, None, None]
            if sd == 0:
                m = (yi == o) | ((yi > o) & (yi <= o + 2) & tick[None, None, :])
            elif sd == 1:
                m = (yi == s - 1 - o) | ((yi < s - 1 - o) & (yi >= s - 3 - o) & tick[None, None, :])
            elif sd == 2:
                m = (xi == o) | ((xi > o) & (xi <= o + 2) & tick[None, :, None])
            else:
                m = (xi == s - 1 - o) | ((xi < s - 1 - o) & (xi >= s - 3 - o) & tick[None, :, None])
            cover[sel] |= m
        shade = rng.uniform(0.05, 0.25, (n, 1, 1, 1)).astype(np.float32)
        colour = np.broadcast_to(shade * np.array([1.0, 0.85, 0.7], np.float32).reshape(1, 3, 1, 1), (n, 3, s, s))
        return colour, cover

    def render(
        self, rng: np.random.Generator, n: int, split: str, chunk: int, *, draw_objects: bool = True
    ) -> Rendered:
        s = self.size
        label = rng.integers(0, len(LESION_LABELS), n)
        skin = self.skin(rng, n)
        shape = self.lesion_shape(rng, n, label)
        colour = self.lesion_colour(rng, n, label, shape)
        # a little skin texture shows through the lesion, so it is not a flat sticker
        lesion = 0.85 * colour + 0.15 * skin
        img = np.where(shape[:, None], lesion, skin) if draw_objects else skin
        dcol, dcov = self.distractors(rng, n)
        img = np.where(dcov[:, None], dcol, img)
        # dermoscope vignette: dark corners outside a random circle (class-independent)
        yy, xx = pixel_grid(s)
        vr = rng.uniform(0.55, 0.9, (n, 1, 1)) * s
        vig = np.sqrt((yy - s / 2) ** 2 + (xx - s / 2) ** 2) > vr
        use_vig = rng.random((n, 1, 1)) < 0.5
        img = np.where((vig & use_vig)[:, None], img * 0.15, img)
        return Rendered(np.clip(img, 0, 1).astype(np.float32), label.astype(np.int64), shape)


def lesions(*, seed: int = 0, size: int = 64, sizes: dict[str, int] | None = None) -> Lesions:
    return Lesions(LesionsConfig(seed=seed, size=size, sizes=sizes or LesionsConfig().sizes))
