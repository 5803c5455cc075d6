"""A folder of a user's images as a training set for a masking network of their own model.

    FolderDataset(root, spec, labels_csv=None, masks=None, class_names=(), val_fraction=0.2, seed=0)

Every image under `root` (PNG, JPEG, BMP, TIFF, WebP; subfolders included) is decoded, converted to
the model's channels and fitted to its input exactly as the server does for a request
(service.images.to_model_input: the manifest's size, normalisation and resize mode), so the network
trains on what it will be served. Labels (NEMt) come from `labels_csv` (rows `path,label`, the path
relative to root, the label a class name of the model or an index), else from class subfolders
(root/<class>/...: folder names are the model's label names or indices), else there are none
(the caller may label the images with the classifier's own predictions, `relabel`). Ground-truth
masks (optional, for held-out localisation metrics) are images with the same relative path under
`masks` (any image suffix; nonzero = object), fitted the same way.

The split is fixed by the seed: `val_fraction` of the images are held out, half for validation
(model selection) and half for test (the card's metrics); with few images validation and test are
the same held-out images. The interface is the one training/nem_train.py uses of the synthetic
datasets (split, normalise, batches, stats, describe), with `has_masks` saying whether ground truth
exists. `describe()` holds counts only: no file names (they may name patients).
"""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image as PILImage
from PIL import UnidentifiedImageError

