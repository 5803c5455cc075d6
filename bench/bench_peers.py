"""xaiserve beside its peers on one model: explain.v1, OIP v2 (gRPC and REST), TorchServe, KServe, MLServer, floors.

Contestants, all serving the default NEM-U (scenes-nemu, its ONNX graph) on one 64 x 64 PNG, and the
same network exported at 224 x 224 (scenes-nemu-224: the 64-trained weights, its ONNX graph made
here at 224; the weights do not change the cost) on one 224 x 224 PNG:

  explain.v1       `xaiserve serve` (a subprocess), Explain with the encoded image
  oip.grpc         the same server, inference.GRPCInferenceService/ModelInfer with a BYTES input
  oip.rest         the same server, POST /v2/models/NAME/infer on its HTTP port (binary data extension)
  torchserve.grpc  TorchServe 0.12 gRPC Predictions with the archive of `xaiserve export torchserve`
  torchserve.rest  the same TorchServe, POST /predictions/NAME with the PNG as the body
                   (batch_size 8, max_batch_delay 1 ms, one worker per model; a virtualenv that sees
                   this environment, --system-site-packages, as the archive's handler imports xaiserve)
  kserve.grpc      KServe 0.21's ModelServer (`kserve` from PyPI), a small custom kserve.Model running
  kserve.rest      the same ONNX file with the same preprocessing (PNG -> RGB / 255 -> (x - mean) / std
                   -> CHW, one ONNX Runtime call, mask and output); gRPC ModelInfer and REST v2 (the
                   image as base64 JSON: KServe turns binary BYTES inputs into UTF-8 strings, which an
                   encoded image is not; outputs binary), one worker process
  mlserver.grpc    Seldon MLServer 1.7, a custom mlserver.MLModel doing the same; gRPC ModelInfer and
  mlserver.rest    REST v2 (MLServer has no binary extension: BYTES as base64 JSON, outputs as JSON);
                   its default settings (inference in one parallel worker process)
  bare.grpc        a bare grpc.aio server (a subprocess) with a generic handler: decode the PNG,
                   preprocess, one ONNX Runtime call, answer the float32 mask bytes; no batching,
                   no validation, no metrics (the floor Python gRPC sets)
  handler          the TorchServe handler called in-process, no network (concurrency 1 only)

KServe and MLServer each live in their own virtualenv (no --system-site-packages) under --cache
(default ~/.cache/xaiserve-bench/), made on first use with pip: kserve 0.21 / mlserver 1.7,
onnxruntime, numpy, pillow; the bench checks that neither pulled in torch or CUDA. A peer that
cannot be installed or started is skipped with the reason printed; the others still run.

Every contestant's mask is compared with explain.v1's for the same image (max |difference|,
printed). Rounds are interleaved (every round runs each contestant once per size and concurrency,
in a rotating order); reported per contestant, size and concurrency: p50 and p99 latency over all
rounds, requests/s (median of rounds), and CPU per request: utime + stime from /proc of the
server process tree and of this client process over the contestant's window, divided by the
requests. ONNX Runtime runs with 1 intra-op thread everywhere. Every server runs on 127.0.0.1 and
is stopped at the end. Ratios are against explain.v1 measured in the same run.

    python bench/bench_peers.py [--rounds 3] [--requests 100] [--requests-224 25] [--concurrency 1,8,32]
                                [--sizes 64,224] [--skip torchserve,kserve,mlserver] [--cache DIR]
                                [--baseline OTHER_CHECKOUT] [--processes 2 --channels 4]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import shutil
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
from collections.abc import Callable
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
DEFAULT_CACHE = Path.home() / ".cache" / "xaiserve-bench"
PEER_PINS = {
    "kserve": ["kserve==0.21.*", "onnxruntime", "numpy", "pillow"],
    # uvloop 0.22 makes asyncio.get_event_loop() raise where no loop runs, which MLServer 1.7's
    # parallel inference workers call at start: each worker dies and no model loads
    "mlserver": ["mlserver==1.7.*", "uvloop<0.22", "onnxruntime", "numpy", "pillow"],
}


class PeerUnavailable(Exception):
    """A contestant that cannot run here (not installable, does not start): skipped, with the reason."""


def model_name(size: int) -> str:
    return MODEL if size == 64 else f"{MODEL}-{size}"


# ------------------------------------------------------------------------------- the bench store
def bench_store(cache: Path, sizes: list[int]) -> Path:
    """A store with scenes-nemu (and the encoder it explains) at 64 x 64, and the same two networks
    with their ONNX graphs exported at each other size (weights and cards linked from model_store/)."""
    from xaiserve.service.registry import read_manifest

    d = cache / "store"
    manifest = json.loads((STORE / "manifest.json").read_text())
    src = {e["name"]: e for e in manifest["models"]}
    wanted = [MODEL, src[MODEL]["explains"].split(":")[0]]
    base = {e.name: e for e in read_manifest(STORE)}
    entries = []
    for size in sizes:
        for name in wanted:
            e = json.loads(json.dumps(src[name]))
            if size != 64:
                e["name"] = f"{name}-{size}"
                e["input"]["height"] = e["input"]["width"] = size
                if "explains" in e:
                    e["explains"] = f"{e['explains'].split(':')[0]}-{size}:1"
            files = {}
            for k, rel in e["files"].items():
                target = d / e["name"] / "1" / Path(rel).name
                files[k] = str(target.relative_to(d))
                target.parent.mkdir(parents=True, exist_ok=True)
                if target.exists() or target.is_symlink():
                    continue
                if k == "onnx" and size != 64:
                    _export_onnx(base[name], target, size)  # the architecture does not depend on the size
                else:
                    target.symlink_to(STORE / rel)
            e["files"] = files
            entries.append(e)
    (d / "manifest.json").write_text(json.dumps({**manifest, "models": entries}, indent=1))
    return d


def _export_onnx(entry, path: Path, size: int) -> None:
    import warnings

    import torch

    from xaiserve.handlers.loading import load_module

    m = load_module(entry, STORE).eval()
    x = torch.zeros(1, entry.input.channels, size, size)
    outs = ["mask", "output"] if entry.kind == "nem_u" else ["output"]
    tmp = path.with_suffix(".tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            m,
            (x,),
            str(tmp),
            input_names=["image"],
            output_names=outs,
            dynamic_axes={n: {0: "batch"} for n in ["image", *outs]},
            dynamo=False,
            opset_version=17,
        )
    tmp.rename(path)


# --------------------------------------------------------------------------------- helpers
BARE_SERVER = textwrap.dedent("""
    import asyncio, json, sys
    from pathlib import Path
    import grpc, numpy as np
    sys.path.insert(0, sys.argv[3])
    from xaiserve.proto.explain.v1 import explainer_pb2 as pb
    from xaiserve.service.images import decode_image, to_model_input
    from xaiserve.service.registry import OnnxModel, read_manifest

    store = Path(sys.argv[2])
    names = json.loads(sys.argv[4])
    entries = {e.name: e for e in read_manifest(store) if e.name in names}
    models = {n: OnnxModel(store / e.files["onnx"], intra_op_threads=1) for n, e in entries.items()}

    def make(name):
        entry, model = entries[name], models[name]

        async def infer(request: bytes, context) -> bytes:
            arr = decode_image(pb.Image(encoded=request))
            res = await asyncio.get_running_loop().run_in_executor(
                None, model.run, {"image": to_model_input(arr, entry.input)[None]}
            )
            return np.ascontiguousarray(res["mask"][0, 0]).tobytes()

        return grpc.unary_unary_rpc_method_handler(infer)

    async def main():
        server = grpc.aio.server()
        handlers = {n: make(n) for n in names}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bare.Infer", handlers),))
        server.add_insecure_port("127.0.0.1:" + sys.argv[1])
        await server.start()
        print("ready", flush=True)
        await server.wait_for_termination()

    asyncio.run(main())
