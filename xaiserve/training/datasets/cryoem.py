"""Simulated single-particle Cryo-EM projections ([THESIS], sec. 6.1-6.3 and 7.1).

SYNTHETIC data, no real micrographs. Like the thesis ("a simple static density projection",
sec. 6.1) a particle is the projection of a 3-D density made of Gaussian "atoms":

- molecule families: a few fixed random compact molecules (`n_families`), each a handful of
  ellipsoidal domains filled with 200-400 atoms of random weight (C/N/O/S-like scattering); the
  molecule is centred on its centre of mass and scaled to fit a sphere of radius `max_radius`, so
  every projection lies inside the unit disc (eq. 7.2) with the centre of mass at its midpoint;
- particles: a family member whose domains move a little (`domain_jitter`) and whose atoms
  jiggle (`atom_jitter`), seen along a uniformly random 3-D orientation (random unit quaternion);
  the projection of an isotropic 3-D Gaussian atom along z is the 2-D Gaussian of the same width
  at the projected centre, so the projection is exact and separable
  (image = G_y^T diag(w) G_x);
- restricted to the unit disc: the clean image is zero outside it (atoms cannot reach it anyway);
- noise (sec. 6.3): additive white Gaussian noise on the whole square with the SNR defined as the
  ratio of norms over the disc, ||x_sig|| / ||x_noise|| (per particle, in expectation), e.g. 1/4 or
  1/64; or, optionally, Poisson (shot) noise as in a low-dose micrograph: electron counts
  k ~ Poisson(D (1 + kappa x_sig)) with `poisson_dose` D expected electrons per background pixel and
  a weak contrast kappa (the shadow of sec. 6.1 modulates a bright background), reported in signal
  units as (k - D) / (D kappa); kappa is solved per particle so that the expected noise norm gives
  the requested SNR. The noise then depends on the signal (sec. 6.3).

Splits are independent streams of a fixed seed (train, val, test), so every run sees the same data.
Particle stacks read and write as MRC files (`mrcfile`), the format Cryo-EM tools use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np

SPLIT_STREAMS = {"train": 1, "val": 2, "test": 3}


@dataclass(frozen=True)
class CryoEMConfig:
    """Simulation parameters; lengths in units of the disc radius (the image spans [-1, 1]^2)."""

    size: int = 64
    n_families: int = 4
    atoms: tuple[int, int] = (200, 400)  # atoms per molecule, drawn per family
    domains: tuple[int, int] = (2, 5)  # ellipsoidal domains per molecule
    atom_sigma: float = 0.04  # Gaussian atom width (1.3 px at 64 x 64)
    max_radius: float = 0.75  # every atom within this 3-D radius of the centre of mass
    domain_jitter: float = 0.02  # per-particle displacement of each domain
    atom_jitter: float = 0.008  # per-particle displacement of each atom
    snr: float = 1.0 / 64.0  # ||x_sig|| / ||x_noise|| over the disc
    noise: str = "gaussian"  # "gaussian" or "poisson"
    poisson_dose: float = 20.0  # expected electrons per background pixel (Poisson noise only)
    seed: int = 0
    sizes: dict[str, int] = field(default_factory=lambda: {"train": 4000, "val": 256, "test": 512})

    def __post_init__(self) -> None:
        if self.noise not in ("gaussian", "poisson"):
            raise ValueError(f"noise must be 'gaussian' or 'poisson', got {self.noise!r}")
        if not self.snr > 0:
            raise ValueError(f"snr must be positive, got {self.snr}")
        if self.size < 8:
            raise ValueError(f"size must be at least 8, got {self.size}")


def parse_snr(text: str | float) -> float:
    """'1/64', '0.015625' or 1/64 -> 0.015625; rejects non-positive values."""
    try:
        v = float(Fraction(str(text).strip()))
    except (ValueError, ZeroDivisionError) as e:
        raise ValueError(f"SNR {text!r} is not a number or fraction like 1/64") from e
    if v <= 0:
        raise ValueError(f"SNR must be positive, got {text!r}")
    return v


def snr_label(snr: float) -> str:
    """0.015625 -> '1/64' (for names and tables)."""
    f = Fraction(snr).limit_denominator(1000)
    return f"{f.numerator}/{f.denominator}" if f.denominator != 1 else str(f.numerator)


def pixel_axis(size: int) -> np.ndarray:
    """Pixel-centre coordinates along one axis, spanning [-1, 1] (as handlers.denoise.geometry)."""
    return (2.0 * np.arange(size) + 1.0 - size) / size


def disc(size: int) -> np.ndarray:
    """Boolean [size, size] unit disc (pixel centres with r <= 1)."""
    a = pixel_axis(size)
    return (a[:, None] ** 2 + a[None, :] ** 2) <= 1.0


@dataclass(frozen=True)
class Molecule:
    """A family's reference molecule: domain of each atom, atom positions [A,3] and weights [A]."""

    positions: np.ndarray
    weights: np.ndarray
    domain: np.ndarray
    n_domains: int


