"""The default model zoo: how each default model is trained, what its card says, how it is published.

Each `run_*` function trains one model, saves the result (state dict + arch + metrics + history) to
`<out>/<name>/result.pt`, and (unless export=False) publishes it to the model store via
`publish_result`. `publish_result` alone is what `xaiserve export` runs.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from xaiserve.errors import FailedPrecondition, InvalidArgument, NotFound
from xaiserve.handlers.loading import load_module
from xaiserve.handlers.nem.build import arch_of, build_from_arch
from xaiserve.handlers.nem.decoder import DecoderArch
from xaiserve.handlers.nem.losses import NemTLossConfig, NemULossConfig
from xaiserve.handlers.nem.smoothing import scaled_size
from xaiserve.handlers.nets import EncoderArch, FrozenSpec, frozen_spec_from_arch, load_into, load_state_dict_file
from xaiserve.service.registry import read_manifest
from xaiserve.training.datasets import get_dataset
from xaiserve.training.datasets.base import SyntheticDataset
from xaiserve.training.nem_export import Publication, publish
from xaiserve.training.nem_train import (
    COND_HEAD_BIAS,
    NEMU_DECODER,
    NEMU_DECODER_BOUNDED,
    NEMU_DECODER_GRADED,
    NemTrainConfig,
    train_nemt,
    train_nemu,
)
from xaiserve.training.ssl import SimCLRConfig, train_simclr
from xaiserve.training.supervised import ClassifierConfig, train_classifier

SCENES_DATA = (
    "**scenes** (real image content, synthetic composition): Fashion-MNIST items (Debian package "
    "`dataset-fashion-mnist`, IDX files) pasted at random positions and scales, one to three per image, "
    "tinted in random colours, on procedurally generated textured and cluttered RGB backgrounds, 64 x 64. "
    "Label = class of the largest item (10 Fashion-MNIST classes); ground truth = union of the item silhouettes "
    "(pixel-exact). Splits fixed by seed: train items from Fashion-MNIST train[:50000], val from train[50000:], "
    "test from t10k."
)
LESIONS_DATA = (
    "**lesions — SYNTHETIC data, not real patients.** Procedurally generated dermoscopy-like images, 64 x 64 RGB: "
    "textured skin, one lesion whose class (nevus, melanoma, seborrheic keratosis, vascular) is carried by its "
    "shape, border and colour pattern, and class-independent distractors (hairs, ruler marks, dermoscope vignette). "
    "Ground truth = the lesion mask (pixel-exact). Nothing here says anything about real skin lesions; "
    "do not use these models clinically."
)
PHANTOMS_DATA = (
    "**ct-phantoms — SYNTHETIC data, not real patients.** Procedurally generated CT-like axial slices rendered in "
    "Hounsfield units (xaiserve/training/datasets/phantoms.py): an elliptical body with a fat rim, two lungs with vessel "
    "dots, a vertebra, sometimes the scanner table, CT noise, and one finding whose class (lung nodule, calcification, "
    "hypodense lesion, lytic bone lesion) needs a different window to see. The model input is the window stack lung "
    "(C -600 / W 1500), soft tissue (C 40 / W 400) and bone (C 400 / W 1800) as its three channels, the mapping the "
    "manifest declares in input.dicom, so a DICOM CT slice served to it is windowed the way it was trained. Ground truth "
    "= the finding's disc (pixel-exact). This model exists to demonstrate the DICOM path end to end; it has never seen a "
    "real scan, says nothing about real findings, and must not be used clinically."
)


@dataclass(frozen=True)
class RunOptions:
    out: Path = Path("runs")
    store: Path = Path("model_store")
    version: str = "1"
    seed: int = 0
    epochs: int | None = None
    resume: bool = False
    progress: bool = True
    limit: int | None = None
    export: bool = True
    fashion_mnist: Path | None = None
    sizes: dict[str, int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"  # where the training runs (a resolved torch device: "cpu", "cuda:0"); results land on the CPU


def dataset(name: str, opts: RunOptions) -> SyntheticDataset:
    return get_dataset(name, seed=opts.seed, root=opts.fashion_mnist, sizes=opts.sizes)


def input_spec(ds: SyntheticDataset) -> dict[str, Any]:
    mean, std = ds.stats()
    spec = {"height": ds.size, "width": ds.size, "channels": 3, "mean": list(mean), "std": list(std)}
    dicom = getattr(ds, "dicom_input", None)  # how a greyscale DICOM image becomes the channels (manifest input.dicom)
    if dicom is not None:
        spec["dicom"] = dicom.to_dict()
    return spec


def save_result(opts: RunOptions, name: str, payload: dict[str, Any]) -> Path:
    payload = {**payload, "resumed": opts.resume}
    path = opts.out / name / "result.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)
    (opts.out / name / "result.json").write_text(
        json.dumps({k: v for k, v in payload.items() if k != "state_dict"}, indent=2, default=str)
    )
    return path


def load_result(opts: RunOptions, name: str) -> dict[str, Any]:
    path = opts.out / name / "result.pt"
    if not path.exists():
        raise FailedPrecondition(f"no trained result at {path}; run `xaiserve train ...` for {name} first (same --out)")
    meta = json.loads((opts.out / name / "result.json").read_text())
    meta["state_dict"] = load_state_dict_file(path, what=f"trained result of {name}")
    return meta


def frozen_from_store(store: Path, model_id: str, kind: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The frozen encoder/classifier `name[:version]` from the store, and its manifest entry as a dict."""
    try:
        entries = read_manifest(Path(store))
    except FileNotFoundError as e:
        raise FailedPrecondition(f"{e}; `xaiserve train zoo` trains the default models in order") from None
    name, _, version = model_id.partition(":")
    cands = [e for e in entries if e.name == name and (not version or e.version == version)]
    if not cands:
        raise NotFound(f"model {model_id} is not in {store}/manifest.json; train it first (`xaiserve train {kind}`)")
    entry = sorted(cands, key=lambda e: e.version)[-1]
    if entry.kind != kind:
        raise FailedPrecondition(f"model {entry.id} is a {entry.kind}, not a {kind}")
    module = load_module(entry, Path(store))
    return module, entry.raw


