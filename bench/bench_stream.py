"""Video streams in real time: encoded video, JPEG frames, cameras in separate client processes.

The video is synthetic, and says so: a 640 x 480, 30 fps clip made here with PyAV (libx264 H.264,
mpeg4 when the wheel lacks it) from scikit-image's sample photos (slowly panned) with Fashion-MNIST
items moving over them, then decoded again with PyAV and JPEG-encoded per frame (Pillow, quality
80), as a camera pipeline would send it. The model is scenes-nemu from model_store/ (NEM-U,
[NEM-U] sec. 3, 64 x 64 input), served by a real `xaiserve serve` process on 127.0.0.1 with the
default store; each camera is its own process using the Python client's stream helper.

Contestants, measured in the same run and interleaved (both servers run side by side, idle when
the other one is measured):
  serving   the defaults: ONNX Runtime spinning off, intra-op threads auto (1 on 2 cores, 8 models)
  ort       ONNX Runtime's own default on this machine: spinning on, 2 intra-op threads
References in this process: "model-only" = per frame, one thread, JPEG decode + preprocessing +
the ONNX call (the work without which there is no mask); "handler" = model-only + the stream's
mask encoding + serialising the answer (what the server must do per frame besides gRPC). ONNX
alone is printed as well.

Goals (issue "Video streams in real time", on these 2 cores):
  1. 4 cameras at 30 fps: 0 drops, p99 latency <= 50 ms (client send to answer received)
  2. answered-fps ceiling (4 cameras, pace="auto") >= 0.9 x the model-only rate
  3. server CPU per answered frame (at 4 x 30 fps) <= 2 x the in-process handler's
  4. bytes per answer at 640 x 480 with the stream default <= 20 kB

Needs the bench extra: pip install -e ".[bench]" (PyAV, scikit-image) and the Fashion-MNIST files
(Debian package dataset-fashion-mnist; scripts/setup.sh installs it).
Usage: python bench/bench_stream.py [--seconds 20] [--cameras 4] [--fps 30]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing as mp
import os
import pickle
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image as PILImage

from xaiserve.paths import checkout_root

ROOT = checkout_root()
STORE = ROOT / "model_store"
sys.path.insert(0, str(ROOT))
MODEL = "scenes-nemu"
W, H = 640, 480
GOAL_P99_MS, GOAL_CEILING, GOAL_CPU, GOAL_BYTES = 50.0, 0.9, 2.0, 20_000


# ------------------------------------------------------------------------------------ the video
def _fashion_items(n: int, seed: int) -> list[np.ndarray]:
    from xaiserve.training.datasets.idx import load_fashion_mnist

    fm = load_fashion_mnist()
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(fm.test_images), n, replace=False)
    return [np.asarray(fm.test_images[i], dtype=np.float32) / 255.0 for i in idx]


def make_video(path: Path, seconds: float, fps: int = 30, seed: int = 0) -> str:
    """Write the synthetic clip; returns the codec used."""
    import av
    from skimage import data

    rng = np.random.default_rng(seed)
    photos = [data.coffee(), data.astronaut(), data.chelsea(), data.rocket()]
    # backgrounds larger than the frame, so that a slow pan moves them
    backs = [
        np.asarray(PILImage.fromarray(p).resize((W + 160, H + 120), PILImage.BILINEAR), dtype=np.float32) / 255
        for p in photos
    ]
    items = _fashion_items(4, seed)
    sizes = rng.integers(110, 170, len(items))
    tints = rng.uniform(0.2, 1.0, (len(items), 3)).astype(np.float32)
    sprites = [
        np.asarray(
            PILImage.fromarray((it * 255).astype(np.uint8)).resize((int(s), int(s)), PILImage.BILINEAR),
            dtype=np.float32,
        )
        / 255
        for it, s in zip(items, sizes)
    ]
    n = int(round(seconds * fps))
    codec = "libx264"
    try:
        av.codec.Codec(codec, "w")
    except Exception:  # noqa: BLE001 - wheels without x264: MPEG-4 part 2
        codec = "mpeg4"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        if codec == "libx264":
            stream.options = {"preset": "veryfast", "crf": "23"}
        else:
            stream.bit_rate = 4_000_000
        for i in range(n):
            t = i / fps
            back = backs[int(t // 5) % len(backs)]  # a new scene every 5 s
            ox = int(80 + 80 * np.sin(0.4 * t))
            oy = int(60 + 60 * np.cos(0.3 * t))
            frame = back[oy : oy + H, ox : ox + W].copy()
            for k, (sp, tint) in enumerate(zip(sprites, tints)):
                s = sp.shape[0]
                x = int((W - s) * (0.5 + 0.45 * np.sin(0.7 * t * (k + 1) + k)))
                y = int((H - s) * (0.5 + 0.45 * np.cos(0.5 * t * (k + 2) + 2 * k)))
                alpha = sp[:, :, None]
                frame[y : y + s, x : x + s] = (1 - alpha) * frame[y : y + s, x : x + s] + alpha * tint
            vf = av.VideoFrame.from_ndarray((np.clip(frame, 0, 1) * 255).astype(np.uint8), format="rgb24")
            for packet in stream.encode(vf):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return codec


def decode_to_jpegs(path: Path, quality: int = 80) -> list[bytes]:
    """Decode the clip with PyAV and JPEG-encode every frame, as a camera pipeline would."""
    import av

    out = []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            buf = io.BytesIO()
            PILImage.fromarray(frame.to_ndarray(format="rgb24")).save(buf, format="JPEG", quality=quality)
            out.append(buf.getvalue())
    return out


# ------------------------------------------------------------------------------- in this process
def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def in_process(jpegs: list[bytes], n: int) -> dict:
    """The per-frame work without gRPC, with the server's ONNX Runtime settings (one thread)."""
    from xaiserve.proto.explain.v1 import explainer_pb2 as pb
    from xaiserve.service.fastpath import FastPath
    from xaiserve.service.mask_wire import fill_mask, with_stream_defaults
    from xaiserve.service.registry import Registry, RegistryConfig

    reg = Registry(RegistryConfig(store=STORE, concurrent_calls=2))
    entry = reg.resolve(MODEL)
    onnx = reg.onnx(entry)
    spec = entry.input
    opts = with_stream_defaults(pb.ExplainOptions())
    frames = [pb.Image(encoded=jpegs[i % len(jpegs)]) for i in range(n)]
    res: dict = {"intra_op_threads": reg.onnx_intra_op_threads()}

    def model_only(img):
        image, x, _ = FastPath._prepare(img, spec, False)  # as the server does for a frame (no PNG, no DICOM)
        return image, onnx.run({"image": x})

    def handler(img):
        image, out = model_only(img)
        r = pb.ExplainResponse(model=entry.id, method=entry.kind)
        fill_mask(r, image, out["mask"][0, 0], opts, spec)
        return pb.ExplainFrameResult(frame_id=1, result=r).SerializeToString()

    x = FastPath._prepare(frames[0], spec, False)[1]
    for name, fn, items in (
        ("onnx", lambda a: onnx.run({"image": a}), [x] * n),
        ("model_only", model_only, frames),
        ("handler", handler, frames),
    ):
        for it in items[:5]:
            fn(it)
        c0, t0 = cpu_s(), time.perf_counter()
        for it in items:
            fn(it)
        wall, cpu = time.perf_counter() - t0, cpu_s() - c0
        res[name] = {"fps": n / wall, "cpu_ms": cpu / n * 1e3, "wall_ms": wall / n * 1e3}
    return res


