"""`xaiserve train|export|evaluate denoiser ...`: the Cryo-EM spiral / cartesian denoisers.

    xaiserve train denoiser --arch spiral|cartesian --snr 1/64 [--augment-rotations]
        simulate particles (training/datasets/cryoem.py), train, log per-epoch validation MSE/PSNR
        and equivariance error to RUN/metrics.jsonl, save RUN/model.pt.
    xaiserve evaluate denoiser [--runs-root runs/denoiser | --run RUN ...]
        held-out test metrics of every run, the comparison table (spiral vs cartesian per SNR and
        augmentation) printed and saved as summary.json, and the training curves of both
        architectures (Fig. 7.7-7.9 of [THESIS]) as denoiser_curves.png.
    xaiserve export denoiser --run RUN [--name cryoem-spiral] [--store model_store]
        ONNX (parity-checked against torch), state dict, model card, metrics log and curves into
        model_store/NAME/VERSION/, manifest entry (kind "denoiser").

Default models: cryoem-spiral = spiral at SNR 1/64, cryoem-cartesian = cartesian at SNR 1/64.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from xaiserve.paths import code_version

TARGET = "denoiser"
DEFAULT_RUNS = Path("runs") / "denoiser"
N_TEST = 512


def _check_target(target: str) -> bool:
    if target != TARGET:
        print(f"xaiserve.training.cli_denoise handles target {TARGET!r}, not {target!r}", file=sys.stderr)
        return False
    return True


def run_name(arch: str, snr: float, augment: bool, encode_sigma: float | None = None) -> str:
    from xaiserve.handlers.denoise.networks import DEFAULT_ENCODE_SIGMA
    from xaiserve.training.datasets.cryoem import snr_label

    name = f"{arch}-snr{snr_label(snr).replace('/', '_')}" + ("-aug" if augment else "")
    if encode_sigma is not None and encode_sigma != DEFAULT_ENCODE_SIGMA[arch]:
        name += f"-blur{encode_sigma:g}"
    return name


def variant_label(model_cfg: dict) -> str:
    """'spiral' / 'cartesian', or e.g. 'cartesian+blur0.7' for a non-default input anti-aliasing."""
    from xaiserve.handlers.denoise.networks import DEFAULT_ENCODE_SIGMA

    arch = model_cfg["arch"]
    sigma = model_cfg.get("encode_sigma", 0.0)
    return arch if sigma == DEFAULT_ENCODE_SIGMA[arch] else f"{arch}+blur{sigma:g}"


def _channels(text: str) -> tuple[int, ...]:
    try:
        ch = tuple(int(c) for c in text.split(",") if c.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--channels takes comma-separated integers, got {text!r}") from e
    if not ch:
        raise argparse.ArgumentTypeError("--channels is empty")
    return ch


def _snr(text: str) -> float:
    from xaiserve.training.datasets.cryoem import parse_snr

    try:
        return parse_snr(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


# -- train --------------------------------------------------------------------------------------


def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="xaiserve train denoiser",
        description="Train a spiral or cartesian Cryo-EM denoiser on simulated particles.",
    )
    p.add_argument("--arch", choices=("spiral", "cartesian"), default="spiral")
    p.add_argument(
        "--snr", type=_snr, default=1.0 / 64.0, help="signal-to-noise ratio of norms, e.g. 1/4 or 1/64 (default 1/64)"
    )
    p.add_argument(
        "--augment-rotations", action="store_true", help="random in-plane rotations of every batch (Fig. 7.9)"
    )
    p.add_argument("--noise", choices=("gaussian", "poisson"), default="gaussian")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-val", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--size", type=int, default=64, help="particle side in pixels")
    p.add_argument("--channels", type=_channels, default=(12, 24, 48), help="channels per level, e.g. 12,24,48")
    p.add_argument("--kernel", type=int, choices=(3, 5), default=3, help="ribbon rows / filter size")
    p.add_argument("--n-wind", type=int, default=0, help="spiral windings (0: size/2)")
    p.add_argument("--n-spls", type=int, default=0, help="spiral samples (0: round(pi n_wind^2))")
    p.add_argument("--predict", choices=("clean", "noise"), default="clean")
    p.add_argument(
        "--encode-sigma",
        type=float,
        default=None,
        help="input anti-aliasing in pixels (default: 0.7 for spiral = Gaussian input resampling, 0 for cartesian; "
        "spiral 0 = barycentric as in the thesis, cartesian > 0 = fixed Gaussian blur, an ablation)",
    )
    p.add_argument("--seed", type=int, default=0, help="data seed (splits and molecules)")
    p.add_argument("--train-seed", type=int, default=0, help="initialisation / batch order seed")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (a GPU when torch sees one; default)")
    p.add_argument(
        "--run-dir", type=Path, default=None, help=f"output directory (default {DEFAULT_RUNS}/ARCH-snrX[-aug])"
    )
    p.add_argument("--no-progress", action="store_true")
    return p


def train_main(target: str, argv: list[str]) -> int:
    if not _check_target(target):
        return 2
    args = train_parser().parse_args(argv)
    import torch

    from xaiserve.devices import resolve_device
    from xaiserve.handlers.denoise.export import save_checkpoint
    from xaiserve.handlers.denoise.networks import Denoiser, DenoiserConfig, expected_signal_rms, parameter_count
    from xaiserve.handlers.denoise.train import TrainConfig, train
    from xaiserve.training.datasets.cryoem import CryoEMConfig, CryoEMSimulator

    torch.set_num_threads(max(1, args.threads))
    try:
        device = resolve_device(args.device)
    except (ValueError, RuntimeError) as e:  # a malformed setting, or cuda asked for and absent
        print(f"error: {e}", file=sys.stderr)
        return 2
    run = args.run_dir or DEFAULT_RUNS / run_name(args.arch, args.snr, args.augment_rotations, args.encode_sigma)
    run.mkdir(parents=True, exist_ok=True)
    data_cfg = CryoEMConfig(
        size=args.size,
        snr=args.snr,
        noise=args.noise,
        seed=args.seed,
        sizes={"train": args.n_train, "val": args.n_val, "test": N_TEST},
    )
    model_cfg = DenoiserConfig(
        arch=args.arch,
        size=args.size,
        channels=args.channels,
        kernel=args.kernel,
        n_wind=args.n_wind,
        n_spls=args.n_spls,
        predict=args.predict,
        encode_sigma=args.encode_sigma,
        out_gain=expected_signal_rms(args.snr) if args.predict == "clean" else 1.0,
    )
    train_cfg = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        augment_rotations=args.augment_rotations,
        seed=args.train_seed,
    )
    t0 = time.perf_counter()
    sim = CryoEMSimulator(data_cfg)
    tr, va = sim.generate("train"), sim.generate("val")
    torch.manual_seed(args.train_seed)
    model = Denoiser(model_cfg)
    print(
        f"{run}: {args.arch} denoiser, {parameter_count(model)} parameters, SNR {args.snr:.6g}, "
        f"{len(tr)} training particles, {args.epochs} epochs (data: {time.perf_counter() - t0:.1f} s)",
        flush=True,
    )
    config = {
        "data": _data_dict(data_cfg),
        "model": model_cfg.to_dict(),
        "train": asdict(train_cfg),
        "parameters": parameter_count(model),
        "code_version": code_version(),
    }
    (run / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    log = run / "metrics.jsonl"
    log.write_text("")

    def show(rec: dict) -> None:
        tl = "-" if rec["train_loss"] is None else f"{rec['train_loss']:.4g}"
        print(
            f"epoch {rec['epoch']:3d}  train {tl}  val mse {rec['val_mse']:.4g}  psnr {rec['val_psnr']:.2f} dB  "
            f"equivariance {rec['equivariance']:.4f}  ({rec['seconds']:.0f} s)",
            flush=True,
        )

    history = train(
        model,
        tr.noisy,
        tr.clean,
        va.noisy,
        va.clean,
        train_cfg,
        log_path=log,
        progress=not args.no_progress,
        on_epoch=show,
        device=device,
    )
    save_checkpoint(run / "model.pt", model, {"data": config["data"], "train": config["train"], "history": history})
    print(
        f"saved {run / 'model.pt'} (weights of epoch {history[-1]['best_epoch']}, the lowest validation loss; "
        f"{time.perf_counter() - t0:.0f} s in all)"
    )
    return 0


def _data_dict(cfg) -> dict[str, Any]:
    d = asdict(cfg)
    d["atoms"], d["domains"] = list(cfg.atoms), list(cfg.domains)
    return d


def _data_cfg(d: dict[str, Any]):
    """CryoEMConfig from a saved dict; keys this version does not know are dropped (older runs)."""
    from dataclasses import fields

    from xaiserve.training.datasets.cryoem import CryoEMConfig

    known = {f.name for f in fields(CryoEMConfig)}
    d = {k: v for k, v in d.items() if k in known}
    d["atoms"], d["domains"] = tuple(d["atoms"]), tuple(d["domains"])
    return CryoEMConfig(**d)


# -- evaluate -----------------------------------------------------------------------------------


def test_metrics(
    model, data_cfg, n_test: int = N_TEST, eq_particles: int = 128, eq_angles: int = 4
) -> dict[str, float]:
    """Held-out test metrics of a torch denoiser: PSNR/MSE of output, of the noisy input and of the
    per-particle-mean predictor, and the equivariance error (eval mode)."""
    import torch

    from xaiserve.handlers.denoise.equivariance import equivariance_error
    from xaiserve.handlers.denoise.metrics import as_tensor, disc_mse, disc_psnr
    from xaiserve.handlers.denoise.train import FastMode
    from xaiserve.training.datasets.cryoem import CryoEMSimulator

    ts = CryoEMSimulator(replace(data_cfg, sizes={**data_cfg.sizes, "test": n_test})).generate("test")
    x, c = as_tensor(ts.noisy), as_tensor(ts.clean)
    model.eval()
    with torch.no_grad(), FastMode(model):
        y = torch.cat([model(x[i : i + 64]) for i in range(0, len(x), 64)])
        disc = model.disc
        mean_pred = ((x * disc).sum((-2, -1), keepdim=True) / disc.sum()) * disc
        eq = equivariance_error(model, x[:eq_particles], angles_per_particle=eq_angles, inner_radius=0.9, seed=12345)
    return {
        "test_psnr": float(disc_psnr(y, c, disc).mean()),
        "test_mse": float(disc_mse(y, c, disc).mean()),
        "noisy_psnr": float(disc_psnr(x * disc, c, disc).mean()),
        "mean_predictor_psnr": float(disc_psnr(mean_pred, c, disc).mean()),
        "test_equivariance": eq,
        "n_test": int(len(ts)),
    }


def _read_log(run: Path) -> list[dict]:
    p = run / "metrics.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.exists() else []


def evaluate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="xaiserve evaluate denoiser",
        description="Compare the trained spiral and cartesian denoisers (table + curves).",
    )
    p.add_argument("--runs-root", type=Path, default=DEFAULT_RUNS, help="every subdirectory with model.pt is a run")
    p.add_argument(
        "--run", type=Path, action="append", default=None, help="a run directory (repeatable; overrides --runs-root)"
    )
    p.add_argument(
        "--out", type=Path, default=None, help="where summary.json and denoiser_curves.png go (default: runs root)"
    )
    p.add_argument("--n-test", type=int, default=N_TEST)
    p.add_argument("--threads", type=int, default=2)
    return p


def evaluate_main(target: str, argv: list[str]) -> int:
    if not _check_target(target):
        return 2
    args = evaluate_parser().parse_args(argv)
    import torch

    from xaiserve.handlers.denoise.export import load_checkpoint

    torch.set_num_threads(max(1, args.threads))
    runs = args.run or sorted(p.parent for p in Path(args.runs_root).glob("*/model.pt"))
    if not runs:
        print(
            f"no runs found (looked for */model.pt under {args.runs_root}); train with `xaiserve train denoiser ...` first",
            file=sys.stderr,
        )
        return 1
    out = args.out or (args.run[0].parent if args.run else Path(args.runs_root))
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for run in runs:
        model, ck = load_checkpoint(run / "model.pt")
        data_cfg = _data_cfg(ck["data"])
        log = _read_log(run)
        m = test_metrics(model, data_cfg, args.n_test)
        rows.append(
            {
                "run": str(run),
                "arch": variant_label(model.config.to_dict()),
                "snr": data_cfg.snr,
                "augment": bool(ck["train"]["augment_rotations"]),
                "parameters": sum(p.numel() for p in model.parameters()),
                "epochs": int(ck["train"]["epochs"]),
                "best_epoch": log[-1].get("best_epoch") if log else None,
                "equivariance_init": log[0]["equivariance"] if log else None,
                "val_psnr_final": log[-1]["val_psnr"] if log else None,
                **m,
            }
        )
        print(f"evaluated {run}", flush=True)
    summary = {"runs": rows, "comparisons": compare(rows)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(format_table(rows))
    print()
    print(format_comparisons(summary["comparisons"]))
    png = plot_curves(runs, out / "denoiser_curves.png")
    print(f"\nwrote {out / 'summary.json'} and {png}")
    return 0


def _condition(row: dict) -> tuple[float, bool]:
    return (round(row["snr"], 8), row["augment"])


def compare(rows: list[dict]) -> list[dict]:
    """Spiral vs each other variant per (SNR, augmentation): PSNR difference and equivariance ratios."""
    out = []
    for cond in sorted({_condition(r) for r in rows}, key=lambda c: (-c[0], c[1])):
        by = {r["arch"]: r for r in rows if _condition(r) == cond}
        if "spiral" not in by:
            continue
        s = by["spiral"]
        for other in sorted(k for k in by if k != "spiral"):
            c = by[other]
            out.append(
                {
                    "snr": cond[0],
                    "augment": cond[1],
                    "versus": other,
                    "psnr_spiral_minus_cartesian_db": s["test_psnr"] - c["test_psnr"],
                    "psnr_target_met": s["test_psnr"] - c["test_psnr"] >= -0.5,  # spiral at most 0.5 dB below
                    "equivariance_ratio_trained": s["test_equivariance"] / max(c["test_equivariance"], 1e-12),
                    "equivariance_ratio_init": (s["equivariance_init"] / max(c["equivariance_init"], 1e-12))
                    if s["equivariance_init"] and c["equivariance_init"]
                    else None,
                    "spiral_at_most_half": s["test_equivariance"] <= 0.5 * c["test_equivariance"],
                }
            )
    return out


def _snr_text(snr: float) -> str:
    from xaiserve.training.datasets.cryoem import snr_label

    return snr_label(snr)


def format_table(rows: list[dict]) -> str:
    head = f"{'arch':<16} {'SNR':>5} {'aug':>4} {'params':>7} {'ep':>5} {'PSNR dB':>8} {'noisy':>7} {'mean':>7} {'MSE':>9} {'equiv init':>10} {'equiv test':>10}"
    lines = [head, "-" * len(head)]
    for r in sorted(rows, key=lambda r: (-r["snr"], r["augment"], r["arch"])):
        ei = "-" if r["equivariance_init"] is None else f"{r['equivariance_init']:.4f}"
        lines.append(
            f"{r['arch']:<16} {_snr_text(r['snr']):>5} {'yes' if r['augment'] else 'no':>4} {r['parameters']:>7} {str(r.get('best_epoch', '?')) + '/' + str(r['epochs']):>5} "
            f"{r['test_psnr']:>8.2f} {r['noisy_psnr']:>7.2f} {r['mean_predictor_psnr']:>7.2f} {r['test_mse']:>9.4g} {ei:>10} {r['test_equivariance']:>10.4f}"
        )
    return "\n".join(lines)


def _half_target(c: dict) -> str:
    """The equivariance target (at most half) is set for SNR 1/64 only."""
    if c["snr"] > 1 / 32:
        return "no target at this SNR"
    return "ok" if c["spiral_at_most_half"] else "MISSED"


def format_comparisons(comps: list[dict]) -> str:
    lines = [
        "spiral vs cartesian (targets: spiral PSNR at most 0.5 dB below; spiral equivariance error <= half the cartesian one)"
    ]
    for c in comps:
        ri = "-" if c["equivariance_ratio_init"] is None else f"{c['equivariance_ratio_init']:.3f}"
        lines.append(
            f"  SNR {_snr_text(c['snr']):>5} aug {'yes' if c['augment'] else 'no ':<3} vs {c['versus']:<16}: dPSNR {c['psnr_spiral_minus_cartesian_db']:+.2f} dB "
            f"({'ok' if c['psnr_target_met'] else 'MISSED'}), equivariance ratio trained {c['equivariance_ratio_trained']:.3f} "
            f"({_half_target(c)}), at init {ri}"
        )
    return "\n".join(lines)


def plot_curves(runs: list[Path], path: Path) -> Path:
    """Validation PSNR and equivariance error per epoch, both architectures per condition."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[tuple[float, bool], dict[str, list[dict]]] = {}
    for run in runs:
        cfg = json.loads((run / "config.json").read_text())
        cond = (round(cfg["data"]["snr"], 8), bool(cfg["train"]["augment_rotations"]))
        series.setdefault(cond, {})[variant_label(cfg["model"])] = _read_log(run)
    conds = sorted(series, key=lambda c: (-c[0], c[1]))
    fig, axes = plt.subplots(len(conds), 2, figsize=(10, 3.2 * len(conds)), squeeze=False)
    colours = {"spiral": "tab:blue", "cartesian": "tab:orange"}  # variants get the next default colours
    for i, cond in enumerate(conds):
        title = f"SNR {_snr_text(cond[0])}" + (", rotation augmentation" if cond[1] else "")
        for arch, log in sorted(series[cond].items()):
            ep = [r["epoch"] for r in log]
            style = dict(
                ms=3, label=arch, color=colours.get(arch, "tab:green" if arch.startswith("cartesian") else "tab:purple")
            )
            fmt = "o-" if arch in colours else "s--"
            axes[i, 0].plot(ep, [r["val_psnr"] for r in log], fmt, **style)
            axes[i, 1].plot(ep, [r["equivariance"] for r in log], fmt, **style)
        axes[i, 0].set_title(f"{title}: validation PSNR (dB)")
        axes[i, 1].set_title(f"{title}: equivariance error")
        axes[i, 1].set_yscale("log")
        for ax in axes[i]:
            ax.set_xlabel("epoch (0 = initialisation)")
            ax.grid(alpha=0.3)
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# -- export -------------------------------------------------------------------------------------