def _fmt(d: dict[str, Any]) -> str:
    return "\n".join(f"- {k}: {v:.4f}" if isinstance(v, float) else f"- {k}: {v}" for k, v in d.items())


def _selected_epoch(res: dict[str, Any]) -> int | None:
    """The epoch whose state the run kept by validation (training.loop's `select`), if any."""
    chosen = [r["epoch"] for r in res.get("history", []) if r.get("selected")]
    return chosen[0] if chosen else None


def _history_table(history: list[dict]) -> str:
    if not history:
        return "(no epochs recorded)"
    keys = [k for k in history[-1] if k not in ("epoch",)]
    rows = ["| epoch | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 1)]
    for r in history:
        rows.append(
            f"| {r.get('epoch')} | "
            + " | ".join(
                f"{r.get(k, float('nan')):.4g}" if isinstance(r.get(k), (int, float)) else str(r.get(k, ""))
                for k in keys
            )
            + " |"
        )
    return "\n".join(rows)


# -- frozen models -------------------------------------------------------------------------------
def run_encoder(opts: RunOptions, name: str = "scenes-simclr") -> dict[str, Any]:
    ds = dataset("scenes", opts)
    cfg = SimCLRConfig(seed=opts.seed, **({"epochs": opts.epochs} if opts.epochs else {}))
    spec = FrozenSpec()
    t0 = time.perf_counter()
    enc, history, probe = train_simclr(
        ds,
        cfg,
        spec.encoder,
        checkpoint=opts.out / name / "ckpt.pt",
        resume=opts.resume,
        progress=opts.progress,
        limit=opts.limit,
        device=opts.device,
    )
    res = {
        "name": name,
        "kind": "encoder",
        "arch": spec.to_arch(),
        "state_dict": enc.state_dict(),
        "dataset": ds.describe(),
        "input": input_spec(ds),
        "labels": list(ds.labels),
        "output_dim": spec.encoder.embed_dim,
        "config": asdict(cfg),
        "history": history,
        "metrics": {**probe, "train_seconds": round(time.perf_counter() - t0, 1)},
        "limit": opts.limit,
    }
    save_result(opts, name, res)
    return res


# classifiers smaller than the default EncoderArch, per dataset (the DICOM demo model stays under 3 MB with its NEMt;
# torch 2.13 CPU aborted (double free in backward) with stems 8 and 12 before a 16-wide first stage, hence 16)
CLASSIFIER_ARCH = {"ct-phantoms": EncoderArch(stem=16, widths=(16, 32, 64))}


def run_classifier(opts: RunOptions, name: str, data: str) -> dict[str, Any]:
    ds = dataset(data, opts)
    cfg = ClassifierConfig(seed=opts.seed, **({"epochs": opts.epochs} if opts.epochs else {}))
    spec = FrozenSpec(encoder=CLASSIFIER_ARCH.get(data, EncoderArch()), num_classes=ds.num_classes)
    t0 = time.perf_counter()
    model, history, metrics = train_classifier(
        ds,
        cfg,
        spec.encoder,
        checkpoint=opts.out / name / "ckpt.pt",
        resume=opts.resume,
        progress=opts.progress,
        limit=opts.limit,
        device=opts.device,
    )
    res = {
        "name": name,
        "kind": "classifier",
        "arch": spec.to_arch(),
        "state_dict": model.state_dict(),
        "dataset": ds.describe(),
        "input": input_spec(ds),
        "labels": list(ds.labels),
        "output_dim": ds.num_classes,
        "config": asdict(cfg),
        "history": history,
        "metrics": {**metrics, "train_seconds": round(time.perf_counter() - t0, 1)},
        "limit": opts.limit,
        "default_method": getattr(ds, "default_method", ""),  # manifest default_method
    }
    save_result(opts, name, res)
    return res


# -- masking networks ----------------------------------------------------------------------------
NEMU_SHIFT = 6  # px of random translation in the scenes-nemu recipe (2026-12)


@dataclass(frozen=True)
class NemuRecipe:
    """What a `--nemu-recipe` changes (docs/METHODS.md, NEM-U); every other setting is shared."""

    decoder: DecoderArch
    families: bool = True  # the background families (TRAIN_FAMILIES; HELDOUT_FAMILIES make `heldout`), else legacy
    item_variety: bool = False  # the train split's items rendered with datasets.scenes.ItemVariety
    flip_consistency: float = 0.0  # weight of nem_train.flip_inconsistency (each batch with its mirror)


NEMU_RECIPES: dict[str, NemuRecipe] = {
    "original": NemuRecipe(NEMU_DECODER, families=False),  # the earlier zero-padded decoder, legacy background
    "families": NemuRecipe(NEMU_DECODER_BOUNDED),  # replicate padding, bounded logit (2026-12)
    "graded": NemuRecipe(NEMU_DECODER_GRADED),  # + the graded head: the served scenes-nemu
    "varied": NemuRecipe(NEMU_DECODER_GRADED, item_variety=True),  # not served
    "consistent": NemuRecipe(NEMU_DECODER_GRADED, flip_consistency=1.0),  # not served
}


def run_nemu(
    opts: RunOptions, name: str = "scenes-nemu", encoder: str = "scenes-simclr:1", recipe: str = "original"
) -> dict[str, Any]:
    """recipe="original": the committed scenes-nemu before 2026-12 (original background, zero-padded
    decoder, epoch picked by validation relevance mass). The others (NEMU_RECIPES, 2026-12): trained on
    the scenes background families (datasets/scenes.py TRAIN_FAMILIES; HELDOUT_FAMILIES make the
    `heldout` split, never seen in training or selection), normalised with the frozen encoder's own
    statistics, replicate-padded bounded decoder, random translations, the epoch picked by the
    validation localisation (relevance mass + pointing game) / 2."""
    from xaiserve.training.datasets.scenes import scenes_families

    if recipe not in NEMU_RECIPES:
        raise InvalidArgument(f"NEM-U recipe {recipe!r}: use one of {', '.join(NEMU_RECIPES)}")
    r = NEMU_RECIPES[recipe]
    fam, arch, cons = r.families, r.decoder, r.flip_consistency
    loss = NemULossConfig()
    frozen, fentry = frozen_from_store(opts.store, encoder, "encoder")
    ds: SyntheticDataset
    if fam:
        fds = scenes_families(opts.fashion_mnist, seed=opts.seed, sizes=opts.sizes, item_variety=r.item_variety)
        fds.use_stats(fentry["input"]["mean"], fentry["input"]["std"])  # the encoder's normalisation, as served
        ds = fds
    else:
        ds = dataset("scenes", opts)
    cfg = NemTrainConfig(seed=opts.seed, **({"epochs": opts.epochs} if opts.epochs else {}))
    t0 = time.perf_counter()
    model, history, metrics = train_nemu(
        frozen,
        ds,
        cfg,
        decoder=arch,
        loss=loss,
        shift=NEMU_SHIFT if fam else 0,
        select="localisation" if fam else "relevance_mass",
        keep_epochs=opts.out / name / "epochs" if fam else None,
        flip_consistency=cons,
        checkpoint=opts.out / name / "ckpt.pt",
        resume=opts.resume,
        progress=opts.progress,
        limit=opts.limit,
        device=opts.device,
    )
    res = {
        "name": name,
        "kind": "nem_u",
        "arch": arch_of(model, fentry["arch"], loss=asdict(loss)),
        "state_dict": model.state_dict(),
        "dataset": ds.describe(),
        "input": fentry["input"],
        "labels": fentry.get("labels", []),
        "output_dim": fentry["output_dim"],
        "explains": f"{fentry['name']}:{fentry['version']}",
        "config": asdict(cfg),
        **({"shift": NEMU_SHIFT, "select": "localisation", "recipe": recipe} if fam else {}),
        **({"flip_consistency": cons} if cons else {}),
        "history": history,
        "metrics": {**metrics, "train_seconds": round(time.perf_counter() - t0, 1)},
        "limit": opts.limit,
    }
    save_result(opts, name, res)
    return res


def run_nemt(
    opts: RunOptions,
    name: str,
    classifier: str = "lesions-classifier:1",
    form: str = "auto",
    conditional: bool = False,
    smoothing: int | None = None,
    ablate_smoothing: int | None = None,
    one_sided: bool = False,
    two_findings: float = 0.0,
    two_findings_val: int = 256,
    pretrain: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """form="auto": train both loss forms and keep the one with the higher validation relevance mass.

    smoothing=None: the paper's 21 x 21 scaled to the image size (handlers.nem.smoothing.scaled_size).
    ablate_smoothing=k: also train the chosen form with a k x k neighbourhood (reported, not served).
    two_findings=share (lesions only): train on the lesions set with that share of two-finding images
    (datasets/two_findings.py), select epochs and the form by the targeted relevance mass on
    `two_findings_val` two-finding validation images. one_sided: only a drop of the target
    probability counts in the loss (handlers.nem.losses).
    pretrain={"epochs": n, "form": f[, "smoothing": k]}: a first stage on the single-lesion set with the
    two-sided loss `f` and a k x k neighbourhood (default: the scaled paper size; the recipe of the
    models before the two-finding images); every form of the second stage continues from its weights. opts.extra["init_from"] = "name:version[,name:version...]": the entry
    named `name` skips the first stage and takes that store model's weights instead (a model trained
    by the first-stage recipe alone, not an earlier two-stage result; the card says which)."""
    frozen, fentry = frozen_from_store(opts.store, classifier, "classifier")
    data = str(fentry.get("arch", {}).get("dataset", "lesions"))
    if two_findings and data != "lesions":
        raise FailedPrecondition(f"two-finding images exist for the lesions set only, not {data!r}")
    if two_findings:
        from xaiserve.training.datasets.two_findings import lesions_with_two_findings

        ds: SyntheticDataset = lesions_with_two_findings(seed=opts.seed, sizes=opts.sizes, share=float(two_findings))
    else:
        ds = dataset(data, opts)
    tv = int(two_findings_val) if two_findings else 0
    if smoothing is None:
        smoothing = scaled_size(ds.size)
    cfg = NemTrainConfig(seed=opts.seed, **({"epochs": opts.epochs} if opts.epochs else {}))
    forms = ("preservation", "deletion") if form == "auto" else (form,)
    results: dict[str, Any] = {}
    t0 = time.perf_counter()
    pretrain = {**pretrain, "smoothing": pretrain.get("smoothing") or scaled_size(ds.size)} if pretrain else None
    init, stage1 = _nemt_stage1(opts, name, frozen, fentry, data, conditional, smoothing, pretrain)
    for f in forms:
        model, history, metrics = train_nemt(
            frozen,
            ds,
            cfg,
            form=f,
            conditional=conditional,
            smoothing=smoothing,
            one_sided=one_sided,
            two_findings_val=tv,
            init=init,
            checkpoint=opts.out / name / f"ckpt-{f}.pt",
            resume=opts.resume,
            progress=opts.progress,
            limit=opts.limit,
            device=opts.device,
        )
        results[f] = (model, history, metrics)

    def score(f: str) -> float:
        m = results[f][2]
        return m["val_two_findings"]["targeted_relevance_mass"] if tv else m["val"]["relevance_mass"]

    best = max(results, key=score)
    model, history, metrics = results[best]
    comparison = {f: results[f][2] for f in results}
    ablation = {}
    if ablate_smoothing and ablate_smoothing != smoothing:
        _, _, abl = train_nemt(
            frozen,
            ds,
            cfg,
            form=best,
            conditional=conditional,
            smoothing=ablate_smoothing,
            one_sided=one_sided,
            two_findings_val=tv,
            checkpoint=opts.out / name / f"ckpt-{best}-s{ablate_smoothing}.pt",
            resume=opts.resume,
            progress=opts.progress,
            limit=opts.limit,
            device=opts.device,
        )
        ablation = {str(smoothing): metrics, str(ablate_smoothing): abl}
    res = {
        "name": name,
        "kind": "nemt",
        "arch": arch_of(
            model, fentry["arch"], loss_form=best, loss=asdict(NemTLossConfig(form=best, one_sided=one_sided))
        ),
        "state_dict": model.state_dict(),
        "dataset": ds.describe(),
        "input": fentry["input"],
        "labels": fentry.get("labels", []),
        "output_dim": fentry["output_dim"],
        "explains": f"{fentry['name']}:{fentry['version']}",
        "config": asdict(cfg),
        "history": history,
        "metrics": {
            **metrics,
            "loss_form": best,
            "form_comparison": comparison,
            **({"smoothing_ablation": ablation} if ablation else {}),
            **({"stage1": stage1} if stage1 else {}),
            "train_seconds": round(time.perf_counter() - t0, 1),
        },
        "conditional": conditional,
        "smoothing": smoothing,
        "limit": opts.limit,
    }
    save_result(opts, name, res)
    return res


def _nemt_stage1(
    opts: RunOptions,
    name: str,
    frozen: torch.nn.Module,
    fentry: dict[str, Any],
    data: str,
    conditional: bool,
    smoothing: int,
    pretrain: dict[str, Any] | None,
) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any]]:
    """The first stage's weights (trained here, or a store model's with opts.extra["init_from"]) and its record."""
    if not pretrain:
        return None, {}
    smoothing1 = int(pretrain.get("smoothing") or smoothing)
    src = next((m for m in str(opts.extra.get("init_from") or "").split(",") if m.partition(":")[0] == name), "")
    if src:
        module, entry = frozen_from_store(opts.store, src, "nemt")
        if "stage1" in entry.get("metrics", {}):
            raise FailedPrecondition(f"{src} is itself a two-stage result; give a first-stage model (or none)")
        arch = entry.get("arch", {})
        if bool(arch.get("conditional")) != conditional or int(arch.get("smoothing", -1)) != smoothing1:
            raise FailedPrecondition(f"{src} is not a first stage of {name} (conditional/smoothing differ)")
        if entry.get("explains") != f"{fentry['name']}:{fentry['version']}":
            raise FailedPrecondition(
                f"{src} explains {entry.get('explains')}, not {fentry['name']}:{fentry['version']}"
            )
        return module.state_dict(), {
            "from_store": f"{entry['name']}:{entry['version']}",
            "smoothing": smoothing1,
            "form": arch.get("loss_form"),
            "test_relevance_mass": entry.get("metrics", {}).get("test", {}).get("relevance_mass"),
        }
    cfg = NemTrainConfig(seed=opts.seed, epochs=int(pretrain["epochs"]))
    form = str(pretrain.get("form", "preservation"))
    model, history, metrics = train_nemt(
        frozen,
        dataset(data, opts),
        cfg,
        form=form,
        conditional=conditional,
        smoothing=smoothing1,
        checkpoint=opts.out / name / f"ckpt-stage1-{form}.pt",
        resume=opts.resume,
        progress=opts.progress,
        limit=opts.limit,
        device=opts.device,
    )
    return model.state_dict(), {
        "epochs": cfg.epochs,
        "form": form,
        "smoothing": smoothing1,
        "test_relevance_mass": metrics["test"]["relevance_mass"],
    }


