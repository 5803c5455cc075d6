"""Model card (card.md) of an exported denoiser: what it is, how it was trained, what it scores."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Any

from xaiserve.handlers.denoise.networks import Denoiser, parameter_count


def _snr(v: float) -> str:
    f = Fraction(v).limit_denominator(1000)
    return f"{f.numerator}/{f.denominator}"


def _fmt(v: Any, nd: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{nd}g}"
    return str(v)


def comparison_section(summary: dict | None) -> str:
    if not summary:
        return "No comparison summary was available at export time (run `xaiserve evaluate denoiser`).\n"
    lines = [
        "Held-out test particles (512 per condition; equivariance on 128 x 4 random angles). "
        "PSNR over the unit disc, peak = dynamic range of the clean particle; `mean` = predicting each "
        "particle's own mean (the trivial denoiser).\n",
        "| arch | SNR | rotation aug. | params | kept epoch / epochs | PSNR (dB) | noisy PSNR | mean PSNR | equivariance at init | equivariance trained |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(summary["runs"], key=lambda r: (-r["snr"], r["augment"], r["arch"])):
        lines.append(
            f"| {r['arch']} | {_snr(r['snr'])} | {_fmt(r['augment'])} | {r['parameters']} | {r.get('best_epoch', '?')} / {r['epochs']} | {r['test_psnr']:.2f} | "
            f"{r['noisy_psnr']:.2f} | {r['mean_predictor_psnr']:.2f} | {_fmt(r['equivariance_init'])} | {r['test_equivariance']:.4f} |"
        )
    lines += [
        "",
        "| SNR | rotation aug. | spiral versus | PSNR spiral - other | spiral at most 0.5 dB below | equivariance spiral / other (trained) | at most 1/2 | at initialisation |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in summary["comparisons"]:
        lines.append(
            f"| {_snr(c['snr'])} | {_fmt(c['augment'])} | {c.get('versus', 'cartesian')} | {c['psnr_spiral_minus_cartesian_db']:+.2f} dB | {_fmt(c['psnr_target_met'])} | "
            f"{c['equivariance_ratio_trained']:.3f} | {_fmt(c['spiral_at_most_half']) if c['snr'] <= 1 / 32 else 'no target at this SNR'} | {_fmt(c['equivariance_ratio_init'])} |"
        )
    return "\n".join(lines) + "\n"


def findings_section(summary: dict | None) -> str:
    """The thesis's claims (sec. 7.4) set against the measured comparisons with the plain cartesian net."""
    if not summary:
        return ""
    comps = {
        (round(c["snr"], 6), c["augment"]): c
        for c in summary["comparisons"]
        if c.get("versus", "cartesian") == "cartesian"
    }
    lines = ["## The thesis's claims (sec. 7.4) on these runs"]
    any_c = next(iter(comps.values()), None)
    if any_c and any_c["equivariance_ratio_init"] is not None:
        lines.append(
            f"- Nearly equivariant from the start: at initialisation the spiral network's equivariance error is "
            f"{any_c['equivariance_ratio_init']:.2f}x the cartesian one. Reproduced."
        )
    c4, c64, c64a = comps.get((0.25, False)), comps.get((round(1 / 64, 6), False)), comps.get((round(1 / 64, 6), True))
    if c4:
        lines.append(
            f"- SNR 1/4, 'the cartesian version can catch up almost perfectly': trained, the spiral/cartesian error ratio is "
            f"{c4['equivariance_ratio_trained']:.2f} ({'the cartesian net did not fully catch up' if c4['equivariance_ratio_trained'] < 0.9 else 'caught up'}); "
            f"PSNR spiral - cartesian {c4['psnr_spiral_minus_cartesian_db']:+.2f} dB (the thesis: indistinguishable)."
        )
    if c64:
        lines.append(
            f"- SNR 1/64, the cartesian net 'does not match the equivariance performance of the spiral': ratio "
            f"{c64['equivariance_ratio_trained']:.2f} ({'at most 1/2: reproduced' if c64['spiral_at_most_half'] else 'above 1/2: only partly reproduced'}); "
            f"PSNR {c64['psnr_spiral_minus_cartesian_db']:+.2f} dB (the thesis: the cartesian net overfits slightly more)."
        )
    if c64a:
        lines.append(
            f"- SNR 1/64 with rotation augmentation, 'comes closer ... but still does not quite reach it': ratio "
            f"{c64a['equivariance_ratio_trained']:.2f} ({'at most 1/2' if c64a['spiral_at_most_half'] else 'above 1/2'}), PSNR {c64a['psnr_spiral_minus_cartesian_db']:+.2f} dB."
        )
    lines.append(
        "- Not in the thesis: both networks overfit the fixed training noise at SNR 1/64 after a few epochs, and their "
        "equivariance error grows with it (the spiral's too); the models kept are those of the best validation epoch."
    )
    return "\n".join(lines) + "\n"


