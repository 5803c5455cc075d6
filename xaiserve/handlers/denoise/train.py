"""Training of the spiral / cartesian denoisers and their per-epoch curves ([THESIS], sec. 7.4).

Loss: MSE on the disc between the network's estimate and the clean particle, both in the
per-particle normalised units of the graph (x / std of the noisy particle, see
networks.normalise): a particle's raw squared error divided by its noisy variance, so particles
of any scale weigh alike. Adam with a cosine learning-rate decay.

Every epoch (and once before training, epoch 0 = "at initialisation") one JSON line goes to
`metrics.jsonl`: train loss, validation MSE / PSNR (metrics.py) and the equivariance error
(equivariance.py) on a fixed validation subset with fixed angles. These are the curves of the
thesis's Fig. 7.7-7.9.

Rotation augmentation (Fig. 7.9): each batch is rotated by random angles (noisy and clean alike,
sinc interpolation, see equivariance.py), i.e. new random rotations every epoch.

Early stopping (keep_best): the training set has fixed noise (as the thesis's fixed data set),
and at SNR 1/64 both networks start to fit that noise after a few epochs (validation loss goes
up again, and the equivariance error with it); the model returned is the one of the epoch with
the lowest validation loss, which the history marks ("best_epoch" in the last record).
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from xaiserve.handlers.denoise.equivariance import equivariance_error, rotate
from xaiserve.handlers.denoise.metrics import as_tensor, disc_mse, disc_psnr
from xaiserve.handlers.denoise.networks import Denoiser, normalise


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 8
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.0
    augment_rotations: bool = False
    equivariance_particles: int = 48  # validation particles for the equivariance error
    equivariance_angles: int = 4  # random angles per particle
    inner_radius: float = 0.9  # equivariance measured on r <= inner_radius (rim excluded)
    keep_best: bool = True  # end with the weights of the epoch with the lowest validation loss
    seed: int = 0


@dataclass
class FastMode:
    """Context: switch spiral gathers to the fast (non-exportable) form while training."""

    model: Denoiser

    def __enter__(self) -> Denoiser:
        if hasattr(self.model.ops, "portable"):
            self.model.ops.portable = False
        return self.model

    def __exit__(self, *exc) -> None:
        if hasattr(self.model.ops, "portable"):
            self.model.ops.portable = True


def normalised_loss(model: Denoiser, noisy: Tensor, clean: Tensor) -> Tensor:
    """Mean over the batch and the disc of (estimate - clean)^2 in normalised units."""
    disc = model.disc
    xn, sd = normalise(noisy, disc, model.config.eps)
    target = clean / sd * disc
    pred = model.forward_normalised(xn)
    return (((pred - target) * disc) ** 2).sum() / (noisy.shape[0] * disc.sum())


@torch.no_grad()
def evaluate(model: Denoiser, noisy: Tensor, clean: Tensor, batch_size: int = 64) -> dict[str, float]:
    """Validation metrics in eval mode: mse, psnr (raw units, disc), loss (normalised)."""
    model.eval()
    dev = model.disc.device
    mses, psnrs, losses = [], [], []
    for i in range(0, noisy.shape[0], batch_size):
        x, c = noisy[i : i + batch_size].to(dev), clean[i : i + batch_size].to(dev)
        y = model(x)
        mses.append(disc_mse(y, c, model.disc))
        psnrs.append(disc_psnr(y, c, model.disc))
        losses.append(normalised_loss(model, x, c) * x.shape[0])
    n = noisy.shape[0]
    return {
        "val_mse": float(torch.cat(mses).mean()),
        "val_psnr": float(torch.cat(psnrs).mean()),
        "val_loss": float(sum(losses) / n),
    }


@torch.no_grad()
def model_equivariance(model: Denoiser, particles: Tensor, cfg: TrainConfig) -> float:
    model.eval()
    return equivariance_error(
        model,
        particles.to(model.disc.device),
        angles_per_particle=cfg.equivariance_angles,
        inner_radius=cfg.inner_radius,
        seed=cfg.seed + 1,
    )


def _lr_at(step: int, total: int, base: float) -> float:
    warm = max(1, total // 50)
    if step < warm:
        return base * (step + 1) / warm
    return 0.5 * base * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def train(
    model: Denoiser,
    train_noisy: np.ndarray,
    train_clean: np.ndarray,
    val_noisy: np.ndarray,
    val_clean: np.ndarray,
    cfg: TrainConfig,
    log_path: Path | None = None,
    progress: bool = True,
    on_epoch: Callable[[dict], None] | None = None,
    device: torch.device | str = "cpu",
) -> list[dict]:
    """Train in place on `device` (the particles stay on the host, each batch is copied there; the
    random order and rotations are drawn on the host, so they are the same on every device); the
    model is back on the CPU at the end. Returns the per-epoch records (also appended to log_path)."""
    from tqdm import tqdm

    model.to(device)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    xt, ct = as_tensor(train_noisy), as_tensor(train_clean)
    xv, cv = as_tensor(val_noisy), as_tensor(val_clean)
    eq_set = xv[: cfg.equivariance_particles]
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = xt.shape[0]
    steps_per_epoch = max(1, n // cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    history: list[dict] = []

    def record(epoch: int, train_loss: float | None, seconds: float) -> None:
        with FastMode(model):
            rec = {"epoch": epoch, "train_loss": train_loss, **evaluate(model, xv, cv)}
            rec["equivariance"] = model_equivariance(model, eq_set, cfg)
        rec["seconds"] = round(seconds, 2)
        history.append(rec)
        if log_path is not None:
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
        if on_epoch is not None:
            on_epoch(rec)

    record(0, None, 0.0)
    best = (history[0]["val_loss"], 0, copy.deepcopy(model.state_dict()))
    step = 0
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        perm = torch.randperm(n, generator=gen)
        running, seen = 0.0, 0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch}/{cfg.epochs}", disable=not progress, leave=False)
        with FastMode(model):
            for b in bar:
                idx = perm[b * cfg.batch_size : (b + 1) * cfg.batch_size]
                x, c = xt[idx].to(device), ct[idx].to(device)
                if cfg.augment_rotations:
                    ang = (torch.rand(x.shape[0], generator=gen) * (2 * math.pi)).to(device)
                    x, c = rotate(x, ang), rotate(c, ang) * model.disc
                for g in opt.param_groups:
                    g["lr"] = _lr_at(step, total, cfg.lr)
                loss = normalised_loss(model, x, c)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                running += loss.item() * x.shape[0]
                seen += x.shape[0]
                bar.set_postfix(loss=f"{running / seen:.4g}")
        record(epoch, running / max(seen, 1), time.perf_counter() - t0)
        if history[-1]["val_loss"] < best[0]:
            best = (history[-1]["val_loss"], epoch, copy.deepcopy(model.state_dict()))
    if cfg.keep_best:
        model.load_state_dict(best[2])
    history[-1]["best_epoch"] = best[1] if cfg.keep_best else cfg.epochs
    if log_path is not None:  # rewrite the last line with the best epoch
        lines = log_path.read_text().splitlines()
        lines[-1] = json.dumps(history[-1])
        log_path.write_text("\n".join(lines) + "\n")
    model.eval()
    model.cpu()
    return history
