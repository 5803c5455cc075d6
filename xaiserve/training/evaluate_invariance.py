"""`xaiserve evaluate invariance`: the invariance test of [SSL-XAI] sec. 5.2 (Table 1) for every method.

    xaiserve evaluate invariance --model NAME [--method M ...] [--dataset D] [--n 8] [--out DIR]

For an image I and an augmentation A (horizontal flip, vertical flip, 15 degree rotation,
greyscale): explain I (M_orig) and A(I) (M_aug), map M_aug back through the inverse transform
(M_aug_inv = A^-1(M_aug); the identity for greyscale), threshold each map at its mean importance
(1 where above), and report IoU(M_orig, M_aug_inv) ([SSL-XAI] sec. 5.2; they ran RELAX only).
Pixels that a 15 degree rotation moves out of the frame and back have no counterpart: the IoU and
the means are taken over the pixels that stay inside (for flips and greyscale, all pixels).

--model names a frozen model (every masking network of the store that explains it is included) or
one masking network (with its frozen model). Methods: the masking networks, RELAX, U-RELAX, the
gradient baselines for the model kind and a random reference map (the chance level: independent
uniform maps thresholded at their mean give IoU about 1/3). Classifier targets: the true labels,
the same for every view. RELAX draws its masks afresh per view: its IoU includes Monte Carlo noise.

Writes DIR/invariance_<model>.md (table), .json (per-image IoUs) and .png (one image: the views and
every method's maps mapped back), and prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from xaiserve.errors import InvalidArgument, XaiError
from xaiserve.service.images import to_model_input
from xaiserve.service.registry import ModelEntry, Registry, RegistryConfig

AUGMENTATIONS = ("hflip", "vflip", "rotate15", "greyscale")
TITLES = {"hflip": "HFlip", "vflip": "VFlip", "rotate15": "Rotate (15°)", "greyscale": "Grayscale"}
ANGLE = 15.0
# relative to the working directory (the repository root in a checkout), not to the installed code
ROOT = Path(".")


# -- the transforms (pure; images HWC in [0, 1], maps HW) -------------------------------------------


def augment(name: str, image: np.ndarray) -> np.ndarray:
    """A(I) for an HWC image in [0, 1]."""
    if name == "hflip":
        return image[:, ::-1].copy()
    if name == "vflip":
        return image[::-1].copy()
    if name == "rotate15":
        # counter-clockwise; the corners that come from outside are filled by reflection, not black
        return np.clip(ndimage.rotate(image, ANGLE, axes=(1, 0), reshape=False, order=1, mode="reflect"), 0, 1)
    if name == "greyscale":
        grey = image[..., :3] @ np.array([0.299, 0.587, 0.114], dtype=image.dtype)  # ITU-R BT.601 luma
        return np.repeat(grey[..., None], image.shape[-1], axis=-1)
    raise InvalidArgument(f"unknown augmentation {name!r}; use one of {', '.join(AUGMENTATIONS)}")


def invert(name: str, m: np.ndarray) -> np.ndarray:
    """A^-1 applied to a map [H, W] computed on A(I): back to the original image's frame."""
    if name == "hflip":
        return m[:, ::-1].copy()
    if name == "vflip":
        return m[::-1].copy()
    if name == "rotate15":
        return ndimage.rotate(m, -ANGLE, axes=(1, 0), reshape=False, order=1, mode="nearest")
    if name == "greyscale":
        return m
    raise InvalidArgument(f"unknown augmentation {name!r}; use one of {', '.join(AUGMENTATIONS)}")


def valid_region(name: str, h: int, w: int) -> np.ndarray:
    """Pixels with a counterpart after A and A^-1 (rotation: those that stay inside the frame)."""
    if name != "rotate15":
        return np.ones((h, w), dtype=bool)
    ones = np.ones((h, w), dtype=np.float64)
    there = ndimage.rotate(ones, ANGLE, axes=(1, 0), reshape=False, order=1, mode="constant", cval=0.0)
    back = ndimage.rotate(there, -ANGLE, axes=(1, 0), reshape=False, order=1, mode="constant", cval=0.0)
    return back > 0.999


