"""Fast-path benchmarks, printed as ratios measured in one run.

1. gRPC overhead: Explain round trip vs the same ONNX Runtime call in-process, p50/p99, batch 1,
   at 64x64 and 224x224 RGB. Goal: overhead p50 <= 1 ms (64) and <= 3 ms (224).
2. Batching: throughput with 16 concurrent clients vs sequential calls. Goal: >= 1.5x.
3. Streaming: answered frames/s vs model-only throughput (goal >= 0.9x); with a sender at 2x the
   model's rate and policy LATEST, p99 frame latency vs model latency (goal <= 2x).
4. Renderings: Explain of a 640 x 480 photo-like image with return_png (mask and overlay PNGs at the
   input's resolution) vs the same call without, interleaved call by call. Goal: <= 1.5x.

The server runs as a separate `xaiserve serve` process on this machine; the models are tiny
stand-ins of the NEM-U graph contract (tests/tiny_models.py) plus the default scenes-nemu when
the store has it. Usage: python bench/bench_grpc.py [--n 300] [--parts 1,2,3,4]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort

from xaiserve.paths import checkout_root  # noqa: E402

ROOT = checkout_root()  # the repository: its model_store/ and tests/ helpers
REPO_STORE = ROOT / "model_store"
sys.path.insert(0, str(ROOT))
from tests.serverutil import server_process  # noqa: E402
from tests.tiny_models import TinyEncoder, TinyNemU, _entry, _export  # noqa: E402
from xaiserve.proto.explain.v1 import explainer_pb2 as pb  # noqa: E402
from xaiserve.proto.explain.v1 import explainer_pb2_grpc as pb_grpc  # noqa: E402
from xaiserve.service.modelstore import add_entry  # noqa: E402
from xaiserve.service.tensors import to_tensor  # noqa: E402


def pct(xs, q) -> float:
    return float(np.percentile(np.asarray(xs) * 1e3, q))


def build(store: Path) -> list[tuple[str, int]]:
    import shutil

    import torch

    torch.manual_seed(0)
    models = []
    for size in (64, 224):
        enc = TinyEncoder()
        name = f"bench-nemu-{size}"
        _export(
            TinyNemU(enc, width=16, depth=2),
            (torch.zeros(1, 3, size, size),),
            store / name / "1/model.onnx",
            ["image"],
            ["mask", "output"],
        )
        _export(enc, (torch.zeros(1, 3, size, size),), store / f"bench-enc-{size}/1/model.onnx", ["image"], ["output"])
        add_entry(store, _entry(f"bench-enc-{size}", "encoder", size, output_dim=16))
        add_entry(store, _entry(name, "nem_u", size, output_dim=16, explains=f"bench-enc-{size}:1"))
        models.append((name, size))
    import json

    if (REPO_STORE / "manifest.json").exists():
        entries = {e["name"]: e for e in json.loads((REPO_STORE / "manifest.json").read_text())["models"]}
        if "scenes-nemu" in entries and "scenes-simclr" in entries:
            for n in ("scenes-nemu", "scenes-simclr"):
                e = entries[n]
                for rel in e["files"].values():
                    (store / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(REPO_STORE / rel, store / rel)
                add_entry(store, e)
            models.append(("scenes-nemu", int(entries["scenes-nemu"]["input"]["height"])))
    return models


def inprocess_latency(store: Path, name: str, size: int, n: int) -> list[float]:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(store / name / "1/model.onnx"), sess_options=so, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    for _ in range(20):
        sess.run(None, {"image": x})
    out = []
    for _ in range(n):
        t = time.perf_counter()
        sess.run(None, {"image": x})
        out.append(time.perf_counter() - t)
    return out


def grpc_latency(stub, name: str, size: int, n: int) -> list[float]:
    img = pb.Image(tensor=to_tensor(np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)))
    req = pb.ExplainRequest(model=name, image=img)
    for _ in range(20):
        stub.Explain(req, timeout=30)
    out = []
    for _ in range(n):
        t = time.perf_counter()
        stub.Explain(req, timeout=30)
        out.append(time.perf_counter() - t)
    return out


async def concurrent_throughput(address: str, name: str, size: int, clients: int, per_client: int) -> float:
    img = pb.Image(tensor=to_tensor(np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)))
    req = pb.ExplainRequest(model=name, image=img)
    async with grpc.aio.insecure_channel(address) as ch:
        stub = pb_grpc.ExplainerStub(ch)
        await stub.Explain(req)

        async def client():
            for _ in range(per_client):
                await stub.Explain(req, timeout=60)

        t = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        return clients * per_client / (time.perf_counter() - t)


def stream_run(
    stub, name: str, size: int, n: int, period: float | None, policy, window: int = 32
) -> tuple[float, list[float], int]:
    """Send n frames every `period` s, or (period None) as fast as the server answers, keeping at most
    `window` frames unanswered; return answered fps, frame latencies, answered count."""
    import threading

    credit = threading.Semaphore(window)
    rng = np.random.default_rng(0)
    imgs = [pb.Image(tensor=to_tensor(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))) for _ in range(8)]
    sent: dict[int, float] = {}

    def gen():
        t0 = time.perf_counter()
        for i in range(n):
            if period:
                delay = t0 + i * period - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            else:
                credit.acquire()
            f = pb.ExplainFrame(frame_id=i, image=imgs[i % 8])
            if i == 0:
                f.model, f.policy, f.max_queue = name, policy, 64
            sent[i] = time.perf_counter()
            yield f

    lat = []
    t = time.perf_counter()
    count = 0
    for r in stub.StreamExplain(gen(), timeout=600):
        lat.append(time.perf_counter() - sent[r.frame_id])
        count += 1
        credit.release()
    return count / (time.perf_counter() - t), lat, count


def photo(h: int, w: int) -> np.ndarray:
    """A smooth, photo-like uint8 image (noise compresses unlike any photo)."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(0)
    return (gaussian_filter(rng.random((h, w, 3)), (4, 4, 0)) * 255).astype(np.uint8)