from xaiserve.errors import InvalidArgument
from xaiserve.service.images import InputSpec, to_model_input
from xaiserve.training.datasets.base import Split

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def image_files(root: Path) -> list[Path]:
    return sorted(
        p
        for p in Path(root).rglob("*")
        if p.is_file()
        and p.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def _read(path: Path, channels: int) -> np.ndarray:
    try:
        with PILImage.open(path) as im:
            im.load()
            arr = np.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise InvalidArgument(f"{path.name} could not be read as an image ({e.__class__.__name__})") from None
    return arr[:, :, None] if arr.ndim == 2 else arr


class FolderDataset:
    """See the module docstring."""

    name = "folder"
    eval_batch = 32  # images per evaluation batch (training/nem_train.py)

    def __init__(
        self,
        root: Path,
        spec: InputSpec,
        *,
        labels_csv: Path | None = None,
        masks: Path | None = None,
        class_names: Sequence[str] = (),
        num_classes: int = 0,
        val_fraction: float = 0.2,
        seed: int = 0,
        limit: int | None = None,
        labelled: bool = True,
    ):
        root = Path(root)
        if not root.is_dir():
            raise InvalidArgument(f"--images {root} is not a folder")
        files = image_files(root)
        if limit is not None and len(files) > max(int(limit), 2):
            # evenly spaced over the sorted files, so that every class folder is represented
            step = len(files) / max(int(limit), 2)
            files = [files[int(i * step)] for i in range(max(int(limit), 2))]
        if len(files) < 2:
            raise InvalidArgument(
                f"--images {root} holds {len(files)} image(s) ({', '.join(IMAGE_SUFFIXES)}); need at least 2"
            )
        if not 0.0 < val_fraction < 1.0:
            raise InvalidArgument(f"val_fraction {val_fraction} must be in (0, 1)")
        self.spec = spec
        self.seed = int(seed)
        self.size = min(spec.height, spec.width)
        self.labels = tuple(class_names)
        k = num_classes or len(class_names)
        rel = [f.relative_to(root).as_posix() for f in files]
        # NEM-U needs no labels: class folders are then just folders
        self.label_source, lab = (
            self._labels(root, rel, labels_csv, k) if labelled else ("none", np.full(len(rel), -1, np.int64))
        )
        self.has_masks = masks is not None
        bad: list[str] = []
        images = np.empty((len(files), spec.channels, spec.height, spec.width), dtype=np.float16)
        gts = np.zeros((len(files), spec.height, spec.width), dtype=bool)
        mask_spec = replace(spec, channels=1, mean=(0.0,), std=(1.0,))
        for i, f in enumerate(files):
            try:
                images[i] = to_model_input(_read(f, spec.channels), spec)
            except InvalidArgument:
                bad.append(rel[i])
                continue
            if masks is not None:
                m = self._mask_file(Path(masks), rel[i])
                gts[i] = to_model_input(_read(m, 1), mask_spec)[0] > 0.5
        if bad:
            raise InvalidArgument(
                f"{len(bad)} of {len(files)} files could not be read as images, e.g. {', '.join(bad[:5])}"
            )
        self._images, self._labels_all, self._masks = images, lab, gts
        n = len(files)
        order = np.random.default_rng([self.seed, 0xF01D]).permutation(n)
        held = max(1, int(round(val_fraction * n)))
        held_out, train = order[:held], order[held:]
        val, test = (held_out[: held // 2], held_out[held // 2 :]) if held >= 4 else (held_out, held_out)
        self._index = {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}
        self.sizes = {k: len(v) for k, v in self._index.items()}

    # -- labels and masks ------------------------------------------------------------------------
    def _labels(self, root: Path, rel: list[str], labels_csv: Path | None, k: int) -> tuple[str, np.ndarray]:
        names = {n: i for i, n in enumerate(self.labels)}

        def index(value: str, where: str) -> int:
            v = value.strip()
            if v in names:
                return names[v]
            if v.lstrip("-").isdigit() and (not k or 0 <= int(v) < k):
                return int(v)
            known = ", ".join(self.labels) if self.labels else f"0..{k - 1}" if k else "class indices"
            raise InvalidArgument(f"{where}: label {v[:80]!r} is not one of the model's classes ({known})")

        if labels_csv is not None:
            path = Path(labels_csv)
            if not path.is_file():
                raise InvalidArgument(f"--labels {path} does not exist")
            table: dict[str, int] = {}
            with open(path, newline="") as f:
                for n, row in enumerate(csv.reader(f), 1):
                    if not row or row[0].startswith("#"):
                        continue
                    if len(row) < 2:
                        raise InvalidArgument(f"{path.name} line {n}: expected `path,label`")
                    if n == 1 and row[1].strip().lower() in ("label", "class", "target"):
                        continue  # header
                    table[row[0].strip().replace("\\", "/")] = index(row[1], f"{path.name} line {n}")
            missing = [r for r in rel if r not in table]
            if missing:
                raise InvalidArgument(
                    f"{path.name} gives no label for {len(missing)} image(s), e.g. {', '.join(missing[:3])}"
                )
            return "csv", np.array([table[r] for r in rel], dtype=np.int64)
        tops = {r.split("/")[0] for r in rel}
        if all("/" in r for r in rel) and len(tops) >= 2:
            return "folders", np.array(
                [index(r.split("/")[0], f"class folder {r.split('/')[0][:80]!r}") for r in rel], dtype=np.int64
            )
        return "none", np.full(len(rel), -1, dtype=np.int64)

    @staticmethod
    def _mask_file(masks: Path, rel: str) -> Path:
        base = masks / rel
        for cand in (base, *(base.with_suffix(s) for s in IMAGE_SUFFIXES)):
            if cand.is_file():
                return cand
        raise InvalidArgument(f"--masks has no mask for {rel} (same relative path, any image suffix)")

    def relabel(self, predict: Callable[[torch.Tensor], torch.Tensor], batch_size: int = 32) -> None:
        """Label unlabelled images with the classifier's argmax (NEMt explains its own decisions)."""
        out = []
        with torch.no_grad():
            for i in range(0, len(self._images), batch_size):
                out.append(predict(torch.from_numpy(self._images[i : i + batch_size].astype(np.float32))).argmax(1))
        self._labels_all = torch.cat(out).numpy().astype(np.int64)
        self.label_source = "predicted"

    # -- the dataset interface of training/nem_train.py ------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def split(self, name: str) -> Split:
        if name not in self._index:
            raise InvalidArgument(f"unknown split {name!r}; use train, val or test")
        idx = self._index[name]
        return Split(self._images[idx], self._labels_all[idx], self._masks[idx])

    def everything(self) -> Split:
        """Every image, in file order (evaluation of a folder: no split)."""
        return Split(self._images, self._labels_all, self._masks)

    def stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return tuple(self.spec.mean), tuple(self.spec.std)

    def normalise(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """The images are stored normalised already (to_model_input); float32 for the model."""
        return torch.as_tensor(np.asarray(images, dtype=np.float32))

    def batches(
        self, name: str, batch_size: int, *, shuffle: bool = False, seed: int = 0, limit: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        sp = self.split(name)
        n = len(sp) if limit is None else min(limit, len(sp))
        order = np.random.default_rng(seed).permutation(len(sp))[:n] if shuffle else np.arange(n)
        for i in range(0, n, batch_size):
            idx = np.sort(order[i : i + batch_size])
            yield self.normalise(sp.images[idx]), torch.from_numpy(sp.labels[idx]), torch.from_numpy(sp.masks[idx])

    def describe(self) -> dict:
        counts = (
            np.bincount(self._labels_all[self._labels_all >= 0], minlength=self.num_classes).tolist()
            if (self._labels_all >= 0).any()
            else []
        )
        return {
            "name": self.name,
            "size": [self.spec.height, self.spec.width],
            "resize": self.spec.resize,
            "seed": self.seed,
            "splits": dict(self.sizes),
            "labels": list(self.labels),
            "label_source": self.label_source,
            "class_counts": counts,
            "ground_truth_masks": self.has_masks,
        }
