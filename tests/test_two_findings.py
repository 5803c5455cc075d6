"""The two-finding lesions set (training/datasets/two_findings.py): two lesions of different classes
per image, ground truth per lesion, aligned with the pixels."""

from __future__ import annotations

import numpy as np

from xaiserve.training.datasets.lesions import lesions
from xaiserve.training.datasets.two_findings import render_two_findings


def test_ground_truth_is_where_the_lesions_were_drawn():
    t = render_two_findings(64)
    bare = render_two_findings(64, draw_objects=False)  # same skin, distractors, vignette; no lesions
    assert t.labels.shape == (64, 2) and (t.labels[:, 0] != t.labels[:, 1]).all()
    assert not (t.masks[:, 0] & t.masks[:, 1]).any()  # disjoint: overlaps go to the lesion on top
    assert (t.masks.sum(axis=(2, 3)) >= 40).all()  # both lesions visible (at least 40 px each)
    changed = np.abs(t.images - bare.images).max(axis=1) > 0
    union = t.masks.any(axis=1)
    # every changed pixel belongs to a lesion; every lesion pixel not under a distractor changed
    assert not (changed & ~union).any()
    visible = union & ~t.cover
    assert changed[visible].mean() > 0.999
    # each mask covers one connected-ish blob in its own half: its centroid lies on its side
    yy, xx = np.mgrid[:64, :64]
    for i in range(64):
        c = [(yy[m].mean(), xx[m].mean()) for m in t.masks[i]]
        d = np.abs(np.subtract(c[0], c[1]))
        assert d.max() > 16, (i, c)


def test_deterministic_and_split_dependent():
    a, b = render_two_findings(8, "test"), render_two_findings(8, "test")
    assert np.array_equal(a.images, b.images) and np.array_equal(a.masks, b.masks)
    v = render_two_findings(8, "val")
    assert not np.array_equal(a.images, v.images)


def test_the_single_lesion_set_is_unchanged_by_the_placement_options():
    """lesion_shape's centre/scale options draw the same random numbers: default renders are as before."""
    ds = lesions()
    rng1, rng2 = np.random.default_rng(5), np.random.default_rng(5)
    labels = np.array([0, 1, 2, 3])
    a = ds.lesion_shape(rng1, 4, labels)
    b = ds.lesion_shape(rng2, 4, labels, centre=(np.full(4, 20.0), np.full(4, 40.0)), scale=0.7)
    assert a.sum() > b.sum() > 0 and rng1.random() == rng2.random()


def test_training_mix_labels_one_lesion_and_keeps_the_classifier_normalisation():
    """lesions_with_two_findings: half the rows are two-finding images labelled with ONE of their
    classes, ground truth = that lesion; statistics are the single-lesion set's (the classifier's)."""
    from xaiserve.training.datasets.two_findings import lesions_with_two_findings

    sizes = {"train": 64, "val": 64, "test": 64}
    mix = lesions_with_two_findings(sizes=sizes, share=0.5)
    assert mix.stats() == lesions().stats()
    ck = mix.render_chunk("train", 0, 64)
    bare = mix.render_chunk("train", 0, 64, draw_objects=False)
    two = ck.meta["two_findings"]
    assert two.sum() == 32 and ck.labels.min() >= 0 and ck.labels.max() < 4
    changed = np.abs(ck.images - bare.images).max(axis=1) > 0
    for i in range(64):
        # the labelled lesion is drawn where its mask is (hairs and ruler marks may cover some of it);
        # a two-finding image changed outside it too (the other lesion)
        assert changed[i][ck.masks[i]].mean() > 0.7
        assert (changed[i] & ~ck.masks[i]).any() == bool(two[i])
    assert np.array_equal(mix.split("val").images, lesions_with_two_findings(sizes=sizes).split("val").images)