def png_cost(stub, name: str, n: int, h: int = 480, w: int = 640) -> tuple[list[float], list[float]]:
    """Round trips without and with return_png, alternating so both see the same machine load."""
    img = pb.Image(tensor=to_tensor(photo(h, w)))
    plain = pb.ExplainRequest(model=name, image=img)
    pngs = pb.ExplainRequest(model=name, image=img, options=pb.ExplainOptions(return_png=True))
    for _ in range(10):
        stub.Explain(plain, timeout=30)
        stub.Explain(pngs, timeout=30)
    a, b = [], []
    for i in range(n):
        for req, out in ((plain, a), (pngs, b)) if i % 2 == 0 else ((pngs, b), (plain, a)):
            t = time.perf_counter()
            stub.Explain(req, timeout=30)
            out.append(time.perf_counter() - t)
    return a, b


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--parts", default="1,2,3,4", help="which parts to run, e.g. 4")
    args = ap.parse_args()
    parts = {int(p) for p in args.parts.split(",") if p.strip()}
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        models = build(store)
        with server_process(store, state_dir=Path(tmp) / "state", job_workers=0) as srv:
            ch = grpc.insecure_channel(srv.address)
            stub = pb_grpc.ExplainerStub(ch)
            if 4 in parts:
                name = "scenes-nemu" if any(m == "scenes-nemu" for m, _ in models) else models[0][0]
                a, b = png_cost(stub, name, max(20, args.n // 3))
                print(
                    f"== 4. return_png at 640 x 480 ({name}): p50 without {pct(a, 50):.2f} ms, with {pct(b, 50):.2f} ms, "
                    f"ratio {pct(b, 50) / pct(a, 50):.2f}x (goal <= 1.5x); p90 {pct(a, 90):.2f} / {pct(b, 90):.2f} ms\n"
                )
            if not parts & {1, 2, 3}:
                ch.close()
                return
            print("== 1. gRPC overhead, batch 1 (ms) ==")
            print(
                f"{'model':18} {'size':>5} {'ORT p50':>8} {'ORT p99':>8} {'gRPC p50':>9} {'gRPC p99':>9} {'overhead p50':>13} {'overhead p99':>13} goal"
            )
            for name, size in models:
                a = inprocess_latency(store, name, size, args.n)
                b = grpc_latency(stub, name, size, args.n)
                goal = 1.0 if size <= 64 else 3.0
                ov50, ov99 = pct(b, 50) - pct(a, 50), pct(b, 99) - pct(a, 99)
                print(
                    f"{name:18} {size:>5} {pct(a, 50):8.3f} {pct(a, 99):8.3f} {pct(b, 50):9.3f} {pct(b, 99):9.3f} "
                    f"{ov50:13.3f} {ov99:13.3f} p50<={goal:.0f}ms {'OK' if ov50 <= goal else 'MISSED'}"
                )
            print("\n== 2. batching: 16 concurrent clients vs sequential calls ==")
            for name, size in models:
                seq = asyncio.run(concurrent_throughput(srv.address, name, size, 1, args.n))
                par = asyncio.run(concurrent_throughput(srv.address, name, size, 16, max(10, args.n // 8)))
                print(
                    f"{name:18} sequential {seq:8.1f}/s  16 clients {par:8.1f}/s  ratio {par / seq:5.2f}x (goal >= 1.5x)"
                )
            print("\n== 3. streaming ==")
            for name, size in models:
                model_lat = inprocess_latency(store, name, size, args.n)
                model_fps = 1.0 / float(np.mean(model_lat))
                fps, _, _ = stream_run(stub, name, size, args.n, None, pb.ALL)
                period = float(np.mean(model_lat)) / 2.0
                _, lat, answered = stream_run(stub, name, size, args.n, period, pb.LATEST)
                print(
                    f"{name:18} model-only {model_fps:8.1f} fps  stream(ALL) {fps:8.1f} fps  ratio {fps / model_fps:5.2f}x (goal >= 0.9x)"
                )
                print(
                    f"{'':18} sender at 2x model rate, LATEST: answered {answered}/{args.n}, p99 frame latency "
                    f"{pct(lat, 99):.3f} ms = {pct(lat, 99) / pct(model_lat, 50):.2f}x model p50 {pct(model_lat, 50):.3f} ms (goal <= 2x)"
                )
            ch.close()


if __name__ == "__main__":
    main()
