"""xaiserve beside its peers on one model: explain.v1, OIP v2, TorchServe, a bare grpc.aio floor, the handler.

Contestants, all serving the default NEM-U (scenes-nemu, its ONNX graph) on one 64 x 64 PNG:

  explain.v1   `xaiserve serve` (a subprocess), Explain with the encoded image
  oip.v2       the same server process, inference.GRPCInferenceService/ModelInfer with a BYTES input
  torchserve   TorchServe 0.12 gRPC Predictions with the archive of `xaiserve export torchserve`
               (batch_size 8, max_batch_delay 1 ms, one worker); built in a virtualenv that sees
               this environment (--system-site-packages), cached under --cache
  bare.grpc    a bare grpc.aio server (a subprocess) with a generic handler: decode the PNG,
               preprocess, one ONNX Runtime call, answer the float32 mask bytes; no batching,
               no validation, no metrics (the floor Python gRPC sets)
  handler      the TorchServe handler called in-process, no network (concurrency 1 only)

Rounds are interleaved (every round runs each contestant once per concurrency, in a rotating
order); reported per contestant and concurrency: p50 and p99 latency over all rounds, requests/s
(median of rounds), and CPU per request: utime + stime from /proc of the server process(es) and
of this client process over the contestant's window, divided by the requests. Every server runs
on 127.0.0.1 and is stopped at the end. Ratios are against explain.v1 measured in the same run.

    python bench/bench_peers.py [--rounds 3] [--requests 200] [--concurrency 1,8,32] [--no-torchserve]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
import venv
import zipfile
from pathlib import Path

import grpc
import numpy as np
from PIL import Image

from xaiserve.paths import checkout_root

ROOT = checkout_root()  # the repository: its model_store/ and tests/ helpers
sys.path.insert(0, str(ROOT))

from xaiserve.proto.explain.v1 import explainer_pb2 as pb  # noqa: E402
from xaiserve.proto.inference import grpc_predict_v2_pb2 as oip  # noqa: E402

MODEL = "scenes-nemu"
STORE = ROOT / "model_store"
TICK = os.sysconf("SC_CLK_TCK")

BARE_SERVER = textwrap.dedent("""
    import asyncio, sys
    import grpc, numpy as np
    sys.path.insert(0, sys.argv[3])
    from xaiserve.proto.explain.v1 import explainer_pb2 as pb
    from xaiserve.service.images import decode_image, to_model_input
    from xaiserve.service.registry import OnnxModel, read_manifest

    entry = next(e for e in read_manifest(__import__("pathlib").Path(sys.argv[2])) if e.name == sys.argv[4])
    model = OnnxModel(__import__("pathlib").Path(sys.argv[2]) / entry.files["onnx"], intra_op_threads=1)

    async def infer(request: bytes, context) -> bytes:
        arr = decode_image(pb.Image(encoded=request))
        res = await asyncio.get_running_loop().run_in_executor(None, model.run, {"image": to_model_input(arr, entry.input)[None]})
        return np.ascontiguousarray(res["mask"][0, 0]).tobytes()

    async def main():
        server = grpc.aio.server()
        handler = grpc.unary_unary_rpc_method_handler(infer)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bare.Infer", {"Infer": handler}),))
        server.add_insecure_port("127.0.0.1:" + sys.argv[1])
        await server.start()
        print("ready", flush=True)
        await server.wait_for_termination()

    asyncio.run(main())
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / TICK  # utime, stime
        except (FileNotFoundError, IndexError):
            pass
    return total


