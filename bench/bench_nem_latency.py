"""NEM-U / NEMt latency per image at batch 1 in ONNX Runtime, against a bare forward pass of the frozen model.

    python bench/bench_nem_latency.py [--store model_store] [--threads 1] [--rounds 30] [--reps 20]

For each mask model in the store (kinds nem_u, nemt) and the frozen model it explains, the ONNX
sessions are timed in interleaved rounds (so that load from other processes hits all of them alike);
the median per-image latency and the ratio mask model / frozen model are printed, with the limit
(at most 2x). Exit code 1 if any ratio exceeds the limit.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from xaiserve.paths import checkout_root  # noqa: E402

ROOT = checkout_root()  # the repository: its model_store/ and tests/ helpers
sys.path.insert(0, str(ROOT))

from xaiserve.service.registry import Registry, RegistryConfig  # noqa: E402

LIMIT = 2.0


def feeds_for(entry, session) -> dict[str, np.ndarray]:
    s = entry.input
    x = np.random.default_rng(0).standard_normal((1, s.channels, s.height, s.width)).astype(np.float32)
    f = {"image": x}
    if "target" in session.input_names:
        f["target"] = np.full((1,), -1, np.int64)
    return f


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, default=ROOT / "model_store")
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args(argv)
    reg = Registry(RegistryConfig(store=args.store, intra_op_threads=args.threads, prefer_cuda=False))
    pairs = [(e, reg.frozen_for(e)) for e in reg.entries() if e.kind in ("nem_u", "nemt")]
    if not pairs:
        print(f"no nem_u/nemt models in {args.store}; run `xaiserve train zoo` first")
        return 1
    ids = {e.id: e for pair in pairs for e in pair}
    sess = {i: reg.onnx(e) for i, e in ids.items()}
    feeds = {i: feeds_for(ids[i], sess[i]) for i in ids}
    times: dict[str, list[float]] = {i: [] for i in ids}
    for i in ids:  # warm-up
        for _ in range(args.reps):
            sess[i].run(feeds[i])
    for _ in range(args.rounds):
        for i in ids:
            t0 = time.perf_counter()
            for _ in range(args.reps):
                sess[i].run(feeds[i])
            times[i].append((time.perf_counter() - t0) / args.reps)
    med = {i: statistics.median(v) for i, v in times.items()}
    worst = 0.0
    print(
        f"ONNX Runtime, batch 1, {args.threads} intra-op thread(s), median of {args.rounds} rounds x {args.reps} runs"
    )
    print(f"{'mask model':28s} {'ms/image':>9s}   {'frozen model':24s} {'ms/image':>9s}   ratio (limit {LIMIT:.1f}x)")
    for e, f in pairs:
        r = med[e.id] / med[f.id]
        worst = max(worst, r)
        print(
            f"{e.id:28s} {med[e.id] * 1e3:9.3f}   {f.id:24s} {med[f.id] * 1e3:9.3f}   {r:.2f}x {'ok' if r <= LIMIT else 'OVER'}"
        )
    return 0 if worst <= LIMIT else 1


if __name__ == "__main__":
    sys.exit(main())
