"""Supervised classifiers (encoder with a feature pyramid + linear head) on lesions or scenes.

These are the frozen models NEMt and the ablation paths explain. Augmentation: random horizontal and
vertical flips only (both datasets are flip-invariant; nothing that moves the ground truth off the
pixels is needed at training time).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from xaiserve.devices import module_device
from xaiserve.handlers.nets import EncoderArch, PyramidClassifier
from xaiserve.training.datasets.base import SyntheticDataset
from xaiserve.training.loop import LoopConfig, train_loop


@dataclass(frozen=True)
class ClassifierConfig:
    epochs: int = 6
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0


def accuracy(model: torch.nn.Module, ds: SyntheticDataset, split: str, batch_size: int = 512) -> float:
    model.eval()
    dev = module_device(model)
    hit = tot = 0
    with torch.no_grad():
        for x, y, _ in ds.batches(split, batch_size):
            hit += int((model(x.to(dev)).argmax(1) == y.to(dev)).sum())
            tot += len(y)
    return hit / max(tot, 1)


def train_classifier(
    ds: SyntheticDataset,
    cfg: ClassifierConfig,
    arch: EncoderArch = EncoderArch(),
    *,
    checkpoint: Path | None = None,
    resume: bool = False,
    progress: bool = True,
    limit: int | None = None,
    device: torch.device | str = "cpu",
) -> tuple[PyramidClassifier, list[dict], dict[str, Any]]:
    """Train on `device` (batches built on the host); the model comes back on the CPU."""
    torch.manual_seed(cfg.seed)
    model = PyramidClassifier(arch, ds.num_classes).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    split = ds.split("train")
    n = len(split) if limit is None else min(limit, len(split))
    steps = (n + cfg.batch_size - 1) // cfg.batch_size

    def batches(epoch: int):
        for g in opt.param_groups:  # cosine decay per epoch (a function of the epoch, so resuming is exact)
            g["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * epoch / cfg.epochs))
        rng = np.random.default_rng([cfg.seed, epoch])
        order = rng.permutation(len(split))[:n]
        for i in range(0, n, cfg.batch_size):
            idx = np.sort(order[i : i + cfg.batch_size])
            x = ds.normalise(split.images[idx])
            fh = torch.from_numpy(rng.random(len(idx)) < 0.5).view(-1, 1, 1, 1)
            fv = torch.from_numpy(rng.random(len(idx)) < 0.5).view(-1, 1, 1, 1)
            x = torch.where(fh, x.flip(3), x)
            x = torch.where(fv, x.flip(2), x)
            yield x, torch.from_numpy(split.labels[idx])

    def step(batch):
        x, y = batch
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        return loss, {"acc": float((logits.argmax(1) == y).float().mean())}

    history = train_loop(
        LoopConfig(
            epochs=cfg.epochs, checkpoint=checkpoint, resume=resume, progress=progress, desc=f"classifier[{ds.name}]"
        ),
        model,
        opt,
        batches,
        steps,
        step,
        validate=lambda e: {"accuracy": accuracy(model, ds, "val")},
        run_config={**asdict(cfg), "arch": arch.to_dict(), "dataset": ds.describe(), "limit": limit},
        device=device,
    )
    model.eval()
    metrics = {"val_accuracy": accuracy(model, ds, "val"), "test_accuracy": accuracy(model, ds, "test")}
    return model.cpu(), history, metrics