SERVED_SPIRAL_NOTE = """
How the served spiral gets there (the goal: at most 1.5x the cartesian latency at 64 x 64): the single ONNX graph spends more time resampling than convolving (profiled
at batch 32, 1 thread: GridSample for the outer ribbon rows ~28 %, the level-change Gathers with their Transposes ~25 %,
NCHWc layout reorders ~12 %, the convolutions ~35 %), because ONNX Runtime has no fused operator for a fixed sparse
resampling and its Python wheel ships no headers for a custom one. The server therefore runs the same network, from
`weights.pt`, as a pipeline (handlers/denoise/spiral_runtime.py): each ribbon convolution is a small ONNX Runtime graph
(the regrouped convolutions of the exported graph, batch norm folded, optimised by ONNX Runtime into its NCHWc kernels),
and the resampling between them runs in compiled loops (numba): the outer ribbon rows (2 taps along the spiral, the
GridSample weights of the stored grid) and the level changes (the stored index/weight operators). Maps of at least one
NCHWc block of channels stay in ONNX Runtime's blocked layout between the graphs (their reorder nodes are cut out of the
optimised graphs), so no reorder passes are added and each resampling tap moves a block of contiguous channels. Same map:
within ~1e-6 of the output scale of the torch module and of `model.onnx` (tests/test_spiral_runtime.py). `model.onnx`
remains the portable artefact; `xaiserve serve --spiral-runtime false` serves it instead, and a CUDA session or an
ONNX-only store entry uses it automatically. Time at batch 32, 1 thread, per batch (development machine): ONNX Runtime
convolutions ~50 ms, ribbon rows ~17 ms, level changes ~10 ms (~78 ms, against ~111 ms for the single graph). One particle
runs on one thread, so a single large particle gains nothing from a second core (the cartesian graph parallelises inside
the image).
"""


