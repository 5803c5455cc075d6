"""Benchmarks of optimised ablation paths ([THESIS], Part II ch. 2), as ratios measured in one run.

1. overhead:   time per Algorithm 2 iteration vs the T (or 2T) batched forward+backward passes of
               the classifier alone, the limit. Goal: non-classifier work <= 10 % of an iteration.
2. projection: the vectorised monotone projection (envelope midpoint + clamp) on a 14 x 64 x 64
               path vs a per-pixel loop port of the thesis's Algorithm 1 (handlers/ablation/reference.py).
               Goal: >= 50x faster, always monotone; both checked for L-inf optimality.
3. pointing:   pointing game (training.metrics.pointing_game, target = true label, ground truth =
               the object / lesion mask) on the lesions and scenes test splits for the four scores
               with the class-transition reduction (contrastive reduction for straddling as well),
               vs GradCAM and Integrated Gradients (handlers.saliency, captum) on the same classifier.

    python bench/bench_ablation.py                       # all parts
    python bench/bench_ablation.py --part projection
    python bench/bench_ablation.py --part pointing --images 40 --store model_store
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from xaiserve.paths import checkout_root  # noqa: E402

ROOT = checkout_root()  # the repository: its model_store/ and tests/ helpers
sys.path.insert(0, str(ROOT))

from xaiserve.handlers.ablation import AblationConfig, AblationPath  # noqa: E402
from xaiserve.handlers.ablation import path as P  # noqa: E402
from xaiserve.handlers.ablation.reference import monotonise_loop  # noqa: E402


def _classifier(store: Path, name: str):
    """(module, entry) of a store classifier, or (None, None) when the store does not have it."""
    from xaiserve.service.registry import Registry, RegistryConfig

    try:
        reg = Registry(RegistryConfig(store=store, warmup=False))
        entry = reg.resolve(name)
        return reg.torch_module(entry), entry
    except Exception as e:  # the default models may not be trained yet: say so, use a stand-in
        print(f"  ({name} not available from {store}: {e})")
        return None, None


def bench_overhead(store: Path, iterations: int, repeats: int) -> dict:
    from xaiserve.handlers.nets import EncoderArch, FrozenSpec

    module, entry = _classifier(store, "lesions-classifier")
    which = entry.id if entry else "untrained handlers.nets classifier (default arch, 4 classes)"
    if module is None:
        torch.manual_seed(0)
        module = FrozenSpec(EncoderArch(), num_classes=4).build().eval()
        for p in module.parameters():
            p.requires_grad_(False)
    size = entry.input.height if entry else 64
    torch.manual_seed(1)
    x = torch.randn(3, size, size)
    out = {"classifier": which, "image": size}
    for score in ("retaining", "contrastive", "straddling"):
        T = 14
        batch = T if score == "retaining" else 2 * T
        imgs = torch.randn(batch, 3, size, size)

        def fwd_bwd():
            xi = imgs.clone().requires_grad_(True)
            p = torch.softmax(module(xi), dim=1)[:, 0].sum()
            torch.autograd.grad(p, xi)

        for _ in range(3):
            fwd_bwd()
        # Interleaved, so that the load of a shared machine hits both alike: after every iteration
        # the progress callback times one standalone batched forward+backward; the iteration's own
        # time is the gap between callbacks minus the time spent inside the callback.
        fb, it = [], []
        marks: list[tuple[float, float]] = []  # (callback entered, callback left)

        def progress(_):
            enter = time.perf_counter()
            fwd_bwd()
            left = time.perf_counter()
            fb.append(left - enter)
            marks.append((enter, left))

        cfg = AblationConfig(
            score=score,
            num_slices=T,
            mask_size=min(64, size),
            max_iterations=iterations * repeats + 1,
            stop_saturation=1.0,
            reduction="contrastive" if score == "straddling" else "transition",
        )
        AblationPath(module, cfg).attribute(x, baseline=torch.zeros_like(x), progress=progress)
        it = [marks[k][0] - marks[k - 1][1] for k in range(1, len(marks))]
        fb = fb[1:]
        # iteration k is paired with the forward+backward timed right after it
        t_fb, t_it = statistics.median(fb), statistics.median(it)
        frac = statistics.median((i_k - f_k) / i_k for i_k, f_k in zip(it, fb))
        out[score] = {
            "batch": batch,
            "fwd_bwd_ms": 1e3 * t_fb,
            "iteration_ms": 1e3 * t_it,
            "non_classifier_fraction": frac,
            "iterations_measured": len(it),
        }
        print(
            f"  {score:12s} batch {batch:3d}: fwd+bwd {1e3 * t_fb:7.2f} ms, iteration {1e3 * t_it:7.2f} ms, "
            f"non-classifier {100 * frac:5.1f} % (median of paired iterations; goal <= 10 %)"
        )
    return out


def bench_projection(samples: int) -> dict:
    g = torch.Generator().manual_seed(0)
    inputs = []
    for i in range(samples):
        # a realistic pre-projection state: an ablation path plus a gradient step and noise
        base = P.project(torch.rand(14, 64, 64, generator=g) * 0.3 + P.affine_path(14, 64, 64))
        inputs.append((base + 0.1 * torch.randn(14, 64, 64, generator=g)).double())
    for p in inputs[:3]:
        P.project_monotone_clamped(p.float())
    t_vec, t_full, t_loop = [], [], []
    bad_vec = bad_loop = subopt_vec = subopt_loop = 0
    for p in inputs:
        p32 = p.float()  # serving runs in float32; the loop port works in float64
        t0 = time.perf_counter()
        q = P.project_monotone_clamped(p32)
        t_vec.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        P.project(p32)
        t_full.append(time.perf_counter() - t0)
        q = q.double()
        t0 = time.perf_counter()
        ql = torch.from_numpy(np.clip(monotonise_loop(p.numpy()), 0.0, 1.0))  # Algorithm 2 lines 12-14
        t_loop.append(time.perf_counter() - t0)
        bound = torch.maximum(P.linf_monotone_bound(p), torch.maximum((p - 1).amax(0), (-p).amax(0)).clamp_min(0))
        bad_vec += int(not bool((q[1:] >= q[:-1]).all()))
        bad_loop += int(not bool((ql[1:] >= ql[:-1]).all()))
        subopt_vec += int(not bool(((q - p).abs().amax(0) <= bound + 1e-6).all()))  # float32 rounding
        subopt_loop += int(not bool(((ql - p).abs().amax(0) <= bound + 1e-9).all()))
    v, f, lp = statistics.median(t_vec), statistics.median(t_full), statistics.median(t_loop)
    print(
        f"  14x64x64: vectorised {1e3 * v:.3f} ms (with constant speed {1e3 * f:.3f} ms), "
        f"per-pixel Algorithm 1 {1e3 * lp:.1f} ms -> {lp / v:.0f}x faster (goal >= 50x)"
    )
    print(
        f"  non-monotone results: vectorised {bad_vec}/{samples}, loop {bad_loop}/{samples}; "
        f"not L-inf-optimal: vectorised {subopt_vec}/{samples}, loop {subopt_loop}/{samples}"
    )
    return {
        "vectorised_ms": 1e3 * v,
        "vectorised_with_constant_speed_ms": 1e3 * f,
        "loop_ms": 1e3 * lp,
        "speedup": lp / v,
        "non_monotone_vectorised": bad_vec,
        "non_monotone_loop": bad_loop,
        "suboptimal_vectorised": subopt_vec,
        "suboptimal_loop": subopt_loop,
        "samples": samples,
    }


# each score is optimised once; its path is then reduced (transition for all, contrastive averaging
# for the two straddling paths as well)
VARIANTS = {
    "retaining": ("transition",),
    "dissipating": ("transition",),
    "contrastive": ("transition",),
    "straddling": ("transition", "contrastive"),
}


def bench_pointing(store: Path, images: int, cfg_kw: dict, datasets: tuple[str, ...] = ("lesions", "scenes")) -> dict:
    from xaiserve.handlers.saliency import attribute
    from xaiserve.service.images import to_model_input
    from xaiserve.training.datasets import get_dataset
    from xaiserve.training.metrics import pointing_game

    results = {}
    for dataset in datasets:
        model_name = f"{dataset}-classifier"
        module, entry = _classifier(store, model_name)
        if module is None:
            print(f"  {dataset}: skipped (no {model_name} in {store}; train it with `xaiserve train classifier`)")
            continue
        split = get_dataset(dataset).split("test")
        n = min(images, len(split))
        hits: dict[str, list[float]] = {}
        seconds: dict[str, float] = {}
        no_change = correct = 0
        t_ds = time.perf_counter()
        for i in range(n):
            arr = split.images[i].transpose(1, 2, 0).astype(np.float32) / 255.0
            x = torch.from_numpy(to_model_input(arr, entry.input))
            label, gt = int(split.labels[i]), split.masks[i]
            with torch.no_grad():
                correct += int(module(x[None]).argmax() == label)
            for method in ("gradcam", "integrated_gradients"):
                t0 = time.perf_counter()
                m = attribute(method, module, x, kind="classifier", target=label)[0]
                seconds[method] = seconds.get(method, 0.0) + time.perf_counter() - t0
                hits.setdefault(method, []).append(float(pointing_game(m, gt)[0]))
            for score, reductions in VARIANTS.items():
                # a blur that never changes the decision falls back to sigma_max here (the job fails
                # instead); such images are counted and reported
                cfg = AblationConfig(score=score, reduction=reductions[0], require_baseline_change=False, **cfg_kw)
                t0 = time.perf_counter()
                out = AblationPath(module, cfg).attribute(x, target=label)
                dt = time.perf_counter() - t0
                if score == "retaining":
                    no_change += int(not out.baseline_changes_class)
                for reduction in reductions:
                    key = f"{score}/{reduction}"
                    seconds[key] = seconds.get(key, 0.0) + dt
                    hits.setdefault(key, []).append(float(pointing_game(out.heatmap_for(reduction)[1].numpy(), gt)[0]))
            if (i + 1) % 10 == 0:
                print(f"    {dataset}: {i + 1}/{n} images, {time.perf_counter() - t_ds:.0f} s", flush=True)
        area = float(split.masks[:n].mean())
        res = {
            "images": n,
            "classifier": entry.id,
            "classifier_accuracy": correct / n,
            "chance_gt_area": area,
            "blur_never_changed_class": no_change,
        }
        print(
            f"  {dataset} ({entry.id}, {n} test images, target = true label, classifier accuracy {correct / n:.2f}, "
            f"chance = mean GT area {area:.3f}, blur never changed the class on {no_change}):"
        )
        for key, v in hits.items():
            res[key] = {"pointing_game": float(np.mean(v)), "seconds_per_image": seconds.get(key, 0.0) / n}
            print(f"    {key:28s} {np.mean(v):.3f}   ({seconds.get(key, 0.0) / n:.2f} s/image)")
        results[dataset] = res
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("all", "overhead", "projection", "pointing"), default="all")
    ap.add_argument("--store", type=Path, default=ROOT / "model_store")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--iterations", type=int, default=10, help="overhead: iterations measured = iterations x repeats")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--samples", type=int, default=20, help="random paths for the projection benchmark")
    ap.add_argument("--images", type=int, default=40, help="test images per dataset for the pointing game")
    ap.add_argument("--max-iterations", type=int, default=AblationConfig.max_iterations)
    ap.add_argument("--step-size", type=float, default=AblationConfig.step_size)
    ap.add_argument("--sigma", type=float, default=AblationConfig.sigma_regu, help="sigma_regu in mask pixels")
    ap.add_argument("--saturation", type=float, default=AblationConfig.saturation, help="zeta_sat of eq. 2.26")
    ap.add_argument("--datasets", default="lesions,scenes", help="pointing game datasets, comma-separated")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    figures: dict = {"threads": args.threads}
    if args.part in ("all", "overhead"):
        print("1. time per iteration vs batched forward+backward")
        figures["overhead"] = bench_overhead(args.store, args.iterations, args.repeats)
    if args.part in ("all", "projection"):
        print("2. monotone projection, vectorised vs per-pixel Algorithm 1")
        figures["projection"] = bench_projection(args.samples)
    if args.part in ("all", "pointing"):
        cfg_kw = dict(
            max_iterations=args.max_iterations,
            step_size=args.step_size,
            sigma_regu=args.sigma,
            saturation=args.saturation,
        )
        print(f"3. pointing game ({', '.join(f'{k} {v}' for k, v in cfg_kw.items())})")
        figures["pointing"] = {
            "config": cfg_kw,
            **bench_pointing(args.store, args.images, cfg_kw, tuple(args.datasets.split(","))),
        }
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