def _stage1_text(s1: dict[str, Any], name: str) -> str:
    """The card's account of a two-stage NEMt: where stage 1's weights came from (run_nemt `pretrain`)."""
    k = int(s1.get("smoothing") or 0)
    text = (
        "Stage 1 (the recipe of the models before the two-finding images): the single-lesion set, the two-sided "
        f"{s1.get('form') or 'preservation'} loss, a {k}x{k} neighbourhood"
    )
    tm = s1.get("test_relevance_mass")
    tm_s = f"test relevance mass {tm:.4f}" if isinstance(tm, (int, float)) else "test relevance mass not recorded"
    if "from_store" in s1:
        text += (
            f"; its weights were taken from the store model `{s1['from_store']}` as it was before this retraining "
            f"(`--init-from`; trained by stage 1 alone, {tm_s}), not trained in this run. A from-scratch "
            f"`xaiserve train zoo --only {name}` trains stage 1 itself (docs/evaluation/README.md gives its figures)."
        )
    else:
        text += f", {s1.get('epochs')} epochs per network, trained in this run ({tm_s})."
    return text + (
        " Stage 2 (the sections below): every loss form continues from the stage-1 weights on the set with two-finding images."
    )


# -- publishing ----------------------------------------------------------------------------------
def _card(res: dict[str, Any]) -> dict[str, str]:
    kind = res["kind"]
    data = {"lesions": LESIONS_DATA, "ct-phantoms": PHANTOMS_DATA}.get(res["dataset"]["name"], SCENES_DATA)
    ds = res["dataset"]
    sections = {
        "Data": data
        + f"\n\nSplit sizes: {ds['splits']} (seed {ds['seed']}); labels: {', '.join(ds['labels'])}."
        + (f"\n\nTraining used only the first {res['limit']} training images." if res.get("limit") else "")
        + (
            f"\n\nTraining mix: a share {ds['two_findings']:g} of every split are **two-finding images** "
            "(xaiserve/training/datasets/two_findings.py: two lesions of different classes at 0.7 of the radius, one per "
            "image half, plus the distractors), each labelled with ONE of its two classes (drawn per image) and that "
            "lesion as its ground truth; the rest are the single-lesion images. The two-finding images of the "
            "evaluation (`render_two_findings`, val and test) come from another random stream."
            if ds.get("two_findings")
            else ""
        ),
    }
    m = res["metrics"]
    cfg = res["config"]
    arch = res["arch"]
    if kind == "encoder":
        sections["Model"] = (
            f"Self-supervised ResNet-style encoder (plain torch, handlers.nets.PyramidEncoder), stem {arch['stem']} channels, "
            f"stages {arch['widths']}, {arch['blocks']} basic blocks; embedding = global average pool of the last stage "
            f"({res['output_dim']}-d). Feature pyramid taps (U-Net skips for NEM-U): channels {arch['pyramid']} at strides "
            f"{arch['pyramid_strides']}.\n\nTraining: SimCLR (NT-Xent, temperature {cfg['temperature']}), projection head 2-layer MLP "
            f"to {cfg['proj_dim']}-d (discarded), augmentations written in torch: random resized crop (0.25-1) + flip, colour jitter "
            f"(p=0.8: brightness/contrast/saturation 0.4, hue 0.1), grayscale (p=0.2), and background augmentation "
            f"(BG_Swap of Ryali et al. 2021, p={cfg.get('bg_swap', 0)} per view: pixels outside the items replaced by an item-free "
            "background; the foreground comes from the dataset's item masks instead of a saliency model - no labels are used); "
            f"AdamW lr {cfg['lr']} cosine, batch {cfg['batch_size']}, {cfg['epochs']} epochs, seed {cfg['seed']}."
            + (
                " This run was resumed with more epochs: the cosine schedule restarted at the resumed epoch (warm restart; "
                "see the history)."
                if res.get("resumed")
                else ""
            )
        )
        sections["Metrics"] = (
            "Linear probe (logistic regression, L-BFGS, on frozen standardised embeddings of the train split; label = class of the "
            "largest item):\n" + _fmt({k: v for k, v in m.items()})
        )
        sections["Limitations"] = (
            "A small encoder trained for minutes on a CPU: the representation is weak (chance is 10 %); it is meant as a realistic "
            "frozen model to explain, not as a good Fashion-MNIST feature extractor. Without the background augmentation, SimCLR "
            "matched the two views by their shared background texture (probe 16.6 % after 4 epochs) and NEM-U then masked the "
            "background instead of the items."
        )
    elif kind == "classifier":
        sections["Model"] = (
            f"Supervised classifier: the same ResNet-style encoder (stem {arch['stem']}, stages {arch['widths']}) + a linear head "
            f"({res['output_dim']} classes, logits out). Cross-entropy, AdamW lr {cfg['lr']} cosine, batch {cfg['batch_size']}, "
            f"{cfg['epochs']} epochs, flips as augmentation, seed {cfg['seed']}."
        )
        sections["Metrics"] = _fmt(m)
        if res["dataset"]["name"] == "ct-phantoms":
            sections["Serving (the DICOM demo)"] = (
                "Takes greyscale CT as DICOM: the server windows the slice with the three windows of the manifest's "
                "input.dicom (lung, soft tissue, bone) into the three channels, as the training data were. Explained with "
                "the gradient methods, e.g. `xaiserve explain CT_small.dcm --model ct-phantoms-classifier --out result.seg.dcm` "
                "(saliency is its manifest default_method) (on 64 test slices: plain saliency puts its maximum within 2 pixels of the finding "
                "for 66 % of them; the findings cover 0.5 % of the image). There is no NEMt for it: trained on this data "
                "for 1-3 epochs per network, the preservation loss drove every mask to 0 (class-conditional and per-class "
                "alike; the findings are a few pixels and the classifier needs their context, so no small mask preserves "
                "its output) and the deletion loss on logits drove them to 1 (the squared logit change, ~10^4, outweighs "
                "the L1 term)."
            )
        if res["dataset"]["name"] == "scenes":
            sections["Limitations"] = (
                "The task (class of the largest of up to three randomly tinted items on cluttered, textured backgrounds) is hard for "
                "this small network and a CPU budget of minutes: the accuracy is modest, and explanations of this classifier show "
                "what a mediocre model uses, not what a good one would."
            )
    elif kind == "nem_u":
        sections["Model"] = (
            f"NEM-U ([NEM-U], sec. 3.3): U-Net decoder (blocks of widths {arch['decoder']['widths']}, deepest first, on the "
            f"{len(arch['decoder']['widths'])} deepest pyramid taps of the frozen encoder `{res['explains']}`"
            + (f", {arch['decoder']['pad']}-padded convolutions" if arch["decoder"].get("pad") else "")
            + (
                f"; mask logit l bounded as {arch['decoder']['logit_bound']:g} tanh(l / {arch['decoder']['logit_bound']:g})"
                if arch["decoder"].get("logit_bound")
                else ""
            )
            + (
                f"; graded head: the last block ends in a leaky ReLU (slope {arch['decoder']['head_slope']:g}), so no "
                "plateau of dead units ties the mask's maximum (docs/METHODS.md, NEM-U)"
                if arch["decoder"].get("head_slope")
                else ""
            )
            + "; the mask logits are bilinearly upsampled to 64 x 64, then a sigmoid). Only the decoder trains. Loss eq. 5-9: "
            "(lambda1 - N_d) P_d + lambda2 ||m||_1 with lambda1 = 1.5, lambda2 = 1, ||m||_1 as the pixel mean, pixel scaling on the "
            f"normalised input (0 = dataset mean). Prodigy (lr 1, weight decay 0.01, safeguard warm-up), batch {cfg['batch_size']}, "
            f"{cfg['epochs']} epochs, "
            + (
                f"random translations up to {res['shift']} px (reflect padding) and horizontal flips"
                if res.get("shift")
                else "no augmentation"
            )
            + (
                f"; each batch with its mirror and {res['flip_consistency']:g} mean|m(x) - flip(m(flip x))| added "
                "(mirror consistency, beyond [NEM-U])"
                if res.get("flip_consistency")
                else ""
            )
            + (
                "; training items rendered with variety (ScenesConfig.item_variety)"
                if res["dataset"].get("item_variety")
                else ""
            )
            + f", seed {cfg['seed']}."
        )
        if res["dataset"].get("families"):
            sections["Data"] = sections.get("Data", "") + (
                f"\n\nBackground families (datasets/scenes.py): train/val/test draw from {res['dataset']['families']} "
                f"with colour/contrast jitter; {res['dataset']['heldout_families']} are held out (never in training or epoch "
                f"selection) and make the `heldout` split ({res['dataset']['heldout_size']} images, test items). Images are "
                "normalised with the frozen encoder's statistics (the served input)."
            )
        sections["Metrics"] = (
            "On held-out splits (masks min-max normalised; relevance mass = positive mass inside the ground truth / total; "
            "fidelity = cos(Phi(x), Phi(x*m))):\n"
            + json.dumps({k: m[k] for k in ("val", "test", "heldout") if k in m}, indent=1)
            + "\n\nThe full comparison with RELAX and the gradient baselines is `xaiserve evaluate explanations`."
        )
        chosen = _selected_epoch(res)
        epochs_text = (
            f"{cfg['epochs']} epochs as in the paper"
            if cfg["epochs"] == 10
            else f"{cfg['epochs']} epochs instead of the paper's 10"
        )
        sections["Deviations"] = (
            epochs_text
            + (
                f"; the decoder of epoch {chosen}, the one with the highest "
                + (
                    "localisation ((relevance mass + pointing game) / 2)"
                    if res.get("select") == "localisation"
                    else "relevance mass"
                )
                + " on 512 validation images, is kept (model selection on the validation split: the paper does not say how it picked its "
                "checkpoint; the test split is not used)"
                if chosen is not None
                else ""
            )
            + ". The decoder is far smaller than the paper's 9-10 M parameters (64 x 64 inputs; latency target at most 2x the "
            "frozen encoder)."
        )
    elif kind == "nemt":
        comp = m.get("form_comparison", {})
        rows = [
            "| loss form | val relevance mass | test relevance mass | test mask mean | test prob. change (keep mask) | test prob. change (delete mask) |",
            "|---|---|---|---|---|---|",
        ]
        for f, r in comp.items():
            rows.append(
                f"| {f} | {r['val']['relevance_mass']:.4f} | {r['test']['relevance_mass']:.4f} | {r['test']['mask_mean']:.4f} | "
                f"{r['test']['prob_change_keep_mask']:+.4f} | {r['test']['prob_change_delete_mask']:+.4f} |"
            )
        cond = arch.get("conditional")
        sections["Model"] = (
            (
                "Class-conditional NEMt (beyond the papers): ONE U-Net decoder whose blocks are FiLM-modulated by the target label "
                "(h <- h (1 + gamma_c) + beta_c), trained with the true label as the target for half of the images and a uniformly "
                "random target for the other half. The mask head starts at logit "
                f"{COND_HEAD_BIAS:g} (masks that keep most of the image) and the epoch with the highest validation relevance "
                f"mass (512 images) is kept (epoch {_selected_epoch(res) or 'the last'}): from the default start the shared network once "
                "collapsed every mask of the nevus class to zero, for every target label, within the first epoch."
                if cond
                else f"NEMt ([NEMt]): one masking network per target label ({res['output_dim']} U-Net decoders; decoder c is trained to "
                "explain label c on all training images of class c plus as many other images drawn afresh each epoch), bundled in one "
                "ONNX graph: the decoders run fused (grouped convolutions), the `target` input selects one."
            )
            + f" Decoder widths {arch['decoder']['widths']} on the deepest pyramid taps of the frozen classifier `{res['explains']}`; "
            "sigmoid, then stochastic weighted neighbourhood averaging (sec. 3.2.2): a random positive "
            f"{arch['smoothing']}x{arch['smoothing']} kernel summing to 1 per sample and training forward pass. Target -1 = the classifier's "
            f"argmax. Prodigy, batch {cfg['batch_size']}, {cfg['epochs']} epochs per network, seed {cfg['seed']}."
        )
        if m.get("stage1"):
            sections["Training stages"] = _stage1_text(m["stage1"], res["name"])
        sections["Loss form"] = (
            (
                "Both forms of METHODS.md were trained; the default is the one with the higher validation relevance mass: "
                if len(comp) > 1
                else "One form was trained, the one chosen for the per-class networks by validation relevance mass: "
            )
            + f"**{m.get('loss_form')}**.\n\n- preservation (authors' code): ||m||_1 + 2 (softmax(Phi(x*m))_c - softmax(Phi(x))_c)^2\n"
            "- deletion (eq. 2, read with the mask marking the deleted region, because the literal x*Psi(x) is minimised by m = 0): "
            "-(softmax(Phi(x))_c - softmax(Phi(x*(1-m)))_c)^2 + 0.5 ||m||_1 on probabilities (bounded, as the authors' "
            "inverse option)\n\n"
            + (
                "**One-sided (beyond the papers)**: only a DROP of the target probability counts, relu(p - p_m)^2 in the "
                "preservation form and relu(p - p_del)^2 in the deletion form. With two lesions of different classes the "
                "classifier gives the target about 0.5; keeping only lesion k raises it to 0.94 and deleting the other "
                "lesion raises it to 0.95 (100 two-finding validation images), so the two-sided terms reward keeping both "
                "lesions or deleting the wrong one.\n\n"
                if arch.get("loss", {}).get("one_sided")
                else ""
            )
            + "\n".join(rows)
            + "\n\n(targets = true labels; masks min-max normalised before the relevance mass)"
        )
        sections["Inference-time smoothing"] = (
            f"Serving is deterministic: the random kernel is replaced by its expectation, the uniform {arch['smoothing']}x"
            f"{arch['smoothing']} box (reflect padding; the authors' code pads circularly). E[smooth(m)] = box(m) because the "
            "normalised i.i.d. weights each have expectation 1/k^2."
        )
        abl = m.get("smoothing_ablation")
        if abl:
            rows = [
                "| neighbourhood | val relevance mass | test relevance mass | test mask mean | test prob. change (keep mask) |",
                "|---|---|---|---|---|",
            ]
            for k_, r in abl.items():
                rows.append(
                    f"| {k_}x{k_}{' (served)' if int(k_) == arch['smoothing'] else ''} | {r['val']['relevance_mass']:.4f} | "
                    f"{r['test']['relevance_mass']:.4f} | {r['test']['mask_mean']:.4f} | {r['test']['prob_change_keep_mask']:+.4f} |"
                )
            sections["Smoothing neighbourhood (ablation)"] = (
                "The paper's 21 x 21 neighbourhood was chosen for 224 x 224 images ([NEMt], Table A.2: robust to the size); at 64 x 64 "
                "it spans a third of the image. **Deviation from the paper (the default of docs/METHODS.md since 2026-12):** the served network keeps the "
                "paper's relative extent, 21 * 64 / 224 rounded up to the odd 7 x 7; the literal 21 x 21 was trained with the same "
                "loss form and budget for comparison (`--smoothing 21` serves it):\n\n" + "\n".join(rows)
            )
        if "test_two_findings" in m:
            rows = [
                "| loss form | val: mass on lesion k | val: on the other lesion | test: mass on lesion k | test: on the other lesion |",
                "|---|---|---|---|---|",
            ]
            for f, r in comp.items():
                v, t = r.get("val_two_findings", {}), r.get("test_two_findings", {})
                if v:
                    rows.append(
                        f"| {f}{' (served)' if f == m.get('loss_form') else ''} | {v['targeted_relevance_mass']:.4f} | "
                        f"{v['other_lesion_mass']:.4f} | {t['targeted_relevance_mass']:.4f} | {t['other_lesion_mass']:.4f} |"
                    )
            sections["Where is class k (two-finding images)"] = (
                "Targeted relevance mass: for each two-finding image and each of its two classes k, the share of the "
                "(min-max normalised) mask on the lesion of class k and on the other lesion. Epochs "
                + ("(per class) " if not cond else "")
                + "and the loss form were selected on 256 two-finding VALIDATION images (both targets each); test = 100 "
                "two-finding test images (the images of docs/evaluation/targeted_two_findings.md, where GradCAM and "
                "Integrated Gradients are compared). Target >= 0.8.\n\n" + "\n".join(rows)
            )
        sections["Metrics"] = json.dumps(
            {k: m[k] for k in ("val", "test", "test_argmax", "val_two_findings", "test_two_findings") if k in m},
            indent=1,
        )
    sections["Training history"] = _history_table(res.get("history", []))
    return sections


