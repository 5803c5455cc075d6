"""The invariance test of [SSL-XAI] sec. 5.2 (xaiserve/training/evaluate_invariance.py): transforms
and their inverses, the IoU at the mean threshold, and `xaiserve evaluate invariance` on a default model."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.serverutil import ROOT
from xaiserve.errors import InvalidArgument
from xaiserve.training import evaluate_invariance as I


def _blob(h: int = 32, w: int = 32, at=(8, 20)) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return np.exp(-((yy - at[0]) ** 2 + (xx - at[1]) ** 2) / 18.0).astype(np.float32)


def test_an_equivariant_map_scores_one_and_a_fixed_map_does_not():
    """A "method" whose map is the image itself moves with the image: IoU 1 after the inverse, for
    every augmentation (up to the rotation's interpolation); a map that ignores the image does not."""
    img = np.repeat(_blob()[..., None], 3, axis=-1)
    fixed = _blob(at=(8, 8))
    for a in I.AUGMENTATIONS:
        aug = I.augment(a, img)
        assert aug.shape == img.shape and 0 <= aug.min() and aug.max() <= 1
        back = I.invert(a, aug[..., 0])
        valid = I.valid_region(a, 32, 32)
        iou = I.iou_at_mean(img[..., 0], back, valid)
        assert iou == pytest.approx(1.0, abs=0.08 if a == "rotate15" else 1e-9), a
        if a in ("hflip", "vflip"):
            assert I.iou_at_mean(fixed, I.invert(a, fixed), valid) < 0.2  # the fixed map does not follow
    # the rotation's valid region leaves out the corners only
    v = I.valid_region("rotate15", 32, 32)
    assert not v[0, 0] and v[16, 16] and 0.7 < v.mean() < 0.95


def test_greyscale_is_the_luma_and_flips_are_exact():
    img = np.random.default_rng(0).random((6, 5, 3)).astype(np.float32)
    grey = I.augment("greyscale", img)
    np.testing.assert_allclose(grey[..., 0], img @ np.array([0.299, 0.587, 0.114], np.float32), rtol=1e-6)
    assert np.array_equal(grey[..., 0], grey[..., 2])
    m = img[..., 0]
    assert np.array_equal(I.invert("hflip", I.augment("hflip", img)[..., 0]), m)
    assert np.array_equal(I.invert("vflip", I.augment("vflip", img)[..., 0]), m)
    with pytest.raises(InvalidArgument, match="unknown augmentation"):
        I.augment("shear", img)


def test_iou_at_mean_by_hand():
    a = np.array([[1.0, 0.0], [0.0, 0.0]])  # mean 0.25: {(0,0)}
    b = np.array([[1.0, 1.0], [0.0, 0.0]])  # mean 0.5: {(0,0), (0,1)}
    assert I.iou_at_mean(a, b) == pytest.approx(0.5)
    assert I.iou_at_mean(np.zeros((2, 2)), np.ones((2, 2))) == 1.0  # both constant: no above-mean set, agreement
    assert I.iou_at_mean(a, np.zeros((2, 2))) == 0.0


@pytest.mark.slow
def test_cli_on_the_default_lesion_classifier(tmp_path):
    """`xaiserve evaluate invariance` on lesions-classifier with GradCAM, the per-class NEMt and the
    random reference (2 images): the table and files are written, the random maps sit at chance,
    and the masking network on flipped images is far above it."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "xaiserve.service.cli",
            "evaluate",
            "invariance",
            "--model",
            "lesions-classifier",
            "--method",
            "gradcam",
            "--method",
            "lesions-nemt",
            "--method",
            "random",
            "--n",
            "2",
            "--out",
            str(tmp_path),
            "--quiet",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| GradCAM |" in proc.stdout and "| lesions-nemt |" in proc.stdout
    data = json.loads((tmp_path / "invariance_lesions-classifier.json").read_text())
    assert set(data["means"]) == {"GradCAM", "lesions-nemt", "random (reference)"}
    for a in I.AUGMENTATIONS:
        assert 0.25 < data["means"]["random (reference)"][a] < 0.42
    assert data["means"]["lesions-nemt"]["hflip"] > 0.5
    assert (tmp_path / "invariance_lesions-classifier.png").stat().st_size > 1000
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "xaiserve.service.cli",
            "evaluate",
            "invariance",
            "--model",
            "lesions-classifier",
            "--method",
            "nope",
            "--n",
            "1",
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "unknown method(s) nope" in bad.stderr
