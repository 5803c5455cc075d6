"""Training of the masking networks: NEM-U ([NEM-U]) and NEMt ([NEMt]), plus a held-out check.

Only the decoders train; the frozen model runs in eval mode with its parameters frozen, and the
gradient reaches the mask through it. Masking is applied to the normalised input (x * m: 0 is the
dataset mean), as the server's fidelity check does. Optimiser: Prodigy ([NEM-U] sec. 4.2; the
authors' code uses lr = 1, weight_decay = 0.01, safeguard_warmup = True, no augmentation).

NEMt: a bank of per-class decoders, decoder t trained to explain target t (one masking network per
label, [NEMt] sec. 6) on every training image of class t plus as many other images drawn afresh each
epoch, or one class-conditional decoder trained with the true label as target for half of the images
and a uniformly random target for the other half (beyond the papers). Why the class balance: trained
on all images, the network of a class that is a quarter of the data collapsed to an all-zero mask
(the L1 term of the other three quarters wins and the sigmoid saturates). The mask passes through stochastic
weighted neighbourhood averaging during training (random kernel per sample and forward pass).
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from prodigyopt import Prodigy
from torch import nn

from xaiserve.devices import module_device
from xaiserve.errors import InvalidArgument
from xaiserve.handlers.nem.decoder import DecoderArch
from xaiserve.handlers.nem.losses import (
    NEMT_FORMS,
    NemTLossConfig,
    NemULossConfig,
    nemt_deletion_loss,
    nemt_preservation_loss,
    nemu_loss,
)
from xaiserve.handlers.nem.models import NemT, NemU
from xaiserve.training.datasets.base import SyntheticDataset
from xaiserve.training.loop import LoopConfig, train_loop

NEMU_DECODER = DecoderArch(widths=(32, 16, 8))
# the 2026-12 decision: replicate padding (no frame feature) and a bounded logit (b tanh(l / b), b = 6: the mask in
# [0.0025, 0.9975], never a dead saturated sigmoid); the zoo's scenes-nemu uses it
NEMU_DECODER_BOUNDED = DecoderArch(widths=(32, 16, 8), pad="replicate", logit_bound=6.0)
# the graded head (2026-12, recipe "graded"): the bounded decoder whose last block ends in a leaky ReLU (slope 0.1),
# so the mask's maximum is not the plateau of dead last-block units (decoder.DecoderArch.head_slope)
NEMU_DECODER_GRADED = DecoderArch(widths=(32, 16, 8), pad="replicate", logit_bound=6.0, head_slope=0.1)
NEMT_BANK_DECODER = DecoderArch(widths=(16, 8))
NEMT_COND_DECODER = DecoderArch(widths=(32, 16, 8))


@dataclass(frozen=True)
class NemTrainConfig:
    epochs: int = 5
    batch_size: int = 64
    weight_decay: float = 0.01
    seed: int = 0


def prodigy(params) -> torch.optim.Optimizer:
    """Prodigy as in the authors' code (lr 1, weight decay 0.01, safeguard warm-up); its constructor's print is muted."""
    with contextlib.redirect_stdout(io.StringIO()):
        return Prodigy(params, lr=1.0, weight_decay=0.01, safeguard_warmup=True)


def _batches(ds: SyntheticDataset, bs: int, seed: int, limit: int | None, focus: int | None = None):
    """Training batches (normalised images, labels). focus=c: every image of class c plus as many
    randomly drawn others, fresh each epoch (the per-class network of c sees its class half the time)."""
    split = ds.split("train")
    n = len(split) if limit is None else min(limit, len(split))
    pool = np.arange(n)
    if focus is not None:
        pos = pool[split.labels[:n] == focus]
        n = 2 * len(pos) if 0 < len(pos) <= n // 2 else n

    def gen(epoch: int):
        rng = np.random.default_rng([seed, epoch, 7, 0 if focus is None else focus + 1])
        if focus is None or n == len(pool):
            order = rng.permutation(pool)
        else:
            others = pool[split.labels[pool] != focus]
            order = rng.permutation(np.concatenate([pos, rng.choice(others, len(pos), replace=False)]))
        for i in range(0, n, bs):
            idx = np.sort(order[i : i + bs])
            yield ds.normalise(split.images[idx]), torch.from_numpy(split.labels[idx])

    return gen, (n + bs - 1) // bs


def minmax(m: torch.Tensor) -> torch.Tensor:
    """Per-image min-max normalisation of masks [B,1,H,W] or [B,H,W] (METHODS.md: before every metric)."""
    flat = m.flatten(1)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    return ((flat - lo) / (hi - lo).clamp_min(1e-12)).view_as(m)


def relevance_mass(mask: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Positive (min-max normalised) mask mass inside the ground truth / all positive mass, per image."""
    m = minmax(mask.float()).flatten(1).clamp_min(0)
    g = gt.flatten(1).float()
    return (m * g).sum(1) / m.sum(1).clamp_min(1e-12)


