"""`xaiserve evaluate explanations --model NAME --images DIR [--masks DIR]` on a user's model and data,
and the deletion / insertion metric it reports when there is no ground truth."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from tests.byom_nets import make, save_forms
from xaiserve.service import cli_models
from xaiserve.training.cli_eval import evaluate_main
from xaiserve.training.metrics import deletion_insertion

torch.set_num_threads(1)


def test_deletion_insertion_rewards_the_map_that_points_at_the_evidence():
    x = torch.zeros(2, 1, 8, 8)
    x[:, :, :4, :4] = 1.0

    def score(b, idx):  # a "model" whose decision is the evidence in the top-left quarter
        return b.flatten(1).sum(1) / 16

    good = np.zeros((2, 8, 8))
    good[:, :4, :4] = 1
    bad = np.zeros((2, 8, 8))
    bad[:, 4:, 4:] = 1
    d_good, i_good = deletion_insertion(score, x, good, steps=8)
    d_bad, i_bad = deletion_insertion(score, x, bad, steps=8)
    assert (d_good < d_bad).all() and (i_good > i_bad).all()
    np.testing.assert_allclose(d_good, 0.125)  # gone after the first quarter of the pixels: area 1/4 * 1/2
    np.testing.assert_allclose(i_good, 0.875)


@pytest.mark.slow
def test_evaluate_a_user_model_on_a_folder_with_and_without_masks(tmp_path, capsys):
    store = tmp_path / "store"
    files = save_forms(make("vgg", size=(64, 64)), tmp_path / "vgg", size=(64, 64))
    (tmp_path / "labels.txt").write_text("a\nb\nc\n")
    assert (
        cli_models.main(
            [
                "add",
                "vgg",
                str(files["exported_program"]),
                "--kind",
                "classifier",
                "--labels",
                str(tmp_path / "labels.txt"),
                "--store",
                str(store),
            ]
        )
        == 0
    )
    rng = np.random.default_rng(0)
    for c in "abc":
        (tmp_path / "img" / c).mkdir(parents=True)
        (tmp_path / "gt" / c).mkdir(parents=True)
        for i in range(2):
            a = (rng.random((48, 80, 3)) * 60).astype(np.uint8)
            m = np.zeros((48, 80), np.uint8)
            m[10:30, 20:50] = 255
            a[m > 0] = (200, 180, 30)
            PILImage.fromarray(a).save(tmp_path / "img" / c / f"{i}.png")
            PILImage.fromarray(m).save(tmp_path / "gt" / c / f"{i}.png")
    common = [
        "--model",
        "vgg",
        "--images",
        str(tmp_path / "img"),
        "--store",
        str(store),
        "--methods",
        "saliency,gradcam",
        "--no-relax",
        "--no-monotonicity",
        "--quiet",
        "--deletion-steps",
        "4",
    ]
    assert evaluate_main("explanations", [*common, "--out", str(tmp_path / "out")]) == 0
    table = capsys.readouterr().out
    assert "the user's folder (6 images)" in table and "deletion AUC" in table and "insertion AUC" in table
    assert "pointing game" not in table  # no ground truth: no localisation columns
    res = json.loads((tmp_path / "out" / "explanations_folder.json").read_text())["results"]
    assert {"Saliency", "GradCAM", "random (reference)"} <= set(res)
    assert 0.0 <= res["Saliency"]["deletion_auc"]["mean"] <= 1.0 and res["Saliency"]["deletion_auc"]["n"] == 6
    assert (tmp_path / "out" / "explanations_folder.png").stat().st_size > 0
    assert (
        evaluate_main("explanations", [*common, "--masks", str(tmp_path / "gt"), "--out", str(tmp_path / "out2")]) == 0
    )
    table = capsys.readouterr().out
    assert "pointing game" in table and "relevance mass" in table and "deletion AUC" in table
    # bad usage: both or neither data source
    assert (
        evaluate_main("explanations", ["--dataset", "scenes", "--images", str(tmp_path / "img"), "--model", "vgg"]) == 2
    )
    assert "give --dataset" in capsys.readouterr().err
