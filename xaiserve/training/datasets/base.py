"""Shared machinery for the procedural datasets: seeded chunks, fixed splits, caching, normalisation.

Every image is generated on the fly from (dataset seed, split, chunk index), in vectorised chunks,
so a split is identical on every machine and run, and nothing large is stored on disk. Images are
kept in memory as uint8 (N, 3, H, W); ground-truth masks as bool (N, H, W), pixel-exact: a pixel
is in the mask iff an object was drawn there (see each dataset's `render`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from xaiserve.errors import InvalidArgument

SPLITS = ("train", "val", "test")
_SPLIT_CODE = {"train": 0, "val": 1, "test": 2}
CHUNK = 256
STATS_IMAGES = 1024  # normalisation statistics come from the first train images, fixed by the seed


@dataclass(frozen=True)
class Rendered:
    """One rendered chunk: images float32 [n,3,H,W] in [0,1], labels int64 [n], masks bool [n,H,W]."""

    images: np.ndarray
    labels: np.ndarray
    masks: np.ndarray
    meta: dict[str, np.ndarray] = field(default_factory=dict)  # per-object details, for checks


@dataclass(frozen=True)
class Split:
    """A materialised split: uint8 images [N,3,H,W], int64 labels [N], bool ground-truth masks [N,H,W]."""

    images: np.ndarray
    labels: np.ndarray
    masks: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def smooth_noise(rng: np.random.Generator, n: int, c: int, lo: int, size: int) -> np.ndarray:
    """Low-frequency noise: i.i.d. uniform values on an lo x lo grid, bicubic-upsampled to size x size."""
    coarse = torch.from_numpy(rng.random((n, c, lo, lo), dtype=np.float32))
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False).numpy()


def pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (yy, xx), each [size, size] float32."""
    ax = np.arange(size, dtype=np.float32) + 0.5
    return np.meshgrid(ax, ax, indexing="ij")


class SyntheticDataset(ABC):
    """A seeded, split, procedurally generated image dataset with pixel-exact ground truth."""

    name: str = ""
    labels: tuple[str, ...] = ()

    def __init__(self, *, size: int, seed: int, sizes: dict[str, int]):
        if size < 16:
            raise InvalidArgument(f"image size {size} is too small; use at least 16 pixels")
        self.size = int(size)
        self.seed = int(seed)
        self.sizes = {k: int(sizes[k]) for k in SPLITS}
        self._cache: dict[str, Split] = {}
        self._stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @abstractmethod
    def render(
        self, rng: np.random.Generator, n: int, split: str, chunk: int, *, draw_objects: bool = True
    ) -> Rendered:
        """Render n images. With draw_objects=False the same random draws give the images without the
        ground-truth objects (used to check that the masks cover exactly the pixels the objects changed)."""

    def chunk_rng(self, split: str, chunk: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, _SPLIT_CODE[split], chunk, 0x5EED])

    def render_chunk(self, split: str, chunk: int, n: int = CHUNK, *, draw_objects: bool = True) -> Rendered:
        return self.render(self.chunk_rng(split, chunk), n, split, chunk, draw_objects=draw_objects)

    def split(self, name: str) -> Split:
        """The whole split (generated once, then cached in memory)."""
        if name not in SPLITS:
            raise InvalidArgument(f"unknown split {name!r}; use one of {SPLITS}")
        if name not in self._cache:
            total = self.sizes[name]
            imgs, labs, masks = [], [], []
            for chunk in range((total + CHUNK - 1) // CHUNK):
                n = min(CHUNK, total - chunk * CHUNK)
                r = self.render_chunk(name, chunk, n)
                imgs.append(to_uint8(r.images))
                labs.append(r.labels)
                masks.append(r.masks)
            self._cache[name] = Split(
                np.concatenate(imgs), np.concatenate(labs).astype(np.int64), np.concatenate(masks)
            )
        return self._cache[name]

    def stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and std of the first STATS_IMAGES train images (fixed by the seed)."""
        if self._stats is None:
            chunks = [to_uint8(self.render_chunk("train", c).images) for c in range(STATS_IMAGES // CHUNK)]
            a = np.concatenate(chunks).astype(np.float64) / 255.0
            mean = tuple(round(float(v), 4) for v in a.mean(axis=(0, 2, 3)))
            std = tuple(round(float(v), 4) for v in a.std(axis=(0, 2, 3)))
            self._stats = (mean, std)
        return self._stats

    def normalise(self, images_u8: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 [N,3,H,W] -> float32 normalised torch tensor (masking this tensor by 0 = the dataset mean)."""
        x = torch.as_tensor(images_u8).float().div_(255.0)
        mean, std = self.stats()
        m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        return (x - m) / s

    def batches(
        self, name: str, batch_size: int, *, shuffle: bool = False, seed: int = 0, limit: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yield (normalised images, labels, masks) torch batches of a split."""
        sp = self.split(name)
        n = len(sp) if limit is None else min(limit, len(sp))
        order = np.random.default_rng(seed).permutation(len(sp))[:n] if shuffle else np.arange(n)
        for i in range(0, n, batch_size):
            idx = np.sort(order[i : i + batch_size]) if shuffle else order[i : i + batch_size]
            yield (
                self.normalise(sp.images[idx]),
                torch.from_numpy(sp.labels[idx]),
                torch.from_numpy(sp.masks[idx]),
            )

    def describe(self) -> dict:
        return {
            "name": self.name,
            "size": self.size,
            "seed": self.seed,
            "splits": dict(self.sizes),
            "labels": list(self.labels),
        }


def to_uint8(images: np.ndarray) -> np.ndarray:
    return (np.clip(images, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