def tree(pid: int) -> list[int]:
    """pid and its descendants (TorchServe: the Java frontend and its Python worker)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for t in Path(f"/proc/{p}/task").iterdir():
                children = (t / "children").read_text().split()
                todo += [int(c) for c in children]
        except FileNotFoundError:
            pass
    return sorted(set(out))


def wait_grpc(address: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    with grpc.insecure_channel(address) as ch:
        grpc.channel_ready_future(ch).result(timeout=max(1.0, deadline - time.time()))


# ----------------------------------------------------------------------------------- contestants
class Contestant:
    name = ""
    pids: list[int] = []

    async def setup(self) -> None: ...

    async def call(self) -> None: ...

    async def close(self) -> None: ...


class GrpcContestant(Contestant):
    def __init__(self, name: str, address: str, method: str, request: bytes, pids_fn):
        self.name, self.address, self.method, self.request, self.pids_fn = name, address, method, request, pids_fn

    @property
    def pids(self) -> list[int]:  # type: ignore[override]
        return self.pids_fn()

    async def setup(self) -> None:
        self.channel = grpc.aio.insecure_channel(self.address, options=[("grpc.max_receive_message_length", 64 << 20)])
        self.fn = self.channel.unary_unary(self.method)  # raw bytes both ways: no client-side parsing cost
        await self.call()

    async def call(self) -> None:
        await self.fn(self.request, timeout=60)

    async def close(self) -> None:
        await self.channel.close()


class HandlerContestant(Contestant):
    """The TorchServe handler in this process (no network, no server)."""

    name = "handler"

    def __init__(self, png: bytes):
        from xaiserve.service.torchserve_handler import ARCHIVE_CONFIG, XaiserveHandler

        self.tmp = tempfile.TemporaryDirectory()
        d = Path(self.tmp.name)
        for p in STORE.iterdir():
            (d / p.name).symlink_to(p)
        (d / ARCHIVE_CONFIG).write_text(json.dumps({"model": MODEL, "intra_op_threads": 1}))

        class Ctx:
            system_properties = {"model_dir": str(d)}

            def set_response_status(self, *a):
                raise AssertionError(a)

        self.ctx = Ctx()
        self.handler = XaiserveHandler()
        self.handler.initialize(self.ctx)
        self.png = png
        self.pids = []

    async def call(self) -> None:
        self.handler.handle([{"body": self.png}], self.ctx)


# ----------------------------------------------------------------------------------- servers
def start_xaiserve(procs: list[subprocess.Popen]) -> str:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "xaiserve.service.cli",
        "serve",
        "--port",
        str(port),
        "--metrics-port",
        "-1",
        "--model-store",
        str(STORE),
        "--job-workers",
        "0",
        "--intra-op-threads",
        "1",
    ]
    p = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    procs.append(p)
    wait_grpc(f"127.0.0.1:{port}")
    return f"127.0.0.1:{port}"


def start_bare(procs: list[subprocess.Popen]) -> str:
    port = free_port()
    p = subprocess.Popen(
        [sys.executable, "-c", BARE_SERVER, str(port), str(STORE), str(ROOT), MODEL],
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    procs.append(p)
    assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    return f"127.0.0.1:{port}"


def torchserve_venv(cache: Path) -> Path:
    d = cache / "torchserve-venv"
    if not (d / "bin" / "torchserve").exists():
        venv.EnvBuilder(with_pip=True, system_site_packages=True).create(d)
        subprocess.run(
            [
                str(d / "bin" / "python"),
                "-m",
                "pip",
                "install",
                "-q",
                "torchserve==0.12.0",
                "torch-model-archiver==0.12.0",
            ],
            check=True,
        )
    return d


def start_torchserve(cache: Path, procs: list[subprocess.Popen]) -> tuple[str, bytes]:
    """TorchServe with the NEM-U archive; returns its gRPC address and a PredictionsRequest builder's bytes."""
    import grpc_tools
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    from grpc_tools import protoc

    d = torchserve_venv(cache)
    work = Path(tempfile.mkdtemp(prefix="bench-ts-"))
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        PATH=f"{d / 'bin'}:{os.environ['PATH']}",
        OMP_NUM_THREADS="1",
        LOG_LOCATION=str(work / "logs"),
        METRICS_LOCATION=str(work / "logs"),
    )
    subprocess.run(
        [
            str(d / "bin" / "python"),
            "-m",
            "xaiserve.service.cli",
            "export",
            "torchserve",
            MODEL,
            "--out",
            str(work / "mars"),
            "--model-store",
            str(STORE),
        ],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    ports = {k: free_port() for k in ("http", "mgmt", "metrics", "grpc", "grpcm")}
    (work / "config.properties").write_text(
        "\n".join(
            [
                f"inference_address=http://127.0.0.1:{ports['http']}",
                f"management_address=http://127.0.0.1:{ports['mgmt']}",
                f"metrics_address=http://127.0.0.1:{ports['metrics']}",
                "grpc_inference_address=127.0.0.1",
                "grpc_management_address=127.0.0.1",
                f"grpc_inference_port={ports['grpc']}",
                f"grpc_management_port={ports['grpcm']}",
                "disable_token_authorization=true",
                "enable_model_api=true",
                "install_py_dep_per_model=false",
                "default_workers_per_model=1",
                "vmargs=-Xmx512m -XX:+UseSerialGC",
                f"model_store={work / 'mars'}",
                "",
            ]
        )
    )
    p = subprocess.Popen(
        [
            str(d / "bin" / "torchserve"),
            "--start",
            "--foreground",
            "--ncs",
            "--ts-config",
            str(work / "config.properties"),
            "--model-store",
            str(work / "mars"),
        ],
        cwd=work,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    procs.append(p)
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{ports['http']}/ping", timeout=2)
            break
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.5)
    urllib.request.urlopen(
        urllib.request.Request(
            f"http://127.0.0.1:{ports['mgmt']}/models?url={MODEL}.mar&batch_size=8&max_batch_delay=1&initial_workers=1"
            "&synchronous=true",
            method="POST",
        ),
        timeout=180,
    )
    # TorchServe's own inference.proto, from its jar, into a private pool
    jar = next((d / "lib").glob("python*/site-packages/ts/frontend/model-server.jar"))
    src = work / "proto"
    with zipfile.ZipFile(jar) as z:
        for name in ("proto/inference.proto", "google/rpc/status.proto"):
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes(z.read(name))
    include = Path(grpc_tools.__file__).parent / "_proto"
    assert (
        protoc.main(
            [
                "protoc",
                f"-I{src / 'proto'}",
                f"-I{src}",
                f"-I{include}",
                "--include_imports",
                f"--descriptor_set_out={work / 'ts.desc'}",
                "inference.proto",
            ]
        )
        == 0
    )
    pool = descriptor_pool.DescriptorPool()
    for f in descriptor_pb2.FileDescriptorSet.FromString((work / "ts.desc").read_bytes()).file:
        pool.Add(f)
    req = message_factory.GetMessageClass(
        pool.FindMessageTypeByName("org.pytorch.serve.grpc.inference.PredictionsRequest")
    )
    return f"127.0.0.1:{ports['grpc']}", req


# ----------------------------------------------------------------------------------- measuring
async def measure(c: Contestant, concurrency: int, n: int) -> dict:
    lat: list[float] = []
    todo = iter(range(n))

    async def worker():
        for _ in todo:
            t = time.perf_counter()
            await c.call()
            lat.append(time.perf_counter() - t)

    pids = c.pids
    cpu0, me0 = cpu_seconds(pids), time.process_time()
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    cpu = cpu_seconds(pids) - cpu0 + time.process_time() - me0
    return {"lat": lat, "rps": n / wall, "cpu_ms": cpu / n * 1e3}


def table(results: dict, order: list[str], concurrencies: list[int]) -> str:
    lines = [
        f"{'contestant':<12} {'conc':>4} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8} {'CPU ms/req':>10}   "
        f"{'p50 x':>6} {'req/s x':>7} {'CPU x':>6}  (x = ratio to explain.v1, same run)"
    ]
    for conc in concurrencies:
        base = results.get(("explain.v1", conc))
        for name in order:
            r = results.get((name, conc))
            if r is None:
                continue
            lat = np.asarray(r["lat"]) * 1e3
            p50, p99 = float(np.percentile(lat, 50)), float(np.percentile(lat, 99))
            rps, cpu = statistics.median(r["rps"]), statistics.median(r["cpu_ms"])
            if base:
                b50 = float(np.percentile(np.asarray(base["lat"]) * 1e3, 50))
                ratio = f"{p50 / b50:6.2f} {rps / statistics.median(base['rps']):7.2f} {cpu / statistics.median(base['cpu_ms']):6.2f}"
            else:
                ratio = ""
            lines.append(f"{name:<12} {conc:>4} {p50:8.2f} {p99:8.2f} {rps:8.1f} {cpu:10.2f}   {ratio}")
        lines.append("")
    return "\n".join(lines)


async def run(args) -> None:
    a = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    png = buf.getvalue()
    procs: list[subprocess.Popen] = []
    contestants: list[Contestant] = []
    try:
        addr = start_xaiserve(procs)
        xpid = procs[-1].pid
        explain = pb.ExplainRequest(model=MODEL, image=pb.Image(encoded=png)).SerializeToString()
        contestants.append(GrpcContestant("explain.v1", addr, "/explain.v1.Explainer/Explain", explain, lambda: [xpid]))
        infer = oip.ModelInferRequest(model_name=MODEL)
        infer.inputs.add(name="image", datatype="BYTES", shape=[1])
        infer.raw_input_contents.append(len(png).to_bytes(4, "little") + png)
        contestants.append(
            GrpcContestant(
                "oip.v2", addr, "/inference.GRPCInferenceService/ModelInfer", infer.SerializeToString(), lambda: [xpid]
            )
        )
        if not args.no_torchserve:
            ts_addr, Req = start_torchserve(Path(args.cache), procs)
            tpid = procs[-1].pid
            contestants.append(
                GrpcContestant(
                    "torchserve",
                    ts_addr,
                    "/org.pytorch.serve.grpc.inference.InferenceAPIsService/Predictions",
                    Req(model_name=MODEL, input={"data": png}).SerializeToString(),
                    lambda: tree(tpid),
                )
            )
        baddr = start_bare(procs)
        bpid = procs[-1].pid
        contestants.append(GrpcContestant("bare.grpc", baddr, "/bare.Infer/Infer", png, lambda: [bpid]))
        handler = HandlerContestant(png)
        for c in contestants:
            await c.setup()
        results: dict = {}
        for rnd in range(args.rounds):
            for conc in args.concurrency:
                order = contestants[rnd % len(contestants) :] + contestants[: rnd % len(contestants)]
                for c in order:
                    m = await measure(c, conc, args.requests)
                    r = results.setdefault((c.name, conc), {"lat": [], "rps": [], "cpu_ms": []})
                    r["lat"] += m["lat"]
                    r["rps"].append(m["rps"])
                    r["cpu_ms"].append(m["cpu_ms"])
                if conc == 1:
                    m = await measure(handler, 1, args.requests)
                    r = results.setdefault(("handler", 1), {"lat": [], "rps": [], "cpu_ms": []})
                    r["lat"] += m["lat"]
                    r["rps"].append(m["rps"])
                    r["cpu_ms"].append(m["cpu_ms"])
            print(f"round {rnd + 1}/{args.rounds} done", file=sys.stderr, flush=True)
        for c in contestants:
            await c.close()
        names = [c.name for c in contestants] + ["handler"]
        load = os.getloadavg()
        print(
            f"bench_peers: {MODEL} on a 64 x 64 PNG, {args.rounds} interleaved rounds of {args.requests} requests, "
            f"{os.cpu_count()} cores, load {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}"
        )
        print(table(results, names, args.concurrency))
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=200, help="requests per contestant, concurrency and round")
    ap.add_argument("--concurrency", type=lambda s: [int(v) for v in s.split(",")], default=[1, 8, 32])
    ap.add_argument("--no-torchserve", action="store_true")
    ap.add_argument(
        "--cache",
        default=str(Path(tempfile.gettempdir()) / "xaiserve-bench-peers"),
        help="where the TorchServe virtualenv is kept between runs",
    )
    args = ap.parse_args()
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