DESCRIPTIONS = {
    "encoder": "SimCLR ResNet-style encoder on scenes (Fashion-MNIST composites); exposes a feature pyramid",
    "classifier": "ResNet-style classifier",
    "nem_u": "NEM-U masking network ([NEM-U])",
    "nemt": "NEMt masking network with target labels ([NEMt])",
}


def publish_result(opts: RunOptions, name: str) -> dict[str, Any]:
    res = load_result(opts, name)
    kind = res["kind"]
    if kind in ("encoder", "classifier"):
        module = frozen_spec_from_arch(res["arch"], what=name).build()
    else:
        module = build_from_arch(kind, res["arch"], what=name)
    load_into(module, res["state_dict"], name)
    desc = DESCRIPTIONS[kind]
    if kind == "classifier":
        desc += f" on {res['dataset']['name']}" + {
            "lesions": " (synthetic lesions)",
            "ct-phantoms": " (synthetic CT phantoms, window stack)",
        }.get(res["dataset"]["name"], " (Fashion-MNIST composites)")
    if kind == "nemt":
        desc += (
            ", class-conditional (FiLM)" if res["arch"].get("conditional") else ", per-class networks"
        ) + f", {res['metrics'].get('loss_form')} loss"
    metrics = {k: v for k, v in res["metrics"].items() if k not in ("form_comparison", "smoothing_ablation")}
    for key in ("form_comparison", "smoothing_ablation"):
        if key in res["metrics"]:
            metrics[key] = {
                f: {s: r[s]["relevance_mass"] for s in ("val", "test")} for f, r in res["metrics"][key].items()
            }
    sections = _card(res)
    if kind == "nemt" and res["arch"].get("conditional"):
        peer = _per_class_peer(opts, res)
        if peer is not None:
            sections["Class-conditional vs per-class networks"] = peer[0]
            metrics["compared_with_per_class"] = peer[1]
    pub = Publication(
        name=name,
        version=opts.version,
        kind=kind,
        description=desc,
        input=res["input"],
        labels=tuple(res["labels"]),
        output_dim=int(res["output_dim"]),
        arch={**res["arch"], "dataset": res["dataset"]["name"]},
        metrics=metrics,
        card_sections=sections,
        explains=res.get("explains", ""),
        default_method=res.get("default_method", ""),
    )
    frozen_onnx = None
    if res.get("explains"):
        try:
            fe = [e for e in read_manifest(opts.store) if e.id == res["explains"]]
            frozen_onnx = opts.store / fe[0].files["onnx"] if fe and "onnx" in fe[0].files else None
        except FileNotFoundError:
            frozen_onnx = None
    return publish(opts.store, pub, module, frozen_onnx=frozen_onnx)