# ------------------------------------------------------------------------------------ cameras
def camera(address: str, jpeg_file: str, index: int, pace, seconds: float, start_at: float, queue) -> None:
    """One camera process: streams the clip (looping) for `seconds`, starting at `start_at`."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from xaiserve.service.client import ExplainerClient, is_notice

    jpegs = pickle.loads(Path(jpeg_file).read_bytes())
    offset = (index * 97) % len(jpegs)  # cameras out of phase
    lat, sizes, trace = [], [], []
    answered = failed = dropped = 0
    first = last = None
    t_start = [0.0]

    def frames():
        time.sleep(max(0.0, start_at - time.time()))
        t_start[0] = time.time()
        end = time.monotonic() + seconds
        i = 0
        while time.monotonic() < end:
            yield jpegs[(offset + i) % len(jpegs)]
            i += 1

    try:
        with ExplainerClient(address) as c:
            for a in c.stream(frames(), MODEL, pace=pace, timeout=seconds + 60):
                if is_notice(a):
                    continue
                now_us = time.time_ns() // 1000
                if a.status.code:
                    failed += 1
                    continue
                answered += 1
                dropped = a.dropped_total
                lat.append((now_us - a.client_timestamp_us) / 1e3)
                tm = a.result.timing
                # one row per answer, all on this machine's wall clock (us): where a drop happened
                trace.append(
                    (
                        a.frame_id,
                        a.client_timestamp_us,
                        a.received_unix_us,
                        a.answered_unix_us,
                        now_us,
                        a.dropped_total,
                        tm.queue_ms,
                        tm.inference_ms,
                        tm.batch_size,
                        tm.total_ms,
                    )
                )
                sizes.append(a.ByteSize())
                first = first or time.monotonic()
                last = time.monotonic()
        err = ""
    except Exception as e:  # noqa: BLE001 - reported in the table
        err = f"{type(e).__name__}: {e}"[:300]
    queue.put(
        {
            "index": index,
            "answered": answered,
            "failed": failed,
            "dropped": dropped,
            "lat_ms": lat,
            "bytes": float(np.mean(sizes)) if sizes else 0.0,
            "span_s": (last - first) if first and last else 0.0,
            "error": err,
            "trace": trace,
            "t_start_us": int(t_start[0] * 1e6),
            "cpu_s": cpu_s(),
        }
    )


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def drop_events(results: list[dict]) -> list[dict]:
    """Each dropped frame (an id no answer names) with what the server held at the time: the frame
    that was running (the last answered before the gap) and its timings, from the answers' traces."""
    events = []
    for r in results:
        tr, t0 = r["trace"], r["t_start_us"]
        for prev, nxt in zip(tr, tr[1:]):
            for fid in range(prev[0] + 1, nxt[0]):
                events.append(
                    {
                        "camera": r["index"],
                        "frame": fid,
                        "since_start_ms": (nxt[1] - t0) / 1e3,  # when the frame that replaced it was sent
                        "running": prev[0],
                        "running_sent_ms": (prev[1] - t0) / 1e3,
                        "running_server_ms": (prev[3] - prev[2]) / 1e3,  # received -> answered
                        "running_queue_ms": prev[6],
                        "running_inference_ms": prev[7],
                        "running_batch": prev[8],
                        "running_total_ms": prev[9],
                        "replacement": nxt[0],
                        "replacement_wait_ms": (nxt[3] - nxt[2]) / 1e3 - nxt[9],  # received -> explain started
                        "dropped_total_after": nxt[5],
                    }
                )
    return events