def iou_at_mean(a: np.ndarray, b: np.ndarray, valid: np.ndarray | None = None) -> float:
    """[SSL-XAI] sec. 5.2: threshold each map at its mean (over the valid pixels), IoU of the two sets.
    Both empty (two constant maps) counts as agreement, 1."""
    valid = np.ones(a.shape, dtype=bool) if valid is None else valid
    av, bv = a[valid].astype(np.float64), b[valid].astype(np.float64)
    sa, sb = av > av.mean(), bv > bv.mean()
    union = np.logical_or(sa, sb).sum()
    return 1.0 if union == 0 else float(np.logical_and(sa, sb).sum() / union)


# -- the evaluation ------------------------------------------------------------------------------------


@dataclass
class InvarianceResult:
    model: str
    frozen: str
    dataset: str
    n: int
    iou: dict[str, dict[str, list[float]]]  # method -> augmentation -> per-image IoU
    seconds: float
    example: dict = field(default_factory=dict)  # views and maps of the first image, for the PNG
    notes: list[str] = field(default_factory=list)

    def means(self) -> dict[str, dict[str, float]]:
        return {m: {a: float(np.mean(v)) for a, v in per.items()} for m, per in self.iou.items()}


def _resolve(registry: Registry, name: str) -> tuple[ModelEntry, ModelEntry, list[ModelEntry]]:
    """(the entry named, its frozen model, the masking networks to include)."""
    e = registry.resolve(name)
    if e.kind in ("nem_u", "nemt"):
        return e, registry.frozen_for(e), [e]
    if e.kind not in ("encoder", "classifier"):
        raise InvalidArgument(
            f"{e.id} is a {e.kind}; the invariance test explains an encoder or a classifier "
            "(or a masking network of one)"
        )
    masks = [m for m in registry.entries() if m.kind in ("nem_u", "nemt") and m.explains in (e.id, e.name)]
    return e, e, masks


def _dataset_for(entry: ModelEntry, frozen: ModelEntry, dataset: str | None) -> str:
    from xaiserve.training.datasets import DATASETS

    if dataset:
        if dataset not in DATASETS:
            raise InvalidArgument(f"unknown dataset {dataset!r}; use one of {', '.join(sorted(DATASETS))}")
        return dataset
    for e in (entry, frozen):  # the zoo's names start with their dataset: lesions-..., ct-phantoms-...
        parts = e.name.split("-")
        for k in range(len(parts), 0, -1):
            if "-".join(parts[:k]) in DATASETS:
                return "-".join(parts[:k])
    raise InvalidArgument(
        f"cannot tell which dataset {entry.name} was trained on; give --dataset ({', '.join(sorted(DATASETS))})"
    )


