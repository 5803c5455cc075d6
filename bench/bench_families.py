"""Speed of the two explanation families on the same encoder ([NEM-U] Table 1 analog).

NEM-U (one ONNX Runtime call returns the mask and the embedding) per explanation, against RELAX on
the same frozen encoder (ONNX Runtime, batched masks) with N = 3000 and with the adaptive rule
(target standard error 0.01). Goal: NEM-U >= 500x faster than RELAX with N = 3000.
Uses the default scenes-nemu / scenes-simclr and scenes test images.

    python bench/bench_families.py [--images 3] [--repeats 50]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from xaiserve.paths import checkout_root  # noqa: E402

ROOT = checkout_root()  # the repository: its model_store/ and tests/ helpers
sys.path.insert(0, str(ROOT))
from xaiserve.handlers.relax import Relax, RelaxConfig  # noqa: E402
from xaiserve.service.jobs.relax import onnx_embed  # noqa: E402
from xaiserve.service.registry import Registry, RegistryConfig  # noqa: E402
from xaiserve.training.datasets.scenes import scenes  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--store", default=str(ROOT / "model_store"))
    args = ap.parse_args()
    reg = Registry(RegistryConfig(store=Path(args.store)))
    nemu, enc = reg.resolve("scenes-nemu"), reg.resolve("scenes-simclr")
    ds = scenes()
    x_all = ds.normalise(ds.split("test").images[: args.images]).numpy()
    nem = reg.onnx(nemu)
    embed = onnx_embed(reg.onnx(enc))

    t_nem = []
    for x in x_all:
        nem.run({"image": x[None]})
        t = time.perf_counter()
        for _ in range(args.repeats):
            nem.run({"image": x[None]})
        t_nem.append((time.perf_counter() - t) / args.repeats)
    nem_s = float(np.mean(t_nem))

    rows = []
    for label, cfg in [
        ("RELAX N=3000", RelaxConfig(num_masks=3000, batch_size=100)),
        ("RELAX adaptive t=0.01", RelaxConfig(num_masks=3000, adaptive=True, target_error=0.01, batch_size=100)),
    ]:
        times, ns = [], []
        for x in x_all:
            t = time.perf_counter()
            out = Relax(embed, cfg).attribute(torch.from_numpy(x))
            times.append(time.perf_counter() - t)
            ns.append(out.num_masks)
        rows.append((label, float(np.mean(times)), float(np.mean(ns))))

    print(f"encoder {enc.id}, {args.images} scenes test images, ONNX Runtime CPU, batch 1 for NEM-U")
    print(f"{'method':24} {'s / explanation':>16} {'masks':>7} {'NEM-U speed-up':>15}")
    print(f"{'NEM-U (' + nemu.id + ')':24} {nem_s:16.5f} {'-':>7} {'1x':>15}")
    for label, s, n in rows:
        print(f"{label:24} {s:16.3f} {n:7.0f} {s / nem_s:14.0f}x")
    print(f"goal: NEM-U >= 500x faster than RELAX N=3000 -> {'OK' if rows[0][1] / nem_s >= 500 else 'MISSED'}")


if __name__ == "__main__":
    main()