def sojourn(results: list[dict]) -> dict:
    """Percentiles of the server's time per frame: received -> answered, and FastPath.explain alone."""
    tr = [row for r in results for row in r["trace"]]
    if not tr:
        return {}
    server = np.array([(row[3] - row[2]) / 1e3 for row in tr])
    explain = np.array([row[9] for row in tr])
    q = lambda a, p: float(np.percentile(a, p))  # noqa: E731
    return {
        "server_ms_p50": q(server, 50),
        "server_ms_p99": q(server, 99),
        "explain_ms_p50": q(explain, 50),
        "explain_ms_p99": q(explain, 99),
        "inference_ms_p50": q(np.array([row[7] for row in tr]), 50),
        # each camera's first frame, received -> answered (the start-up cost a new stream meets)
        "first_frame_server_ms": [(r["trace"][0][3] - r["trace"][0][2]) / 1e3 for r in results if r["trace"]],
    }


def run_cameras(address: str, server_pid: int, jpeg_file: str, cameras: int, pace, seconds: float) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    start_at = time.time() + 3.0  # all processes imported and connected by then
    procs = [
        ctx.Process(target=camera, args=(address, jpeg_file, i, pace, seconds, start_at, q)) for i in range(cameras)
    ]
    for p in procs:
        p.start()
    time.sleep(max(0.0, start_at - time.time()))
    c0, t0 = proc_cpu_s(server_pid), time.monotonic()
    results = [q.get(timeout=seconds + 120) for _ in procs]
    c1, t1 = proc_cpu_s(server_pid), time.monotonic()
    for p in procs:
        p.join(30)
    answered = sum(r["answered"] for r in results)
    drops = drop_events(results)
    lat = np.concatenate([r["lat_ms"] for r in results]) if answered else np.zeros(1)
    return {
        "answered": answered,
        "failed": sum(r["failed"] for r in results),
        "dropped": sum(r["dropped"] for r in results),
        "fps_per_camera": [r["answered"] / seconds for r in results],
        "fps_total": answered / seconds,
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "max_ms": float(lat.max()),
        "bytes": float(np.mean([r["bytes"] for r in results])),
        "server_cpu_s": c1 - c0,
        "wall_s": t1 - t0,
        "server_cpu_ms_per_frame": (c1 - c0) / max(answered, 1) * 1e3,
        "errors": [r["error"] for r in results if r["error"]],
        "drop_events": drops,
        "start_unix": start_at,
        "client_cpu_ms_per_frame": sum(r["cpu_s"] for r in results) / max(answered, 1) * 1e3,
        **sojourn(results),
    }