def evaluate(
    model: str,
    *,
    methods: tuple[str, ...] | None = None,
    dataset: str | None = None,
    n: int = 8,
    store: Path | None = None,
    relax_masks: int = 500,
    threads: int = 1,
    seed: int = 0,
    augmentations: tuple[str, ...] = AUGMENTATIONS,
    quiet: bool = False,
) -> InvarianceResult:
    """Run the test on the first n test images; `methods` filters the runners by name (the table's
    row names or the wire names of the gradient baselines; None = all)."""
    from xaiserve.training import evaluate_explanations as EE
    from xaiserve.training.datasets import get_dataset

    torch.set_num_threads(threads)
    registry = Registry(
        RegistryConfig(store=store or ROOT / "model_store", intra_op_threads=threads, warmup=False, prefer_cuda=False)
    )
    entry, frozen, masks = _resolve(registry, model)
    ds_name = _dataset_for(entry, frozen, dataset)
    module = registry.torch_module(frozen)
    kind = frozen.kind
    cfg = EE.EvalConfig(
        dataset=ds_name if ds_name in EE.DEFAULT_MASK_MODELS else "scenes",
        out=Path("."),
        n=n,
        relax_masks=relax_masks,
        threads=threads,
        seed=seed,
        quiet=True,
        methods=None,
        mask_models=tuple(m.name for m in masks),
    )
    notes: list[str] = []
    runners = EE._build_runners(registry, cfg, frozen, masks, module, notes)
    if methods is not None:
        from xaiserve.handlers.saliency import methods_for

        wanted = set(methods)
        known = {label for label, *_ in runners} | {info.get("method") for *_, info in runners if info.get("method")}
        known |= {"U-RELAX", "relax", "random"}
        bad = sorted(wanted - known - set(methods_for(kind)))
        if bad:
            raise InvalidArgument(
                f"unknown method(s) {', '.join(bad)} for {frozen.id}; available: "
                f"{', '.join(sorted(str(k) for k in known if k))}"
            )
        aliases = {"relax": "RELAX", "random": EE.RANDOM_ROW}
        wanted = {aliases.get(w, w) for w in wanted}
        runners = [
            r
            for r in runners
            if r[0] in wanted or r[3].get("method") in wanted or (r[0] == "RELAX" and "U-RELAX" in wanted)
        ]
    if not any(r[1] == "relax" for r in runners):  # _build_runners notes RELAX's settings
        notes = [t for t in notes if not t.startswith("RELAX")]
    split = get_dataset(ds_name).split("test")
    n = min(n, len(split.labels))
    spec = frozen.input
    if spec.height != split.images.shape[2] or spec.width != split.images.shape[3]:
        raise InvalidArgument(
            f"{frozen.id} takes {spec.height}x{spec.width} images; {ds_name} images are "
            f"{split.images.shape[2]}x{split.images.shape[3]}"
        )
    t0 = time.perf_counter()
    iou: dict[str, dict[str, list[float]]] = {}
    example: dict = {"views": {}, "maps": {}}
    for i in range(n):
        image = split.images[i].transpose(1, 2, 0).astype(np.float32) / 255.0
        target = int(split.labels[i]) if kind == "classifier" else None
        views = {"original": image, **{a: augment(a, image) for a in augmentations}}
        maps: dict[str, dict[str, np.ndarray]] = {}
        for vname, img in views.items():
            x = torch.from_numpy(to_model_input(img, spec))[None]
            for label, family, run, info in runners:
                for mname, m in run(x, target).items():
                    m = np.asarray(m, dtype=np.float32)
                    maps.setdefault(mname, {})[vname] = m if vname == "original" else invert(vname, m)
        h, w = image.shape[:2]
        for mname, per in maps.items():
            for a in augmentations:
                iou.setdefault(mname, {}).setdefault(a, []).append(
                    iou_at_mean(per["original"], per[a], valid_region(a, h, w))
                )
        if i == 0:
            example = {"views": views, "maps": maps}
        if not quiet:
            print(f"  image {i + 1}/{n}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    notes.append(
        f"{n} test images of {ds_name}; IoU at the mean threshold ([SSL-XAI] sec. 5.2); rotation about the "
        f"centre by {ANGLE:g} degrees (bilinear, reflected corners), IoU over the pixels that stay in the frame."
    )
    if kind == "classifier":
        notes.append("targets: the true labels, the same for every view.")
    return InvarianceResult(entry.id, frozen.id, ds_name, n, iou, time.perf_counter() - t0, example, notes)


# -- reporting -----------------------------------------------------------------------------------------