# -- NEM-U ---------------------------------------------------------------------------------------
def nemu_step(
    model: NemU, x: torch.Tensor, cfg: NemULossConfig = NemULossConfig(), flip_consistency: float = 0.0
) -> tuple[torch.Tensor, dict[str, float]]:
    """One NEM-U training step (eq. 5-9). flip_consistency = mu > 0 (beyond [NEM-U], recipe `consistent`):
    the batch is trained together with its horizontal mirror and mu * mean|m(x) - flip(m(flip x))| is
    added, so the mask mirrors with the image instead of marking one side of an item."""
    xx = torch.cat([x, x.flip(-1)]) if flip_consistency > 0 else x
    mask, z = model(xx)
    z_m = model.frozen(xx * mask)  # eq. 6
    z_bar = model.frozen(xx * (1 - mask))  # eq. 7
    loss, parts = nemu_loss(z, z_m, z_bar, mask, cfg)
    out = {k: float(v) for k, v in parts.items()}
    if flip_consistency > 0:
        cons = flip_inconsistency(mask[: len(x)], mask[len(x) :])
        loss = loss + flip_consistency * cons
        out["flip"] = float(cons.detach())
    return loss, out


def flip_inconsistency(mask: torch.Tensor, mask_of_mirror: torch.Tensor) -> torch.Tensor:
    """mean |m(x) - flip(m(flip x))| over pixels and images: 0 iff the masks mirror with the image."""
    return (mask - mask_of_mirror.flip(-1)).abs().mean()


def augment_shift(x: torch.Tensor, shift: int, g: torch.Generator) -> torch.Tensor:
    """Training augmentation (beyond [NEM-U], the 2026-12 decision): each image translated by up to `shift` px in
    x and y (reflect padding, so no new edge appears) and flipped horizontally with probability 1/2;
    the frame then carries no fixed content. The loss (eq. 5-9) needs no labels, so any view is valid."""
    if shift <= 0:
        return x
    b, _, h, w = x.shape
    pad = torch.nn.functional.pad(x, (shift, shift, shift, shift), mode="reflect")
    off = torch.randint(0, 2 * shift + 1, (b, 2), generator=g)
    flip = torch.rand(b, generator=g) < 0.5
    out = torch.stack([pad[i, :, oy : oy + h, ox : ox + w] for i, (oy, ox) in enumerate(off.tolist())])
    return torch.where(flip.to(x.device)[:, None, None, None], out.flip(-1), out)


def evaluate_nemu(model: NemU, ds: SyntheticDataset, split: str = "val", limit: int | None = None) -> dict[str, float]:
    """Relevance mass, pointing game, argmax at the border (training.metrics), mask size and fidelity
    cos(Phi(x), Phi(x*m)) on a held-out split; `localisation` = (relevance mass + pointing game) / 2."""
    from xaiserve.training import metrics as M

    model.eval()
    dev = module_device(model)
    rm, size, fid, pg, border = [], [], [], [], []
    with torch.no_grad():
        for x, _, gt in ds.batches(split, _eval_batch(ds), limit=limit):
            x, gt = x.to(dev), gt.to(dev)
            mask, z = model(x)
            rm.append(relevance_mass(mask, gt))
            size.append(mask.flatten(1).mean(1))
            fid.append(torch.nn.functional.cosine_similarity(z, model.frozen(x * mask), dim=1))
            mk = mask[:, 0].cpu().numpy()
            border.append(M.border_argmax(mk))
            if getattr(ds, "has_masks", True):
                g = gt.cpu().numpy().astype(bool)
                keep = g.reshape(len(g), -1).any(1)  # the pointing game needs an object pixel
                if keep.any():
                    pg.append(M.pointing_game(mk[keep], g[keep]))
    out = {
        "relevance_mass": float(torch.cat(rm).mean()),
        "mask_mean": float(torch.cat(size).mean()),
        "fidelity_cos": float(torch.cat(fid).mean()),
        "border_argmax": float(np.concatenate(border).mean()),
    }
    if pg:
        out["pointing_game"] = float(np.concatenate(pg).mean())
        out["localisation"] = (out["relevance_mass"] + out["pointing_game"]) / 2
    return out if getattr(ds, "has_masks", True) else {k: v for k, v in out.items() if k != "relevance_mass"}


