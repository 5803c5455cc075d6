"""Scenes background families (2026-12): every family renders [n,3,S,S] in [0,1] deterministically
by seed; held-out families never appear in train/val/test and are the only ones in `heldout`; the
original background (`scenes()`) is unchanged; the bounded, replicate-padded NEM-U decoder and the
translation augmentation behave as documented (docs/METHODS.md, NEM-U)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xaiserve.errors import InvalidArgument
from xaiserve.handlers.nem.decoder import DecoderArch, UNetDecoder, logits_to_mask
from xaiserve.training.datasets.scenes import (
    BACKGROUND_FAMILIES,
    HELDOUT_FAMILIES,
    TRAIN_FAMILIES,
    ScenesConfig,
    scenes,
    scenes_families,
)
from xaiserve.training.nem_train import augment_shift

SMALL = {"train": 64, "val": 32, "test": 32}


@pytest.mark.parametrize("family", sorted(BACKGROUND_FAMILIES))
def test_each_family_renders_in_range_and_by_seed(family):
    fn = BACKGROUND_FAMILIES[family]
    cfg = ScenesConfig()
    a = fn(np.random.default_rng(7), 6, 32, cfg)
    b = fn(np.random.default_rng(7), 6, 32, cfg)
    c = fn(np.random.default_rng(8), 6, 32, cfg)
    assert a.shape == (6, 3, 32, 32) and a.dtype == np.float32
    assert np.isfinite(a).all() and a.min() >= 0.0 and a.max() <= 1.0
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.std() > 0.01  # a texture, not a flat fill
    # images of one batch differ from each other
    assert not np.array_equal(a[0], a[1])


def test_families_partition_train_and_heldout():
    assert set(TRAIN_FAMILIES).isdisjoint(HELDOUT_FAMILIES)
    assert set(TRAIN_FAMILIES) | set(HELDOUT_FAMILIES) == set(BACKGROUND_FAMILIES)


def test_heldout_families_never_in_train_val_test():
    ds = scenes_families(sizes=SMALL)
    for split in ("train", "val", "test"):
        fam = ds.render_chunk(split, 0, 64).meta["family"]
        used = {ds.families_for(split)[i] for i in fam}
        assert used <= set(TRAIN_FAMILIES), split
        assert not used & set(HELDOUT_FAMILIES), split
        assert len(used) >= 4  # the families mix within a chunk
    fam = ds.render_chunk("heldout", 0, 64).meta["family"]
    assert {ds.families_for("heldout")[i] for i in fam} == set(HELDOUT_FAMILIES)
    # the split is materialised, fixed by the seed, and carries pixel-exact ground truth
    cfg = ScenesConfig(families=TRAIN_FAMILIES, heldout_families=HELDOUT_FAMILIES, heldout_size=40, sizes=SMALL)
    from xaiserve.training.datasets.scenes import Scenes

    h1, h2 = Scenes(cfg).split("heldout"), Scenes(cfg).split("heldout")
    assert h1.images.shape == (40, 3, 64, 64) and h1.images.dtype == np.uint8
    np.testing.assert_array_equal(h1.images, h2.images)
    assert h1.masks.any(axis=(1, 2)).all()
    # the held-out images are not the test images
    assert not np.array_equal(h1.images[:32], Scenes(cfg).split("test").images)


def test_family_config_is_checked():
    with pytest.raises(InvalidArgument, match="both trained on and held out"):
        scenes(sizes=SMALL, families=("pink", "photo"), heldout_families=("photo",))
    with pytest.raises(InvalidArgument, match="unknown background families"):
        scenes(sizes=SMALL, families=("marble",))
    with pytest.raises(InvalidArgument, match="holds no background families out"):
        scenes(sizes=SMALL).split("heldout")


def test_default_scenes_keep_the_original_background():
    ds = scenes(sizes=SMALL)
    r = ds.render_chunk("test", 0, 16)
    assert (r.meta["family"] == -1).all() and "families" not in ds.describe()
    # the composite drawn by legacy_background_for is the same whether called directly or as the family
    rng1, rng2 = np.random.default_rng(3), np.random.default_rng(3)
    np.testing.assert_array_equal(ds.legacy_background(rng1, 4), BACKGROUND_FAMILIES["legacy"](rng2, 4, 64, ds.config))


def test_bounded_replicate_decoder():
    arch = DecoderArch(widths=(8, 4), pad="replicate", logit_bound=6.0)
    assert DecoderArch.from_dict(arch.to_dict()) == arch
    old = DecoderArch(widths=(8, 4)).to_dict()
    assert "pad" not in old and "logit_bound" not in old  # earlier manifests stay as they were
    assert DecoderArch.from_dict(old).pad == "zeros"
    dec = UNetDecoder([4, 6, 8], arch).eval()
    with torch.no_grad():
        for p in dec.parameters():
            p.mul_(50.0)  # push the logits far out: the bound must hold
        pyr = [torch.randn(2, 4, 16, 16), torch.randn(2, 6, 8, 8), torch.randn(2, 8, 4, 4)]
        logits = dec(pyr)
        mask = logits_to_mask(logits, dec.stride)
    assert logits.abs().max() <= 6.0 + 1e-5
    lo, hi = float(torch.sigmoid(torch.tensor(-6.0))), float(torch.sigmoid(torch.tensor(6.0)))
    assert mask.min() >= lo - 1e-6 and mask.max() <= hi + 1e-6
    assert dec.blocks[0].padding_mode == "replicate"
    with pytest.raises(ValueError, match="padding"):
        UNetDecoder([4, 6, 8], DecoderArch(widths=(8, 4), pad="circularish"))


def test_augment_shift_is_a_seeded_translation():
    x = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).view(2, 3, 16, 16)
    a = augment_shift(x, 3, torch.Generator().manual_seed(0))
    b = augment_shift(x, 3, torch.Generator().manual_seed(0))
    assert a.shape == x.shape
    torch.testing.assert_close(a, b)
    assert augment_shift(x, 0, torch.Generator()) is x
    # every output row is a (possibly flipped) run of the reflect-padded input: values come from x
    assert set(a.unique().tolist()) <= set(x.unique().tolist())


def test_item_variety_changes_only_the_train_items():
    """ScenesConfig.item_variety (recipe `varied`): train items rotated / textured / re-shaded; the ground
    truth is still the silhouette (pixel-exact); val, test and heldout render exactly as without it."""
    plain, varied = scenes_families(sizes=SMALL), scenes_families(sizes=SMALL, item_variety=True)
    assert varied.describe()["item_variety"] == "train split" and "item_variety" not in plain.describe()
    for split in ("val", "test", "heldout"):
        a, b = plain.render_chunk(split, 0, 16), varied.render_chunk(split, 0, 16)
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.masks, b.masks)
    a, b = plain.render_chunk("train", 0, 32), varied.render_chunk("train", 0, 32)
    b2 = varied.render_chunk("train", 0, 32)
    np.testing.assert_array_equal(b.images, b2.images)  # seeded
    assert b.images.min() >= 0.0 and b.images.max() <= 1.0
    # the backgrounds are the same draws; the items differ (shape by rotation/stretch, look by texture/shade)
    off = ~(a.masks | b.masks)
    np.testing.assert_array_equal(a.images.transpose(1, 0, 2, 3)[:, off], b.images.transpose(1, 0, 2, 3)[:, off])
    assert not np.array_equal(a.masks, b.masks)
    assert (b.masks.sum(axis=(1, 2)) > 0).all()


def test_mirror_consistency_term():
    """flip_inconsistency is 0 exactly for masks that mirror with the image; nemu_step with mu > 0 trains the
    batch with its mirror and adds mu times the term (recipe `consistent`)."""
    from xaiserve.handlers.nem.models import NemU
    from xaiserve.handlers.nets import EncoderArch, FrozenSpec
    from xaiserve.training.nem_train import NEMU_DECODER_GRADED, flip_inconsistency, nemu_step

    m = torch.rand(4, 1, 16, 16)
    assert float(flip_inconsistency(m, m.flip(-1))) == 0.0
    assert float(flip_inconsistency(m, m)) > 0.0
    torch.manual_seed(0)
    frozen = FrozenSpec(encoder=EncoderArch(), num_classes=0).build().eval()
    model = NemU(frozen, NEMU_DECODER_GRADED).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        plain, p0 = nemu_step(model, x)
        mixed, p1 = nemu_step(model, x, flip_consistency=2.0)
        mirror_only, _ = nemu_step(model, x.flip(-1))
        mask, _ = model(x)
        mask_m, _ = model(x.flip(-1))
    assert "flip" not in p0 and p1["flip"] == pytest.approx(float(flip_inconsistency(mask, mask_m)), rel=1e-5)
    # the loss of (x, mirror) as one batch is the mean of the two losses, plus mu times the term
    assert float(mixed) == pytest.approx((float(plain) + float(mirror_only)) / 2 + 2.0 * p1["flip"], rel=1e-4)


@pytest.mark.parametrize("recipe", ["varied", "consistent"])
def test_nemu_recipes_train_and_describe_themselves(tmp_path, recipe):
    """The two not-served recipes run end to end through the zoo (a few images) and say what they did."""
    from xaiserve.paths import default_model_store
    from xaiserve.training.cli_nem import _parser
    from xaiserve.training.zoo import NEMU_RECIPES, RunOptions, _card, run_nemu

    # the CLI offers exactly the zoo's recipes
    (action,) = [a for a in _parser("train", "zoo")._actions if a.dest == "nemu_recipe"]
    assert tuple(action.choices) == tuple(NEMU_RECIPES)

    opts = RunOptions(
        out=tmp_path, store=default_model_store(), epochs=1, limit=64, progress=False, export=False, sizes=SMALL
    )
    res = run_nemu(opts, recipe=recipe)
    assert res["recipe"] == recipe and (tmp_path / "scenes-nemu" / "result.pt").exists()
    assert res["arch"]["decoder"]["head_slope"] == pytest.approx(0.1)
    text = " ".join(_card(res).values())
    if recipe == "consistent":
        assert res["flip_consistency"] == NEMU_RECIPES["consistent"].flip_consistency > 0
        assert "mirror consistency" in text
        assert "item_variety" not in res["dataset"]
    else:
        assert res["dataset"]["item_variety"] == "train split" and "rendered with variety" in text
        assert "flip_consistency" not in res