def markdown(result: InvarianceResult) -> str:
    means = result.means()
    augs = list(next(iter(result.iou.values())).keys()) if result.iou else []
    lines = [
        f"Invariance of explanations ([SSL-XAI] sec. 5.2, Table 1) for {result.model} "
        f"(frozen model {result.frozen}), {result.n} test images of {result.dataset}.",
        "",
        "| method | " + " | ".join(TITLES[a] for a in augs) + " | mean |",
        "|---|" + "---|" * (len(augs) + 1),
    ]
    for m, per in means.items():
        se = {
            a: float(np.std(result.iou[m][a], ddof=1) / np.sqrt(len(result.iou[m][a])))
            if len(result.iou[m][a]) > 1
            else float("nan")
            for a in augs
        }
        lines.append(
            f"| {m} | "
            + " | ".join(f"{per[a]:.3f} ± {se[a]:.3f}" for a in augs)
            + f" | {np.mean([per[a] for a in augs]):.3f} |"
        )
    lines += [
        "",
        "IoU of the above-mean sets of M_orig and A^-1(M_aug), mean ± standard error over images; 1 = the "
        "explanation moves exactly with the image (equivariant), about 0.33 = chance (the random reference).",
        *[f"- {n}" for n in result.notes],
    ]
    return "\n".join(lines) + "\n"


def write_png(result: InvarianceResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    views, maps = result.example["views"], result.example["maps"]
    cols = list(views)
    rows = list(maps)
    fig, axes = plt.subplots(len(rows) + 1, len(cols), figsize=(1.5 * len(cols), 1.5 * (len(rows) + 1)), squeeze=False)
    for c, v in enumerate(cols):
        axes[0, c].imshow(np.clip(views[v], 0, 1))
        axes[0, c].set_title("original" if v == "original" else TITLES[v], fontsize=7)
    for r, mname in enumerate(rows, start=1):
        for c, v in enumerate(cols):
            m = maps[mname][v]
            axes[r, c].imshow(m, cmap="inferno")
            axes[r, c].contour(m > m.mean(), levels=[0.5], colors="cyan", linewidths=0.5)
            if v != "original":
                axes[r, c].set_title(f"IoU {result.iou[mname][v][0]:.2f}", fontsize=6)
        axes[r, 0].set_ylabel(mname[:18], fontsize=6)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(f"{result.model}: maps of the augmented views mapped back (A^-1); cyan = above the mean", fontsize=7)
    fig.tight_layout(rect=(0, 0, 1, 0.97))  # room for the title above the column headings
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(result: InvarianceResult, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    stem = "invariance_" + result.model.split(":")[0]
    paths = {"md": out / f"{stem}.md", "json": out / f"{stem}.json", "png": out / f"{stem}.png"}
    paths["md"].write_text(markdown(result))
    paths["json"].write_text(
        json.dumps(
            {
                "model": result.model,
                "frozen": result.frozen,
                "dataset": result.dataset,
                "n": result.n,
                "seconds": result.seconds,
                "means": result.means(),
                "iou": result.iou,
                "notes": result.notes,
            },
            indent=1,
        )
        + "\n"
    )
    write_png(result, paths["png"])
    return paths


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="xaiserve evaluate invariance", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True, help="a frozen model, or one masking network of it")
    p.add_argument(
        "--method",
        action="append",
        default=None,
        help="a method to include (repeatable; a row name such as RELAX or lesions-nemt, or a gradient "
        "baseline's wire name such as gradcam); default: every method",
    )
    p.add_argument("--dataset", default=None, help="test images (default: from the model's name)")
    p.add_argument("--n", type=int, default=8, help="test images (the first n of the held-out split)")
    p.add_argument("--out", type=Path, default=Path("eval_out"))
    p.add_argument("--store", type=Path, default=None)
    p.add_argument("--relax-masks", type=int, default=500)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quiet", action="store_true")
    return p


def evaluate_main(target: str, argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.n < 1:
            raise InvalidArgument(f"--n is {args.n}; use at least 1 image")
        result = evaluate(
            args.model,
            methods=tuple(args.method) if args.method else None,
            dataset=args.dataset,
            n=args.n,
            store=args.store,
            relax_masks=args.relax_masks,
            threads=args.threads,
            quiet=args.quiet,
        )
        paths = write_report(result, args.out)
    except XaiError as e:
        print(f"xaiserve evaluate invariance: {e.code}: {e}", file=sys.stderr)
        return 2 if isinstance(e, InvalidArgument) else 1
    print(markdown(result))
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(evaluate_main("invariance", sys.argv[1:]))