def _validate_nemu(model: NemU, ds: SyntheticDataset, epoch: int, keep: Path | None) -> dict[str, float]:
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        torch.save(model.decoder.state_dict(), keep / f"epoch{epoch + 1}.pt")
    return evaluate_nemu(model, ds, "val", limit=512)


def has_heldout(ds: SyntheticDataset) -> bool:
    """A scenes dataset with held-out background families (the `heldout` split)."""
    return bool(getattr(getattr(ds, "config", None), "heldout_families", ()))


def _eval_batch(ds) -> int:
    """Images per evaluation batch: 256 for the 64-px synthetic sets, the dataset's own for a user's
    (a 224-px model at 256 images would hold gigabytes of activations)."""
    return int(getattr(ds, "eval_batch", 256))


def _select(ds, metric: str, without_masks: str | None) -> str | None:
    """The validation metric that picks the epoch: relevance mass needs ground-truth masks."""
    return metric if getattr(ds, "has_masks", True) else without_masks


def train_nemu(
    frozen: nn.Module,
    ds: SyntheticDataset,
    cfg: NemTrainConfig,
    *,
    decoder: DecoderArch = NEMU_DECODER,
    loss: NemULossConfig = NemULossConfig(),
    checkpoint: Path | None = None,
    resume: bool = False,
    progress: bool = True,
    limit: int | None = None,
    device: torch.device | str = "cpu",
    shift: int = 0,
    select: str = "relevance_mass",
    keep_epochs: Path | None = None,
    flip_consistency: float = 0.0,
) -> tuple[NemU, list[dict], dict[str, Any]]:
    """Train the decoder on `device` (the frozen encoder goes there with it); back on the CPU at the end.

    shift > 0: random translations (and flips) of the training images (augment_shift).
    select: the validation metric that picks the epoch ("relevance_mass" or "localisation").
    keep_epochs: a folder; the decoder's state after every epoch is saved there as epoch<N>.pt (analysis).
    flip_consistency: the weight of the mirror-consistency term (nemu_step; 0 = the paper's loss alone)."""
    torch.manual_seed(cfg.seed)
    model = NemU(frozen, decoder).to(device)
    opt = prodigy(model.decoder.parameters())
    gen, steps = _batches(ds, cfg.batch_size, cfg.seed, limit)
    g_aug = torch.Generator().manual_seed(cfg.seed + 1)
    history = train_loop(
        # the decoder of the epoch with the highest validation relevance mass is kept: the loss (eq. 5-9)
        # trades mask size against fidelity and the masks' localisation swings from epoch to epoch
        LoopConfig(
            epochs=cfg.epochs,
            checkpoint=checkpoint,
            resume=resume,
            progress=progress,
            desc="nem-u",
            select=_select(ds, select, "fidelity_cos"),
        ),
        model,
        opt,
        gen,
        steps,
        lambda b: nemu_step(model, augment_shift(b[0], shift, g_aug), loss, flip_consistency),
        validate=lambda e: _validate_nemu(model, ds, e, keep_epochs),
        run_config={
            **asdict(cfg),
            "decoder": decoder.to_dict(),
            "loss": asdict(loss),
            "dataset": ds.describe(),
            "limit": limit,
            **({"shift": shift} if shift else {}),
            **({"select": select} if select != "relevance_mass" else {}),
            **({"flip_consistency": flip_consistency} if flip_consistency else {}),
        },
        device=device,
    )
    model.eval()
    metrics = {"val": evaluate_nemu(model, ds, "val"), "test": evaluate_nemu(model, ds, "test")}
    if has_heldout(ds):
        metrics["heldout"] = evaluate_nemu(model, ds, "heldout")
    return model.cpu(), history, metrics


