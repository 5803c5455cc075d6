"""NEM-U / NEMt masking networks for a user's own CNN, trained on a folder of its images.

    xaiserve train nem-u --encoder NAME[:V] --images DIR [--masks DIR] [--taps a,b,c] [--epochs N] [--device D]
    xaiserve train nemt --classifier NAME[:V] --images DIR [--labels labels.csv] [--conditional] [--device D]

1. The frozen model comes from the store in its torch form (TorchScript / torch.export via
   handlers.nets.forms, an ONNX graph converted by handlers.nets.onnx_torch, or a handlers.nets
   network), at its own input size (non-square too).
2. Its feature pyramid is found by a probe forward pass (handlers.nets.forms.find_pyramid: the last
   4-D activation at each stride 2..32; `--taps` names the layers instead) and the U-Net decoder is
   built for those strides and channels ([NEM-U] sec. 3.3; handlers.nem.decoder with `strides`).
3. The images are fitted to the model's input as the server fits requests (training/datasets/folder.py),
   a held-out split selects the epoch and gives the card's metrics.
4. Training is nem_train.train_nemu / train_nemt unchanged ([NEM-U] eq. 5-9, [NEMt] eq. 2), on
   `--device` (cpu | cuda | cuda:N | auto, xaiserve/devices.py) like the other train commands; the
   trained network comes back to the CPU for the export.
5. One ONNX graph returns the mask and the frozen model's output from one pass (the contract of
   service/registry.py), checked against the torch module, and is added to the store with a card
   (training time, held-out metrics, taps). Only the decoder's weights are kept beside it: the graph
   is what serves.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from xaiserve.errors import FailedPrecondition, InvalidArgument, NotFound
from xaiserve.handlers.loading import load_module
from xaiserve.handlers.nem.decoder import DecoderArch
from xaiserve.handlers.nem.smoothing import scaled_size
from xaiserve.handlers.nets.forms import TappedModel, example_input, tapped
from xaiserve.service.registry import ModelEntry, read_manifest
from xaiserve.training.datasets.folder import FolderDataset
from xaiserve.training.nem_export import Publication, publish
from xaiserve.training.nem_train import NemTrainConfig, train_nemt, train_nemu

USER_WIDTHS = (48, 32, 16, 8)  # decoder blocks, deepest first: one per pyramid level used (at most 4)


@dataclass(frozen=True)
class UserNemOptions:
    images: Path
    store: Path
    name: str
    version: str = "1"
    masks: Path | None = None
    labels_csv: Path | None = None
    taps: tuple[str, ...] = ()
    widths: tuple[int, ...] = ()
    epochs: int = 5
    batch_size: int = 16
    val_fraction: float = 0.2
    seed: int = 0
    limit: int | None = None
    conditional: bool = False
    form: str = "preservation"
    smoothing: int | None = None
    progress: bool = True
    device: str = (
        "cpu"  # where the decoder trains, with the frozen model (a resolved torch device); exported on the CPU
    )


def frozen_entry(store: Path, model_id: str, kind: str) -> ModelEntry:
    name, _, version = model_id.partition(":")
    cands = [e for e in read_manifest(Path(store)) if e.name == name and (not version or e.version == version)]
    if not cands:
        raise NotFound(
            f"model {model_id} is not in {store}/manifest.json (or is not valid: `xaiserve models list "
            f"--store {store}` says why); add it with `xaiserve models add`"
        )
    from xaiserve.service.registry import _version_key

    entry = max(cands, key=lambda e: _version_key(e.version))
    if entry.kind != kind:
        raise FailedPrecondition(f"model {entry.id} is a {entry.kind}, not a {kind}")
    return entry


def pyramid_model(entry: ModelEntry, store: Path, taps: Sequence[str] = ()) -> nn.Module:
    """The frozen model with a feature pyramid: handlers.nets networks have one; a user's model is tapped."""
    try:
        module = load_module(entry, Path(store))
    except FailedPrecondition as e:
        raise FailedPrecondition(
            f"{e}. A masking network reads the frozen model's inner feature maps, so it needs its torch form: "
            f"`xaiserve models add {entry.name} model.onnx --kind {entry.kind}` converts an ONNX graph to one "
            f"(onnx2torch), or give it: `xaiserve models add {entry.name} model.onnx --torch model.pt2 --kind {entry.kind}`"
        ) from None
    if callable(getattr(module, "features", None)) and getattr(module, "pyramid_channels", None) and not taps:
        return module
    s = entry.input
    return tapped(module, example_input(s.channels, s.height, s.width, batch=1), taps or None)


def decoder_arch(frozen: nn.Module, widths: Sequence[int] = ()) -> DecoderArch:
    levels = len(frozen.pyramid_channels)
    if widths:
        if not 1 <= len(widths) <= levels:
            raise InvalidArgument(f"--decoder-widths gives {len(widths)} blocks for a pyramid of {levels} levels")
        return DecoderArch(widths=tuple(int(w) for w in widths))
    return DecoderArch(widths=USER_WIDTHS[-min(4, levels) :])


