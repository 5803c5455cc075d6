"""Targeted relevance mass on the two-finding lesions set (training/datasets/two_findings.py): for
each image and each of its two classes k, the map explaining k should put its relevance on the
lesion of class k, not on the other ([NEMt]; METHODS.md, decision 2026-12; target >= 0.8 for the
NEMt networks). Methods: the per-class NEMt bank (lesions-nemt), the class-conditional network
(lesions-nemt-cond), GradCAM and Integrated Gradients targeted at k, on the CURRENT default models.

    python -m xaiserve.training.evaluate_targeted [--n 100] [--out docs/evaluation]

Relevance mass as everywhere (metrics.relevance_mass: positive attribution inside the lesion of
class k / all positive attribution, maps min-max normalised); "on the other lesion" is the same
share inside the lesion of the other class; pointing game on lesion k.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from xaiserve.handlers import saliency
from xaiserve.service.images import to_model_input
from xaiserve.service.registry import Registry, RegistryConfig
from xaiserve.training import metrics as M
from xaiserve.training.datasets.two_findings import render_two_findings

ROOT = Path(__file__).resolve().parents[2]
METHODS = ("lesions-nemt", "lesions-nemt-cond", "gradcam", "integrated_gradients")
TITLES = {
    "lesions-nemt": "NEMt per-class bank (lesions-nemt)",
    "lesions-nemt-cond": "NEMt conditional (lesions-nemt-cond)",
    "gradcam": "GradCAM (target k)",
    "integrated_gradients": "Integrated Gradients (target k)",
}


def evaluate(
    n: int = 100, out_dir: Path = ROOT / "docs" / "evaluation", threads: int = 1, store: Path = ROOT / "model_store"
) -> dict:
    torch.set_num_threads(threads)
    reg = Registry(RegistryConfig(store=store, warmup=False, intra_op_threads=threads, prefer_cuda=False))
    frozen = reg.resolve("lesions-classifier")
    module = reg.torch_module(frozen)
    sessions = {m: reg.onnx(reg.resolve(m)) for m in METHODS if m.startswith("lesions-")}
    data = render_two_findings(n, "test")
    x = torch.stack([torch.from_numpy(to_model_input(im.transpose(1, 2, 0), frozen.input)) for im in data.images])
    with torch.no_grad():
        probs = torch.softmax(module(x), dim=1).numpy()
    t0 = time.perf_counter()
    maps: dict[str, list[np.ndarray]] = {m: [] for m in METHODS}
    gt_k, gt_other, tgt = [], [], []
    for i in range(n):
        for j in (0, 1):
            k = int(data.labels[i, j])
            for m in METHODS:
                if m in sessions:
                    out = sessions[m].run({"image": x[i : i + 1].numpy(), "target": np.array([k], dtype=np.int64)})
                    maps[m].append(np.asarray(out["mask"][0, 0], dtype=np.float32))
                else:
                    maps[m].append(
                        np.asarray(
                            saliency.attribute(m, module, x[i : i + 1], kind="classifier", target=k)[0],
                            dtype=np.float32,
                        )
                    )
            gt_k.append(data.masks[i, j])
            gt_other.append(data.masks[i, 1 - j])
            tgt.append((i, k))
    gk, go = np.stack(gt_k), np.stack(gt_other)
    rows = {}
    for m in METHODS:
        a = np.stack(maps[m])
        mass_k = M.relevance_mass(a, gk)
        mass_o = M.relevance_mass(a, go)
        empty = np.array([float(mm.max()) < 0.5 for mm in a]) if m in sessions else np.zeros(len(a), bool)
        zero = np.array([float(mm.max()) == 0.0 for mm in a])
        rows[m] = {
            "relevance_mass_k": float(mass_k.mean()),
            "relevance_mass_k_se": float(mass_k.std(ddof=1) / np.sqrt(len(a))),
            "relevance_mass_other": float(mass_o.mean()),
            "pointing_game_k": float(M.pointing_game(a, gk).mean()),
            "k_over_other": float((mass_k > mass_o).mean()),
            "all_zero": float(zero.mean()),
            "max_below_half": float(empty.mean()),
        }
    p_k = np.array([probs[i, k] for i, k in tgt])
    summary = {
        "n_images": n,
        "n_targets": len(tgt),
        "seconds": time.perf_counter() - t0,
        "classifier": frozen.id,
        "models": {m: reg.resolve(m).id for m in sessions},
        "target_probability_mean": float(p_k.mean()),
        "argmax_is_one_of_the_two": float(np.mean([probs[i].argmax() in data.labels[i] for i in range(n)])),
        "rows": rows,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "targeted_two_findings.json").write_text(json.dumps(summary, indent=1) + "\n")
    mixed = {m: "test_two_findings" in reg.resolve(m).metrics for m in sessions}
    trained = (
        "the NEMt networks were trained with two-finding images (another random stream than these), "
        "the classifier was not"
        if all(mixed.values())
        else "not retrained on such images"
    )
    md = [
        f"Targeted explanations on the two-finding lesions set ({n} test images, two lesions of different classes "
        f"each, {len(tgt)} targets), CURRENT default models (classifier {frozen.id}; {trained}).",
        "",
        "| method | relevance mass on lesion k ↑ (target >= 0.8 for NEMt) | on the other lesion ↓ | pointing game on k ↑ | "
        "share of targets with more mass on k than on the other | all-zero masks | masks with max < 0.5 |",
        "|---|---|---|---|---|---|---|",
    ]
    for m, r in rows.items():
        md.append(
            f"| {TITLES[m]} | {r['relevance_mass_k']:.3f} ± {r['relevance_mass_k_se']:.3f} | {r['relevance_mass_other']:.3f} | "
            f"{r['pointing_game_k']:.3f} | {r['k_over_other']:.3f} | {r['all_zero']:.3f} | "
            + (f"{r['max_below_half']:.3f} |" if m in sessions else "n/a |")
        )
    md += [
        "",
        f"The classifier's mean probability of the target k on these images: {summary['target_probability_mean']:.3f}; "
        f"its argmax is one of the two classes on {summary['argmax_is_one_of_the_two']:.3f} of the images (it was trained "
        "on single-lesion images).",
        "Relevance mass: positive min-max-normalised attribution inside the lesion / all of it (mean ± standard error). "
        "Generated by `python -m xaiserve.training.evaluate_targeted --n " + str(n) + "`.",
    ]
    (out_dir / "targeted_two_findings.md").write_text("\n".join(md) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "evaluation")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    s = evaluate(a.n, a.out, a.threads)
    print(json.dumps({k: v for k, v in s.items()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
