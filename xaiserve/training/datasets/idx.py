"""Fashion-MNIST IDX reader (the Debian package `dataset-fashion-mnist` ships the gzipped IDX files).

The IDX format: a big-endian header (magic: two zero bytes, a dtype code, the number of
dimensions; then one uint32 per dimension) followed by the raw array.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xaiserve.errors import FailedPrecondition

DEFAULT_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
APT_HINT = "install it with `apt-get install dataset-fashion-mnist` or pass the directory that holds the IDX files"

FASHION_MNIST_LABELS = (
    "t-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (gzipped or not) into a numpy array; clear errors for missing or corrupt files."""
    path = Path(path)
    if not path.exists():
        raise FailedPrecondition(f"Fashion-MNIST file {path} is missing; {APT_HINT}")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise FailedPrecondition(f"Fashion-MNIST file {path} cannot be read ({e}); reinstall it: {APT_HINT}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _DTYPES:
        raise FailedPrecondition(f"{path} is not an IDX file (bad magic number); {APT_HINT}")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_DTYPES[data[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise FailedPrecondition(
            f"{path} is truncated or corrupt: header says shape {shape} ({expected} bytes), file has {len(data) - header}; {APT_HINT}"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


@dataclass(frozen=True)
class FashionMnist:
    """Train (60k) and test (10k) images [N,28,28] uint8 with labels [N] uint8."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def load_fashion_mnist(root: Path | str = DEFAULT_FASHION_MNIST) -> FashionMnist:
    """Load the four IDX files from `root`; raises FailedPrecondition naming the apt package when missing."""
    root = Path(root)
    if not root.is_dir():
        raise FailedPrecondition(f"Fashion-MNIST directory {root} does not exist; {APT_HINT}")

    def pick(stem: str) -> Path:
        for name in (stem + ".gz", stem):
            if (root / name).exists():
                return root / name
        raise FailedPrecondition(f"Fashion-MNIST file {stem}[.gz] is missing from {root}; {APT_HINT}")

    out = FashionMnist(
        train_images=read_idx(pick("train-images-idx3-ubyte")),
        train_labels=read_idx(pick("train-labels-idx1-ubyte")),
        test_images=read_idx(pick("t10k-images-idx3-ubyte")),
        test_labels=read_idx(pick("t10k-labels-idx1-ubyte")),
    )
    for imgs, labs, what in ((out.train_images, out.train_labels, "train"), (out.test_images, out.test_labels, "t10k")):
        if imgs.ndim != 3 or labs.ndim != 1 or imgs.shape[0] != labs.shape[0]:
            raise FailedPrecondition(
                f"Fashion-MNIST {what} images {imgs.shape} and labels {labs.shape} do not match; {APT_HINT}"
            )
    return out