def _latency_rows(results: list[dict]) -> str:
    return (
        "| particle | batch | spiral served | spiral graph | cartesian | served / cartesian | graph / cartesian |\n"
        "|---|---|---|---|---|---|---|\n"
        + "\n".join(
            f"| {r['size']} x {r['size']} | {r['batch']} | {r['spiral_ms']:.2f} | {r['spiral_graph_ms']:.2f} | {r['cartesian_ms']:.2f} "
            f"| {r['ratio']:.2f}x | {r['graph_ratio']:.2f}x |"
            for r in results
        )
        + "\n"
    )


def latency_section(bench: dict | None, extra: dict | None = None) -> str:
    """The card's latency section from bench/bench_denoise.py --json: the spiral network as served
    (handlers/denoise/spiral_runtime.py) and as its single ONNX graph, against the cartesian graph;
    `extra`: a second run (e.g. --threads 2) shown for information."""
    if not bench:
        return "\n## Latency\nNot measured at export time; run `python bench/bench_denoise.py`.\n"
    res = bench["results"]
    met = all(r["ratio"] <= bench["limit"] for r in res if r["size"] == 64)
    out = (
        "\n## Latency (CPU, ms per particle)\n"
        f"bench/bench_denoise.py, {res[0]['threads']} intra-op thread(s), interleaved rounds on a shared 2-core machine "
        "(absolute times vary with the load; the ratios are measured in one run). Served: the spiral network as the server "
        "runs it (handlers/denoise/spiral_runtime.py: its convolutions in ONNX Runtime, its resampling in compiled loops, "
        "same weights, same map); graph: its single exported ONNX graph (`model.onnx`, the portable artefact) in ONNX Runtime; "
        f"cartesian: the baseline's ONNX graph in ONNX Runtime. Target: spiral at most {bench['limit']}x the cartesian "
        f"baseline at 64 x 64: {'met at every batch size' if met else 'NOT met'}.\n\n" + _latency_rows(res)
    )
    if extra:
        out += (
            f"\n{extra['results'][0]['threads']} threads (for information; the served spiral splits a batch over the threads, "
            "the ONNX graphs use as many intra-op threads):\n\n" + _latency_rows(extra["results"])
        )
    return out + SERVED_SPIRAL_NOTE


