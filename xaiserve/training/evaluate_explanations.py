"""Evaluate explanation methods on a held-out test split: the papers' scores and speed, one table per model.

For one dataset and one frozen model from the model store, every method explains the same first n
test images one at a time (batch 1, as a client would ask), and each map is scored against the
image's ground truth (union of object masks) with training/metrics.py:

    pointing game, top-k intersection, relevance rank, relevance mass, complexity, sparseness (maps vs ground truth),
    fidelity cos(Phi(x), Phi(x*m)) and accuracy-per-complexity ([NEM-U] Appendix A, Table 3; for a
    classifier Phi = its softmax probabilities, see `_score`),
    monotonicity (Nguyen & Martinez 2020; classifiers only), mean seconds per image.

Methods (rows):
- the masking networks (NEM-U on an encoder; NEMt, default and class-conditional, on a classifier),
  run through their ONNX graphs as the service runs them;
- RELAX and U-RELAX (handlers.relax; one run gives both maps, so both rows carry its time); for a
  classifier RELAX explains the logit vector (label-free), the others explain the target class;
- gradient baselines (handlers.saliency) on the frozen torch module;
- "random (reference)": i.i.d. uniform noise maps, the chance level of every metric.

Targets for classifiers are the true labels, as in [NEMt] sec. 4.2 ("we explain the channel
belonging to the true target label"). Timing: wall time of each explanation call after one warm-up
call, same thread count for torch and ONNX Runtime; the metric computation is not timed.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from xaiserve.errors import FailedPrecondition, InvalidArgument, NotFound
from xaiserve.handlers.saliency import SaliencyConfig, attribute, methods_for
from xaiserve.paths import DEFAULT_STORE
from xaiserve.service.registry import ModelEntry, Registry, RegistryConfig
from xaiserve.training import metrics as M

DEFAULT_MASK_MODELS = {"scenes": ("scenes-nemu",), "lesions": ("lesions-nemt", "lesions-nemt-cond")}
DEFAULT_FROZEN = {"scenes": "scenes-simclr", "lesions": "lesions-classifier"}
FOLDER = "folder"  # EvalConfig.dataset for a user's folder of images
METHOD_TITLES = {
    "saliency": "Saliency (eq. 14)",
    "guided_backprop": "Guided backprop (eq. 15)",
    "smoothgrad": "SmoothGrad (eq. 16)",
    "label_free_saliency": "Saliency (label-free)",
    "integrated_gradients": "Integrated Gradients",
    "gradient_shap": "GradientShap",
    "gradcam": "GradCAM",
}
CLASSIFIER_TITLES = {"saliency": "Saliency", "guided_backprop": "Guided backprop", "smoothgrad": "SmoothGrad"}
RANDOM_ROW = "random (reference)"
COLUMNS = (
    ("pointing_game", "pointing game", True),
    ("top_k_intersection", "top-k intersection", True),
    ("relevance_rank", "relevance rank", True),
    ("relevance_mass", "relevance mass", True),
    ("complexity", "complexity", False),
    ("sparseness", "sparseness", True),
    ("fidelity", "fidelity", True),
    ("fidelity_ratio", "fidelity / random", True),
    ("accuracy_per_complexity", "acc./complexity", True),
    ("monotonicity", "monotonicity", True),
    ("deletion_auc", "deletion AUC", False),
    ("insertion_auc", "insertion AUC", True),
    ("border_argmax", "argmax at border", False),
    ("seconds", "s / image", False),
)


@dataclass(frozen=True)
class EvalConfig:
    dataset: str
    out: Path
    n: int = 200
    store: Path = DEFAULT_STORE  # ./model_store of the working directory
    mask_models: tuple[str, ...] | None = None  # None: the dataset's defaults; () = none
    frozen: str = ""  # "" = what the mask models explain (or the dataset's default frozen model)
    methods: tuple[str, ...] | None = None  # gradient baselines; None = all for the model's kind
    relax: bool = True
    relax_masks: int = 500  # modest default; the paper's N is 3000 (--relax-masks 3000)
    relax_batch: int = 100
    random_row: bool = True
    monotonicity: bool = True  # classifiers only
    monotonicity_config: M.MonotonicityConfig = M.MonotonicityConfig()
    saliency_config: SaliencyConfig = SaliencyConfig()
    threads: int = 1
    seed: int = 0  # dataset seed (fixes the test split)
    data_root: Path | None = None  # Fashion-MNIST IDX directory for scenes
    examples: int = 6  # rows of the PNG grid
    quiet: bool = False
    # test-split size override (the first n images of a split depend on its size: use the default
    # for real numbers; tests use a small split to stay fast)
    split_sizes: dict[str, int] | None = field(default=None, hash=False)
    # a user's own data (dataset "folder"): every image of `images` (training/datasets/folder.py),
    # optional ground-truth `masks`; `model` names the frozen model or a masking network of it
    images: Path | None = None
    masks: Path | None = None
    model: str = ""
    deletion_steps: int = 16  # deletion / insertion curves (no ground truth needed)
    # scenes only (2026-12): "legacy" = the original background (what the encoder trained on),
    # "families" = the background families scenes-nemu trains on (datasets/scenes.py TRAIN_FAMILIES)
    backgrounds: str = "legacy"
    split: str = "test"  # "heldout" (scenes): test items on the held-out families (HELDOUT_FAMILIES)

    def __post_init__(self) -> None:
        if self.images is not None:
            if self.dataset != FOLDER or not self.model:
                raise InvalidArgument("--images needs --model NAME (and no --dataset)")
        elif self.dataset not in DEFAULT_MASK_MODELS:
            raise InvalidArgument(f"unknown dataset {self.dataset!r}; use one of {', '.join(DEFAULT_MASK_MODELS)}")
        if self.n < 1:
            raise InvalidArgument("--n must be >= 1")
        if self.relax_masks < 1 or self.relax_batch < 1:
            raise InvalidArgument("--relax-masks and --relax-batch must be >= 1")
        if self.threads < 1:
            raise InvalidArgument("--threads must be >= 1")
        if self.backgrounds not in ("legacy", "families"):
            raise InvalidArgument(f"--backgrounds {self.backgrounds!r}: use legacy or families")
        if self.split not in ("test", "heldout"):
            raise InvalidArgument(f"--split {self.split!r}: use test or heldout")
        if (self.backgrounds != "legacy" or self.split != "test") and self.dataset != "scenes":
            raise InvalidArgument("--backgrounds and --split heldout exist for --dataset scenes only")

    @property
    def tag(self) -> str:
        """File-name suffix: '' (legacy test), '_families' (family test), '_heldout' (held-out families)."""
        if self.split == "heldout":
            return "_heldout"
        return "_families" if self.backgrounds == "families" else ""


@dataclass
class MethodResult:
    name: str
    family: str  # "mask" | "relax" | "gradient" | "reference"
    maps: np.ndarray  # [n,H,W] float32
    seconds: np.ndarray  # [n]
    scores: dict[str, np.ndarray] = field(default_factory=dict)
    info: dict = field(default_factory=dict)


@dataclass
class EvalResult:
    dataset: str
    frozen: str
    kind: str
    n: int
    images: np.ndarray  # [n,H,W,3] display images in [0,1]
    gt: np.ndarray  # [n,H,W] bool
    labels: np.ndarray  # [n]
    rows: list[MethodResult]
    notes: list[str]
    settings: dict
    tag: str = ""  # EvalConfig.tag
    split_text: str = "test split"

    def summary(self) -> dict[str, dict[str, dict[str, float]]]:
        out: dict[str, dict[str, dict[str, float]]] = {}
        for r in self.rows:
            cols = {}
            for key, _, _ in COLUMNS:
                v = r.seconds if key == "seconds" else r.scores.get(key)
                if v is None:
                    continue
                v = np.asarray(v, dtype=np.float64)
                ok = v[np.isfinite(v)]
                cols[key] = {
                    "mean": float(ok.mean()) if ok.size else float("nan"),
                    "std": float(ok.std(ddof=1)) if ok.size > 1 else 0.0,
                    "sem": float(ok.std(ddof=1) / math.sqrt(ok.size)) if ok.size > 1 else 0.0,
                    "n": int(ok.size),
                }
            out[r.name] = cols
        return out


# -- method runners: (x [1,C,H,W] normalised, target) -> {row name: map [H,W]} ---------------------

Runner = Callable[[torch.Tensor, int | None], dict[str, np.ndarray]]


def _mask_runner(registry: Registry, entry: ModelEntry) -> Runner:
    sess = registry.onnx(entry)

    def run(x: torch.Tensor, target: int | None) -> dict[str, np.ndarray]:
        feeds = {"image": x.numpy()}
        if entry.kind == "nemt":
            feeds["target"] = np.array([-1 if target is None else target], dtype=np.int64)
        out = sess.run(feeds)
        return {entry.name: out["mask"][0, 0]}

    return run


def relax_api():
    """(Relax, RelaxConfig, "") if handlers.relax is importable, else (None, None, the reason)."""
    try:
        from xaiserve.handlers.relax import Relax, RelaxConfig
    except ImportError as e:
        return None, None, str(e)
    return Relax, RelaxConfig, ""


def _relax_runner(embed: Callable[[torch.Tensor], torch.Tensor], cfg: EvalConfig, spec, api) -> tuple[Runner, dict]:
    Relax, RelaxConfig = api
    info: dict = {"num_masks": []}
    counter = {"i": 0}

    def run(x: torch.Tensor, target: int | None) -> dict[str, np.ndarray]:
        # a different mask seed per image: the masks of one image are not reused for the next
        rc = RelaxConfig(num_masks=cfg.relax_masks, batch_size=cfg.relax_batch, seed=counter["i"])
        counter["i"] += 1
        out = Relax(embed, rc, mean=spec.mean, std=spec.std).attribute(x[0])
        info["num_masks"].append(int(out.num_masks))
        return {"RELAX": out.importance.numpy(), "U-RELAX": out.u_relax.numpy()}

    return run, info


def _gradient_runner(method: str, module: torch.nn.Module, kind: str, config: SaliencyConfig) -> Runner:
    title = (CLASSIFIER_TITLES.get(method) if kind == "classifier" else None) or METHOD_TITLES.get(method, method)

    def run(x: torch.Tensor, target: int | None) -> dict[str, np.ndarray]:
        return {title: attribute(method, module, x, kind=kind, target=target, config=config)[0]}

    return run


def _random_runner(seed: int) -> Runner:
    rng = np.random.default_rng(seed)

    def run(x: torch.Tensor, target: int | None) -> dict[str, np.ndarray]:
        return {RANDOM_ROW: rng.random(tuple(x.shape[2:])).astype(np.float32)}

    return run


# -- the evaluation -------------------------------------------------------------------------------


def _log(cfg: EvalConfig, msg: str) -> None:
    if not cfg.quiet:
        print(msg, file=sys.stderr, flush=True)


def _resolve_models(registry: Registry, cfg: EvalConfig) -> tuple[ModelEntry, list[ModelEntry]]:
    if cfg.images is not None:
        return _resolve_user_model(registry, cfg)
    names = DEFAULT_MASK_MODELS[cfg.dataset] if cfg.mask_models is None else cfg.mask_models
    masks = [registry.resolve(n) for n in names]
    for e in masks:
        if e.kind not in ("nem_u", "nemt"):
            raise InvalidArgument(f"{e.id} is a {e.kind}, not a masking network (nem_u or nemt)")
    if cfg.frozen:
        frozen = registry.resolve(cfg.frozen)
    elif masks:
        frozen = registry.frozen_for(masks[0])
    else:
        frozen = registry.resolve(DEFAULT_FROZEN[cfg.dataset])
    if frozen.kind not in ("encoder", "classifier"):
        raise InvalidArgument(
            f"{frozen.id} is a {frozen.kind}; explanations are evaluated on an encoder or a classifier"
        )
    trained_on = frozen.arch.get("dataset")
    if trained_on and trained_on != cfg.dataset:
        raise InvalidArgument(f"{frozen.id} was trained on {trained_on}, not {cfg.dataset}: use --dataset {trained_on}")
    for e in masks:
        if registry.frozen_for(e).id != frozen.id:
            raise InvalidArgument(f"{e.id} explains {e.explains}, not {frozen.id}: evaluate one frozen model at a time")
    return frozen, masks


def _resolve_user_model(registry: Registry, cfg: EvalConfig) -> tuple[ModelEntry, list[ModelEntry]]:
    """--model: a frozen model (with every masking network of the store that explains it) or one
    masking network (with the frozen model it explains)."""
    e = registry.resolve(cfg.model)
    if e.kind in ("nem_u", "nemt"):
        masks, frozen = [e], registry.frozen_for(e)
    else:
        frozen = e
        names = cfg.mask_models
        masks = (
            [registry.resolve(n) for n in names]
            if names is not None
            else [
                m for m in registry.entries() if m.kind in ("nem_u", "nemt") and m.explains in (frozen.id, frozen.name)
            ]
        )
    if frozen.kind not in ("encoder", "classifier"):
        raise InvalidArgument(
            f"{frozen.id} is a {frozen.kind}; explanations are evaluated on an encoder or a classifier"
        )
    return frozen, masks


def _load_folder(cfg: EvalConfig, frozen: ModelEntry, module: torch.nn.Module):
    """(x normalised, display images [n,H,W,3], ground truth, labels) of the user's folder: every
    image fitted to the model as the server fits requests; labels from class folders / none (then
    the classifier's predictions)."""
    from xaiserve.training.datasets.folder import FolderDataset

    spec = frozen.input
    ds = FolderDataset(
        cfg.images,
        spec,
        masks=cfg.masks,
        class_names=frozen.labels,
        num_classes=frozen.output_dim or len(frozen.labels),
        labelled=frozen.kind == "classifier",
        limit=cfg.n,
    )
    if frozen.kind == "classifier" and ds.label_source == "none":
        ds.relabel(module)
    sp = ds.everything()
    n = min(cfg.n, len(sp))
    x = torch.from_numpy(sp.images[:n].astype(np.float32))
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    img = (x * std + mean).clamp(0, 1)
    if img.shape[1] == 1:
        img = img.repeat(1, 3, 1, 1)
    return x, img.permute(0, 2, 3, 1).numpy(), sp.masks[:n].astype(bool), sp.labels[:n], ds


def _load_split(cfg: EvalConfig, spec) -> tuple[torch.Tensor, np.ndarray, np.ndarray, np.ndarray]:
    from xaiserve.training.datasets import get_dataset

    if spec.height != spec.width:
        raise FailedPrecondition(f"the model takes {spec.height}x{spec.width} images; the datasets are square")
    if cfg.dataset == "scenes" and (cfg.backgrounds == "families" or cfg.split == "heldout"):
        from xaiserve.training.datasets.scenes import scenes_families

        ds = scenes_families(cfg.data_root, seed=cfg.seed, size=spec.height, sizes=cfg.split_sizes)
    else:
        ds = get_dataset(cfg.dataset, seed=cfg.seed, size=spec.height, root=cfg.data_root, sizes=cfg.split_sizes)
    split = ds.split(cfg.split)
    n = min(cfg.n, len(split))
    if spec.channels != split.images.shape[1]:
        raise FailedPrecondition(
            f"the model takes {spec.channels} channels; {cfg.dataset} images have {split.images.shape[1]}"
        )
    u8 = split.images[:n]
    img = torch.from_numpy(u8).float() / 255.0
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1)
    x = (img - mean) / std
    return x, img.permute(0, 2, 3, 1).numpy(), split.masks[:n].astype(bool), split.labels[:n]