""")

# The peers' model classes: the same decoding and preprocessing as xaiserve's for an image at the
# model's size (RGB, / 255, (x - mean) / std, CHW float32), one ONNX Runtime session per model with
# one intra-op thread and no spinning, mask and output answered.
PEER_COMMON = textwrap.dedent("""
    import base64, io
    import numpy as np, onnxruntime as ort
    from PIL import Image

    def session(path):
        o = ort.SessionOptions()
        o.intra_op_num_threads = 1
        o.inter_op_num_threads = 1
        o.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])

    def prepare(b, mean, std):
        if isinstance(b, str):
            b = base64.b64decode(b)
        elif not bytes(b[:4]) == b"\\x89PNG":
            b = base64.b64decode(b)
        a = np.asarray(Image.open(io.BytesIO(bytes(b))).convert("RGB"), dtype=np.float32) / 255.0
        return np.ascontiguousarray(((a - mean) / std).transpose(2, 0, 1), dtype=np.float32)
""")

KSERVE_SERVER = PEER_COMMON + textwrap.dedent("""
    import json, sys
    spec = json.loads(sys.argv.pop(1))  # before kserve parses sys.argv (--http_port, --grpc_port)
    from kserve import InferOutput, InferResponse, Model, ModelServer

    class NemU(Model):
        def __init__(self, name, onnx, mean, std):
            super().__init__(name)
            self.sess = session(onnx)
            self.mean, self.std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
            self.ready = True

        def predict(self, payload, headers=None, response_headers=None):
            items = payload.inputs[0].as_numpy().ravel()
            x = np.stack([prepare(b, self.mean, self.std) for b in items])
            mask, out = self.sess.run(["mask", "output"], {"image": x})
            outs = []
            for n, a in (("mask", mask), ("output", out)):
                o = InferOutput(n, list(a.shape), "FP32")
                o.set_data_from_numpy(a)
                outs.append(o)
            return InferResponse(response_id=payload.id or "", model_name=self.name, infer_outputs=outs)

    ModelServer(workers=1, enable_latency_logging=False).start([NemU(**m) for m in spec])
