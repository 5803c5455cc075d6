"""Procedural datasets with pixel-exact ground-truth masks and fixed, seeded train/val/test splits."""

from __future__ import annotations

from pathlib import Path

from xaiserve.errors import InvalidArgument
from xaiserve.training.datasets.base import SPLITS, Split, SyntheticDataset

DATASETS = ("scenes", "lesions", "ct-phantoms")


def get_dataset(
    name: str, *, seed: int = 0, size: int = 64, root: Path | str | None = None, sizes: dict[str, int] | None = None
) -> SyntheticDataset:
    """Build a dataset by name ("scenes" needs the Fashion-MNIST IDX files under `root`)."""
    if name == "scenes":
        from xaiserve.training.datasets.scenes import scenes

        return scenes(root, seed=seed, size=size, sizes=sizes)
    if name == "lesions":
        from xaiserve.training.datasets.lesions import lesions

        return lesions(seed=seed, size=size, sizes=sizes)
    if name == "ct-phantoms":
        from xaiserve.training.datasets.phantoms import phantoms

        return phantoms(seed=seed, size=size, sizes=sizes)
    raise InvalidArgument(f"unknown dataset {name!r}; use one of {DATASETS}")


__all__ = ["DATASETS", "SPLITS", "Split", "SyntheticDataset", "get_dataset"]