def _build_runners(
    registry: Registry,
    cfg: EvalConfig,
    frozen: ModelEntry,
    masks: list[ModelEntry],
    module: torch.nn.Module,
    notes: list[str],
) -> list[tuple[str, str, Runner, dict]]:
    """(label, family, runner, info) for every method, in table order."""
    kind = frozen.kind
    runners: list[tuple[str, str, Runner, dict]] = []
    for e in masks:
        runners.append((e.name, "mask", _mask_runner(registry, e), {"model": e.id}))
    if cfg.relax:
        Relax, RelaxConfig, why = relax_api()
        if Relax is None:
            notes.append(f"RELAX and U-RELAX rows left out: handlers.relax is not importable ({why}).")
            _log(cfg, f"note: {notes[-1]}")
        else:
            if "onnx" in frozen.files:  # batched masks through ONNX Runtime, as the job workers run RELAX
                sess = registry.onnx(frozen)

                def embed(b: torch.Tensor) -> torch.Tensor:
                    return torch.from_numpy(sess.run({"image": b.numpy().astype(np.float32)})["output"])
            else:

                def embed(b: torch.Tensor) -> torch.Tensor:
                    with torch.no_grad():
                        return module(b)

            run, info = _relax_runner(embed, cfg, frozen.input, (Relax, RelaxConfig))
            runners.append(("RELAX", "relax", run, info))
            what = "the logit vector (label-free)" if kind == "classifier" else "the embedding"
            notes.append(
                f"RELAX explains {what}; N = {cfg.relax_masks} masks per image (paper: 3000); "
                "RELAX and U-RELAX come from one run and share its time."
            )
    for meth in cfg.methods if cfg.methods is not None else methods_for(kind):
        runners.append((meth, "gradient", _gradient_runner(meth, module, kind, cfg.saliency_config), {"method": meth}))
    if cfg.random_row:
        runners.append((RANDOM_ROW, "reference", _random_runner(cfg.seed), {}))
    return runners