""")

MLSERVER_MODEL = PEER_COMMON + textwrap.dedent("""
    from mlserver import MLModel
    from mlserver.codecs import NumpyCodec
    from mlserver.types import InferenceResponse

    class NemU(MLModel):
        async def load(self):
            extra = self.settings.parameters.extra
            self.sess = session(self.settings.parameters.uri)
            self.mean, self.std = np.asarray(extra["mean"], np.float32), np.asarray(extra["std"], np.float32)
            return True

        async def predict(self, payload):
            data = payload.inputs[0].data
            items = data.root if hasattr(data, "root") else data.__root__
            x = np.stack([prepare(b, self.mean, self.std) for b in items])
            mask, out = self.sess.run(["mask", "output"], {"image": x})
            return InferenceResponse(
                model_name=self.name,
                id=payload.id,
                outputs=[NumpyCodec.encode_output("mask", mask), NumpyCodec.encode_output("output", out)],
            )
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
    """pid and its descendants (TorchServe's Java frontend and Python workers, MLServer's workers)."""
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


def wait_http(url: str, timeout: float = 120, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            if proc is not None and proc.poll() is not None:
                raise PeerUnavailable(f"the server exited with status {proc.returncode} before it answered {url}")
            if time.time() > deadline:
                raise PeerUnavailable(f"{url} did not answer within {timeout:g} s") from None
            time.sleep(0.5)


def spawn(cmd: list[str], procs: list[subprocess.Popen], log: Path, **kw) -> subprocess.Popen:
    p = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True, **kw)
    procs.append(p)
    return p


def tail(log: Path, n: int = 400) -> str:
    try:
        return log.read_text(errors="replace")[-n:].strip().replace("\n", " | ")
    except OSError:
        return ""


