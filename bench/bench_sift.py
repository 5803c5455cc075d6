"""Benchmark of the SIFT decomposition ([THESIS] ch. 4, handlers/sift), figures measured in one run.

On lesions test images (the default lesions-classifier, 64 x 64) and the same images resized to
224 x 224:

1. keypoints per image (skimage SIFT with the default cutoffs) and the decomposition time
   (keypoint detection + cells + sparse matrices), the reconstruction error max |D(1) - x|;
2. one ablation iteration (the default contrastive score: 2T = 28 slices decoded, classified, and
   differentiated back to the gains) against the decoder's own forward + backward pass on the same
   28 gain vectors, interleaved (decoder, iteration, decoder, ...), medians: the decoder's share of
   an iteration (goal <= 10 %, Remark 24: "much less than that of the subsequent network
   evaluations") and the decomposition time in iterations;
3. the same at 224 x 224 (the decoder's sparse matrix sizes too). There is no 224 classifier in the
   store; lesions-classifier is fully convolutional with global pooling, so it runs on 224 x 224
   input and stands in for the cost of a small CNN at that size (its scores there mean nothing, the
   timing does). Fewer repeats there (--repeats-224), since an iteration takes seconds.

Decomposition times are wall and CPU (process) seconds: on a shared machine the CPU time is the
cost, the wall time the load.

    python bench/bench_sift.py [--images 5] [--repeats 7] [--repeats-224 3] [--json out.json]
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
import torch.nn.functional as F

from xaiserve.paths import checkout_root

ROOT = checkout_root()


def _lesions(n: int):
    from xaiserve.training.datasets.lesions import Lesions, LesionsConfig

    return Lesions(LesionsConfig(sizes={"train": 1, "val": 1, "test": n})).split("test")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--repeats-224", type=int, default=3)
    ap.add_argument("--store", type=Path, default=ROOT / "model_store")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    from xaiserve.handlers.sift import SiftAblation, SiftAblationConfig, decompose
    from xaiserve.handlers.sift.ablation import keypoints_of
    from xaiserve.handlers.sift.keypoints import KeypointConfig
    from xaiserve.service.registry import Registry, RegistryConfig

    reg = Registry(RegistryConfig(store=args.store, warmup=False))
    entry = reg.resolve("lesions-classifier")
    module = reg.torch_module(entry)
    mean, std = entry.input.mean, entry.input.std
    m_t, s_t = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    split = _lesions(args.images)
    cfg = SiftAblationConfig()
    method = SiftAblation(module, cfg, mean=mean, std=std)
    T = cfg.num_slices
    rows = {64: [], 224: []}
    for i in range(args.images):
        img = torch.from_numpy(split.images[i]).float() / 255.0
        for side in (64, 224):
            im = (
                img
                if side == 64
                else F.interpolate(img[None], size=(side, side), mode="bilinear", align_corners=False)[0]
            )
            x = (im - m_t) / s_t
            t0 = time.perf_counter()
            kp = keypoints_of(x, KeypointConfig(), mean, std)
            t_kp = time.perf_counter() - t0
            c0 = time.process_time()
            dec = decompose(x, kp, cfg.cells)
            dec_cpu = time.process_time() - c0
            K = dec.num_keypoints
            theta = torch.rand(2 * T, K, generator=torch.Generator().manual_seed(i))
            w = torch.randn(1, *dec.image_shape, generator=torch.Generator().manual_seed(i))

            def decoder_pass() -> float:
                th = theta.clone().requires_grad_(True)
                t = time.perf_counter()
                (dec.decode(th) * w).sum().backward()
                return time.perf_counter() - t

            def iteration() -> float:
                state = (1.0 - theta[:T]).reshape(1, T, 1, K).clone().requires_grad_(True)
                t = time.perf_counter()
                method._gradient(dec, state, int(split.labels[i]), 0.9, 0.1)
                return time.perf_counter() - t

            d_times, it_times = [], []
            for _ in range(args.repeats if side == 64 else args.repeats_224):  # interleaved contestants
                d_times.append(decoder_pass())
                it_times.append(iteration())
            row = {
                "keypoints": K,
                "detect_s": t_kp,
                "decompose_s": dec.seconds,
                "decompose_cpu_s": dec_cpu,
                "reconstruction_error": dec.reconstruction_error,
                "decoder_fwd_bwd_s": statistics.median(d_times),
                "nnz": dec.nnz,
                "dense_entries": sum(int(np.prod(lv.shape)) * dec.image_shape[0] * K for lv in dec.levels),
            }
            row["iteration_s"] = statistics.median(it_times)
            rows[side].append(row)

    def med(side: int, key: str) -> float:
        return float(statistics.median(r[key] for r in rows[side]))

    out = {}
    for side in (64, 224):
        out[side] = {k: med(side, k) for k in rows[side][0]}
        out[side]["keypoints_range"] = [
            min(r["keypoints"] for r in rows[side]),
            max(r["keypoints"] for r in rows[side]),
        ]
    for side in (64, 224):
        out[side]["decoder_share_of_iteration"] = float(
            statistics.median(r["decoder_fwd_bwd_s"] / r["iteration_s"] for r in rows[side])
        )
        out[side]["decomposition_in_iterations"] = float(
            statistics.median((r["detect_s"] + r["decompose_s"]) / r["iteration_s"] for r in rows[side])
        )
    print(f"SIFT decomposition, {args.images} lesions test images, medians (torch threads 1)")
    for side in (64, 224):
        o = out[side]
        print(
            f"  {side} x {side}: {o['keypoints']:.0f} keypoints (range {o['keypoints_range'][0]}-{o['keypoints_range'][1]}), "
            f"detect {o['detect_s'] * 1e3:.0f} ms, decompose {o['decompose_s'] * 1e3:.0f} ms "
            f"(CPU {o['decompose_cpu_s'] * 1e3:.0f} ms), max |D(1) - x| {o['reconstruction_error']:.1e}, "
            f"nnz {o['nnz']:.0f} ({o['nnz'] / o['dense_entries']:.1%} of dense)"
        )
        print(
            f"    one ablation iteration (contrastive, {2 * T} slices, lesions-classifier fwd+bwd): "
            f"{o['iteration_s'] * 1e3:.0f} ms; decoder fwd+bwd on the {2 * T} gain vectors "
            f"{o['decoder_fwd_bwd_s'] * 1e3:.1f} ms = {o['decoder_share_of_iteration']:.1%} of it (goal <= 10 %); "
            f"detect + decompose = {o['decomposition_in_iterations']:.2f} iterations, once per job"
        )
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