def _run(cfg: EvalConfig, runners, x: torch.Tensor, targets: list[int | None]) -> list[MethodResult]:
    """Every method on every image, one image per call, timed after one untimed warm-up call."""
    n = x.shape[0]
    rows: list[MethodResult] = []
    for label, family, run, info in runners:
        run(x[:1], targets[0])  # warm-up (session/graph caches, captum imports), not timed
        if family == "relax":
            info["num_masks"].clear()
        maps: dict[str, list[np.ndarray]] = {}
        secs = np.empty(n)
        t_all = time.perf_counter()
        for i in range(n):
            t0 = time.perf_counter()
            out = run(x[i : i + 1], targets[i])
            secs[i] = time.perf_counter() - t0
            for name, m in out.items():
                maps.setdefault(name, []).append(np.asarray(m, dtype=np.float32))
        _log(cfg, f"  {label}: {n} images in {time.perf_counter() - t_all:.1f} s")
        for name, ms in maps.items():
            extra = dict(info)
            if family == "relax":
                extra = {"num_masks_mean": float(np.mean(info["num_masks"]))}
            rows.append(MethodResult(name=name, family=family, maps=np.stack(ms), seconds=secs.copy(), info=extra))
    return rows


def _score(
    cfg: EvalConfig,
    rows: list[MethodResult],
    module: torch.nn.Module,
    kind: str,
    x: torch.Tensor,
    gt: np.ndarray,
    labels: np.ndarray,
) -> None:
    def forward(b: torch.Tensor) -> torch.Tensor:
        return module(b)

    variance = None
    if kind == "classifier" and cfg.monotonicity:
        # the perturbation variance depends on the image only: once per image, shared by every method
        t0 = time.perf_counter()
        variance = M.perturbation_variance(forward, x, torch.as_tensor(labels), cfg.monotonicity_config)
        _log(cfg, f"  monotonicity perturbations: {time.perf_counter() - t0:.1f} s")

    def logits(b: torch.Tensor) -> torch.Tensor:
        return module(b)

    with_gt = cfg.images is None or cfg.masks is not None
    with torch.no_grad():
        ref = module(x)
    target = torch.as_tensor(labels) if labels is not None else None

    def keeps(b: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        # how much of image idx's decision a perturbed copy keeps: its label's probability, or the
        # cosine of its embedding to the original's (the fidelity definition, handlers/fidelity.py)
        out = module(b)
        if kind == "classifier":
            return torch.softmax(out, 1).gather(1, target[idx].view(-1, 1))[:, 0]
        return F.cosine_similarity(out, ref[idx], dim=1)

    fid_targets = labels if kind == "classifier" else None
    for r in rows:
        r.scores = (
            M.map_scores(r.maps, gt)
            if with_gt
            else {"complexity": M.complexity(r.maps), "sparseness": M.sparseness(r.maps)}
        )
        # faithfulness that is not area: deletion / insertion AUC on every dataset (METHODS.md 2026-12)
        r.scores["deletion_auc"], r.scores["insertion_auc"] = M.deletion_insertion(
            keeps, x, r.maps, steps=cfg.deletion_steps
        )
        # one definition with Explain's fidelity option: the target's probability / the embedding cosine
        r.scores["fidelity"] = M.fidelity(logits, x, r.maps, kind=kind, targets=fid_targets)
        r.scores["fidelity_ratio"] = M.fidelity_vs_random(
            logits, x, r.maps, kind=kind, targets=fid_targets, fidelity_scores=r.scores["fidelity"], seed=cfg.seed
        )
        r.scores["accuracy_per_complexity"] = M.accuracy_per_complexity(r.scores["fidelity"], r.maps)
        # the border artefact: share of the maps' maxima within 3 px of the frame (chance: border_chance)
        r.scores["border_argmax"] = M.border_argmax(r.maps)
        if variance is not None:
            r.scores["monotonicity"] = M.monotonicity(
                None, x, r.maps, config=cfg.monotonicity_config, variance=variance
            )


def evaluate(cfg: EvalConfig) -> EvalResult:
    """Run and score every method on the first cfg.n test images (see the module docstring)."""
    torch.set_num_threads(cfg.threads)
    registry = Registry(RegistryConfig(store=cfg.store, intra_op_threads=cfg.threads, prefer_cuda=False))
    if not registry.entries():
        raise NotFound(f"the model store {cfg.store} has no models; train and export them first (`xaiserve train ...`)")
    frozen, masks = _resolve_models(registry, cfg)
    module = registry.torch_module(frozen)
    kind = frozen.kind
    folder = None
    if cfg.images is not None:
        x, display, gt, labels, folder = _load_folder(cfg, frozen, module)
    else:
        x, display, gt, labels = _load_split(cfg, frozen.input)
    n = x.shape[0]
    targets: list[int | None] = [None] * n
    if kind == "classifier":
        with torch.no_grad():
            k = frozen.output_dim or int(module(x[:1]).shape[1])
        if labels.max(initial=0) >= k:
            raise FailedPrecondition(
                f"{frozen.id} has {k} classes but {cfg.dataset} labels go up to {int(labels.max())}"
            )
        targets = [int(t) for t in labels]
    notes: list[str] = []
    rows = _run(cfg, _build_runners(registry, cfg, frozen, masks, module, notes), x, targets)
    _score(cfg, rows, module, kind, x, gt, labels)
    if folder is not None:
        notes.append(
            f"data: {n} images of the user's folder, fitted with `{frozen.input.resize}`; labels: {folder.label_source}; "
            f"ground truth: {'given' if cfg.masks else 'none (localisation columns left out)'}."
        )
    notes.append(
        f"deletion / insertion AUC (RISE, Petsiuk et al. 2018): {cfg.deletion_steps} steps removing (revealing) "
        "the top-ranked pixels, score = "
        + ("the target's probability" if kind == "classifier" else "cosine to the original embedding")
        + "."
    )
    notes.append(
        "fidelity = "
        + ("softmax(Phi(x*m))_target" if kind == "classifier" else "cos(Phi(x), Phi(x*m)) of the embeddings")
        + ", m = the min-max normalised map (the same definition as Explain's fidelity option); "
        "fidelity / random = mean fidelity over the mean fidelity of the same maps with their pixels randomly "
        "permuted (same area); "
        "acc./complexity = fidelity / mean(m) ([NEM-U] Table 3)."
    )
    h, w = x.shape[2], x.shape[3]
    notes.append(
        f"argmax at border: share of a map's maximal pixels within {M.BORDER_PX} px of the frame; chance "
        f"(the band's area) = {M.border_chance(h, w):.3f} at {h} x {w}."
    )
    if kind == "classifier":
        predicted = folder is not None and folder.label_source == "predicted"
        notes.append(
            "targets: the classifier's own predictions (the folder gives no labels)."
            if predicted
            else "targets: the true labels ([NEMt] sec. 4.2)."
        )
        if cfg.monotonicity:
            mc = cfg.monotonicity_config
            notes.append(
                f"monotonicity: {mc.patch}x{mc.patch} patches, {mc.baseline} baseline, {mc.n_samples} draws per patch."
            )
    settings = {
        "dataset": cfg.dataset,
        "seed": cfg.seed,
        "n": n,
        "frozen": frozen.id,
        "kind": kind,
        "mask_models": [e.id for e in masks],
        "relax_masks": cfg.relax_masks if cfg.relax else 0,
        "threads": cfg.threads,
        "saliency": asdict(cfg.saliency_config),
        "target": "true label" if kind == "classifier" else "none",
    }
    split_text = "test split"
    if cfg.dataset == "scenes":
        from xaiserve.training.datasets.scenes import HELDOUT_FAMILIES, TRAIN_FAMILIES

        settings.update(backgrounds=cfg.backgrounds, split=cfg.split)
        if cfg.split == "heldout":
            split_text = f"held-out background families {', '.join(HELDOUT_FAMILIES)}, test items"
        elif cfg.backgrounds == "families":
            split_text = f"test split on the training background families {', '.join(TRAIN_FAMILIES)}"
        else:
            split_text = "test split, original background"
    return EvalResult(cfg.dataset, frozen.id, kind, n, display, gt, labels, rows, notes, settings, cfg.tag, split_text)


# -- reporting ------------------------------------------------------------------------------------


def _fmt(v: float, key: str) -> str:
    if not math.isfinite(v):
        return "n/a"
    if key == "seconds":
        return f"{v:.4f}" if v < 1 else f"{v:.2f}"
    return f"{v:.3f}"


def markdown_table(result: EvalResult) -> str:
    summ = result.summary()
    keys = [c for c in COLUMNS if any(c[0] in s for s in summ.values())]
    best: dict[str, float] = {}
    for key, _, higher in keys:
        vals = [
            s[key]["mean"]
            for name, s in summ.items()
            if key in s and name != RANDOM_ROW and math.isfinite(s[key]["mean"])
        ]
        if vals:
            best[key] = max(vals) if higher else min(vals)
    head = "| method | " + " | ".join(f"{t} {'↑' if h else '↓'}" for _, t, h in keys) + " |"
    where = (
        f"the user's folder ({result.n} images)"
        if result.dataset == FOLDER
        else f"{result.dataset} ({result.split_text}, first {result.n} images)"
    )
    lines = [
        f"Explanations on {where}, frozen model {result.frozen} ({result.kind}).",
        "",
        head,
        "|" + "---|" * (len(keys) + 1),
    ]
    for name, s in summ.items():
        cells = []
        for key, _, _ in keys:
            if key not in s:
                cells.append("n/a")
                continue
            v = s[key]["mean"]
            txt = _fmt(v, key)
            cells.append(
                f"**{txt}**"
                if key in best and math.isfinite(v) and abs(v - best[key]) < 1e-12 and name != RANDOM_ROW
                else txt
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Means over images; bold = best among methods (the random reference row is excluded)."]
    lines += [f"- {n}" for n in result.notes]
    return "\n".join(lines) + "\n"


def save_grid(result: EvalResult, path: Path, examples: int = 6) -> Path:
    """PNG grid: one row per example image; columns image, ground truth, one per method (jet: red high)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = min(examples, result.n)
    cols = 2 + len(result.rows)
    fig, axes = plt.subplots(k, cols, figsize=(1.6 * cols, 1.6 * k + 0.4), squeeze=False)
    for i in range(k):
        panels = [("image", result.images[i], None), ("ground truth", result.gt[i].astype(np.float32), "gray")]
        panels += [(r.name, r.maps[i], "jet") for r in result.rows]
        for j, (title, img, cmap) in enumerate(panels):
            ax = axes[i, j]
            if cmap is None:
                ax.imshow(np.clip(img, 0, 1))
            else:
                ax.imshow(M.normalise_maps(img)[0] if cmap == "jet" else img, cmap=cmap, vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_report(result: EvalResult, out: Path, examples: int = 6) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    stem = f"explanations_{result.dataset}{result.tag}"
    md = out / f"{stem}.md"
    md.write_text(markdown_table(result))
    js = out / f"{stem}.json"
    js.write_text(
        json.dumps(
            {
                "settings": result.settings,
                "notes": result.notes,
                "results": result.summary(),
                "info": {r.name: r.info for r in result.rows},
            },
            indent=2,
            default=float,
        )
        + "\n"
    )
    png = save_grid(result, out / f"{stem}.png", examples)
    return {"markdown": md, "json": js, "png": png}