def write_card(
    path: Path, entry: dict, model: Denoiser, summary: dict | None, history: list[dict], extra: str = ""
) -> None:
    cfg = model.config
    m = entry["metrics"]
    data = entry["training"]["data"]
    tr = entry["training"]["train"]
    spiral = cfg.arch == "spiral"
    geom = ""
    if not spiral and cfg.encode_sigma > 0:
        geom = (
            f"Input blurred by a fixed Gaussian of sigma {cfg.encode_sigma} px (an ablation, not the plain baseline).\n"
        )
    if spiral:
        specs = model.ops.specs
        geom = (
            "Spiral levels (n_wind, n_spls): "
            + ", ".join(f"({s.n_wind}, {s.n_spls})" for s in specs)
            + f"; ribbon of {cfg.kernel} rows across neighbouring windings, {cfg.kernel} x {cfg.kernel} filters. "
            "All resampling operators (cartesian -> spiral, spiral -> ribbon, between levels, spiral -> cartesian) "
            "are precomputed once from Delaunay triangulations with barycentric weights and stored with the model "
            "(buffers in weights.pt, initialisers in model.onnx): index/weight tensors applied by Gather and a weighted "
            "sum, and, for the ribbon, whose points lie on the neighbouring windings (footnote 4 of sec. 7.3.3), the two "
            "largest barycentric weights as a fractional position along the spiral, read by GridSample (in the exported graph "
            "only the outer rows: the middle row is the spiral itself, a plain 1 x 3 convolution; batch norms folded into the "
            "convolutions).\n"
            + (
                f"Input resampling (cartesian -> spiral): a normalised Gaussian average of the nearby pixels, sigma "
                f"{cfg.encode_sigma} px, instead of the thesis's barycentric interpolation. Deviation, measured: linear "
                "interpolation gives the pixel noise a variance pattern fixed to the pixel grid (1 on a pixel centre, 1/3 at a "
                "triangle centroid) that does not rotate with the particle; at SNR 1/4 it left the trained spiral network at an "
                "equivariance error of 0.13 (worse than the cartesian baseline), the Gaussian average at 0.04, with a slightly "
                "better PSNR.\n"
                if cfg.encode_sigma > 0
                else "Input resampling (cartesian -> spiral): barycentric interpolation, as in the thesis.\n"
            )
        )
    curve_rows = "\n".join(
        f"| {h['epoch']} | {_fmt(h['train_loss'])} | {h['val_mse']:.4g} | {h['val_psnr']:.2f} | {h['equivariance']:.4f} |"
        for h in history
    )
    served = (
        "\nThe server runs the same network from `weights.pt` with its resampling in compiled loops\n"
        "(handlers/denoise/spiral_runtime.py, see Latency); `model.onnx` is the portable form of the same map."
        if cfg.arch == "spiral"
        else ""
    )
    text = f"""# {entry["name"]}:{entry["version"]} — {cfg.arch} CNN Cryo-EM particle denoiser

{entry["description"]}.

## What it does
Takes raw single-particle images (float32, {cfg.size} x {cfg.size}, any units) and returns the denoised
particles in the same units. ONNX graph: `particles` [B,1,{cfg.size},{cfg.size}] -> `denoised` [B,1,{cfg.size},{cfg.size}].{served}
Inside the graph: the particle is restricted to the unit disc inscribed in the box (eq. 7.1-7.2 of [THESIS]),
scaled per particle (x / std over the disc), denoised, and the scaling is undone; pixels outside the disc are
returned as 0. The mean is not subtracted (at SNR 1/64 it is mostly noise, and the network needs it to estimate
the particle's offset), so particles are expected with a zero-mean background, as Cryo-EM pipelines normalise them;
the output scales with the input (F(a x) = a F(x), a > 0) but is not offset-equivariant.

Residual design / target: the network predicts the **clean particle** directly (predict = "{cfg.predict}"), the
thesis's choice (sec. 6.3: "direct signal estimation makes for clearer comparisons"); a learnable output gain starts
at the expected clean-signal size in normalised units ({cfg.out_gain:.4g} for SNR {_snr(data["snr"])}).

## Input handling (Denoise RPC)
- a float tensor [N,H,W] or [H,W] (float32/float64/float16), or the bytes of an MRC image or stack (any real mode);
- non-square particles are **rejected** (INVALID_ARGUMENT); square particles of another side between
  {entry["particles"]["min_side"]} and {entry["particles"]["max_side_factor"]} x {cfg.size} pixels are **Fourier-resampled**
  to {cfg.size} x {cfg.size} (crop / zero-pad of the centred spectrum, the usual binning) and the denoised stack is
  returned at {cfg.size} x {cfg.size} (pixel size scaled by side/{cfg.size});
- NaN/Inf values, an empty batch and corrupt MRC bytes are INVALID_ARGUMENT; more particles than the server's
  maximum batch is RESOURCE_EXHAUSTED.

## Architecture
{cfg.arch} U-Net with {len(cfg.channels)} levels, channels {list(cfg.channels)}, {cfg.convs_per_level} x (conv, batch norm, ReLU)
per level on the way down, one on the way up (concatenated skips), a final conv to 1 channel. {parameter_count(model)} parameters
(the spiral and cartesian models have identical parameter counts). {geom}
The multi-scale (U-Net) structure goes beyond the thesis's "fairly simplistic standard" stacks (sec. 7.3.3): at
SNR 1/64 a flat stack of 3 x 3 convolutions sees too little of the particle. The cartesian baseline uses 2 x 2 average
pooling and bilinear upsampling where the spiral model uses Gaussian averaging to a coarser spiral and barycentric
interpolation back.

## Training data (synthetic)
Simulated projections (training/datasets/cryoem.py): {data["n_families"]} random compact molecules of
{data["atoms"][0]}-{data["atoms"][1]} Gaussian atoms (sigma {data["atom_sigma"]} of the disc radius) in
{data["domains"][0]}-{data["domains"][1]} ellipsoidal domains, per-particle domain and atom jitter, uniformly random
3-D orientations, exact projection along z, centred on the centre of mass, inside the unit disc; additive white Gaussian
noise ({data["noise"]}) at SNR {_snr(data["snr"])} (ratio of norms over the disc). {data["sizes"]["train"]} training,
{data["sizes"]["val"]} validation particles (seed {data["seed"]}); test metrics on {m.get("n_test", "?")} held-out particles.

Training: Adam, lr {tr["lr"]} with warm-up and cosine decay, batch {tr["batch_size"]}, {tr["epochs"]} epochs,
rotation augmentation: {_fmt(tr["augment_rotations"])}. Loss: MSE on the disc in the per-particle normalised units.
The weights are those of the epoch with the lowest validation loss (epoch {history[-1].get("best_epoch", "?") if history else "?"}; early
stopping: the training particles have fixed noise, which the networks start to fit after a few epochs at SNR 1/64).
Code version: {entry["training"].get("code_version", "unknown")}.

## Metrics (held-out test set, this model)
| metric | value |
|---|---|
| PSNR (dB, disc, peak = clean dynamic range) | {_fmt(m.get("test_psnr"))} |
| PSNR of the noisy input | {_fmt(m.get("noisy_psnr"))} |
| PSNR of the per-particle-mean predictor | {_fmt(m.get("mean_predictor_psnr"))} |
| MSE (raw units, disc) | {_fmt(m.get("test_mse"))} |
| equivariance error, trained (mean over random angles of ‖F(Rx) − R F(x)‖ / ‖F(x)‖, r ≤ 0.9) | {_fmt(m.get("test_equivariance"))} |
| equivariance error at initialisation (validation subset) | {_fmt(m.get("equivariance_init"))} |
| ONNX Runtime PSNR (same test set) | {_fmt(m.get("onnx_test_psnr"))} |
| ONNX vs torch max relative difference | {_fmt(m.get("onnx_parity_max_rel"))} |

Equivariance is measured with rotations by sinc interpolation (three DFT shears, handlers/denoise/equivariance.py),
which keep white pixel noise white; the rim (r > 0.9) is excluded (Remark 31). Bilinear rotation shrinks the norm of
pixel noise to ~0.67 and correlates it; at SNR 1/64 it gave both architectures the same error (~0.3) whatever
their training, i.e. it measured the interpolation rather than the network. The spectral corners of pixel noise
(beyond the inscribed circle of the DFT square) cannot be rotated on a grid at all, so a small floor remains.

## Spiral vs cartesian (all trained conditions)
{comparison_section(summary)}
{findings_section(summary)}
Training curves (validation PSNR and equivariance error per epoch, epoch 0 = initialisation) of this model:

| epoch | train loss | val MSE | val PSNR (dB) | equivariance |
|---|---|---|---|---|
{curve_rows}

Curves of all conditions: `curves.png` beside this card (if present), raw log `metrics.jsonl`.
{extra}
## Limits
- Trained on simulated density projections with additive Gaussian noise only (the thesis's own simplification,
  sec. 6.3); real micrographs have CTF modulation and Poisson (shot) noise; the simulator can add Poisson noise
  (`--noise poisson`) but this model did not see it.
- Only in-plane rotations (SO(2)) are addressed (Remark 30); the spiral's equivariance is approximate and breaks
  down near the centre (sec. 7.3.2) and at the rim (Remark 31).
- {cfg.size} x {cfg.size} particles with the particle centred; other sizes are resampled as described above.
"""
    Path(path).write_text(text)
