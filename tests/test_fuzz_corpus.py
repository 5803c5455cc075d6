"""A corpus of more than 200 bad inputs over all eight RPCs, sent to a real `xaiserve serve` process
over gRPC: each gets its precise status, health checks keep answering while they run, and the
server's resident memory grows by less than 100 MB (the 2 GB MRC header used to cost 2.1 GB)."""

from __future__ import annotations

import io
import shutil
import struct
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from tests.serverutil import server_process
from xaiserve.handlers.denoise.export import export_onnx
from xaiserve.handlers.denoise.mrc import mrc_bytes
from xaiserve.handlers.denoise.networks import Denoiser, DenoiserConfig
from xaiserve.proto.explain.v1 import explainer_pb2 as pb
from xaiserve.service.denoise import DEFAULT_POLICY
from xaiserve.service.jobs.backend import new_job_id
from xaiserve.service.modelstore import add_entry
from xaiserve.service.tensors import to_tensor

# the store's spiral denoiser is exported through torch.onnx (dynamo) first
pytestmark = pytest.mark.slow

IA, NF, RE = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED
GARBAGE = [b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", b"\x0a\x64abc", b"\x0f\x00", b"\x0c", b"\x0a\x02\xc3\x28"]
RPCS = {
    "Explain": "unary_unary",
    "Denoise": "unary_unary",
    "ListModels": "unary_unary",
    "SubmitJob": "unary_unary",
    "GetJob": "unary_unary",
    "CancelJob": "unary_unary",
    "WatchJob": "unary_stream",
    "StreamExplain": "stream_stream",
}
DN = 32  # the denoiser's particle side


def png(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def png_header_only(h: int, w: int) -> bytes:
    """A PNG declaring h x w whose pixels compress to almost nothing (a decompression bomb)."""
    return png(np.zeros((h, w), np.uint8))


def mrc_with(**fields) -> bytes:
    data = bytearray(mrc_bytes(np.zeros((4, DN, DN), np.float32)))
    offsets = {"nx": 0, "ny": 4, "nz": 8, "mode": 12, "nsymbt": 92}
    for k, v in fields.items():
        data[offsets[k] : offsets[k] + 4] = struct.pack("<i", v)
    return bytes(data)


def corpus() -> list[tuple[str, str, object, grpc.StatusCode]]:
    """(label, rpc, payload, expected status): payload is request bytes, or a list of frame bytes."""
    rng = np.random.default_rng(0)
    ok_img = np.zeros((32, 32, 3), np.uint8)
    out: list[tuple[str, str, object, grpc.StatusCode]] = []

    def explain(label, image=None, code=IA, model="tiny-nemu", **opts):
        req = pb.ExplainRequest(model=model, options=pb.ExplainOptions(**opts))
        if image is not None:
            req.image.CopyFrom(image)
        out.append((label, "Explain", req.SerializeToString(), code))

    # 1. bytes that are no protobuf message, on every RPC (40)
    for rpc in RPCS:
        for i, g in enumerate(GARBAGE):
            out.append((f"garbage {i} to {rpc}", rpc, [g] if rpc == "StreamExplain" else g, IA))
    # 2. images that do not decode (60)
    for i in range(20):
        junk = rng.integers(0, 256, int(rng.integers(1, 3000)), dtype=np.uint8).tobytes()
        explain(f"random bytes {i}", pb.Image(encoded=b"\x00" + junk))
    full = png(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    for frac in np.linspace(0.05, 0.9, 10):
        explain(f"truncated png {frac:.2f}", pb.Image(encoded=full[: int(len(full) * frac)]))
    jpeg = png(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), "JPEG")
    for cut in (2, 4, 20, 100, 160):
        explain(f"truncated jpeg {cut}", pb.Image(encoded=jpeg[:cut]))
    for side in ((4096, 4096), (5000, 10), (10, 5000), (4097, 1)):  # the answer cannot fit, or too large a side
        explain(f"png header {side}", pb.Image(encoded=png_header_only(*side)), RE)
    explain("renderings cannot fit", pb.Image(encoded=png_header_only(3000, 3000)), RE, return_png=True)
    for dtype, shape, n in (
        ("complex64", [2, 2], 32),
        ("int64", [2, 2], 32),
        ("uint8", [4, 4, 3], 47),
        ("uint8", [0, 4, 3], 0),
        ("uint8", [2, 4, 4, 3], 96),
        ("uint8", [4, 4, 5], 80),
        ("float32", [4, 4], 63),
        ("", [4, 4], 16),
        ("uint8", [], 0),
        ("uint8", [-4, 4], 16),
    ):
        explain(f"tensor {dtype} {shape}", pb.Image(tensor=pb.Tensor(dtype=dtype, shape=shape, data=b"\0" * n)))
    for v in (np.nan, np.inf, -np.inf, 255.0, -1.0):
        explain(f"float value {v}", pb.Image(tensor=to_tensor(np.full((8, 8), v, np.float32))))
    explain("giant tensor dims", pb.Image(tensor=pb.Tensor(dtype="uint8", shape=[5000, 1], data=b"\0" * 5000)), RE)
    explain(
        "4096^2 tensor", pb.Image(tensor=pb.Tensor(dtype="uint8", shape=[4096, 4096], data=b"\0" * (4096 * 4096))), RE
    )
    explain("empty image", pb.Image())
    explain("empty bytes", pb.Image(encoded=b""))
    # 3. Explain: models, methods, options (20)
    for n in (1, 100, 1000, 10_000, 100_000, 1_000_000):
        explain(f"model name of {n}", pb.Image(encoded=png(ok_img)), NF, model="m" * n)
    for n in (1, 1000, 100_000):
        explain(f"version of {n}", pb.Image(encoded=png(ok_img)), NF, model="tiny-nemu:" + "9" * n)
    explain("empty model", pb.Image(encoded=png(ok_img)), IA, model="")
    explain("blank model", pb.Image(encoded=png(ok_img)), IA, model="   ")
    for m in ("lime", "x" * 10_000, "relax", "denoise"):
        explain(f"method {m[:10]}", pb.Image(encoded=png(ok_img)), IA, method=m)
    explain("target on nem-u", pb.Image(encoded=png(ok_img)), IA, target_label=1)
    explain("target out of range", pb.Image(encoded=png(ok_img)), IA, model="tiny-nemt", target_label=3)
    explain("negative target", pb.Image(encoded=png(ok_img)), IA, model="tiny-nemt", target_label=-5)
    explain("encoder without method", pb.Image(encoded=png(ok_img)), IA, model="tiny-encoder")
    explain("denoiser via explain", pb.Image(encoded=png(ok_img)), IA, model="tiny-spiral")

    # 4. Denoise (40)
    def denoise(label, code=IA, model="tiny-spiral", **kw):
        out.append((label, "Denoise", pb.DenoiseRequest(model=model, **kw).SerializeToString(), code))

    for v in (2**31 - 1, 2**30, 10**9, 1 << 20, 100_000, -1, -(2**31)):
        denoise(f"mrc nsymbt {v}", mrc=mrc_with(nsymbt=v))
    for mode in (3, 4, 5, 7, 101, -1, 2**31 - 1):
        denoise(f"mrc mode {mode}", mrc=mrc_with(mode=mode))
    for k in ("nx", "ny", "nz"):
        denoise(f"mrc {k}=0", mrc=mrc_with(**{k: 0}))
        denoise(f"mrc {k}<0", mrc=mrc_with(**{k: -3}))
    denoise("mrc declares 2^40 values", RE, mrc=mrc_with(nx=2**20, ny=2**20, nz=1))
    denoise("mrc declares many particles", RE, mrc=mrc_with(nz=100_000))
    good = mrc_with()
    for cut in (0, 10, 1023, 1024, 2000, len(good) - 1):
        denoise(f"mrc cut at {cut}", mrc=good[:cut])
    denoise("mrc trailing bytes", mrc=good + b"\0" * 7)
    denoise("mrc without map id", mrc=good[:208] + b"XXXX" + good[212:])
    denoise("mrc bad machine stamp", mrc=good[:212] + b"\x00\x00\x00\x00" + good[216:])
    denoise("mrc random bytes", mrc=rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    denoise("no particles")
    for dtype in ("uint8", "int64", "complex64", "f" * 10_000):
        denoise(f"particles {dtype}", tensor=pb.Tensor(dtype=dtype, shape=[1, DN, DN], data=b"\0" * DN * DN * 8))
    denoise("particles nan", tensor=to_tensor(np.full((2, DN, DN), np.nan, np.float32)))
    denoise("particles not square", tensor=to_tensor(np.zeros((2, DN, DN + 2), np.float32)))
    denoise("particles rank 5", tensor=pb.Tensor(dtype="float32", shape=[1, 1, 1, DN, DN], data=b"\0" * DN * DN * 4))
    denoise(
        "too many particles", RE, tensor=pb.Tensor(dtype="float32", shape=[100, DN, DN], data=b"\0" * 100 * DN * DN * 4)
    )
    denoise("unknown denoiser", NF, model="no-such-denoiser", tensor=to_tensor(np.zeros((1, DN, DN), np.float32)))
    denoise("long denoiser name", NF, model="d" * 50_000, tensor=to_tensor(np.zeros((1, DN, DN), np.float32)))
    denoise("explainer via denoise", IA, model="tiny-nemu", tensor=to_tensor(np.zeros((1, DN, DN), np.float32)))

    # 5. ListModels (5)
    for kind in ("xyz", "NEM_U", " ", "encoders", "k" * 100):
        out.append((f"kind {kind[:8]!r}", "ListModels", pb.ListModelsRequest(kind=kind).SerializeToString(), IA))

    # 6. jobs (50)
    img = pb.Image(encoded=png(ok_img))
    for label, req, code in (
        ("unknown method", pb.JobRequest(method="lime", model="tiny-encoder", image=img), IA),
        ("long method", pb.JobRequest(method="j" * 20_000, model="tiny-encoder", image=img), IA),
        ("empty method", pb.JobRequest(model="tiny-encoder", image=img), IA),
        ("negative deadline", pb.JobRequest(method="relax", model="tiny-encoder", image=img, deadline_seconds=-1), IA),
        (
            "nan deadline",
            pb.JobRequest(method="relax", model="tiny-encoder", image=img, deadline_seconds=float("nan")),
            IA,
        ),
        (
            "inf deadline",
            pb.JobRequest(method="relax", model="tiny-encoder", image=img, deadline_seconds=float("inf")),
            IA,
        ),
        (
            "long idempotency key",
            pb.JobRequest(method="relax", model="tiny-encoder", image=img, idempotency_key="k" * 300),
            IA,
        ),
        ("relax unknown model", pb.JobRequest(method="relax", model="nope", image=img), NF),
        ("relax bad image", pb.JobRequest(method="relax", model="tiny-encoder", image=pb.Image(encoded=b"junk")), IA),
        ("relax no image", pb.JobRequest(method="relax", model="tiny-encoder"), IA),
        (
            "relax giant image",
            pb.JobRequest(method="relax", model="tiny-encoder", image=pb.Image(encoded=png_header_only(5000, 5000))),
            RE,
        ),
    ):
        out.append((label, "SubmitJob", req.SerializeToString(), code))
    for i in range(10):
        jid = new_job_id(time.time() - i * 1000)
        for rpc in ("GetJob", "CancelJob", "WatchJob"):
            out.append((f"unknown job {i} {rpc}", rpc, pb.JobRef(id=jid).SerializeToString(), NF))
    for jid, code in (("", IA), (" ", IA), ("i" * 129, IA), ("i" * 100_000, IA), ("not-an-id", NF)):
        for rpc in ("GetJob", "CancelJob", "WatchJob"):
            out.append((f"job id {jid[:6]!r}x{len(jid)} {rpc}", rpc, pb.JobRef(id=jid).SerializeToString(), code))

    # 7. streams (15)
    def frame(i, **kw):
        return pb.ExplainFrame(frame_id=i, image=pb.Image(encoded=png(ok_img)), **kw).SerializeToString()

    for label, frames, code in (
        ("first frame without model", [frame(0)], IA),
        ("unknown model", [frame(0, model="nope")], NF),
        ("long model", [frame(0, model="s" * 20_000)], NF),
        ("max_queue too large", [frame(0, model="tiny-nemu", policy=pb.ALL, max_queue=10_000)], IA),
        ("frame ids go back", [frame(5, model="tiny-nemu", policy=pb.ALL), frame(3)], IA),
        ("frame ids repeat", [frame(5, model="tiny-nemu", policy=pb.ALL), frame(5)], IA),
        ("model switch", [frame(0, model="tiny-nemu", policy=pb.ALL), frame(1, model="tiny-nemt")], IA),
        *[
            (
                f"garbage at {k}",
                [frame(i, model="tiny-nemu" if i == 0 else "", policy=pb.ALL) for i in range(k)]
                + [GARBAGE[k % len(GARBAGE)]],
                IA,
            )
            for k in range(1, 9)
        ],
    ):
        out.append((label, "StreamExplain", frames, code))
    return out


@pytest.fixture(scope="module")
def store(tiny_store, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus-store") / "store"
    shutil.copytree(tiny_store, root)
    torch.manual_seed(0)
    model = Denoiser(DenoiserConfig(arch="spiral", size=DN, channels=(4, 8))).eval()
    export_onnx(model, root / "tiny-spiral" / "1" / "model.onnx")
    torch.save(model.state_dict(), root / "tiny-spiral" / "1" / "weights.pt")
    add_entry(
        root,
        {
            "name": "tiny-spiral",
            "version": "1",
            "kind": "denoiser",
            "files": {"onnx": "tiny-spiral/1/model.onnx", "state_dict": "tiny-spiral/1/weights.pt"},
            "input": {"height": DN, "width": DN, "channels": 1, "mean": [0.0], "std": [1.0]},
            "particles": dict(DEFAULT_POLICY),
            "arch": model.config.to_dict(),
        },
    )
    return root


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmRSS")


def send(ch: grpc.Channel, rpc: str, payload) -> grpc.StatusCode:
    ident = dict(request_serializer=lambda b: b, response_deserializer=lambda b: b)
    f = getattr(ch, RPCS[rpc])(f"/explain.v1.Explainer/{rpc}", **ident)
    try:
        if rpc == "StreamExplain":
            list(f(iter(payload), timeout=60))
        elif rpc == "WatchJob":
            list(f(payload, timeout=60))
        else:
            f(payload, timeout=60)
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""


@pytest.mark.slow  # a server process and a denoiser export: about a minute on 2 shared cores
def test_corpus_of_bad_inputs_gets_precise_statuses(store, tmp_path):
    cases = corpus()
    assert len(cases) >= 200
    with server_process(store, state_dir=tmp_path / "state", job_workers=0, max_denoise_batch=16) as srv:
        opts = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
        ch = grpc.insecure_channel(srv.address, options=opts)
        # warm up with good calls, so that what is measured is growth caused by the bad inputs
        good_explain = pb.ExplainRequest(
            model="tiny-nemu",
            image=pb.Image(encoded=png(np.zeros((64, 64, 3), np.uint8))),
            options=pb.ExplainOptions(return_png=True),
        ).SerializeToString()
        good_denoise = pb.DenoiseRequest(model="tiny-spiral", mrc=mrc_with(), return_mrc=True).SerializeToString()
        for _ in range(5):
            assert send(ch, "Explain", good_explain)[0] == grpc.StatusCode.OK
            assert send(ch, "Denoise", good_denoise)[0] == grpc.StatusCode.OK
        rss0 = rss_mb(srv.process.pid)

        probes: list[float] = []
        failures: list[str] = []
        stop = threading.Event()

        def probe() -> None:
            with grpc.insecure_channel(srv.address) as hc:
                health = health_pb2_grpc.HealthStub(hc)
                while not stop.is_set():
                    t = time.perf_counter()
                    try:
                        if (
                            health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                            != health_pb2.HealthCheckResponse.SERVING
                        ):
                            failures.append("not serving")
                    except grpc.RpcError as e:
                        failures.append(e.code().name)
                    probes.append(time.perf_counter() - t)
                    stop.wait(0.01)

        th = threading.Thread(target=probe, daemon=True)
        th.start()
        wrong = []
        peak = rss0
        try:
            for i, (label, rpc, payload, code) in enumerate(cases):
                got, details = send(ch, rpc, payload)
                if got != code:
                    wrong.append(f"{label} ({rpc}): expected {code.name}, got {got.name}: {details[:200]}")
                elif len(details) > 1500 or not details:
                    wrong.append(f"{label} ({rpc}): message of {len(details)} characters")
                if i % 20 == 0:
                    peak = max(peak, rss_mb(srv.process.pid))
        finally:
            stop.set()
            th.join(10)
        rss1 = rss_mb(srv.process.pid)
        assert send(ch, "Explain", good_explain)[0] == grpc.StatusCode.OK, "the server still serves"
        ch.close()
    assert not wrong, "\n".join(wrong)
    assert not failures, failures
    assert len(probes) >= 5
    p = sorted(probes)
    print(
        f"{len(cases)} bad inputs; health probes {len(p)}, p50 {p[len(p) // 2] * 1e3:.1f} ms, max {p[-1] * 1e3:.1f} ms; "
        f"RSS {rss0:.0f} -> {rss1:.0f} MB (peak sampled {peak:.0f} MB)"
    )
    assert p[int(len(p) * 0.99) - 1] < 0.25 and p[-1] < 1.0, [round(x * 1e3) for x in p[-5:]]
    assert max(rss1, peak) - rss0 < 100, f"RSS grew from {rss0:.0f} to {rss1:.0f} MB (peak {peak:.0f} MB)"