# -- NEMt ----------------------------------------------------------------------------------------
def nemt_step(
    model: NemT,
    x: torch.Tensor,
    target: torch.Tensor,
    form: str,
    only: int | None = None,
    loss: NemTLossConfig | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """One NEMt loss evaluation; `only` trains one decoder of a per-class bank (target = that class)."""
    loss = loss or NemTLossConfig(form=form)
    with torch.no_grad():
        logits, pyr = model.frozen.features(x)
    mask = model.mask_from(pyr, target, only=only, stochastic=True)
    if form == "preservation":
        out, parts = nemt_preservation_loss(
            logits, model.frozen(x * mask), mask, target, loss.preservation_weight, loss.one_sided
        )
    elif form == "deletion":
        out, parts = nemt_deletion_loss(
            logits, model.frozen(x * (1 - mask)), mask, target, loss.deletion_lambda1, loss.one_sided
        )
    else:
        raise InvalidArgument(f"unknown NEMt loss form {form!r}; use one of {NEMT_FORMS}")
    return out, {k: float(v) for k, v in parts.items()}


def evaluate_nemt(
    model: NemT, ds: SyntheticDataset, split: str = "val", limit: int | None = None, target: str = "label"
) -> dict[str, float]:
    """Held-out relevance mass etc. of the served masks (eval mode, box smoothing).

    target="label": explain the true class (as the ground truth marks the lesion of that class);
    target="argmax": explain the predicted class (target -1)."""
    model.eval()
    dev = module_device(model)
    rm, size, keep, drop = [], [], [], []
    with torch.no_grad():
        for x, y, gt in ds.batches(split, _eval_batch(ds), limit=limit):
            x, y, gt = x.to(dev), y.to(dev), gt.to(dev)
            t = y if target == "label" else torch.full_like(y, -1)
            mask, logits, label = model(x, t)
            rm.append(relevance_mass(mask, gt))
            size.append(mask.flatten(1).mean(1))
            p = logits.softmax(1).gather(1, label[:, None])[:, 0]
            keep.append(model.frozen(x * mask).softmax(1).gather(1, label[:, None])[:, 0] - p)
            drop.append(model.frozen(x * (1 - mask)).softmax(1).gather(1, label[:, None])[:, 0] - p)
    out = {
        "relevance_mass": float(torch.cat(rm).mean()),
        "mask_mean": float(torch.cat(size).mean()),
        "prob_change_keep_mask": float(torch.cat(keep).mean()),
        "prob_change_delete_mask": float(torch.cat(drop).mean()),
    }
    return out if getattr(ds, "has_masks", True) else {k: v for k, v in out.items() if k != "relevance_mass"}


def evaluate_nemt_two_findings(
    model: NemT, ds: SyntheticDataset, split: str = "val", n: int = 128, only: int | None = None
) -> dict[str, float]:
    """Targeted relevance mass on the two-finding set (datasets/two_findings.py, `n` images of `split`):
    for each image and each of its two classes k, the share of the mask on the lesion of class k
    (and on the other lesion); only=c: the targets of class c alone (one decoder of a bank)."""
    from xaiserve.training.datasets.base import to_uint8
    from xaiserve.training.datasets.two_findings import render_two_findings

    model.eval()
    dev = module_device(model)
    t = render_two_findings(n, split, seed=ds.seed, size=ds.size)
    x = ds.normalise(to_uint8(t.images)).to(dev)
    on_k, on_other = [], []
    with torch.no_grad():
        for j in (0, 1):
            k = torch.from_numpy(t.labels[:, j]).to(dev)
            sel = torch.ones_like(k, dtype=torch.bool) if only is None else k == only
            if not bool(sel.any()):
                continue
            for i in range(0, int(sel.sum()), 256):
                xs, ks = x[sel][i : i + 256], k[sel][i : i + 256]
                mask, _, _ = model(xs, ks)
                gk = torch.from_numpy(t.masks[:, j]).to(dev)[sel][i : i + 256]
                go = torch.from_numpy(t.masks[:, 1 - j]).to(dev)[sel][i : i + 256]
                on_k.append(relevance_mass(mask, gk))
                on_other.append(relevance_mass(mask, go))
    if not on_k:
        return {}
    return {
        "targeted_relevance_mass": float(torch.cat(on_k).mean()),
        "other_lesion_mass": float(torch.cat(on_other).mean()),
    }


COND_HEAD_BIAS = 2.0  # initial mask logit of the class-conditional NEMt (see train_nemt)


def train_nemt(
    frozen: nn.Module,
    ds: SyntheticDataset,
    cfg: NemTrainConfig,
    *,
    form: str = "preservation",
    conditional: bool = False,
    decoder: DecoderArch | None = None,
    smoothing: int = 21,
    one_sided: bool = False,
    two_findings_val: int = 0,
    init: dict[str, torch.Tensor] | None = None,
    checkpoint: Path | None = None,
    resume: bool = False,
    progress: bool = True,
    limit: int | None = None,
    device: torch.device | str = "cpu",
) -> tuple[NemT, list[dict], dict[str, Any]]:
    """Train a per-class NEMt bank (each decoder in turn) or one class-conditional NEMt, on
    `device` (the frozen classifier goes there with it); back on the CPU at the end.

    one_sided: only a drop of the target probability counts in the loss (handlers.nem.losses).
    two_findings_val=n: select epochs by the targeted relevance mass on n two-finding validation
    images (both targets each; per class for a bank) and report it on 100 two-finding test images.
    init: a state dict of the same NemT (decoders only are read) to continue from (a second stage)."""
    if form not in NEMT_FORMS:
        raise InvalidArgument(f"unknown NEMt loss form {form!r}; use one of {NEMT_FORMS}")
    torch.manual_seed(cfg.seed)
    k = int(frozen.output_dim)
    decoder = decoder or (NEMT_COND_DECODER if conditional else NEMT_BANK_DECODER)
    model = NemT(frozen, decoder, num_classes=k, conditional=conditional, smoothing=smoothing).to(device)
    base = {
        **asdict(cfg),
        "form": form,
        "conditional": conditional,
        "decoder": decoder.to_dict(),
        "smoothing": smoothing,
        "one_sided": one_sided,
        "two_findings_val": two_findings_val,
        "dataset": ds.describe(),
        "limit": limit,
    }
    loss_cfg = NemTLossConfig(form=form, one_sided=one_sided)
    tv = int(two_findings_val)

    def validate_cond(e):
        out = evaluate_nemt(model, ds, "val", limit=512)
        if tv:
            out.update(evaluate_nemt_two_findings(model, ds, "val", tv))
        return out

    history: list[dict] = []
    if init is not None:
        dec = {k[len("decoders.") :]: v for k, v in init.items() if k.startswith("decoders.")}
        model.decoders.load_state_dict(dec)
    if conditional:
        # Start from masks that keep most of the image (sigmoid(2) = 0.88) and let the L1 term shrink
        # them: from the default start (0.5) the shared network drove every mask of one class to 0
        # within the first epoch (sigmoid saturated, no gradient back), for every target label.
        if init is None:
            with torch.no_grad():
                model.decoders[0].head.bias.fill_(COND_HEAD_BIAS)
        opt = prodigy(model.decoders.parameters())
        gen, steps = _batches(ds, cfg.batch_size, cfg.seed, limit)
        g = torch.Generator().manual_seed(cfg.seed)

        def step(b):
            # half the targets are the true label, half uniformly random (as the per-class networks see
            # their own class half the time)
            x, y = b
            # drawn on the host (the same targets on every device), moved to the batch's device
            rand = torch.randint(0, k, (len(x),), generator=g).to(x.device)
            t = torch.where((torch.rand(len(x), generator=g) < 0.5).to(x.device), y, rand)
            return nemt_step(model, x, t, form, loss=loss_cfg)

        ck = checkpoint.with_name(checkpoint.stem + "-cond.pt") if checkpoint else None
        # one network for every label can fall into "empty mask for a whole class" (sigmoid saturated,
        # no gradient left); the epoch with the highest validation relevance mass is kept
        history = train_loop(
            LoopConfig(
                epochs=cfg.epochs,
                checkpoint=ck,
                resume=resume,
                progress=progress,
                desc=f"nemt-cond[{form}]",
                select="targeted_relevance_mass" if tv else _select(ds, "relevance_mass", "prob_change_keep_mask"),
            ),
            model,
            opt,
            gen,
            steps,
            step,
            run_config=base,
            validate=validate_cond,
            device=device,
        )
    else:
        for c in range(k):
            opt = prodigy(model.decoders[c].parameters())
            gen, steps = _batches(ds, cfg.batch_size, cfg.seed, limit, focus=c)
            ck = checkpoint.with_name(f"{checkpoint.stem}-class{c}.pt") if checkpoint else None
            h = train_loop(
                LoopConfig(
                    epochs=cfg.epochs,
                    checkpoint=ck,
                    resume=resume and ck is not None and ck.exists(),
                    progress=progress,
                    desc=f"nemt[{form}] class {c}",
                    select="targeted_relevance_mass" if tv else None,
                ),
                model.decoders[c],
                opt,
                gen,
                steps,
                lambda b, c=c: nemt_step(
                    model,
                    b[0],
                    torch.full((len(b[0]),), c, dtype=torch.int64, device=b[0].device),
                    form,
                    only=c,
                    loss=loss_cfg,
                ),
                run_config={**base, "class": c},
                validate=(lambda e, c=c: evaluate_nemt_two_findings(model, ds, "val", tv, only=c)) if tv else None,
                device=device,
            )
            history += [{**r, "class": c} for r in h]
    model.eval()
    metrics = {
        "val": evaluate_nemt(model, ds, "val"),
        "test": evaluate_nemt(model, ds, "test"),
        "test_argmax": evaluate_nemt(model, ds, "test", target="argmax"),
    }
    if tv:
        metrics["val_two_findings"] = evaluate_nemt_two_findings(model, ds, "val", tv)
        metrics["test_two_findings"] = evaluate_nemt_two_findings(model, ds, "test", 100)
    model.eval()
    return model.cpu(), history, metrics
