"""A small epoch loop shared by every trainer: progress bar, per-epoch checkpoints, resumable runs.

A checkpoint (one file, rewritten atomically after every epoch) holds the trainable module's state,
the optimiser's state, the epoch count, the torch RNG state, the per-epoch history and the run's
configuration. `resume=True` continues from it, refusing if the configuration differs.

Devices: the trainers build their batches on the host (data, augmentation, RNG streams as on the
CPU) and `train_loop(device=...)` moves each batch there just before the step, the one host-to-
device copy per step; the trainers move their modules there once (`xaiserve train ... --device`).
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn
from tqdm import tqdm

from xaiserve.errors import FailedPrecondition
from xaiserve.handlers.nets import load_state_dict_file

StepFn = Callable[[Any], tuple[torch.Tensor, dict[str, float]]]


def to_device(batch: Any, device: torch.device | str | None) -> Any:
    """The batch (a tensor, or tuples / lists / dicts of them) on `device`; None leaves it where it is."""
    if device is None:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


@dataclass(frozen=True)
class LoopConfig:
    epochs: int
    checkpoint: Path | None = None
    resume: bool = False
    progress: bool = True
    desc: str = "train"
    log_epochs: bool = True  # one summary line per epoch, even without the progress bar
    # Model selection: the name of a validation metric to maximise; the module ends with the state of
    # the epoch that scored highest (kept in the checkpoint, so a resumed run selects the same way).
    select: str | None = None


def set_threads(n: int = 2) -> None:
    """The machines here are shared: never take more than `n` cores."""
    torch.set_num_threads(max(1, int(n)))


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise FailedPrecondition(f"no checkpoint at {path} to resume from; run without --resume to start afresh")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - torch.load raises many types on foreign bytes
        raise FailedPrecondition(
            f"checkpoint {path} is corrupt ({e.__class__.__name__}); delete it and run without --resume"
        ) from None


def _comparable(config: dict[str, Any] | None) -> dict[str, Any] | None:
    """Configuration minus the epoch count (resuming with more epochs extends a run)."""
    return None if config is None else {k: v for k, v in config.items() if k != "epochs"}


def train_loop(
    cfg: LoopConfig,
    module: nn.Module,
    optimiser: torch.optim.Optimizer,
    batches: Callable[[int], Iterable[Any]],
    steps_per_epoch: int,
    step: StepFn,
    validate: Callable[[int], dict[str, float]] | None = None,
    run_config: dict[str, Any] | None = None,
    device: torch.device | str | None = None,
) -> list[dict[str, float]]:
    """Train for cfg.epochs epochs; returns the history (one dict of mean train logs + validation per epoch).
    `device`: where each batch goes before `step` (the module must already be there)."""
    start, history = 0, []
    best: dict[str, Any] | None = None
    run_config = run_config or {}
    if cfg.resume and cfg.checkpoint is not None:
        ck = load_checkpoint(cfg.checkpoint)
        if _comparable(ck.get("config")) != _comparable(run_config):
            raise FailedPrecondition(
                f"checkpoint {cfg.checkpoint} was written by a different configuration ({ck.get('config')}); "
                "run without --resume, or with the same options"
            )
        module.load_state_dict(ck["module"])
        optimiser.load_state_dict(ck["optimiser"])  # its state tensors follow the parameters' device
        torch.set_rng_state(ck["rng"])
        start, history = int(ck["epoch"]), list(ck["history"])
        best = ck.get("best")
    for epoch in range(start, cfg.epochs):
        module.train()
        sums: dict[str, float] = {}
        n = 0
        t0 = time.perf_counter()
        bar = tqdm(
            total=steps_per_epoch,
            desc=f"{cfg.desc} {epoch + 1}/{cfg.epochs}",
            disable=not cfg.progress,
            leave=False,
            mininterval=1.0,
        )
        for batch in batches(epoch):
            optimiser.zero_grad(set_to_none=True)
            loss, logs = step(to_device(batch, device))
            loss.backward()
            optimiser.step()
            n += 1
            logs = {"loss": float(loss.detach()), **logs}
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            bar.update(1)
            bar.set_postfix({k: f"{v / n:.4f}" for k, v in list(sums.items())[:4]}, refresh=False)
        bar.close()
        rec = {f"train_{k}": v / max(n, 1) for k, v in sums.items()}
        rec["epoch"] = epoch + 1
        rec["seconds"] = round(time.perf_counter() - t0, 1)
        if validate is not None:
            module.eval()
            with torch.no_grad():
                rec.update({f"val_{k}": v for k, v in validate(epoch).items()})
        history.append(rec)
        score = rec.get(f"val_{cfg.select}") if cfg.select else None
        if score is not None and (best is None or score > best["value"]):
            best = {"epoch": epoch + 1, "value": float(score), "module": copy.deepcopy(module.state_dict())}
        if cfg.progress or cfg.log_epochs:
            print(
                f"{cfg.desc} epoch {epoch + 1}/{cfg.epochs}: "
                + ", ".join(f"{k}={v:.4g}" for k, v in rec.items() if k != "epoch"),
                flush=True,
            )
        if cfg.checkpoint is not None:
            save_checkpoint(
                cfg.checkpoint,
                {
                    "module": module.state_dict(),
                    "optimiser": optimiser.state_dict(),
                    "rng": torch.get_rng_state(),
                    "epoch": epoch + 1,
                    "history": history,
                    "config": run_config,
                    "best": best,
                },
            )
    if best is not None:
        module.load_state_dict(best["module"])
        for rec in history:
            rec["selected"] = float(rec["epoch"] == best["epoch"])
    return history


__all__ = ["LoopConfig", "load_checkpoint", "load_state_dict_file", "save_checkpoint", "set_threads", "train_loop"]