# ------------------------------------------------------------------------------ a small HTTP client
class HttpPool:
    """HTTP/1.1 keep-alive connections, one per concurrent caller (asyncio streams: the same client
    cost for every REST contestant)."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.free: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        while self.free:  # a kept connection the server closed while idle: the next one, or a new one
            try:
                return await self._post(self.free.pop(), path, body, headers)
            except (ConnectionError, asyncio.IncompleteReadError):
                continue
        return await self._post(await asyncio.open_connection(self.host, self.port), path, body, headers)

    async def _post(self, conn, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        r, w = conn
        head = f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Length: {len(body)}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        w.write(head.encode() + body)
        line = await r.readline()
        if not line:
            raise ConnectionError("the server closed the connection")
        status = int(line.split()[1])
        hdrs: dict[str, str] = {}
        while True:
            h = await r.readline()
            if h in (b"\r\n", b"\n", b""):
                break
            k, _, v = h.decode("latin-1").partition(":")
            hdrs[k.strip().lower()] = v.strip()
        if "content-length" in hdrs:
            data = await r.readexactly(int(hdrs["content-length"]))
        elif hdrs.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int((await r.readline()).split(b";")[0], 16)
                if size == 0:
                    await r.readline()
                    break
                parts.append(await r.readexactly(size))
                await r.readline()
            data = b"".join(parts)
        else:
            data = await r.read()
            hdrs["connection"] = "close"
        if hdrs.get("connection", "").lower() == "close":
            w.close()
        else:
            self.free.append(conn)
        return status, hdrs, data

    async def close(self) -> None:
        for _, w in self.free:
            w.close()
        self.free.clear()


# ----------------------------------------------------------------------------------- contestants
class Contestant:
    name = ""

    def __init__(self, name: str, pids_fn: Callable[[], list[int]], mask_of: Callable[[bytes, dict], np.ndarray]):
        self.name, self.pids_fn, self.mask_of = name, pids_fn, mask_of

    @property
    def pids(self) -> list[int]:
        return self.pids_fn()

    async def setup(self) -> np.ndarray:
        """Connect, make one call; the mask it answered."""
        return self.mask_of(*await self.call())

    async def call(self) -> tuple[bytes, dict]: ...

    async def close(self) -> None: ...


class GrpcContestant(Contestant):
    def __init__(self, name, address, method, request: bytes, pids_fn, mask_of):
        super().__init__(name, pids_fn, mask_of)
        self.address, self.method, self.request = address, method, request

    channels = 1  # connections per gRPC contestant (--channels; a --processes group gets connections)

    async def setup(self) -> np.ndarray:
        opts = [("grpc.max_receive_message_length", 64 << 20)]
        if self.channels > 1:  # each channel its own connection (grpc would share one)
            opts.append(("grpc.use_local_subchannel_pool", 1))
        self.chans = [grpc.aio.insecure_channel(self.address, options=opts) for _ in range(self.channels)]
        # raw bytes both ways: no client-side parsing cost
        self.fns = [ch.unary_unary(self.method) for ch in self.chans]
        self.next = 0
        return await super().setup()

    async def call(self) -> tuple[bytes, dict]:
        self.next += 1
        return await self.fns[self.next % len(self.fns)](self.request, timeout=60), {}

    async def close(self) -> None:
        for ch in self.chans:
            await ch.close()


class HttpContestant(Contestant):
    def __init__(self, name, port: int, path: str, body: bytes, headers: dict, pids_fn, mask_of):
        super().__init__(name, pids_fn, mask_of)
        self.pool = HttpPool("127.0.0.1", port)
        self.path, self.body, self.headers = path, body, headers

    async def call(self) -> tuple[bytes, dict]:
        status, hdrs, data = await self.pool.post(self.path, self.body, self.headers)
        if status != 200:
            raise RuntimeError(f"{self.name}: HTTP {status}: {data[:200]!r}")
        return data, hdrs

    async def close(self) -> None:
        await self.pool.close()


class HandlerContestant(Contestant):
    """The TorchServe handler in this process (no network, no server)."""

    def __init__(self, store: Path, model: str, png: bytes):
        from xaiserve.service.torchserve_handler import ARCHIVE_CONFIG, XaiserveHandler

        super().__init__("handler", lambda: [], lambda data, h: ts_mask(data))
        self.tmp = tempfile.TemporaryDirectory()
        d = Path(self.tmp.name)
        for p in store.iterdir():
            (d / p.name).symlink_to(p.resolve())
        (d / ARCHIVE_CONFIG).write_text(json.dumps({"model": model, "intra_op_threads": 1}))

        class Ctx:
            system_properties = {"model_dir": str(d)}

            def set_response_status(self, *a):
                raise AssertionError(a)

        self.ctx = Ctx()
        self.handler = XaiserveHandler()
        self.handler.initialize(self.ctx)
        self.png = png

    async def call(self) -> tuple[bytes, dict]:
        return self.handler.handle([{"body": self.png}], self.ctx)[0].encode(), {}


# ------------------------------------------------------------------------------------ the masks
def explain_mask(data: bytes, h: dict) -> np.ndarray:
    from xaiserve.service.tensors import from_tensor

    return from_tensor(pb.ExplainResponse.FromString(data).mask)


def oip_grpc_mask(data: bytes, h: dict) -> np.ndarray:
    r = oip.ModelInferResponse.FromString(data)
    i = [o.name for o in r.outputs].index("mask")
    o = r.outputs[i]
    raw = r.raw_output_contents[i] if r.raw_output_contents else np.asarray(o.contents.fp32_contents, "<f4").tobytes()
    return np.frombuffer(raw, "<f4").reshape(list(o.shape))[0, 0]


def oip_rest_mask(data: bytes, h: dict) -> np.ndarray:
    n = int(h.get("inference-header-content-length", len(data)))
    doc = json.loads(data[:n])
    pos = n
    for o in doc["outputs"]:
        size = (o.get("parameters") or {}).get("binary_data_size")
        if o["name"] == "mask":
            a = np.frombuffer(data[pos : pos + size], "<f4") if size is not None else np.asarray(o["data"], "<f4")
            return a.reshape(o["shape"])[0, 0]
        pos += size or 0
    raise ValueError("no mask in the answer")


def ts_mask(data: bytes) -> np.ndarray:
    from xaiserve.service.torchserve_handler import decode_array

    return decode_array(json.loads(data)["mask"])


def bare_mask(size: int) -> Callable[[bytes, dict], np.ndarray]:
    return lambda data, h: np.frombuffer(data, "<f4").reshape(size, size)


# ----------------------------------------------------------------------------------- servers
def start_xaiserve(
    store: Path, procs: list[subprocess.Popen], work: Path, root: Path = ROOT, processes: int = 1
) -> tuple[str, int]:
    """`xaiserve serve` from the checkout `root` (--baseline: another checkout, e.g. a git worktree);
    `processes` > 1: a group of that many server processes on the port (--processes)."""
    port, hport = free_port(), free_port()
    cmd = [sys.executable, "-m", "xaiserve.service.cli", "serve", "--port", str(port), "--metrics-port", str(hport)]
    cmd += ["--model-store", str(store), "--job-workers", "0", "--intra-op-threads", "1"]
    cmd += ["--processes", str(processes)] if processes > 1 else []
    log = work / ("xaiserve.log" if root == ROOT else "xaiserve-baseline.log")
    log = log.with_name(f"xaiserve-p{processes}.log") if processes > 1 else log
    spawn(cmd, procs, log, cwd=root, env=dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1"))
    wait_grpc(f"127.0.0.1:{port}")
    end = time.time() + 120
    while processes > 1 and time.time() < end:  # every process of the group serving
        with urllib.request.urlopen(f"http://127.0.0.1:{hport}/metrics", timeout=5) as r:
            if f"xaiserve_server_processes {float(processes)}" in r.read().decode():
                break
        time.sleep(0.2)
    return f"127.0.0.1:{port}", hport


def start_bare(store: Path, names: list[str], procs: list[subprocess.Popen], work: Path) -> str:
    port = free_port()
    p = subprocess.Popen(
        [sys.executable, "-c", BARE_SERVER, str(port), str(store), str(ROOT), json.dumps(names)],
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        stdout=subprocess.PIPE,
        stderr=(work / "bare.log").open("wb"),
        text=True,
        start_new_session=True,
    )
    procs.append(p)
    assert p.stdout is not None and p.stdout.readline().strip() == "ready", tail(work / "bare.log")
    return f"127.0.0.1:{port}"


def peer_venv(cache: Path, peer: str) -> Path:
    """The peer's own virtualenv (no system site packages), made once (and brought to PEER_PINS when
    they change); PeerUnavailable when pip fails or the install pulled in torch / CUDA."""
    d = cache / f"{peer}-venv"
    py = d / "bin" / "python"
    stamp = d / ".bench-pins"
    pins = PEER_PINS[peer]
    if not stamp.exists() or stamp.read_text().split() != pins:
        if not py.exists():
            print(f"bench_peers: making the {peer} virtualenv in {d}", file=sys.stderr, flush=True)
            venv.EnvBuilder(with_pip=True, system_site_packages=False).create(d)
        print(f"bench_peers: pip install {' '.join(pins)} into {d}", file=sys.stderr, flush=True)
        r = subprocess.run([str(py), "-m", "pip", "install", "-q", *pins], capture_output=True, text=True)
        if r.returncode != 0:
            raise PeerUnavailable(f"pip install {' '.join(pins)} failed: {r.stderr.strip()[-300:]}")
        stamp.write_text(" ".join(pins) + "\n")
    r = subprocess.run([str(py), "-m", "pip", "list", "--format", "json"], capture_output=True, text=True)
    names = {p["name"].lower() for p in json.loads(r.stdout or "[]")}
    heavy = sorted(n for n in names if n == "torch" or n.startswith("nvidia-") or "cuda" in n)
    if heavy:
        raise PeerUnavailable(f"its virtualenv pulled in {', '.join(heavy)}; this bench wants it without torch/CUDA")
    return d


def _specs(store: Path, sizes: list[int]) -> list[dict]:
    from xaiserve.service.registry import read_manifest

    entries = {e.name: e for e in read_manifest(store)}
    out = []
    for size in sizes:
        e = entries[model_name(size)]
        out.append(
            {"name": e.name, "onnx": str(store / e.files["onnx"]), "mean": list(e.input.mean), "std": list(e.input.std)}
        )
    return out


def start_kserve(cache: Path, store: Path, sizes: list[int], procs: list, work: Path) -> tuple[str, int, int]:
    d = peer_venv(cache, "kserve")
    script = work / "kserve_server.py"
    script.write_text(KSERVE_SERVER)
    http, grpc_port = free_port(), free_port()
    log = work / "kserve.log"
    p = spawn(
        [str(d / "bin" / "python"), str(script), json.dumps(_specs(store, sizes))]
        + ["--http_port", str(http), "--grpc_port", str(grpc_port)],
        procs,
        log,
        cwd=work,
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=""),
    )
    try:
        wait_http(f"http://127.0.0.1:{http}/v2/health/ready", 120, p)
        wait_grpc(f"127.0.0.1:{grpc_port}", 30)
    except (PeerUnavailable, grpc.FutureTimeoutError) as e:
        raise PeerUnavailable(f"{e}; its log: {tail(log)}") from None
    return f"127.0.0.1:{grpc_port}", http, p.pid


def start_mlserver(cache: Path, store: Path, sizes: list[int], procs: list, work: Path) -> tuple[str, int, int]:
    d = peer_venv(cache, "mlserver")
    root = work / "mlserver"
    http, grpc_port, metrics = free_port(), free_port(), free_port()
    root.mkdir(parents=True, exist_ok=True)
    (root / "settings.json").write_text(
        json.dumps({"http_port": http, "grpc_port": grpc_port, "metrics_port": metrics, "debug": False})
    )
    for spec in _specs(store, sizes):
        m = root / spec["name"]
        m.mkdir(exist_ok=True)
        (m / "nemu_model.py").write_text(MLSERVER_MODEL)
        (m / "model-settings.json").write_text(
            json.dumps(
                {
                    "name": spec["name"],
                    "implementation": "nemu_model.NemU",
                    "parameters": {"uri": spec["onnx"], "extra": {"mean": spec["mean"], "std": spec["std"]}},
                }
            )
        )
    log = work / "mlserver.log"
    p = spawn(
        [str(d / "bin" / "mlserver"), "start", str(root)],
        procs,
        log,
        cwd=root,
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=""),
    )
    try:
        for spec in _specs(store, sizes):
            wait_http(f"http://127.0.0.1:{http}/v2/models/{spec['name']}/ready", 180, p)
        wait_grpc(f"127.0.0.1:{grpc_port}", 30)
    except (PeerUnavailable, grpc.FutureTimeoutError) as e:
        raise PeerUnavailable(f"{e}; its log: {tail(log)}") from None
    return f"127.0.0.1:{grpc_port}", http, p.pid


def torchserve_venv(cache: Path) -> Path:
    d = cache / "torchserve-venv"
    if not (d / "bin" / "torchserve").exists():
        venv.EnvBuilder(with_pip=True, system_site_packages=True).create(d)
        r = subprocess.run(
            [
                str(d / "bin" / "python"),
                "-m",
                "pip",
                "install",
                "-q",
                "torchserve==0.12.0",
                "torch-model-archiver==0.12.0",
            ],
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            raise PeerUnavailable(f"pip install torchserve==0.12.0 failed: {r.stderr.strip()[-300:]}")
    if shutil.which("java") is None:
        raise PeerUnavailable("TorchServe needs Java (17) on PATH")
    return d


def start_torchserve(cache: Path, store: Path, sizes: list[int], procs: list, work: Path):
    """TorchServe with the archives of each size; returns (gRPC address, HTTP port, pid, PredictionsRequest class)."""
    import grpc_tools
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    from grpc_tools import protoc

    d = torchserve_venv(cache)
    work = work / "ts"
    work.mkdir()
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        PATH=f"{d / 'bin'}:{os.environ['PATH']}",
        OMP_NUM_THREADS="1",
        LOG_LOCATION=str(work / "logs"),
        METRICS_LOCATION=str(work / "logs"),
    )
    for size in sizes:
        cmd = [str(d / "bin" / "python"), "-m", "xaiserve.service.cli", "export", "torchserve", model_name(size)]
        r = subprocess.run(
            cmd + ["--out", str(work / "mars"), "--model-store", str(store)], env=env, capture_output=True, text=True
        )
        if r.returncode != 0:
            raise PeerUnavailable(f"xaiserve export torchserve failed: {r.stderr.strip()[-300:]}")
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
    cmd = [str(d / "bin" / "torchserve"), "--start", "--foreground", "--ncs", "--ts-config"]
    p = spawn(
        cmd + [str(work / "config.properties"), "--model-store", str(work / "mars")],
        procs,
        work / "torchserve.log",
        cwd=work,
        env=env,
    )
    wait_http(f"http://127.0.0.1:{ports['http']}/ping", 120, p)
    for size in sizes:
        urllib.request.urlopen(
            urllib.request.Request(
                f"http://127.0.0.1:{ports['mgmt']}/models?url={model_name(size)}.mar&batch_size=8&max_batch_delay=1"
                "&initial_workers=1&synchronous=true",
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
    args = ["protoc", f"-I{src / 'proto'}", f"-I{src}", f"-I{include}", "--include_imports"]
    assert protoc.main(args + [f"--descriptor_set_out={work / 'ts.desc'}", "inference.proto"]) == 0
    pool = descriptor_pool.DescriptorPool()
    for f in descriptor_pb2.FileDescriptorSet.FromString((work / "ts.desc").read_bytes()).file:
        pool.Add(f)
    req = message_factory.GetMessageClass(
        pool.FindMessageTypeByName("org.pytorch.serve.grpc.inference.PredictionsRequest")
    )
    resp = message_factory.GetMessageClass(
        pool.FindMessageTypeByName("org.pytorch.serve.grpc.inference.PredictionResponse")
    )
    return f"127.0.0.1:{ports['grpc']}", ports["http"], p.pid, req, resp


# ----------------------------------------------------------------------------------- requests
def png_of(size: int) -> bytes:
    a = (np.random.default_rng(size).random((size, size, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


def oip_grpc_request(name: str, png: bytes, raw: bool = True) -> bytes:
    r = oip.ModelInferRequest(model_name=name)
    t = r.inputs.add(name="image", datatype="BYTES", shape=[1])
    if raw:
        r.raw_input_contents.append(len(png).to_bytes(4, "little") + png)
    else:
        t.contents.bytes_contents.append(png)
    return r.SerializeToString()


def oip_rest_binary(png: bytes) -> tuple[bytes, dict]:
    """The request tritonclient.http sends: JSON, then the BYTES element (length-prefixed), binary outputs."""
    head = json.dumps(
        {
            "inputs": [
                {"name": "image", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": len(png) + 4}}
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    return head + len(png).to_bytes(4, "little") + png, {
        "Inference-Header-Content-Length": str(len(head)),
        "Content-Type": "application/octet-stream",
    }


def oip_rest_json(png: bytes, binary_out: bool = False) -> tuple[bytes, dict]:
    """BYTES as base64 in JSON: MLServer has no binary extension, and KServe 0.21 turns binary BYTES
    inputs into JSON strings (UTF-8), which an encoded image is not (HTTP 500 "Failed to encode")."""
    doc: dict = {
        "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(png).decode()]}]
    }
    if binary_out:
        doc["parameters"] = {"binary_data_output": True}
    return json.dumps(doc).encode(), {"Content-Type": "application/json"}


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


def table(results: dict, order: list[str], concurrencies: list[int], size: int) -> str:
    lines = [
        f"{size} x {size}:",
        f"{'contestant':<16} {'conc':>4} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8} {'CPU ms/req':>10}   "
        f"{'p50 x':>6} {'req/s x':>7} {'CPU x':>6}  (x = ratio to explain.v1, same run)",
    ]
    for conc in concurrencies:
        base = results.get((size, "explain.v1", conc))
        for name in order:
            r = results.get((size, name, conc))
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
            lines.append(f"{name:<16} {conc:>4} {p50:8.2f} {p99:8.2f} {rps:8.1f} {cpu:10.2f}   {ratio}")
        lines.append("")
    return "\n".join(lines)


async def run(args) -> None:
    cache = Path(args.cache).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-peers-"))
    store = bench_store(cache, args.sizes)
    names = {size: model_name(size) for size in args.sizes}
    pngs = {size: png_of(size) for size in args.sizes}
    procs: list[subprocess.Popen] = []
    by_size: dict[int, list[Contestant]] = {size: [] for size in args.sizes}
    skipped: list[str] = []

    def add(size: int, c: Contestant) -> None:
        if c.name not in args.skip:
            by_size[size].append(c)

    try:
        addr, hport = start_xaiserve(store, procs, work)
        xpid = procs[-1].pid
        for size, name in names.items():
            png = pngs[size]
            explain = pb.ExplainRequest(model=name, image=pb.Image(encoded=png)).SerializeToString()
            add(
                size,
                GrpcContestant(
                    "explain.v1", addr, "/explain.v1.Explainer/Explain", explain, lambda: [xpid], explain_mask
                ),
            )
            add(
                size,
                GrpcContestant(
                    "oip.grpc",
                    addr,
                    "/inference.GRPCInferenceService/ModelInfer",
                    oip_grpc_request(name, png),
                    lambda: [xpid],
                    oip_grpc_mask,
                ),
            )
            body, headers = oip_rest_binary(png)
            add(
                size,
                HttpContestant(
                    "oip.rest", hport, f"/v2/models/{name}/infer", body, headers, lambda: [xpid], oip_rest_mask
                ),
            )
        if args.processes > 1:  # explain.v1 served by a group of processes on one port
            gaddr, _ = start_xaiserve(store, procs, work, processes=args.processes)
            gpid = procs[-1].pid
            for size, name in names.items():
                explain = pb.ExplainRequest(model=name, image=pb.Image(encoded=pngs[size])).SerializeToString()
                add(
                    size,
                    GrpcContestant(
                        f"explain.v1.p{args.processes}",
                        gaddr,
                        "/explain.v1.Explainer/Explain",
                        explain,
                        lambda gpid=gpid: tree(gpid),
                        explain_mask,
                    ),
                )
        if args.baseline:
            base_addr, _ = start_xaiserve(store, procs, work, Path(args.baseline).resolve())
            base_pid = procs[-1].pid
            for size, name in names.items():
                explain = pb.ExplainRequest(model=name, image=pb.Image(encoded=pngs[size])).SerializeToString()
                add(
                    size,
                    GrpcContestant(
                        "explain.v1.base",
                        base_addr,
                        "/explain.v1.Explainer/Explain",
                        explain,
                        lambda base_pid=base_pid: [base_pid],
                        explain_mask,
                    ),
                )
        peers = [p for p in ("torchserve", "kserve", "mlserver") if p not in args.skip]
        for peer in peers:
            try:
                if peer == "torchserve":
                    ts_addr, ts_http, tpid, Req, Resp = start_torchserve(cache, store, args.sizes, procs, work)
                    for size, name in names.items():
                        png = pngs[size]
                        add(
                            size,
                            GrpcContestant(
                                "torchserve.grpc",
                                ts_addr,
                                "/org.pytorch.serve.grpc.inference.InferenceAPIsService/Predictions",
                                Req(model_name=name, input={"data": png}).SerializeToString(),
                                lambda tpid=tpid: tree(tpid),
                                lambda data, h, Resp=Resp: ts_mask(Resp.FromString(data).prediction),
                            ),
                        )
                        add(
                            size,
                            HttpContestant(
                                "torchserve.rest",
                                ts_http,
                                f"/predictions/{name}",
                                png,
                                {"Content-Type": "application/octet-stream"},
                                lambda tpid=tpid: tree(tpid),
                                lambda data, h: ts_mask(data),
                            ),
                        )
                elif peer == "kserve":
                    k_addr, k_http, kpid = start_kserve(cache, store, args.sizes, procs, work)
                    for size, name in names.items():
                        add(
                            size,
                            GrpcContestant(
                                "kserve.grpc",
                                k_addr,
                                "/inference.GRPCInferenceService/ModelInfer",
                                oip_grpc_request(name, pngs[size]),
                                lambda kpid=kpid: tree(kpid),
                                oip_grpc_mask,
                            ),
                        )
                        body, headers = oip_rest_json(pngs[size], binary_out=True)
                        add(
                            size,
                            HttpContestant(
                                "kserve.rest",
                                k_http,
                                f"/v2/models/{name}/infer",
                                body,
                                headers,
                                lambda kpid=kpid: tree(kpid),
                                oip_rest_mask,
                            ),
                        )
                else:
                    m_addr, m_http, mpid = start_mlserver(cache, store, args.sizes, procs, work)
                    for size, name in names.items():
                        add(
                            size,
                            GrpcContestant(
                                "mlserver.grpc",
                                m_addr,
                                "/inference.GRPCInferenceService/ModelInfer",
                                oip_grpc_request(name, pngs[size], raw=False),
                                lambda mpid=mpid: tree(mpid),
                                oip_grpc_mask,
                            ),
                        )
                        body, headers = oip_rest_json(pngs[size])
                        add(
                            size,
                            HttpContestant(
                                "mlserver.rest",
                                m_http,
                                f"/v2/models/{name}/infer",
                                body,
                                headers,
                                lambda mpid=mpid: tree(mpid),
                                oip_rest_mask,
                            ),
                        )
            except (PeerUnavailable, OSError, subprocess.SubprocessError) as e:
                msg = f"{peer}: skipped: {e}"
                skipped.append(msg)
                print(f"bench_peers: {msg}", file=sys.stderr, flush=True)
        baddr = start_bare(store, list(names.values()), procs, work)
        bpid = procs[-1].pid
        for size, name in names.items():
            add(
                size,
                GrpcContestant("bare.grpc", baddr, f"/bare.Infer/{name}", pngs[size], lambda: [bpid], bare_mask(size)),
            )
        handlers = {size: HandlerContestant(store, name, pngs[size]) for size, name in names.items()}
        agreement: dict[int, list[str]] = {}
        for size, cs in by_size.items():
            ref = None
            ok = []
            for c in list(cs) + [handlers[size]]:
                try:
                    mask = await c.setup()
                except Exception as e:  # noqa: BLE001 - a contestant that fails its first call is skipped, with why
                    msg = f"{c.name} ({size} px): skipped: its first call failed: {type(e).__name__}: {str(e)[:300]}"
                    skipped.append(msg)
                    print(f"bench_peers: {msg}", file=sys.stderr, flush=True)
                    if c in cs:
                        cs.remove(c)
                    continue
                if ref is None:
                    ref = mask
                agreement.setdefault(size, []).append(f"{c.name} {float(np.abs(mask - ref).max()):.1e}")
                ok.append(c)
        results: dict = {}
        requests = {size: (args.requests if size == 64 else args.requests_224) for size in args.sizes}
        t_start = time.time()
        for rnd in range(args.rounds):
            for size in args.sizes:
                cs = by_size[size]
                for conc in args.concurrency:
                    order = cs[rnd % len(cs) :] + cs[: rnd % len(cs)]
                    for c in order:
                        m = await measure(c, conc, requests[size])
                        r = results.setdefault((size, c.name, conc), {"lat": [], "rps": [], "cpu_ms": []})
                        r["lat"] += m["lat"]
                        r["rps"].append(m["rps"])
                        r["cpu_ms"].append(m["cpu_ms"])
                    if conc == 1:
                        m = await measure(handlers[size], 1, requests[size])
                        r = results.setdefault((size, "handler", 1), {"lat": [], "rps": [], "cpu_ms": []})
                        r["lat"] += m["lat"]
                        r["rps"].append(m["rps"])
                        r["cpu_ms"].append(m["cpu_ms"])
            load = os.getloadavg()
            print(
                f"round {rnd + 1}/{args.rounds} done after {time.time() - t_start:.0f} s (load {load[0]:.1f})",
                file=sys.stderr,
                flush=True,
            )
        for cs in by_size.values():
            for c in cs:
                await c.close()
        load = os.getloadavg()
        print(
            f"bench_peers: NEM-U ({', '.join(names.values())}) on one PNG per size, {args.rounds} interleaved rounds of "
            f"{'/'.join(str(requests[s]) for s in args.sizes)} requests (per size), {os.cpu_count()} cores, "
            f"load {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}"
        )
        for msg in skipped:
            print(f"  {msg}")
        for size in args.sizes:
            print(
                f"  masks vs the first contestant's, max |difference| at {size} px: "
                + ", ".join(agreement.get(size, []))
            )
        print()
        for size in args.sizes:
            order = [c.name for c in by_size[size]] + ["handler"]
            print(table(results, order, args.concurrency, size))
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
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=100, help="requests per contestant, concurrency and round at 64 px")
    ap.add_argument("--requests-224", type=int, default=25, help="the same at the other sizes (224 px)")
    ap.add_argument("--concurrency", type=ints, default=[1, 8, 32])
    ap.add_argument("--sizes", type=ints, default=[64, 224])
    ap.add_argument(
        "--skip",
        type=lambda s: s.split(","),
        default=[],
        help="peers to leave out: torchserve,kserve,mlserver; or contestants by name: oip.grpc,oip.rest,bare.grpc",
    )
    ap.add_argument(
        "--baseline",
        default="",
        help="another checkout (e.g. `git worktree add /tmp/old HEAD`): its `xaiserve serve` runs beside this "
        "one as contestant explain.v1.base (before/after in one interleaved run)",
    )
    ap.add_argument(
        "--processes",
        type=int,
        default=1,
        help="N > 1: also `xaiserve serve --processes N` as contestant explain.v1.pN (use with --channels)",
    )
    ap.add_argument("--channels", type=int, default=1, help="connections per gRPC contestant, calls spread round-robin")
    ap.add_argument("--no-torchserve", action="store_true", help="the same as --skip torchserve")
    ap.add_argument(
        "--cache",
        default=str(DEFAULT_CACHE),
        help="where the peers' virtualenvs and the bench store are kept between runs",
    )
    args = ap.parse_args()
    GrpcContestant.channels = max(1, args.channels)
    if args.no_torchserve:
        args.skip.append("torchserve")
    if 64 not in args.sizes:
        ap.error("--sizes must include 64 (the default model's size)")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
