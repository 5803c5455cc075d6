"""Evaluation of SIFT-based saliency ([THESIS] sec. 4.3.4B, Table 4.2) on lesions test images and on
the two-finding set.

Pointing game (training.metrics.pointing_game) of both heatmap extractions (Voronoi, eq. 4.46-4.47;
band-pass, eq. 4.48) for sift_ablation and sift_rise, against the pixel ablation path
(handlers.ablation, transition reduction) and GradCAM (handlers.saliency), and the spread over a
parameter sweep: sift_ablation eta in {1, 2, 4} x saturation in {0, 0.8}; sift_rise eta in
{1, 2, 4}; the pixel path sigma_regu in {3.5, 7, 14} x saturation in {0, 0.8} (the regularisation /
saturation pair whose interplay sec. 4.3.4B says SIFT avoids). Seconds per image per run.

Sets: `lesions` (target = the true label, ground truth = the lesion mask; the pixel path's baseline
is the blur of sec. 2.7.1, refused where no blur changes the decision) and `two_findings`
(datasets/two_findings.py; each image once per class k of its two lesions, ground truth = the
lesion of class k, and the pointing game on the other lesion too; the pixel path's baseline is the
same image without its lesions, the explanation-quality issue's default for this set, since a blur
rarely changes the decision there).

Rows go to build/eval_sift/<set>.jsonl as they are measured (a rerun resumes after the last image
done), so the two sets can run as two processes and be stopped at any time; --report writes the
tables from whatever rows exist:

    nice -n 19 python bench/eval_sift.py --set lesions --images 24 &
    nice -n 19 python bench/eval_sift.py --set two_findings --images 24 &
    nice -n 19 python bench/eval_sift.py --set two_findings --images 24 --first 12 &   # optional 2nd worker
    wait; python bench/eval_sift.py --report --keep-findings [--out docs/evaluation/sift.md]

(a worker started with --first writes its own file; stop the first one when it reaches that image).
Timings are CPU seconds of the one-thread process, so that the load of a shared machine does not
enter them. Stability is also compared paired, per sample, with bootstrap intervals (the spread of
a mean over ~20 samples moves in steps of 1/20, and one sample can make or break it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from xaiserve.paths import checkout_root

ROOT = checkout_root()
ETAS = (1.0, 2.0, 4.0)
SATURATIONS = (0.0, 0.8)
SIGMAS = (3.5, 7.0, 14.0)
SETS = ("lesions", "two_findings")
FAMILIES = (
    "sift_ablation Voronoi",
    "sift_ablation band-pass",
    "sift_rise Voronoi",
    "sift_rise band-pass",
    "pixel ablation path",
    "GradCAM",
)
WORK = ROOT / "build" / "eval_sift"


def _samples(name: str, n: int, mean, std):
    """(image index, normalised x [3, H, W], target, ground truth [H, W], other lesion or None,
    pixel-path baseline or None = blur) per sample of the set."""
    m_t, s_t = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    if name == "lesions":
        from xaiserve.training.datasets.lesions import Lesions, LesionsConfig

        split = Lesions(LesionsConfig(sizes={"train": 1, "val": 1, "test": n})).split("test")
        for i in range(n):
            x = (torch.from_numpy(split.images[i]).float() / 255.0 - m_t) / s_t
            yield i, x, int(split.labels[i]), split.masks[i].astype(bool), None, None
        return
    from xaiserve.training.datasets.two_findings import render_two_findings

    data = render_two_findings(n, "test")
    bare = render_two_findings(n, "test", draw_objects=False)
    for i in range(n):
        x = (torch.from_numpy(data.images[i]).float() - m_t) / s_t
        b = (torch.from_numpy(bare.images[i]).float() - m_t) / s_t
        for j in (0, 1):
            yield i, x, int(data.labels[i, j]), data.masks[i, j], data.masks[i, 1 - j], b


def run(args) -> int:
    torch.set_num_threads(1)
    from xaiserve.errors import FailedPrecondition
    from xaiserve.handlers.ablation import AblationConfig, AblationPath
    from xaiserve.handlers.saliency import attribute
    from xaiserve.handlers.sift import (
        DecompositionConfig,
        SiftAblation,
        SiftAblationConfig,
        SiftRise,
        SiftRiseConfig,
        decompose,
    )
    from xaiserve.handlers.sift.ablation import keypoints_of
    from xaiserve.handlers.sift.keypoints import KeypointConfig
    from xaiserve.service.registry import Registry, RegistryConfig
    from xaiserve.training.metrics import pointing_game

    reg = Registry(RegistryConfig(store=args.store, warmup=False))
    entry = reg.resolve("lesions-classifier")
    module = reg.torch_module(entry)
    mean, std = entry.input.mean, entry.input.std
    args.work.mkdir(parents=True, exist_ok=True)
    path = args.work / (f"{args.set}.jsonl" if args.first == 0 else f"{args.set}_from{args.first}.jsonl")
    done = set()
    if path.exists():
        for line in path.read_text().splitlines():
            r = json.loads(line)
            done.add((r["image"], r["target"]))
    meta = {"slices": args.slices, "iterations": args.iterations, "masks": args.masks}
    with path.open("a") as fh:
        for i, x, target, gt, other, base in _samples(args.set, args.images, mean, std):
            if (i, target) in done or i < args.first:
                continue
            rows = []

            def record(family: str, setting: str, heat, seconds: float | None, **extra) -> None:
                h = (heat.detach().numpy() if isinstance(heat, torch.Tensor) else np.asarray(heat))[None]
                row = {"image": i, "target": target, "family": family, "setting": setting, **meta, **extra}
                row["pg"] = float(pointing_game(h, gt[None])[0])
                if other is not None:
                    row["pg_other"] = float(pointing_game(h, other[None])[0])
                row["cpu_s"] = seconds  # CPU seconds of this one-thread process (wall time is the load)
                rows.append(row)

            kp = keypoints_of(x, KeypointConfig(), mean, std)
            for eta in ETAS:
                t0 = time.process_time()
                dec = decompose(x, kp, DecompositionConfig(eta=eta))
                t_dec = time.process_time() - t0
                for sat in SATURATIONS:
                    cfg = SiftAblationConfig(
                        cells=DecompositionConfig(eta=eta),
                        saturation=sat,
                        num_slices=args.slices,
                        max_iterations=args.iterations,
                    )
                    t0 = time.process_time()
                    out = SiftAblation(module, cfg, mean=mean, std=std).attribute(x, target=target, decoder=dec)
                    s = time.process_time() - t0 + t_dec
                    setting = f"eta {eta:g}, sat {sat:g}"
                    record(
                        "sift_ablation Voronoi", setting, out.heatmap_voronoi, s, keypoints=len(kp), decompose_s=t_dec
                    )
                    record("sift_ablation band-pass", setting, out.heatmap_bandpass, s)
                t0 = time.process_time()
                r = SiftRise(
                    module,
                    SiftRiseConfig(cells=DecompositionConfig(eta=eta), num_masks=args.masks, seed=i),
                    mean=mean,
                    std=std,
                ).attribute(x, target=target, decoder=dec)
                s = time.process_time() - t0 + t_dec
                record("sift_rise Voronoi", f"eta {eta:g}", r.heatmap_voronoi, s)
                record("sift_rise band-pass", f"eta {eta:g}", r.heatmap_bandpass, s)
            for sigma in SIGMAS:
                for sat in SATURATIONS:
                    setting = f"sigma_regu {sigma:g}, sat {sat:g}"
                    t0 = time.process_time()
                    try:
                        out = AblationPath(
                            module,
                            AblationConfig(
                                sigma_regu=sigma,
                                saturation=sat,
                                num_slices=args.slices,
                                max_iterations=args.iterations,
                            ),
                        ).attribute(x, baseline=base, target=target)
                    except FailedPrecondition:  # no blur changes the decision: the method refuses (sec. 2.7.1)
                        rows.append(
                            {
                                "image": i,
                                "target": target,
                                "family": "pixel ablation path",
                                "setting": setting,
                                "refused": True,
                                **meta,
                            }
                        )
                        continue
                    record("pixel ablation path", setting, out.heatmap, time.process_time() - t0)
            t0 = time.process_time()
            cam = attribute("gradcam", module, x, kind="classifier", target=target)[0]
            record("GradCAM", "-", cam, time.process_time() - t0)
            for row in rows:
                fh.write(json.dumps(row) + "\n")
            fh.flush()
            print(
                f"{args.set}: image {i + 1}/{args.images}, target {target}: {len(kp)} keypoints "
                f"({time.strftime('%H:%M:%S')})",
                file=sys.stderr,
                flush=True,
            )
    return 0


def _stats(rows: list[dict], family: str, images: set | None = None) -> dict | None:
    """Mean pointing game per setting over the samples, the spread over the settings, and the mean
    per-sample range (how often one sample's answer changes with the setting)."""
    ok = [r for r in rows if r["family"] == family and not r.get("refused")]
    if images is not None:
        ok = [r for r in ok if (r["image"], r["target"]) in images]
    if not ok:
        return None
    settings = list(dict.fromkeys(r["setting"] for r in ok))  # sweep order
    per = {s: float(np.mean([r["pg"] for r in ok if r["setting"] == s])) for s in settings}
    other = [r["pg_other"] for r in ok if "pg_other" in r]
    by_sample: dict = {}
    for r in ok:
        by_sample.setdefault((r["image"], r["target"]), []).append(r["pg"])
    full = [v for v in by_sample.values() if len(v) == len(settings)]
    secs = [r["cpu_s"] for r in ok if r.get("cpu_s") is not None]
    wall = [r["seconds"] for r in ok if r.get("seconds") is not None]
    return {
        "per_setting": per,
        "samples": len(by_sample),
        "mean": float(np.mean(list(per.values()))),
        "min": min(per.values()),
        "max": max(per.values()),
        "spread": max(per.values()) - min(per.values()),
        "sample_range": float(np.mean([max(v) - min(v) for v in full])) if full else float("nan"),
        "other": float(np.mean(other)) if other else None,
        "cpu_seconds": float(np.mean(secs)) if secs else float("nan"),
        "cpu_samples": len(secs),
        "wall_seconds": float(np.mean(wall)) if wall else float("nan"),
    }


def _matrix(rows: list[dict], family: str) -> dict:
    """{(image, target): [pointing game per setting, in sweep order]} for the samples with every setting."""
    ok = [r for r in rows if r["family"] == family and not r.get("refused")]
    settings = list(dict.fromkeys(r["setting"] for r in ok))
    by: dict = {}
    for r in ok:
        by.setdefault((r["image"], r["target"]), {})[r["setting"]] = r["pg"]
    return {k: [v[s] for s in settings] for k, v in by.items() if len(v) == len(settings)}


def _bootstrap(rows: list[dict], n: int = 2000, seed: int = 0) -> dict:
    """Spread and per-sample range of each SIFT family minus the pixel path's, paired over the samples
    where both ran every setting, with 5 / 95 % bootstrap quantiles (resampling the samples)."""
    pixel = _matrix(rows, "pixel ablation path")
    out = {}
    for fam in FAMILIES[:4]:
        m = _matrix(rows, fam)
        keys = sorted(set(m) & set(pixel))
        if len(keys) < 2:
            continue
        a, b = np.array([m[k] for k in keys]), np.array([pixel[k] for k in keys])

        def stats(ix):
            ma, mb = a[ix].mean(0), b[ix].mean(0)
            spread = (ma.max() - ma.min()) - (mb.max() - mb.min())
            rng_ = (a[ix].max(1) - a[ix].min(1)).mean() - (b[ix].max(1) - b[ix].min(1)).mean()
            return spread, rng_

        point = stats(np.arange(len(keys)))
        g = np.random.default_rng(seed)
        boots = np.array([stats(g.integers(0, len(keys), len(keys))) for _ in range(n)])
        lo, hi = np.quantile(boots, [0.05, 0.95], axis=0)
        out[fam] = {
            "samples": len(keys),
            "spread_diff": float(point[0]),
            "spread_lo": float(lo[0]),
            "spread_hi": float(hi[0]),
            "range_diff": float(point[1]),
            "range_lo": float(lo[1]),
            "range_hi": float(hi[1]),
        }
    return out


def report(args) -> int:
    sections, summary = [], {}
    for name in SETS:
        seen, rows = set(), []
        for p in sorted(args.work.glob(f"{name}*.jsonl")):  # a second worker may overlap the first: keep one
            for line in p.read_text().splitlines():
                r = json.loads(line)
                key = (r["image"], r["target"], r["family"], r["setting"])
                if key not in seen:
                    seen.add(key)
                    rows.append(r)
        if not rows:
            continue
        samples = sorted({(r["image"], r["target"]) for r in rows})
        pixel_ok = {
            (r["image"], r["target"]) for r in rows if r["family"] == "pixel ablation path" and not r.get("refused")
        }
        refused = {(r["image"], r["target"]) for r in rows if r.get("refused")}
        kps = [
            r["keypoints"] for r in rows if r["family"] == "sift_ablation Voronoi" and r["setting"] == "eta 1, sat 0"
        ]
        meta = rows[0]
        stats = {f: _stats(rows, f) for f in FAMILIES}
        for f in FAMILIES:  # a band-pass map comes from the same run as the Voronoi one
            if f.endswith("band-pass") and stats[f] is not None:
                v = stats[f.replace("band-pass", "Voronoi")]
                stats[f].update({k: v[k] for k in ("cpu_seconds", "cpu_samples", "wall_seconds")})
        common = {f: _stats(rows, f, pixel_ok) for f in FAMILIES} if refused and pixel_ok else {}
        summary[name] = {
            "samples": len(samples),
            "images": len({s[0] for s in samples}),
            "stats": stats,
            "on_pixel_path_samples": common,
            "pixel_refused_samples": len(refused),
            "keypoints": kps,
        }
        two = name == "two_findings"
        title = (
            f"## Two-finding set: {len(samples)} samples ({len({s[0] for s in samples})} images, each targeted at "
            "both of its classes)"
            if two
            else f"## Lesions test set: {len(samples)} images"
        )
        lines = [title, ""]
        lines.append(
            f"T = {meta['slices']} slices, at most {meta['iterations']} iterations for every path method; "
            f"sift_rise {meta['masks']} masks. SIFT keypoints per image: {min(kps)}-{max(kps)} "
            f"(median {int(np.median(kps))})."
        )
        if two:
            lines.append(
                "Target k = each of the two classes in turn; pointing game on the lesion of class k (↑) and on "
                "the other lesion (↓); pixel path baseline: the same image without its lesions."
            )
        else:
            lines.append(
                f"Target = the true label; pixel path baseline: the blur of sec. 2.7.1, refused (FailedPrecondition, "
                f"no blur changes the decision) on {len(refused)} of {len(samples)} images."
            )
        lines += [
            "",
            "| method | heatmap | setting | pointing game |" + (" on the other lesion |" if two else ""),
            "|---|---|---|---|" + ("---|" if two else ""),
        ]
        for fam in FAMILIES:
            st = stats[fam]
            if st is None:
                continue
            method, _, heat = fam.partition(" ")
            if fam in ("pixel ablation path", "GradCAM"):
                method, heat = fam, "-"
            for setting, v in st["per_setting"].items():
                ok = [r for r in rows if r["family"] == fam and r["setting"] == setting and "pg_other" in r]
                o = f" {np.mean([r['pg_other'] for r in ok]):.3f} |" if two else ""
                lines.append(f"| {method} | {heat} | {setting} | {v:.3f} |{o}")
        lines += [
            "",
            "Spread = max - min over the settings of the mean pointing game; per-sample range = the mean over "
            "samples of max - min of that sample's pointing game over the settings (0: no sample's answer "
            "depends on the parameters); CPU seconds per sample and run (one thread; decomposition included for the "
            "SIFT methods; the wall time on the shared machine was several times that), over the samples timed.",
            "",
            "| method | settings | samples | mean | min | max | spread | per-sample range | CPU s / sample (timed) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for fam in FAMILIES:
            d = stats[fam]
            if d is None:
                lines.append(f"| {fam} | - | 0 | | | | | | |")
                continue
            lines.append(
                f"| {fam} | {len(d['per_setting'])} | {d['samples']} | {d['mean']:.3f} | {d['min']:.3f} | "
                f"{d['max']:.3f} | {d['spread']:.3f} | {d['sample_range']:.3f} | {d['cpu_seconds']:.2f} ({d['cpu_samples']}) |"
            )
        if common:
            lines += [
                "",
                f"The same on the {len(pixel_ok)} images the pixel path ran on:",
                "",
                "| method | mean | min | max | spread | per-sample range |",
                "|---|---|---|---|---|---|",
            ]
            for fam in FAMILIES:
                d = common[fam]
                if d is not None:
                    lines.append(
                        f"| {fam} | {d['mean']:.3f} | {d['min']:.3f} | {d['max']:.3f} | {d['spread']:.3f} | "
                        f"{d['sample_range']:.3f} |"
                    )
        boot = _bootstrap(rows)
        summary[name]["bootstrap_vs_pixel"] = boot
        if boot:
            n_b = next(iter(boot.values()))["samples"]
            lines += [
                "",
                f"Stability against the pixel path, paired over the {n_b} samples where every method ran every "
                "setting: the difference of the spreads (method minus pixel path; < 0 = the method is more stable) "
                "and of the per-sample ranges, with 90 % bootstrap intervals (2000 resamples of the samples):",
                "",
                "| method | spread difference | 90 % interval | per-sample range difference | 90 % interval |",
                "|---|---|---|---|---|",
            ]
            for fam, b in boot.items():
                lines.append(
                    f"| {fam} | {b['spread_diff']:+.3f} | [{b['spread_lo']:+.3f}, {b['spread_hi']:+.3f}] | "
                    f"{b['range_diff']:+.3f} | [{b['range_lo']:+.3f}, {b['range_hi']:+.3f}] |"
                )
        lines += ["", f"One sample moves a mean by {1 / len(samples):.3f}.", ""]
        sections.append("\n".join(lines))
    out = args.out
    head = [
        "# SIFT-based saliency: pointing game and parameter stability",
        "",
        "Made by `bench/eval_sift.py` (CPU, torch 1 thread, nice 19, on a shared 2-core machine; see its "
        "docstring for the commands). Model: the default `lesions-classifier` (64 x 64); pointing game = "
        "`training.metrics.pointing_game` (the maximum of the heatmap inside the ground truth; ties counted "
        "fractionally). sift_ablation: contrastive score, transition reduction (Table 4.2's first rows); pixel "
        "path: retaining score, transition reduction. Iterations and masks are reduced from the serving "
        "defaults (T 14, 60 iterations, 1000 masks) so that the sweep fits in the session.",
        "",
    ]
    findings = out.read_text().split("\n## Findings", 1) if out.exists() else [""]
    tail = "\n## Findings" + findings[1] if len(findings) > 1 and args.keep_findings else ""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(head) + "\n" + "\n".join(sections) + tail)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    print("\n".join(head) + "\n" + "\n".join(sections))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--set", choices=SETS, default="lesions")
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--first", type=int, default=0, help="start at this image (a second process on the same set)")
    ap.add_argument("--slices", type=int, default=8, help="T of every path method (default 14 in serving)")
    ap.add_argument("--iterations", type=int, default=30, help="max iterations of every path method")
    ap.add_argument("--masks", type=int, default=500, help="sift_rise masks per image")
    ap.add_argument("--store", type=Path, default=ROOT / "model_store")
    ap.add_argument("--report", action="store_true", help="write the tables from build/eval_sift/*.jsonl")
    ap.add_argument("--keep-findings", action="store_true", help="keep the '## Findings' part of --out")
    ap.add_argument("--work", type=Path, default=WORK, help="where the rows go (jsonl per set)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "evaluation" / "sift.md")
    args = ap.parse_args(argv)
    return report(args) if args.report else run(args)


if __name__ == "__main__":
    sys.exit(main())
