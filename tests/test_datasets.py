"""Datasets: ground truth aligned with the pixels, fixed splits by seed, clear errors for missing data."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from xaiserve.errors import FailedPrecondition, InvalidArgument
from xaiserve.training.datasets import get_dataset
from xaiserve.training.datasets.idx import load_fashion_mnist, read_idx
from xaiserve.training.datasets.lesions import lesions
from xaiserve.training.datasets.scenes import scenes

SMALL = {"train": 40, "val": 20, "test": 20}


@pytest.fixture(scope="module")
def sc():
    return scenes(sizes=SMALL)


@pytest.fixture(scope="module")
def le():
    return lesions(sizes=SMALL)


def test_scenes_ground_truth_is_exactly_the_pixels_the_items_changed(sc):
    with_items = sc.render_chunk("train", 0, 48)
    without = sc.render_chunk("train", 0, 48, draw_objects=False)
    changed = np.abs(with_items.images - without.images).max(axis=1) > 0
    np.testing.assert_array_equal(changed, with_items.masks)
    assert with_items.masks.any(axis=(1, 2)).all(), "every scene holds at least one item"


def test_lesions_ground_truth_covers_the_lesion_pixels(le):
    r = le.render_chunk("val", 0, 48)
    bare = le.render_chunk("val", 0, 48, draw_objects=False)
    changed = np.abs(r.images - bare.images).max(axis=1) > 0
    # nothing outside the lesion mask changes when the lesion is drawn
    assert not (changed & ~r.masks).any()
    # inside it, only pixels hidden by a hair or ruler mark afterwards can be unchanged
    hidden = (r.masks & ~changed).sum() / r.masks.sum()
    assert hidden < 0.1
    assert r.masks.any(axis=(1, 2)).all()
    # the class shows in the lesion: the mean lesion colour differs between classes
    means = [r.images.transpose(0, 2, 3, 1)[r.masks & (r.labels[:, None, None] == c)].mean(0) for c in range(4)]
    assert min(np.abs(means[i] - means[j]).max() for i in range(4) for j in range(i + 1, 4)) > 0.03


def test_splits_are_fixed_by_seed_and_disjoint(le):
    again = lesions(sizes=SMALL)
    np.testing.assert_array_equal(le.split("train").images, again.split("train").images)
    np.testing.assert_array_equal(le.split("test").masks, again.split("test").masks)
    other = lesions(seed=1, sizes=SMALL)
    assert not np.array_equal(le.split("train").images, other.split("train").images)
    assert not np.array_equal(le.split("train").images[:20], le.split("val").images)


@pytest.mark.slow
def test_batches_are_normalised_with_the_dataset_statistics(sc):
    x, y, m = next(sc.batches("train", 16))
    assert x.shape == (16, 3, 64, 64) and y.shape == (16,) and m.shape == (16, 64, 64)
    assert y.min() >= 0 and y.max() < 10
    mean, std = sc.stats()
    assert all(0.2 < v < 0.8 for v in mean) and all(0.05 < v < 0.5 for v in std)
    # un-normalising gives back the uint8 pixels
    back = (x.numpy() * np.asarray(std).reshape(1, 3, 1, 1) + np.asarray(mean).reshape(1, 3, 1, 1)) * 255
    np.testing.assert_allclose(back, sc.split("train").images[:16], atol=1e-3)


def test_scene_label_is_the_class_of_the_largest_item(sc):
    r = sc.render_chunk("test", 0, 64)
    areas, labels = r.meta["item_areas"], r.meta["item_labels"]
    np.testing.assert_array_equal(r.labels, labels[np.arange(64), areas.argmax(1)])
    assert ((labels >= 0).sum(1) >= 1).all() and ((labels >= 0).sum(1) <= 3).all()
    assert ((labels >= 0).sum(1) > 1).any(), "some scenes hold several items"
    # the largest item is drawn last: all of its silhouette is visible, so the mask holds at least its area
    assert (r.masks.sum((1, 2)) >= areas.max(1)).all()


def test_missing_fashion_mnist_names_the_apt_package(tmp_path):
    with pytest.raises(FailedPrecondition, match="apt-get install dataset-fashion-mnist"):
        scenes(root=tmp_path / "nowhere")
    with pytest.raises(FailedPrecondition, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)  # exists but empty


def test_corrupt_idx_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "train-images-idx3-ubyte.gz"
    with gzip.open(bad, "wb") as f:
        f.write(b"\x00\x00\x08\x03" + (60000).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + b"\x00" * 100)
    with pytest.raises(FailedPrecondition, match="truncated or corrupt"):
        read_idx(bad)
    junk = tmp_path / "junk"
    junk.write_bytes(b"hello world")
    with pytest.raises(FailedPrecondition, match="not an IDX file"):
        read_idx(junk)


def test_unknown_dataset_and_split():
    with pytest.raises(InvalidArgument, match="unknown dataset"):
        get_dataset("mnist")
    with pytest.raises(InvalidArgument, match="unknown split"):
        lesions(sizes=SMALL).split("holdout")
