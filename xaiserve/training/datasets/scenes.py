"""scenes: Fashion-MNIST items composited on textured, cluttered RGB backgrounds.

Each image holds one to three Fashion-MNIST items (Debian package `dataset-fashion-mnist`) at
random positions and scales, tinted in random colours, over a background made of colour gradients,
sinusoidal gratings, cloudy noise and random geometric clutter (rectangles, discs, bars). The label
is the class of the largest item (by silhouette area; it is drawn last, so it is never occluded); the
ground truth is the union of the items' silhouettes, pixel-exact: a pixel is in the mask iff an item
was drawn there. Items never repeat across splits: train and val take disjoint ranges of the
Fashion-MNIST training set, test takes the Fashion-MNIST test set.

Background families (2026-12): with `ScenesConfig.families` unset the background is the original
composite (`legacy`: gradient + gratings + cloudy noise + clutter, the data scenes-simclr and
scenes-classifier were trained on; `scenes()` keeps it). With `families` set, each image draws one
named procedural family from `BACKGROUND_FAMILIES` (the three parts of the original, and families with
natural-image statistics: 1/f colour noise, Voronoi cells, stripes/checkers at random scales and
angles, blurred large blobs, high-contrast edges and lines, crops of the scikit-image bundled
photographs), then a colour/contrast jitter. `heldout_families` are never drawn for train, val or
test: they make the extra split `heldout` (items from the Fashion-MNIST test set).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from xaiserve.errors import InvalidArgument
from xaiserve.training.datasets.base import (
    CHUNK,
    Rendered,
    Split,
    SyntheticDataset,
    pixel_grid,
    smooth_noise,
    to_uint8,
)
from xaiserve.training.datasets.idx import DEFAULT_FASHION_MNIST, FASHION_MNIST_LABELS, FashionMnist, load_fashion_mnist

_VAL_START = 50_000  # Fashion-MNIST train[:50000] -> our train items, train[50000:] -> our val items


@dataclass(frozen=True)
class ScenesConfig:
    root: Path = DEFAULT_FASHION_MNIST
    size: int = 64
    seed: int = 0
    sizes: dict[str, int] = field(default_factory=lambda: {"train": 6000, "val": 1000, "test": 1000})
    max_items: int = 3
    min_scale: float = 0.30  # item box side as a fraction of the image side
    max_scale: float = 0.62
    clutter: int = 8  # geometric clutter shapes per background
    # None: the original composite background (bit-identical to before the families existed);
    # a tuple of BACKGROUND_FAMILIES names: each train/val/test image draws one of them uniformly
    families: tuple[str, ...] | None = None
    heldout_families: tuple[str, ...] = ()  # only in the `heldout` split; disjoint from `families`
    heldout_size: int = 1000
    jitter: bool = True  # colour / contrast jitter on the family backgrounds
    # item rendering variety (2026-12), in the train split only (val/test/heldout render as before): each item
    # rotated, stretched, textured, two-toned, contrast-varied or inverted (ItemVariety, variety_params)
    item_variety: bool = False


HELDOUT_SPLIT = "heldout"
_HELDOUT_CODE = 3


class Scenes(SyntheticDataset):
    name = "scenes"
    labels = FASHION_MNIST_LABELS

    def __init__(self, config: ScenesConfig = ScenesConfig()):
        super().__init__(size=config.size, seed=config.seed, sizes=config.sizes)
        self.config = config
        self.__post_init_families()
        self._fm: FashionMnist = load_fashion_mnist(config.root)  # fails early, naming the apt package

    def _pool(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        if split == "train":
            return self._fm.train_images[:_VAL_START], self._fm.train_labels[:_VAL_START]
        if split == "val":
            return self._fm.train_images[_VAL_START:], self._fm.train_labels[_VAL_START:]
        return self._fm.test_images, self._fm.test_labels

    def __post_init_families(self) -> None:
        cfg = self.config
        names = tuple(cfg.families or ()) + tuple(cfg.heldout_families)
        bad = [f for f in names if f not in BACKGROUND_FAMILIES]
        if bad:
            raise InvalidArgument(f"unknown background families {bad}; use names from {sorted(BACKGROUND_FAMILIES)}")
        if cfg.families is not None and not cfg.families:
            raise InvalidArgument("families must name at least one background family (or be None)")
        both = set(cfg.families or ()) & set(cfg.heldout_families)
        if both:
            raise InvalidArgument(f"families {sorted(both)} are both trained on and held out")

    def split(self, name: str) -> Split:
        """train / val / test as SyntheticDataset; `heldout`: test items on the held-out families."""
        if name != HELDOUT_SPLIT:
            return super().split(name)
        if not self.config.heldout_families:
            raise InvalidArgument("this scenes dataset holds no background families out (heldout_families is empty)")
        if name not in self._cache:
            total = int(self.config.heldout_size)
            parts = [
                self.render_chunk(name, c, min(CHUNK, total - c * CHUNK)) for c in range((total + CHUNK - 1) // CHUNK)
            ]
            self._cache[name] = Split(
                np.concatenate([to_uint8(r.images) for r in parts]),
                np.concatenate([r.labels for r in parts]).astype(np.int64),
                np.concatenate([r.masks for r in parts]),
            )
        return self._cache[name]

    def chunk_rng(self, split: str, chunk: int) -> np.random.Generator:
        if split == HELDOUT_SPLIT:
            return np.random.default_rng([self.seed, _HELDOUT_CODE, chunk, 0x5EED])
        return super().chunk_rng(split, chunk)

    def describe(self) -> dict:
        d = super().describe()
        if self.config.families is not None:
            d["families"] = list(self.config.families)
            d["heldout_families"] = list(self.config.heldout_families)
            d["heldout_size"] = int(self.config.heldout_size)
            d["jitter"] = bool(self.config.jitter)
        if self.config.item_variety:
            d["item_variety"] = "train split"
        return d

    def use_stats(self, mean, std) -> None:
        """Normalise with given per-channel statistics (a frozen model's: the NEM-U recipe trains on the
        family backgrounds but feeds the encoder exactly as it is served)."""
        self._stats = (tuple(float(v) for v in mean), tuple(float(v) for v in std))

    def families_for(self, split: str) -> tuple[str, ...] | None:
        """The background families a split draws from (None: the legacy composite)."""
        if split == HELDOUT_SPLIT:
            return tuple(self.config.heldout_families)
        return None if self.config.families is None else tuple(self.config.families)

    def background(self, rng: np.random.Generator, n: int, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
        """Backgrounds [n,3,S,S] in [0,1] and each image's family index into families_for(split)
        (all -1 for the legacy composite)."""
        fams = self.families_for(split)
        if fams is None:
            return self.legacy_background(rng, n), np.full(n, -1, np.int64)
        pick = rng.integers(0, len(fams), n)
        bg = np.empty((n, 3, self.size, self.size), np.float32)
        for i, f in enumerate(fams):
            sel = np.flatnonzero(pick == i)
            if len(sel):
                bg[sel] = BACKGROUND_FAMILIES[f](rng, len(sel), self.size, self.config)
        if self.config.jitter:
            bg = colour_jitter(rng, bg)
        return bg, pick

    def legacy_background(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """The original textured, cluttered background [n,3,S,S] in [0,1]."""
        return self.legacy_background_for(rng, n, self.size, self.config.clutter)

    @staticmethod
    def legacy_background_for(rng: np.random.Generator, n: int, s: int, clutter: int) -> np.ndarray:
        """The original composite: gradient, two gratings, cloudy noise, geometric clutter."""
        yy, xx = pixel_grid(s)
        yy, xx = yy / s, xx / s
        base = rng.uniform(0.15, 0.85, (n, 3, 1, 1)).astype(np.float32)
        # a colour gradient in a random direction
        ang = rng.uniform(0, 2 * np.pi, (n, 1, 1, 1)).astype(np.float32)
        ramp = (np.cos(ang) * xx + np.sin(ang) * yy) - 0.5
        bg = base + rng.uniform(-0.25, 0.25, (n, 3, 1, 1)).astype(np.float32) * ramp
        # gratings: two random orientations and frequencies
        for _ in range(2):
            th = rng.uniform(0, np.pi, (n, 1, 1, 1)).astype(np.float32)
            fr = rng.uniform(3, 12, (n, 1, 1, 1)).astype(np.float32)
            ph = rng.uniform(0, 2 * np.pi, (n, 1, 1, 1)).astype(np.float32)
            amp = rng.uniform(0.0, 0.12, (n, 3, 1, 1)).astype(np.float32)
            bg = bg + amp * np.sin(2 * np.pi * fr * (np.cos(th) * xx + np.sin(th) * yy) + ph)
        bg = bg + 0.25 * (smooth_noise(rng, n, 3, 6, s) - 0.5)
        # clutter: opaque rectangles, discs and bars in random colours
        k = clutter
        cy = rng.uniform(0, 1, (n, k, 1, 1)).astype(np.float32)
        cx = rng.uniform(0, 1, (n, k, 1, 1)).astype(np.float32)
        hw = rng.uniform(0.03, 0.14, (n, k, 2, 1, 1)).astype(np.float32)
        kind = rng.integers(0, 3, (n, k, 1, 1))
        col = rng.uniform(0, 1, (n, k, 3)).astype(np.float32)
        present = rng.random((n, k, 1, 1)) < 0.8
        dy, dx = np.abs(yy - cy), np.abs(xx - cx)
        rect = (dy < hw[:, :, 0]) & (dx < hw[:, :, 1])
        disc = (dy**2 + dx**2) < hw[:, :, 0] ** 2
        bar = (dy < 0.012) & (dx < 2.5 * hw[:, :, 1])
        shape = np.where(kind == 0, rect, np.where(kind == 1, disc, bar)) & present
        for j in range(k):  # later shapes occlude earlier ones
            bg = np.where(shape[:, j, None], col[:, j, :, None, None], bg)
        bg = bg + rng.normal(0, 0.03, bg.shape).astype(np.float32)
        return np.clip(bg, 0.0, 1.0).astype(np.float32)

    def render(
        self, rng: np.random.Generator, n: int, split: str, chunk: int, *, draw_objects: bool = True
    ) -> Rendered:
        s, cfg = self.size, self.config
        pool_x, pool_y = self._pool(split)
        bg, fam = self.background(rng, n, split)
        m = cfg.max_items
        count = rng.integers(1, m + 1, n)
        pick = rng.integers(0, len(pool_x), (n, m))
        scale = rng.uniform(cfg.min_scale, cfg.max_scale, (n, m)).astype(np.float32)
        pos = rng.uniform(0, 1, (n, m, 2)).astype(np.float32)
        flip = rng.random((n, m)) < 0.5
        tint = rng.uniform(0.0, 1.0, (n, m, 3)).astype(np.float32)
        # keep items visible against any background: push the tint away from mid-grey
        tint = np.where(tint.mean(-1, keepdims=True) > 0.5, 0.55 + 0.45 * tint, 0.45 * tint)

        var = variety_params(rng, n * m, s) if cfg.item_variety and split == "train" else None

        items = torch.from_numpy(pool_x[pick.reshape(-1)].astype(np.float32) / 255.0)[:, None]  # [n*m,1,28,28]
        side = scale.reshape(-1) * s
        x0 = pos[..., 0].reshape(-1) * (s - side)
        y0 = pos[..., 1].reshape(-1) * (s - side)
        # affine_grid maps output coords in [-1,1] to input coords; the item fills the box [x0, x0+side]
        k = s / side
        cxn = 2 * (x0 + side / 2) / s - 1
        cyn = 2 * (y0 + side / 2) / s - 1
        sx = np.where(flip.reshape(-1), -k, k)
        theta = np.zeros((n * m, 2, 3), np.float32)
        theta[:, 0, 0], theta[:, 0, 2] = sx, -cxn * sx
        theta[:, 1, 1], theta[:, 1, 2] = k, -cyn * k
        if var is not None:
            theta = var.warp(theta)
        grid = F.affine_grid(torch.from_numpy(theta), [n * m, 1, s, s], align_corners=False)
        warped = F.grid_sample(items, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        inten = warped.numpy().reshape(n, m, s, s)
        sil = inten > 0.12
        sil &= (np.arange(m)[None, :] < count[:, None])[:, :, None, None]
        area = sil.sum(axis=(2, 3))
        order = np.argsort(area, axis=1, kind="stable")  # ascending: the largest is drawn last, on top
        img = bg
        gt = np.zeros((n, s, s), bool)
        rows = np.arange(n)
        for j in range(m):
            idx = order[:, j]
            sj = sil[rows, idx]
            if var is None:
                col = tint[rows, idx][:, :, None, None] * (0.35 + 0.65 * inten[rows, idx][:, None])
            else:
                col = var.colour(rows * m + idx, tint[rows, idx], inten[rows, idx])
            if draw_objects:
                img = np.where(sj[:, None], col, img)
            gt |= sj
        largest = order[:, -1]
        labels = pool_y[pick[rows, largest]].astype(np.int64)
        item_labels = np.where(area > 0, pool_y[pick].astype(np.int64), -1)
        return Rendered(
            np.clip(img, 0, 1).astype(np.float32),
            labels,
            gt,
            {"item_labels": item_labels, "item_areas": area, "family": fam},
        )


@dataclass(frozen=True)
class ItemVariety:
    """Per-item rendering parameters for ScenesConfig.item_variety (one row per item, n*m rows): the
    item's shape stays a Fashion-MNIST silhouette (so the ground truth stays pixel-exact); its look
    varies so that "a flat tinted region" is not what an item looks like."""

    angle: np.ndarray  # rotation in radians, U(-0.5, 0.5)
    stretch: np.ndarray  # aspect ratio factor (x), U(0.8, 1.25)
    floor: np.ndarray  # shading floor: colour = tint * (floor + (1 - floor) * intensity), U(0, 0.7)
    invert: np.ndarray  # bool, p 0.25: intensity -> 1 - intensity inside the silhouette
    second: np.ndarray  # [N,3] a second tint, blended by the texture
    texture: np.ndarray  # [N,S,S] in [0,1]: smooth noise at a random scale, or a grating
    textured: np.ndarray  # bool, p 0.6

    def warp(self, theta: np.ndarray) -> np.ndarray:
        """theta [N,2,3] (output -> input coords) composed with a rotation and an x stretch of the item."""
        c, si = np.cos(self.angle), np.sin(self.angle)
        rot = np.zeros_like(theta)
        rot[:, 0, 0], rot[:, 0, 1] = c / self.stretch, -si / self.stretch
        rot[:, 1, 0], rot[:, 1, 1] = si, c
        out = theta.copy()
        out[:, :, :2] = rot[:, :, :2] @ theta[:, :, :2]
        out[:, :, 2] = (rot[:, :, :2] @ theta[:, :, 2:])[..., 0]
        return out.astype(np.float32)

    def colour(self, rows: np.ndarray, tint: np.ndarray, inten: np.ndarray) -> np.ndarray:
        """[n,3,S,S] colours of items `rows` (indices into the parameters), tints [n,3], intensities [n,S,S]."""
        i = np.where(self.invert[rows, None, None], 1.0 - inten, inten)
        f = self.floor[rows, None, None]
        shade = (f + (1 - f) * i)[:, None]
        t = np.where(self.textured[rows, None, None], self.texture[rows], 0.0)[:, None]
        base = tint[:, :, None, None] * (1 - t) + self.second[rows][:, :, None, None] * t
        return (base * shade).astype(np.float32)


def variety_params(rng: np.random.Generator, count: int, s: int) -> ItemVariety:
    """Draw ItemVariety for `count` items of an s x s image (all draws from `rng`)."""
    angle = rng.uniform(-0.5, 0.5, count).astype(np.float32)
    stretch = np.exp(rng.uniform(np.log(0.8), np.log(1.25), count)).astype(np.float32)
    floor = rng.uniform(0.0, 0.7, count).astype(np.float32)
    invert = rng.random(count) < 0.25
    second = rng.uniform(0.0, 1.0, (count, 3)).astype(np.float32)
    lo = rng.integers(3, 12, count)
    noise = np.empty((count, s, s), np.float32)
    for g in np.unique(lo):
        sel = np.flatnonzero(lo == g)
        noise[sel] = smooth_noise(rng, len(sel), 1, int(g), s)[:, 0]
    yy, xx = _unit(1, s)
    freq = rng.uniform(3.0, 12.0, count).astype(np.float32)
    ang = rng.uniform(0, np.pi, count).astype(np.float32)
    grating = 0.5 + 0.5 * np.sin(
        2 * np.pi * freq[:, None, None] * (np.cos(ang)[:, None, None] * xx + np.sin(ang)[:, None, None] * yy)
    )
    use_grating = rng.random(count) < 0.3
    texture = np.clip(np.where(use_grating[:, None, None], grating, noise), 0.0, 1.0).astype(np.float32)
    return ItemVariety(angle, stretch, floor, invert, second, texture, rng.random(count) < 0.6)


# -- background families ------------------------------------------------------------------------
# Each: (rng, n, size, config) -> float32 [n,3,size,size] in [0,1], every draw from `rng` (seeded chunks).
Family = Callable[[np.random.Generator, int, int, ScenesConfig], np.ndarray]


def _unit(n: int, s: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = pixel_grid(s)
    return yy / s, xx / s


def _gradient(rng: np.random.Generator, n: int, s: int) -> np.ndarray:
    yy, xx = _unit(n, s)
    base = rng.uniform(0.15, 0.85, (n, 3, 1, 1)).astype(np.float32)
    ang = rng.uniform(0, 2 * np.pi, (n, 1, 1, 1)).astype(np.float32)
    ramp = (np.cos(ang) * xx + np.sin(ang) * yy) - 0.5
    return base + rng.uniform(-0.35, 0.35, (n, 3, 1, 1)).astype(np.float32) * ramp


def fam_gratings(rng: np.random.Generator, n: int, s: int, cfg: ScenesConfig) -> np.ndarray:
    """A colour gradient plus two to three sinusoidal gratings (random orientation, frequency, phase)."""
    yy, xx = _unit(n, s)
    bg = _gradient(rng, n, s)
    for _ in range(3):
        th = rng.uniform(0, np.pi, (n, 1, 1, 1)).astype(np.float32)
        fr = rng.uniform(2, 16, (n, 1, 1, 1)).astype(np.float32)
        ph = rng.uniform(0, 2 * np.pi, (n, 1, 1, 1)).astype(np.float32)
        amp = rng.uniform(0.0, 0.2, (n, 3, 1, 1)).astype(np.float32)
        bg = bg + amp * np.sin(2 * np.pi * fr * (np.cos(th) * xx + np.sin(th) * yy) + ph)
    return np.clip(bg, 0, 1).astype(np.float32)


def fam_clouds(rng: np.random.Generator, n: int, s: int, cfg: ScenesConfig) -> np.ndarray:
    """Cloudy noise: three octaves of bicubic value noise, per-channel, around a random colour."""
    bg: np.ndarray = rng.uniform(0.2, 0.8, (n, 3, 1, 1)).astype(np.float32)
    for lo, amp in ((4, 0.5), (8, 0.3), (16, 0.15)):
        bg = bg + amp * (smooth_noise(rng, n, 3, lo, s) - 0.5)
    return np.clip(bg, 0, 1).astype(np.float32)


def fam_clutter(rng: np.random.Generator, n: int, s: int, cfg: ScenesConfig) -> np.ndarray:
    """Flat colour with opaque rectangles, discs and bars in random colours (12 shapes)."""
    yy, xx = _unit(n, s)
    bg = np.broadcast_to(rng.uniform(0.1, 0.9, (n, 3, 1, 1)).astype(np.float32), (n, 3, s, s)).copy()
    k = 12
    cy, cx = rng.uniform(0, 1, (2, n, k, 1, 1)).astype(np.float32)
    hw = rng.uniform(0.03, 0.2, (n, k, 2, 1, 1)).astype(np.float32)
    kind = rng.integers(0, 3, (n, k, 1, 1))
    col = rng.uniform(0, 1, (n, k, 3)).astype(np.float32)
    dy, dx = np.abs(yy - cy), np.abs(xx - cx)
    rect = (dy < hw[:, :, 0]) & (dx < hw[:, :, 1])
    disc = (dy**2 + dx**2) < hw[:, :, 0] ** 2
    bar = (dy < 0.015) & (dx < 2.5 * hw[:, :, 1])
    shape = np.where(kind == 0, rect, np.where(kind == 1, disc, bar))
    for j in range(k):
        bg = np.where(shape[:, j, None], col[:, j, :, None, None], bg)
    return bg


def fam_pink(rng: np.random.Generator, n: int, s: int, cfg: ScenesConfig) -> np.ndarray:
    """Colour 1/f^beta noise (beta in [0.8, 1.6] on the amplitude: natural images have about 1),
    channels mixed by a random colour matrix."""
    f = np.sqrt(np.fft.fftfreq(s)[:, None] ** 2 + np.fft.fftfreq(s)[None, :] ** 2)
    f[0, 0] = 1.0
    beta = rng.uniform(0.8, 1.6, (n, 1, 1, 1))
    spec = (rng.normal(size=(n, 3, s, s)) + 1j * rng.normal(size=(n, 3, s, s))) / f**beta
    spec[..., 0, 0] = 0
    img = np.fft.ifft2(spec).real
    img /= img.std(axis=(2, 3), keepdims=True) + 1e-9
    mix = rng.normal(0, 1, (n, 3, 3)) * 0.6 + np.eye(3)
    img = np.einsum("nij,njhw->nihw", mix, img)
    bg = rng.uniform(0.3, 0.7, (n, 3, 1, 1)) + rng.uniform(0.08, 0.2, (n, 1, 1, 1)) * img
    return np.clip(bg, 0, 1).astype(np.float32)


def fam_voronoi(rng: np.random.Generator, n: int, s: int, cfg: ScenesConfig) -> np.ndarray:
    """Voronoi cells (8 to 40 seeds), each a flat random colour with a slight shading gradient."""
    yy, xx = _unit(n, s)
    k = 40
    pts = rng.uniform(0, 1, (n, k, 2)).astype(np.float32)
    used = rng.integers(8, k + 1, n)
    d = (yy[None, None] - pts[:, :, 0, None, None]) ** 2 + (xx[None, None] - pts[:, :, 1, None, None]) ** 2
    d = np.where((np.arange(k)[None, :] < used[:, None])[:, :, None, None], d, np.inf)
    cell = d.argmin(1)  # [n,s,s]
    col = rng.uniform(0, 1, (n, k, 3)).astype(np.float32)
    bg: np.ndarray = np.take_along_axis(col, cell.reshape(n, -1, 1), 1).reshape(n, s, s, 3).transpose(0, 3, 1, 2)
    shade = rng.uniform(-0.15, 0.15, (n, k)).astype(np.float32)
    bg = bg + np.take_along_axis(shade, cell.reshape(n, -1), 1).reshape(n, 1, s, s) * (yy - 0.5)
    return np.clip(bg, 0, 1).astype(np.float32)


def fam_checker(rng: np.random.Generator, n: int, s: int, cfg: ScenesConfig) -> np.ndarray:
    """Stripes or checkerboards at a random scale (period 3 to 24 px) and angle, two random colours."""
    yy, xx = _unit(n, s)
    th = rng.uniform(0, np.pi, (n, 1, 1)).astype(np.float32)
    per = rng.uniform(3, 24, (n, 1, 1)).astype(np.float32) / s
    u = (np.cos(th) * xx + np.sin(th) * yy) / per
    v = (-np.sin(th) * xx + np.cos(th) * yy) / per
    checker = rng.random((n, 1, 1)) < 0.5
    a = np.floor(u) % 2
    pat = np.where(checker, (np.floor(u) + np.floor(v)) % 2, a).astype(np.float32)
    c0, c1 = rng.uniform(0, 1, (2, n, 3, 1, 1)).astype(np.float32)
    return (c0 + (c1 - c0) * pat[:, None]).astype(np.float32)


def fam_blobs(rng: np.random.Generator, n: int, s: int, cfg: ScenesConfig) -> np.ndarray:
    """Photo-like: a sky/ground split plus large blurred ellipses in muted colours (defocused shapes)."""
    yy, xx = _unit(n, s)
    horizon = rng.uniform(0.2, 0.8, (n, 1, 1, 1)).astype(np.float32)
    top, bottom = rng.uniform(0.1, 0.9, (2, n, 3, 1, 1)).astype(np.float32)
    w = 1 / (1 + np.exp(-(yy - horizon) / rng.uniform(0.02, 0.15, (n, 1, 1, 1)).astype(np.float32)))
    bg = top * (1 - w) + bottom * w
    for _ in range(5):
        cy, cx = rng.uniform(-0.1, 1.1, (2, n, 1, 1, 1)).astype(np.float32)
        ry, rx = rng.uniform(0.1, 0.45, (2, n, 1, 1, 1)).astype(np.float32)
        soft = rng.uniform(0.05, 0.3, (n, 1, 1, 1)).astype(np.float32)
        r = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
        a = 1 / (1 + np.exp(np.minimum((r - 1) / soft, 50))) * rng.uniform(0.4, 1.0, (n, 1, 1, 1)).astype(np.float32)
        bg = bg * (1 - a) + rng.uniform(0.05, 0.95, (n, 3, 1, 1)).astype(np.float32) * a
    return np.clip(bg, 0, 1).astype(np.float32)


def fam_lines(rng: np.random.Generator, n: int, s: int, cfg: ScenesConfig) -> np.ndarray:
    """High-contrast straight edges (half-planes) and thin lines in random colours over a flat colour."""
    yy, xx = _unit(n, s)
    bg = np.broadcast_to(rng.uniform(0, 1, (n, 3, 1, 1)).astype(np.float32), (n, 3, s, s)).copy()
    for j in range(10):
        th = rng.uniform(0, 2 * np.pi, (n, 1, 1)).astype(np.float32)
        off = rng.uniform(-0.5, 0.5, (n, 1, 1)).astype(np.float32)
        dist = np.cos(th) * (xx - 0.5) + np.sin(th) * (yy - 0.5) - off
        half = rng.random((n, 1, 1)) < 0.3
        width = rng.uniform(0.005, 0.03, (n, 1, 1)).astype(np.float32)
        sel = np.where(half, dist > 0, np.abs(dist) < width)
        col = rng.uniform(0, 1, (n, 3, 1, 1)).astype(np.float32)
        bg = np.where(sel[:, None], col, bg)
    return bg


_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "motorcycle_left")
_photo_cache: list[np.ndarray] = []


def _photos() -> list[np.ndarray]:
    """The RGB photographs bundled with scikit-image (in the installed wheel, no download), float [3,H,W]."""
    if not _photo_cache:
        import skimage.data as data

        for name in _PHOTOS:
            fn = getattr(data, name, None)
            if fn is None:
                continue
            try:
                img = np.asarray(fn())
            except Exception:  # noqa: BLE001 - a photo that needs a download (pooch) is skipped
                continue
            if img.ndim == 3 and img.shape[2] >= 3:
                _photo_cache.append(np.ascontiguousarray(img[..., :3].transpose(2, 0, 1)).astype(np.float32) / 255.0)
        if not _photo_cache:
            raise InvalidArgument("the `photo` background family needs scikit-image's bundled photographs")
    return _photo_cache


def fam_photo(rng: np.random.Generator, n: int, s: int, cfg: ScenesConfig) -> np.ndarray:
    """Random crops (side 64 to 256 px, resized to size x size, random flip) of real photographs."""
    photos = _photos()
    pick = rng.integers(0, len(photos), n)
    side = rng.uniform(0, 1, n)
    pos = rng.uniform(0, 1, (n, 2))
    flip = rng.random(n) < 0.5
    out = np.empty((n, 3, s, s), np.float32)
    for i in range(n):
        img = photos[pick[i]]
        h, w = img.shape[1:]
        c = int(64 + side[i] * (min(h, w, 256) - 64))
        y0, x0 = int(pos[i, 0] * (h - c)), int(pos[i, 1] * (w - c))
        crop = torch.from_numpy(img[:, y0 : y0 + c, x0 : x0 + c][None])
        r = F.interpolate(crop, size=(s, s), mode="area")[0].numpy()
        out[i] = r[:, :, ::-1] if flip[i] else r
    return out


def colour_jitter(rng: np.random.Generator, bg: np.ndarray) -> np.ndarray:
    """Per image: contrast x [0.5, 1.5] about the mean, brightness +- 0.15, channel gains x [0.8, 1.2],
    greyscale with probability 0.1."""
    n = len(bg)
    mean = bg.mean(axis=(1, 2, 3), keepdims=True)
    out = (bg - mean) * rng.uniform(0.5, 1.5, (n, 1, 1, 1)) + mean + rng.uniform(-0.15, 0.15, (n, 1, 1, 1))
    out = out * rng.uniform(0.8, 1.2, (n, 3, 1, 1))
    grey = rng.random(n) < 0.1
    out[grey] = out[grey].mean(axis=1, keepdims=True)
    return np.clip(out, 0, 1).astype(np.float32)


def _legacy(rng: np.random.Generator, n: int, s: int, cfg: ScenesConfig) -> np.ndarray:
    return Scenes.legacy_background_for(rng, n, s, cfg.clutter)


BACKGROUND_FAMILIES: dict[str, Family] = {
    "legacy": _legacy,
    "gratings": fam_gratings,
    "clouds": fam_clouds,
    "clutter": fam_clutter,
    "pink": fam_pink,
    "voronoi": fam_voronoi,
    "checker": fam_checker,
    "blobs": fam_blobs,
    "lines": fam_lines,
    "photo": fam_photo,
}
# the NEM-U recipe (zoo scenes-nemu): train/val/test on these, the `heldout` split on the others
TRAIN_FAMILIES = ("legacy", "gratings", "clouds", "clutter", "pink", "checker", "blobs")
HELDOUT_FAMILIES = ("voronoi", "lines", "photo")


def scenes(
    root: Path | str | None = None,
    *,
    seed: int = 0,
    size: int = 64,
    sizes: dict[str, int] | None = None,
    families: tuple[str, ...] | None = None,
    heldout_families: tuple[str, ...] = (),
    item_variety: bool = False,
) -> Scenes:
    """Convenience constructor (families=None: the original background, as before)."""
    cfg = ScenesConfig(
        root=Path(root) if root else DEFAULT_FASHION_MNIST,
        seed=seed,
        size=size,
        sizes=sizes or ScenesConfig().sizes,
        families=tuple(families) if families is not None else None,
        heldout_families=tuple(heldout_families),
        item_variety=item_variety,
    )
    return Scenes(cfg)


def scenes_families(
    root: Path | str | None = None,
    *,
    seed: int = 0,
    size: int = 64,
    sizes: dict[str, int] | None = None,
    item_variety: bool = False,
) -> Scenes:
    """The background-family variant the NEM-U recipe trains on (TRAIN_FAMILIES; HELDOUT_FAMILIES held out);
    item_variety: the train split's items rendered with ItemVariety (val, test and heldout unchanged)."""
    return scenes(
        root,
        seed=seed,
        size=size,
        sizes=sizes,
        families=TRAIN_FAMILIES,
        heldout_families=HELDOUT_FAMILIES,
        item_variety=item_variety,
    )