def export_parser() -> argparse.ArgumentParser:
    from xaiserve.paths import default_model_store

    p = argparse.ArgumentParser(
        prog="xaiserve export denoiser",
        description="Export a trained denoiser run to the model store (ONNX + card + manifest).",
    )
    p.add_argument(
        "--run", type=Path, required=True, help="run directory with model.pt (from `xaiserve train denoiser`)"
    )
    p.add_argument("--name", default=None, help="model name (default cryoem-ARCH)")
    p.add_argument("--version", default="1")
    p.add_argument(
        "--store",
        type=Path,
        default=default_model_store(),
        help="model store (default: $XAISERVE_MODEL_STORE, else ./model_store)",
    )
    p.add_argument(
        "--summary",
        type=Path,
        default=None,
        help="summary.json of `xaiserve evaluate denoiser` to quote in the card (default: next to the run, if present)",
    )
    p.add_argument(
        "--bench",
        type=Path,
        default=None,
        help="JSON of bench/bench_denoise.py --json to quote in the card (default: next to the run, if present)",
    )
    p.add_argument(
        "--bench-extra",
        type=Path,
        default=None,
        help="JSON of a second bench run (e.g. --threads 2) shown for information (default: bench-threads2.json next to the run, if present)",
    )
    p.add_argument("--n-test", type=int, default=N_TEST)
    p.add_argument("--threads", type=int, default=2)
    return p


