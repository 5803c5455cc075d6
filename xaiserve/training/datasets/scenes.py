"""scenes: Fashion-MNIST items composited on textured, cluttered RGB backgrounds.

Each image holds one to three Fashion-MNIST items (Debian package `dataset-fashion-mnist`) at
random positions and scales, tinted in random colours, over a background made of colour gradients,
sinusoidal gratings, cloudy noise and random geometric clutter (rectangles, discs, bars). The label
is the class of the largest item (by silhouette area; it is drawn last, so it is never occluded); the
ground truth is the union of the items' silhouettes, pixel-exact: a pixel is in the mask iff an item
was drawn there. Items never repeat across splits: train and val take disjoint ranges of the
Fashion-MNIST training set, test takes the Fashion-MNIST test set.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from xaiserve.training.datasets.base import Rendered, SyntheticDataset, pixel_grid, smooth_noise
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


class Scenes(SyntheticDataset):
    name = "scenes"
    labels = FASHION_MNIST_LABELS

    def __init__(self, config: ScenesConfig = ScenesConfig()):
        super().__init__(size=config.size, seed=config.seed, sizes=config.sizes)
        self.config = config
        self._fm: FashionMnist = load_fashion_mnist(config.root)  # fails early, naming the apt package

    def _pool(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        if split == "train":
            return self._fm.train_images[:_VAL_START], self._fm.train_labels[:_VAL_START]
        if split == "val":
            return self._fm.train_images[_VAL_START:], self._fm.train_labels[_VAL_START:]
        return self._fm.test_images, self._fm.test_labels

    def background(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Textured, cluttered background [n,3,S,S] in [0,1]."""
        s = self.size
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
        k = self.config.clutter
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
        bg = self.background(rng, n)
        m = cfg.max_items
        count = rng.integers(1, m + 1, n)
        pick = rng.integers(0, len(pool_x), (n, m))
        scale = rng.uniform(cfg.min_scale, cfg.max_scale, (n, m)).astype(np.float32)
        pos = rng.uniform(0, 1, (n, m, 2)).astype(np.float32)
        flip = rng.random((n, m)) < 0.5
        tint = rng.uniform(0.0, 1.0, (n, m, 3)).astype(np.float32)
        # keep items visible against any background: push the tint away from mid-grey
        tint = np.where(tint.mean(-1, keepdims=True) > 0.5, 0.55 + 0.45 * tint, 0.45 * tint)

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
            col = tint[rows, idx][:, :, None, None] * (0.35 + 0.65 * inten[rows, idx][:, None])
            if draw_objects:
                img = np.where(sj[:, None], col, img)
            gt |= sj
        largest = order[:, -1]
        labels = pool_y[pick[rows, largest]].astype(np.int64)
        item_labels = np.where(area > 0, pool_y[pick].astype(np.int64), -1)
        return Rendered(
            np.clip(img, 0, 1).astype(np.float32), labels, gt, {"item_labels": item_labels, "item_areas": area}
        )


def scenes(
    root: Path | str | None = None, *, seed: int = 0, size: int = 64, sizes: dict[str, int] | None = None
) -> Scenes:
    """Convenience constructor."""
    cfg = ScenesConfig(
        root=Path(root) if root else DEFAULT_FASHION_MNIST,
        seed=seed,
        size=size,
        sizes=sizes or ScenesConfig().sizes,
    )
    return Scenes(cfg)