def byte_sizes(address: str, jpegs: list[bytes], n: int = 30) -> dict:
    """Bytes per answer at 640 x 480 for every mask encoding, and the error of each once mapped back."""
    from xaiserve.proto.explain.v1 import explainer_pb2 as pb
    from xaiserve.service.client import ExplainerClient, decode_mask
    from xaiserve.service.tensors import from_tensor

    out = {}
    frames = jpegs[:n]
    with ExplainerClient(address) as c:
        ref = [
            from_tensor(c.stub.Explain(pb.ExplainRequest(model=MODEL, image=pb.Image(encoded=j)), timeout=30).mask)
            for j in frames
        ]
        for enc in (pb.MASK_FLOAT32, pb.MASK_UINT8, pb.MASK_PNG):
            for res in (pb.MASK_AT_INPUT, pb.MASK_AT_MODEL):
                opts = pb.ExplainOptions(mask_encoding=enc, mask_resolution=res)
                answers = list(c.stream(frames, MODEL, policy=pb.ALL, options=opts, timeout=120))
                err = max(float(np.abs(decode_mask(a.result) - r).max()) for a, r in zip(answers, ref))
                out[f"{pb.MaskEncoding.Name(enc)} {pb.MaskResolution.Name(res)}"] = {
                    "bytes": float(np.mean([a.ByteSize() for a in answers])),
                    "max_error": err,
                }
        answers = list(c.stream(frames, MODEL, policy=pb.ALL, timeout=120))
        out["stream default"] = {
            "bytes": float(np.mean([a.ByteSize() for a in answers])),
            "encoding": f"{answers[0].result.mask.dtype} {list(answers[0].result.mask.shape)}",
        }
    return out


def load() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


# ---------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=20.0, help="per camera configuration (and the clip's length)")
    ap.add_argument("--cameras", type=int, default=4)
    ap.add_argument("--fps", type=float, default=30.0)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument(
        "--trace", action="store_true", help="print every dropped frame: when, and what the server was running"
    )
    ap.add_argument("--repeat", type=int, default=1, help="run the cameras scenario this many times (interleaved)")
    ap.add_argument("--only", default="", help="e.g. cameras/serving: run only these runs (comma-separated)")
    args = ap.parse_args()
    from tests.serverutil import server_process

    print(f"load at start: {load()}", flush=True)
    figures: dict = {"load_start": load()}
    with tempfile.TemporaryDirectory(prefix="bench-stream-") as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        clip = tmp / "clip.mp4"
        codec = make_video(clip, args.seconds)
        jpegs = decode_to_jpegs(clip)
        jpeg_file = tmp / "jpegs.pkl"
        jpeg_file.write_bytes(pickle.dumps(jpegs))
        figures["video"] = {
            "codec": codec,
            "frames": len(jpegs),
            "file_bytes": clip.stat().st_size,
            "mean_jpeg_bytes": float(np.mean([len(j) for j in jpegs])),
            "seconds_to_make": time.perf_counter() - t,
        }
        print(
            f"video: {codec}, {len(jpegs)} frames {W} x {H}, {clip.stat().st_size / 1e6:.2f} MB, "
            f"mean JPEG {figures['video']['mean_jpeg_bytes'] / 1e3:.1f} kB",
            flush=True,
        )

        contestants = {
            "serving": {},
            "ort": {"ort_spinning": "true", "intra_op_threads": 2},
            "one-in-flight": {"stream_latest_inflight": 1},  # LATEST before: one frame of a stream at a time
        }
        with contextlib.ExitStack() as stack:
            servers = {
                name: stack.enter_context(server_process(STORE, state_dir=tmp / name, job_workers=0, **kw))
                for name, kw in contestants.items()
            }
            figures["inproc"] = in_process(jpegs, min(len(jpegs), 300))
            print("in process:", json.dumps(figures["inproc"]), flush=True)
            runs: dict = {}
            plan = [("cameras", args.fps, args.seconds, name, rep) for rep in range(args.repeat) for name in servers]
            plan += [("ceiling", "auto", args.seconds / 2, name, 0) for name in ("serving", "ort")]
            for scenario, pace, secs, name, rep in plan:
                key = f"{scenario}/{name}" + (f" #{rep + 1}" if rep else "")
                if args.only and f"{scenario}/{name}" not in args.only.split(","):
                    continue
                srv = servers[name]
                r = run_cameras(srv.address, srv.process.pid, str(jpeg_file), args.cameras, pace, secs)
                r["load"] = load()
                runs[key] = r
                print(f"{key}: " + json.dumps({k: v for k, v in r.items() if k != "drop_events"}), flush=True)
                if args.trace:
                    for e in r["drop_events"]:
                        print("  drop: " + json.dumps({k: round(v, 1) for k, v in e.items()}), flush=True)
            figures["runs"] = runs
            figures["inproc_after"] = in_process(jpegs, min(len(jpegs), 300))
            print("in process (after):", json.dumps(figures["inproc_after"]), flush=True)
            figures["bytes"] = byte_sizes(servers["serving"].address, jpegs)
    figures["load_end"] = load()
    if args.only:  # a partial run (tracing): the figures above, no goal table
        print(f"load at end: {figures['load_end']}")
    else:
        report(figures, args)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