def _table(split_metrics: dict[str, dict[str, float]]) -> str:
    keys = sorted({k for m in split_metrics.values() for k in m})
    rows = ["| split | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for split, m in split_metrics.items():
        rows.append(f"| {split} | " + " | ".join(f"{m[k]:.4f}" if k in m else "" for k in keys) + " |")
    return "\n".join(rows)


def train_user_nem(kind: str, model_id: str, opts: UserNemOptions) -> dict[str, Any]:
    """Train, export and publish a masking network for `model_id`; returns the manifest entry."""
    frozen_kind = "encoder" if kind == "nem_u" else "classifier"
    entry = frozen_entry(opts.store, model_id, frozen_kind)
    spec = entry.input
    frozen = pyramid_model(entry, opts.store, opts.taps)
    k = entry.output_dim or len(entry.labels)
    ds = FolderDataset(
        opts.images,
        spec,
        labels_csv=opts.labels_csv,
        masks=opts.masks,
        class_names=entry.labels,
        num_classes=k if kind == "nemt" else 0,
        val_fraction=opts.val_fraction,
        seed=opts.seed,
        limit=opts.limit,
        labelled=kind == "nemt",
    )
    if kind == "nemt" and ds.label_source == "none":
        ds.relabel(frozen)  # no labels given: NEMt explains the classifier's own decisions
    arch = decoder_arch(frozen, opts.widths)
    cfg = NemTrainConfig(epochs=opts.epochs, batch_size=opts.batch_size, seed=opts.seed)
    n_train = ds.sizes["train"]
    t0 = time.perf_counter()
    if kind == "nem_u":
        model, history, metrics = train_nemu(frozen, ds, cfg, decoder=arch, progress=opts.progress, device=opts.device)
    else:
        smoothing = opts.smoothing or scaled_size(min(spec.height, spec.width))
        model, history, metrics = train_nemt(
            frozen,
            ds,
            cfg,
            form=opts.form,
            conditional=opts.conditional,
            decoder=arch,
            smoothing=smoothing,
            progress=opts.progress,
            device=opts.device,
        )
    seconds = time.perf_counter() - t0
    passes = opts.epochs * n_train * (max(k, 1) if kind == "nemt" and not opts.conditional else 1)
    taps = [{"layer": t.layer, "stride": t.stride, "channels": t.channels} for t in getattr(frozen, "taps", ())]
    strides = list(getattr(frozen, "pyramid_strides", ())) or [2**i for i in range(len(frozen.pyramid_channels))]
    metrics_out = {
        **{s: m for s, m in metrics.items()},
        "training_seconds": round(seconds, 1),
        "training_device": str(opts.device),
        "seconds_per_1000_images": round(1000 * seconds / max(passes, 1), 2),
    }
    sections = {
        "Data": (
            f"A folder of {sum(ds.sizes.values())} of the user's images (names not recorded), fitted to the model's "
            f"{spec.channels} x {spec.height} x {spec.width} input with `{spec.resize}` as the server fits requests. "
            f"Split (seed {opts.seed}): {ds.sizes['train']} train, {ds.sizes['val']} validation, {ds.sizes['test']} test"
            + (
                " (validation and test are the same held-out images: few images)"
                if ds.sizes["val"] == ds.sizes["test"] and ds.sizes["val"] < 2
                else ""
            )
            + f". Labels: {ds.label_source}. Ground-truth masks: {'yes' if ds.has_masks else 'none (no relevance mass)'}."
        ),
        "Frozen model": (
            f"`{entry.id}` ({entry.kind}), its torch form; feature pyramid "
            + (
                ", ".join(f"`{t['layer']}` (stride {t['stride']}, {t['channels']} channels)" for t in taps)
                if taps
                else "of handlers.nets"
            )
            + (
                " (named with --taps)"
                if opts.taps
                else " (found by a probe forward pass: the last activation at each stride 2..32)"
            )
            + "."
        ),
        "Decoder": (
            f"U-Net decoder ([NEM-U] sec. 3.3) with blocks of {list(arch.widths)} channels on the "
            f"{len(arch.widths)} deepest levels (strides {strides[::-1][: len(arch.widths)]}), batch norm, sigmoid; "
            + (
                "NEM-U loss [NEM-U] eq. 5-9 (lambda1 1.5, lambda2 1)."
                if kind == "nem_u"
                else f"NEMt [NEMt] eq. 2, {opts.form} loss, "
                + ("one class-conditional network." if opts.conditional else f"one network per class ({k}).")
                + f" Smoothing {model.smoothing} x {model.smoothing} (the paper's 21 at 224 px, scaled)."
            )
        ),
        "Training": (
            f"{opts.epochs} epochs, batch {opts.batch_size}, Prodigy (lr 1, weight decay 0.01); "
            f"{seconds:.1f} s in all on {opts.device}, {metrics_out['seconds_per_1000_images']} s per 1000 images on "
            "this machine."
        ),
        "Held-out metrics": _table({s: m for s, m in metrics.items() if isinstance(m, dict)}),
    }
    pub = Publication(
        name=opts.name,
        version=opts.version,
        kind=kind,
        description=f"{'NEM-U' if kind == 'nem_u' else 'NEMt'} masking network for the user model {entry.id}, trained on a "
        f"folder of its images",
        input=dict(entry.raw["input"]),
        labels=tuple(entry.labels),
        output_dim=int(k),
        # a handlers.nets frozen model keeps its rebuildable arch (the whole network's weights are saved)
        arch={
            "type": kind,
            "frozen": (
                {"type": "user", "model": entry.id, "taps": taps, "strides": strides}
                if isinstance(frozen, TappedModel)
                else dict(entry.arch)
            ),
            "decoder": arch.to_dict(),
            **(
                {"num_classes": k, "conditional": opts.conditional, "smoothing": model.smoothing}
                if kind == "nemt"
                else {}
            ),
        },
        metrics=metrics_out,
        card_sections=sections,
        explains=entry.id,
    )
    frozen_onnx = Path(opts.store) / entry.files["onnx"] if "onnx" in entry.files else None
    return publish(opts.store, pub, model, frozen_onnx=frozen_onnx, decoder_only=isinstance(frozen, TappedModel))


__all__ = ["UserNemOptions", "decoder_arch", "pyramid_model", "train_user_nem"]