def _per_class_peer(opts: RunOptions, res: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """Same metrics for the per-class NEMt bank on the same classifier (from its trained result under --out)."""
    for cand in sorted(opts.out.glob("*/result.json")):
        try:
            other = json.loads(cand.read_text())
        except (OSError, ValueError):
            continue
        if (
            other.get("kind") == "nemt"
            and not other.get("arch", {}).get("conditional")
            and other.get("explains") == res.get("explains")
        ):
            rows = [
                "| model | split | relevance mass | mask mean | prob. change (keep mask) | prob. change (delete mask) |",
                "|---|---|---|---|---|---|",
            ]
            out = {}
            for label, r in (
                (f"per-class `{other['name']}` ({other['metrics'].get('loss_form')})", other["metrics"]),
                (f"class-conditional `{res['name']}`", res["metrics"]),
            ):
                for split in ("val", "test", "test_argmax"):
                    m = r[split]
                    rows.append(
                        f"| {label} | {split} | {m['relevance_mass']:.4f} | {m['mask_mean']:.4f} | "
                        f"{m['prob_change_keep_mask']:+.4f} | {m['prob_change_delete_mask']:+.4f} |"
                    )
            out = {
                "per_class_test_relevance_mass": other["metrics"]["test"]["relevance_mass"],
                "conditional_test_relevance_mass": res["metrics"]["test"]["relevance_mass"],
            }
            text = (
                "Same data, classifier, smoothing and training budget (per-class: K networks x 3 epochs on class-balanced halves; "
                "conditional: 6 epochs on all images). `test_argmax` explains the predicted class, `val`/`test` the true label.\n\n"
                + "\n".join(rows)
            )
            return text, out
    return None