def export_main(target: str, argv: list[str]) -> int:
    if not _check_target(target):
        return 2
    args = export_parser().parse_args(argv)
    import torch

    from xaiserve.handlers.denoise.card import write_card
    from xaiserve.handlers.denoise.export import export_onnx, load_checkpoint, onnx_parity, ort_denoise, ort_session
    from xaiserve.handlers.denoise.metrics import as_tensor, disc_psnr
    from xaiserve.handlers.denoise.resample import DEFAULT_POLICY
    from xaiserve.service.modelstore import add_entry
    from xaiserve.training.datasets.cryoem import CryoEMSimulator

    torch.set_num_threads(max(1, args.threads))
    ck_path = args.run / "model.pt"
    if not ck_path.exists():
        print(f"{ck_path} does not exist; train first: xaiserve train denoiser --run-dir {args.run}", file=sys.stderr)
        return 1
    model, ck = load_checkpoint(ck_path)
    cfg = model.config
    name = args.name or f"cryoem-{cfg.arch}"
    rel = Path(name) / str(args.version)
    dest = args.store / rel
    dest.mkdir(parents=True, exist_ok=True)
    data_cfg = _data_cfg(ck["data"])

    metrics = test_metrics(model, data_cfg, args.n_test)
    onnx_path = export_onnx(model, dest / "model.onnx")
    ts = CryoEMSimulator(replace(data_cfg, sizes={**data_cfg.sizes, "test": args.n_test})).generate("test")
    parity = onnx_parity(model, onnx_path, ts.noisy[:16, None])
    ort_out = ort_denoise(ort_session(onnx_path), ts.noisy[:, None])
    metrics["onnx_test_psnr"] = float(disc_psnr(torch.from_numpy(ort_out), as_tensor(ts.clean), model.disc).mean())
    metrics["onnx_parity_max_abs"] = parity["max_abs"]
    metrics["onnx_parity_max_rel"] = parity["max_rel"]
    if parity["max_rel"] > 1e-4:
        print(f"ONNX parity check failed: {parity}", file=sys.stderr)
        return 1
    torch.save(model.state_dict(), dest / "weights.pt")
    shutil.copyfile(args.run / "metrics.jsonl", dest / "metrics.jsonl")
    summary_path = args.summary or (args.run.parent / "summary.json")
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
    files = {
        "onnx": str(rel / "model.onnx"),
        "state_dict": str(rel / "weights.pt"),
        "card": str(rel / "card.md"),
        "metrics_log": str(rel / "metrics.jsonl"),
    }
    curves = args.run.parent / "denoiser_curves.png"
    if curves.exists():
        shutil.copyfile(curves, dest / "curves.png")
        files["curves"] = str(rel / "curves.png")
    history = ck.get("history") or _read_log(args.run)
    metrics["equivariance_init"] = history[0]["equivariance"] if history else None
    metrics["val_psnr_final"] = history[-1]["val_psnr"] if history else None
    entry = {
        "name": name,
        "version": str(args.version),
        "kind": "denoiser",
        "description": f"{cfg.arch} CNN Cryo-EM particle denoiser ([THESIS] ch. 7), trained on simulated particles at SNR {_snr_text(data_cfg.snr)}",
        "files": files,
        "input": {"height": cfg.size, "width": cfg.size, "channels": 1, "mean": [0.0], "std": [1.0]},
        "particles": dict(DEFAULT_POLICY),
        "arch": cfg.to_dict(),
        "metrics": {k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()},
        "training": {"data": ck["data"], "train": ck["train"], "code_version": code_version()},
    }
    bench_path = args.bench or (args.run.parent / "bench.json")
    bench = json.loads(bench_path.read_text()) if bench_path.exists() else None
    extra_path = args.bench_extra or (args.run.parent / "bench-threads2.json")
    extra = json.loads(extra_path.read_text()) if extra_path.exists() else None
    write_card(dest / "card.md", entry, model, summary, history, latency_section(bench, extra))
    add_entry(args.store, entry)
    print(json.dumps(entry["metrics"], indent=2))
    print(f"exported {name}:{args.version} to {dest}")
    return 0
