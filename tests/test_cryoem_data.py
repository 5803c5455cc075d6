"""Simulated Cryo-EM particles and MRC stacks ([THESIS], sec. 6.1-6.3)."""

from __future__ import annotations

import mrcfile
import numpy as np
import pytest

from xaiserve.handlers.denoise import client_io
from xaiserve.training.datasets.cryoem import (
    CryoEMConfig,
    CryoEMSimulator,
    disc,
    export_split,
    parse_snr,
    project,
    read_mrc_stack,
    snr_label,
    write_mrc_stack,
)

SMALL = CryoEMConfig(size=32, sizes={"train": 24, "val": 12, "test": 12})


@pytest.fixture(scope="module")
def sim() -> CryoEMSimulator:
    return CryoEMSimulator(SMALL)


def test_same_seed_same_particles_and_splits_differ(sim):
    a = sim.generate("val")
    b = CryoEMSimulator(SMALL).generate("val")
    np.testing.assert_array_equal(a.noisy, b.noisy)
    np.testing.assert_array_equal(a.clean, b.clean)
    t = sim.generate("test")
    assert not np.allclose(a.clean, t.clean)
    other = CryoEMSimulator(CryoEMConfig(size=32, seed=5, sizes=SMALL.sizes)).generate("val")
    assert not np.allclose(a.clean, other.clean)
    assert a.noisy.dtype == np.float32 and a.noisy.shape == (12, 32, 32)
    assert set(np.unique(a.family)) <= set(range(SMALL.n_families))


def test_particles_are_centred_and_inside_the_disc(sim):
    ps = sim.generate("train")
    inside = disc(32)
    assert np.all(ps.clean[:, ~inside] == 0)
    ax = (2 * np.arange(32) + 1 - 32) / 32
    for c in ps.clean:
        m = c.sum()
        cy, cx = (c.sum(1) * ax).sum() / m, (c.sum(0) * ax).sum() / m
        assert abs(cx) < 0.06 and abs(cy) < 0.06  # centre of mass within one pixel of the middle
        assert c.max() > 0 and c.min() >= 0


def test_projection_of_a_gaussian_atom_is_the_2d_gaussian():
    pos = np.array([[0.25, -0.5, 0.3]])
    img = project(pos, np.array([2.0]), 64, 0.05)
    ax = (2 * np.arange(64) + 1 - 64) / 64
    ref = 2.0 * np.exp(-((ax[None, :] - 0.25) ** 2 + (ax[:, None] + 0.5) ** 2) / (2 * 0.05**2))
    np.testing.assert_allclose(img, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("snr", [1 / 4, 1 / 64])
@pytest.mark.parametrize("noise", ["gaussian", "poisson"])
def test_snr_is_the_ratio_of_norms_on_the_disc(snr, noise):
    cfg = CryoEMConfig(size=32, snr=snr, noise=noise, sizes={"train": 8, "val": 64, "test": 8})
    ps = CryoEMSimulator(cfg).generate("val")
    inside = disc(32)
    ratio = np.linalg.norm(ps.clean[:, inside], axis=1) / np.linalg.norm((ps.noisy - ps.clean)[:, inside], axis=1)
    assert np.mean(ratio) == pytest.approx(snr, rel=0.03)
    noise_arr = (ps.noisy - ps.clean)[:, inside]
    assert abs(noise_arr.mean()) < 0.05 * noise_arr.std()  # zero-mean noise


def test_poisson_noise_depends_on_the_signal():
    # a low dose (1 electron per background pixel) makes the contrast, and so the effect, large
    cfg = CryoEMConfig(size=32, snr=1 / 4, noise="poisson", poisson_dose=1.0, sizes={"train": 8, "val": 32, "test": 8})
    ps = CryoEMSimulator(cfg).generate("val")
    inside = disc(32)
    bright = ps.clean > np.quantile(ps.clean[:, inside], 0.95)
    dark = (ps.clean == 0) & inside[None]
    resid = ps.noisy - ps.clean
    assert resid[bright].var() > 1.3 * resid[dark].var()


def test_parse_snr():
    assert parse_snr("1/64") == 1 / 64
    assert parse_snr("0.25") == 0.25
    assert snr_label(1 / 64) == "1/64"
    for bad in ("0", "-1/4", "abc", "1/0"):
        with pytest.raises(ValueError):
            parse_snr(bad)


def test_mrc_stack_round_trip(tmp_path, sim):
    ps = sim.generate("val")
    path = tmp_path / "particles.mrcs"
    write_mrc_stack(path, ps.noisy)
    with mrcfile.open(path) as m:  # a real MRC image stack that other tools can open
        assert m.is_image_stack()
        assert m.data.shape == (12, 32, 32)
        assert m.header.mode == 2
    back = read_mrc_stack(path)
    np.testing.assert_array_equal(back, ps.noisy)
    # client helpers: [N,1,H,W] and [H,W] are accepted, the result is always [N,H,W]
    client_io.write_stack(tmp_path / "sub" / "one.mrcs", ps.clean[:3, None])
    np.testing.assert_array_equal(client_io.read_stack(tmp_path / "sub" / "one.mrcs"), ps.clean[:3])
    client_io.write_stack(tmp_path / "single.mrc", ps.clean[0])
    assert client_io.read_stack(tmp_path / "single.mrc").shape == (1, 32, 32)


def test_export_split_writes_noisy_and_clean_stacks(tmp_path, sim):
    noisy_path, clean_path = export_split(SMALL, "val", tmp_path / "sim", n=5)
    ps = sim.generate("val", 5)
    np.testing.assert_array_equal(read_mrc_stack(noisy_path), ps.noisy)
    np.testing.assert_array_equal(read_mrc_stack(clean_path), ps.clean)


def test_mrc_modes_and_errors(tmp_path):
    ints = (np.arange(2 * 8 * 8).reshape(2, 8, 8) % 100).astype(np.int16)
    with mrcfile.new(tmp_path / "ints.mrcs") as m:  # written by mrcfile itself, mode 1
        m.set_data(ints)
    back = client_io.read_stack(tmp_path / "ints.mrcs")
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back, ints.astype(np.float32))
    with pytest.raises(FileNotFoundError, match="no such particle stack"):
        client_io.read_stack(tmp_path / "missing.mrcs")
    (tmp_path / "junk.mrcs").write_bytes(b"not an mrc file" * 100)
    with pytest.raises(ValueError, match="junk.mrcs"):
        client_io.read_stack(tmp_path / "junk.mrcs")
    with pytest.raises(ValueError, match="shape"):
        client_io.write_stack(tmp_path / "bad.mrcs", np.zeros((2, 2, 2, 2), np.float32))