def make_molecule(rng: np.random.Generator, cfg: CryoEMConfig) -> Molecule:
    """A random compact molecule: atoms uniformly inside a few overlapping random ellipsoids."""
    n_atoms = int(rng.integers(cfg.atoms[0], cfg.atoms[1] + 1))
    n_dom = int(rng.integers(cfg.domains[0], cfg.domains[1] + 1))
    centres = rng.normal(0.0, 0.25, size=(n_dom, 3))
    axes = rng.uniform(0.12, 0.35, size=(n_dom, 3))
    rots = np.stack([random_rotation(rng) for _ in range(n_dom)])
    share = rng.dirichlet(np.full(n_dom, 2.0))
    dom = rng.choice(n_dom, size=n_atoms, p=share)
    u = rng.normal(size=(n_atoms, 3))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    u *= rng.uniform(0, 1, size=(n_atoms, 1)) ** (1.0 / 3.0)  # uniform in the unit ball
    pos = np.einsum("aij,aj->ai", rots[dom], u * axes[dom]) + centres[dom]
    weights = rng.choice([1.0, 1.15, 1.3, 2.6], size=n_atoms, p=[0.55, 0.2, 0.2, 0.05])  # ~ C, N, O, S
    pos = pos - np.average(pos, axis=0, weights=weights)  # centre of mass at the origin
    reach = np.linalg.norm(pos, axis=1).max() + 2 * cfg.domain_jitter + 3 * cfg.atom_jitter
    pos *= cfg.max_radius / reach
    return Molecule(positions=pos, weights=weights, domain=dom, n_domains=n_dom)


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """Uniformly random rotation matrix (normalised Gaussian quaternion)."""
    q = rng.normal(size=4)
    w, x, y, z = q / np.linalg.norm(q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def project(positions: np.ndarray, weights: np.ndarray, size: int, sigma: float) -> np.ndarray:
    """Projection along z of sum_a w_a N(x; p_a, sigma^2 I3), sampled at the pixel centres [size, size].

    Integrating an isotropic 3-D Gaussian over z leaves the 2-D Gaussian of the same sigma at
    (x_a, y_a); the sum factorises per atom, so image = G_y^T diag(w) G_x. Peak of one atom = w_a.
    """
    a = pixel_axis(size)
    gx = np.exp(-0.5 * ((a[None, :] - positions[:, 0:1]) / sigma) ** 2)
    gy = np.exp(-0.5 * ((a[None, :] - positions[:, 1:2]) / sigma) ** 2)
    # einsum without BLAS: a multi-threaded BLAS call this small ran 25x slower on a busy machine.
    return np.einsum("ai,aj->ij", gy * weights[:, None], gx)


def particle_density(rng: np.random.Generator, mol: Molecule, cfg: CryoEMConfig) -> np.ndarray:
    """One family member in a random orientation: atom positions [A,3] (after rotation)."""
    shift = rng.normal(0.0, cfg.domain_jitter, size=(mol.n_domains, 3))
    pos = mol.positions + shift[mol.domain] + rng.normal(0.0, cfg.atom_jitter, size=mol.positions.shape)
    pos = pos - np.average(pos, axis=0, weights=mol.weights)  # keep the centre of mass centred
    return pos @ random_rotation(rng).T


def add_noise(rng: np.random.Generator, clean: np.ndarray, cfg: CryoEMConfig, inside: np.ndarray) -> np.ndarray:
    """Noisy particle at SNR cfg.snr = ||x_sig|| / ||x_noise|| on the disc (sec. 6.3)."""
    sig = float(np.linalg.norm(clean[inside]))
    n_in = int(inside.sum())
    if cfg.noise == "gaussian":
        sd = sig / (cfg.snr * math.sqrt(n_in))
        return clean + rng.normal(0.0, sd, size=clean.shape)
    x = np.clip(clean, 0.0, None)
    d = cfg.poisson_dose
    # E||(k - D)/(D kappa) - x||^2 over the disc = sum(1 + kappa x) / (D kappa^2) = ||x||^2 / snr^2:
    # D ||x||^2 kappa^2 - snr^2 sum(x) kappa - snr^2 n = 0, positive root.
    a, b, c = d * sig * sig, -(cfg.snr**2) * float(x[inside].sum()), -(cfg.snr**2) * n_in
    kappa = (-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)
    counts = rng.poisson(d * (1.0 + kappa * x))
    return (counts - d) / (d * kappa)


@dataclass(frozen=True)
class ParticleSet:
    """clean, noisy: float32 [N, H, W]; family int64 [N] (which molecule family)."""

    clean: np.ndarray
    noisy: np.ndarray
    family: np.ndarray

    def __len__(self) -> int:
        return int(self.clean.shape[0])


class CryoEMSimulator:
    """Deterministic simulator: the same config gives the same molecules and particles."""

    def __init__(self, config: CryoEMConfig = CryoEMConfig()):
        self.config = config
        fam_rng = np.random.default_rng([config.seed, 0])
        self.molecules = [make_molecule(fam_rng, config) for _ in range(config.n_families)]
        self.inside = disc(config.size)
        # One global scale so clean images are O(1) (mean over a reference batch of the disc RMS).
        ref = [self.clean_image(np.random.default_rng([config.seed, 99, i]), i % config.n_families) for i in range(16)]
        self.scale = 1.0 / float(np.mean([np.sqrt(np.mean(r[self.inside] ** 2)) for r in ref]))

    def clean_image(self, rng: np.random.Generator, family: int) -> np.ndarray:
        mol = self.molecules[family]
        pos = particle_density(rng, mol, self.config)
        img = project(pos, mol.weights, self.config.size, self.config.atom_sigma)
        return np.where(self.inside, img, 0.0)

    def generate(self, split: str, n: int | None = None) -> ParticleSet:
        """The particles of one split (fixed seed stream per split)."""
        if split not in SPLIT_STREAMS:
            raise ValueError(f"split must be one of {sorted(SPLIT_STREAMS)}, got {split!r}")
        cfg = self.config
        n = cfg.sizes[split] if n is None else int(n)
        rng = np.random.default_rng([cfg.seed, SPLIT_STREAMS[split]])
        noise_rng = np.random.default_rng([cfg.seed, SPLIT_STREAMS[split], 7])
        clean = np.empty((n, cfg.size, cfg.size), np.float32)
        noisy = np.empty_like(clean)
        family = rng.integers(0, cfg.n_families, size=n)
        for i in range(n):
            c = self.clean_image(rng, int(family[i])) * self.scale
            clean[i] = c
            noisy[i] = add_noise(noise_rng, c, cfg, self.inside)
        return ParticleSet(clean=clean, noisy=noisy, family=family.astype(np.int64))


def simulate(config: CryoEMConfig, split: str, n: int | None = None) -> ParticleSet:
    return CryoEMSimulator(config).generate(split, n)


# -- MRC stacks -------------------------------------------------------------------------------


def write_mrc_stack(path: str | Path, stack: np.ndarray, voxel_size: float = 1.0) -> None:
    """Write float32 [N, H, W] (or [H, W]) as an MRC image stack (mode 2, ispg 0)."""
    from xaiserve.handlers.denoise.mrc import write_stack

    write_stack(path, stack, voxel_size=voxel_size)


def read_mrc_stack(path: str | Path) -> np.ndarray:
    """Read an MRC image or stack as float32 [N, H, W]."""
    from xaiserve.handlers.denoise.mrc import read_stack

    return read_stack(path)


def export_split(config: CryoEMConfig, split: str, out_dir: str | Path, n: int | None = None) -> tuple[Path, Path]:
    """Write a split as `<split>_noisy.mrcs` and `<split>_clean.mrcs` in out_dir."""
    ps = simulate(config, split, n)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pn, pc = out / f"{split}_noisy.mrcs", out / f"{split}_clean.mrcs"
    write_mrc_stack(pn, ps.noisy)
    write_mrc_stack(pc, ps.clean)
    return pn, pc
