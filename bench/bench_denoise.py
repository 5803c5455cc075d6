"""Spiral vs cartesian denoiser latency per particle on CPU (target: <= 1.5x at 64 x 64).

    python bench/bench_denoise.py [--store model_store] [--threads 1] [--batches 1,32] [--rounds 15]

Three contestants per size, timed in interleaved rounds (load from other processes hits them alike):
  spiral        the spiral network as the server runs it (handlers/denoise/spiral_runtime.py:
                ONNX Runtime convolutions, resampling in compiled loops), from the same weights;
  spiral-graph  the spiral network's single exported ONNX graph in ONNX Runtime;
  cartesian     the cartesian baseline's exported ONNX graph in ONNX Runtime (its fastest form).
Configurations: 64 x 64 (the exported cryoem-spiral / cryoem-cartesian models from the store when
present, else freshly built ones of the default architecture, or of --channels), and 128 x 128
(the same architecture at that size, n_wind = 64, n_spls = round(pi 64^2), exported to a temporary
directory; latency does not depend on the weights). Prints the median per-particle latency and the
ratios spiral / cartesian (the target) and spiral-graph / cartesian per batch size. Exit code 1 if
a 64 x 64 spiral / cartesian ratio exceeds the limit at any batch size.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from xaiserve.paths import checkout_root  # noqa: E402

ROOT = checkout_root()  # the repository: its model_store/ and tests/ helpers
sys.path.insert(0, str(ROOT))

LIMIT = 1.5


def _contestants(
    size: int, store: Path, tmp: Path, threads: int, channels: tuple[int, ...] | None
) -> dict[str, tuple[object, str]]:
    import torch

    from xaiserve.handlers.denoise.export import export_onnx, load_denoiser
    from xaiserve.handlers.denoise.networks import Denoiser, DenoiserConfig
    from xaiserve.handlers.denoise.spiral_runtime import SpiralRuntime
    from xaiserve.service.registry import OnnxModel, read_manifest

    out = {}
    for arch in ("spiral", "cartesian"):
        stored = store / f"cryoem-{arch}" / "1" / "model.onnx"
        if size == 64 and stored.exists() and channels is None:
            path = stored
            if arch == "spiral":
                entry = next(e for e in read_manifest(store) if e.id == "cryoem-spiral:1")
                module = load_denoiser(entry, store)
        else:
            torch.manual_seed(0)
            cfg = (
                DenoiserConfig(arch=arch, size=size)
                if channels is None
                else DenoiserConfig(arch=arch, size=size, channels=channels)
            )
            module = Denoiser(cfg).eval()
            path = export_onnx(module, tmp / f"{arch}{size}.onnx")
        label = str(path) if path.parent != tmp else f"{path.name} (fresh weights)"
        if arch == "spiral":
            out["spiral"] = (SpiralRuntime(module, threads=threads), f"SpiralRuntime, same weights as {label}")
            out["spiral-graph"] = (OnnxModel(path, intra_op_threads=threads, prefer_cuda=False), label)
        else:
            out["cartesian"] = (OnnxModel(path, intra_op_threads=threads, prefer_cuda=False), label)
    return out


def _time(model, x: np.ndarray, reps: int) -> float:
    feeds = {"particles": x}
    t0 = time.perf_counter()
    for _ in range(reps):
        model.run(feeds)
    return (time.perf_counter() - t0) / reps / x.shape[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, default=ROOT / "model_store")
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    ap.add_argument("--batches", default="1,32", help="batch sizes, comma-separated")
    ap.add_argument("--sizes", default="64,128")
    ap.add_argument(
        "--channels",
        default=None,
        help="channels per level of freshly built models, e.g. 24,48,96 (default: the store's models / the default architecture)",
    )
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--reps", type=int, default=0, help="runs per round (0: about 64 particles per round)")
    ap.add_argument(
        "--json",
        type=Path,
        default=None,
        help="also write the results here (read by `xaiserve export denoiser --bench`)",
    )
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    sizes = [int(s) for s in args.sizes.split(",")]
    rng = np.random.default_rng(0)
    status = 0
    results = []
    print(f"CPU, {args.threads} intra-op thread(s); median of {args.rounds} interleaved rounds; ms per particle")
    with tempfile.TemporaryDirectory() as tmpd:
        for size in sizes:
            sess = _contestants(
                size,
                args.store,
                Path(tmpd),
                args.threads,
                tuple(int(c) for c in args.channels.split(",")) if args.channels else None,
            )
            for name, (_, label) in sess.items():
                print(f"  {size}x{size} {name}: {label}")
            for b in batches:
                x = rng.standard_normal((b, 1, size, size)).astype(np.float32)
                reps = args.reps or max(1, 64 // b)
                times: dict[str, list[float]] = {a: [] for a in sess}
                for a, (m, _) in sess.items():
                    m.run({"particles": x})  # warm-up (and the runtime's one-time compilation)
                for _ in range(args.rounds):
                    for a, (m, _) in sess.items():
                        times[a].append(_time(m, x, reps))
                med = {a: statistics.median(t) * 1e3 for a, t in times.items()}
                ratio = med["spiral"] / med["cartesian"]
                graph_ratio = med["spiral-graph"] / med["cartesian"]
                limit = f" (limit {LIMIT}x: {'ok' if ratio <= LIMIT else 'EXCEEDED'})" if size == 64 else ""
                print(
                    f"{size:>4}x{size:<4} batch {b:>3}: spiral {med['spiral']:7.3f} ms  spiral-graph {med['spiral-graph']:7.3f} ms  "
                    f"cartesian {med['cartesian']:7.3f} ms  spiral/cartesian {ratio:5.2f}x{limit}  spiral-graph/cartesian {graph_ratio:5.2f}x"
                )
                results.append(
                    {
                        "size": size,
                        "batch": b,
                        "spiral_ms": med["spiral"],
                        "spiral_graph_ms": med["spiral-graph"],
                        "cartesian_ms": med["cartesian"],
                        "ratio": ratio,
                        "graph_ratio": graph_ratio,
                        "threads": args.threads,
                        "channels": args.channels or "default",
                    }
                )
                if size == 64 and ratio > LIMIT:
                    status = 1
    if args.json:
        import json

        args.json.write_text(json.dumps({"limit": LIMIT, "results": results}, indent=2) + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