def report(f: dict, args) -> None:
    ip = {k: min(f["inproc"][k]["cpu_ms"], f["inproc_after"][k]["cpu_ms"]) for k in ("onnx", "model_only", "handler")}
    rate = {k: max(f["inproc"][k]["fps"], f["inproc_after"][k]["fps"]) for k in ("onnx", "model_only", "handler")}
    print(
        "\n## bench_stream: %d cameras x %.0f fps, %.0f s each, %s"
        % (args.cameras, args.fps, args.seconds, f["video"]["codec"])
    )
    print(f"load: start `{f['load_start']}`, end `{f['load_end']}`")
    print(
        f"in process (best of before/after): ONNX alone {rate['onnx']:.0f} fps ({ip['onnx']:.2f} ms CPU), "
        f"model-only {rate['model_only']:.0f} fps ({ip['model_only']:.2f} ms CPU), handler {rate['handler']:.0f} fps "
        f"({ip['handler']:.2f} ms CPU per frame)\n"
    )
    print(
        "| run | answered fps | drops (in the first second) | failed | p50 ms | p99 ms | server CPU ms / answer "
        "| bytes / answer | first frame ms (slowest camera) | load after |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for k, r in f["runs"].items():
        early = sum(1 for e in r["drop_events"] if e["since_start_ms"] < 1000)
        print(
            f"| {k} | {r['fps_total']:.1f} ({', '.join(f'{x:.1f}' for x in r['fps_per_camera'])}) | "
            f"{r['dropped']} ({early}) | {r['failed']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
            f"{r['server_cpu_ms_per_frame']:.2f} | {r['bytes']:.0f} | {max(r.get('first_frame_server_ms') or [0]):.1f} | "
            f"{r['load'].split('average:')[-1].strip()} |"
        )
    print("\n| mask encoding (640 x 480) | bytes / answer | max error vs float32 at input |")
    print("|---|---|---|")
    for k, v in f["bytes"].items():
        print(
            f"| {k} | {v['bytes']:.0f} | {v.get('max_error', float('nan')):.2g} |"
            if "max_error" in v
            else f"| {k} ({v['encoding']}) | {v['bytes']:.0f} | |"
        )
    cam, ceil = f["runs"]["cameras/serving"], f["runs"]["ceiling/serving"]
    cams = [r for k, r in f["runs"].items() if k.startswith("cameras/serving")]  # every repeat
    goals = [
        (
            "4 cameras at 30 fps: 0 drops, p99 <= 50 ms",
            all(r["dropped"] == 0 and r["p99_ms"] <= GOAL_P99_MS for r in cams),
            "; ".join(
                f"drops {r['dropped']}, p99 {r['p99_ms']:.1f} ms, {r['fps_total'] / args.cameras:.1f} fps per camera"
                for r in cams
            ),
        ),
        (
            "ceiling >= 0.9 x model-only",
            ceil["fps_total"] >= GOAL_CEILING * rate["model_only"],
            f"{ceil['fps_total']:.0f} / {rate['model_only']:.0f} fps = {ceil['fps_total'] / rate['model_only']:.2f}x",
        ),
        (
            "server CPU / answer <= 2 x in-process handler",
            cam["server_cpu_ms_per_frame"] <= GOAL_CPU * ip["handler"],
            f"{cam['server_cpu_ms_per_frame']:.2f} / {ip['handler']:.2f} ms = {cam['server_cpu_ms_per_frame'] / ip['handler']:.2f}x",
        ),
        (
            "bytes / answer (stream default) <= 20 kB",
            f["bytes"]["stream default"]["bytes"] <= GOAL_BYTES,
            f"{f['bytes']['stream default']['bytes']:.0f} B",
        ),
    ]
    print("\n| goal | met | measured |")
    print("|---|---|---|")
    for g, ok, m in goals:
        print(f"| {g} | {'yes' if ok else 'NO'} | {m} |")


if __name__ == "__main__":
    main()
