"""`xaiserve export torchserve`: the archive served by a real TorchServe 0.12 answers like xaiserve.

TorchServe and torch-model-archiver come from PyPI into a virtualenv that sees this environment's
packages (--system-site-packages: the system torch and xaiserve itself); TorchServe runs on the
machine's Java 17, on 127.0.0.1 ports, and is stopped at the end. Its HTTP and gRPC APIs are
called with the default NEM-U model's archive and compared with xaiserve's Explain for the same
image; a bad image batched with good ones fails alone.
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
import venv
import zipfile
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from PIL import Image

from tests.conftest import DEFAULT_STORE
from tests.serverutil import ROOT, free_port, running_server
from xaiserve.proto.explain.v1 import explainer_pb2 as pb
from xaiserve.service.tensors import from_tensor
from xaiserve.service.torchserve_handler import decode_array

pytestmark = pytest.mark.slow
TORCHSERVE = ["torchserve==0.12.0", "torch-model-archiver==0.12.0"]


def png(h: int, w: int, seed: int) -> bytes:
    a = (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def ts_venv(tmp_path_factory) -> Path:
    assert shutil.which("java"), "TorchServe needs Java 17 (apt-get install openjdk-17-jre-headless)"
    d = tmp_path_factory.mktemp("ts") / "venv"
    venv.EnvBuilder(with_pip=True, system_site_packages=True).create(d)
    r = subprocess.run(
        [str(d / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check", *TORCHSERVE],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    torch_here = subprocess.run(
        [str(d / "bin" / "python"), "-c", "import torch; print(torch.__file__)"], capture_output=True, text=True
    ).stdout
    assert "/tmp" not in torch_here and "venv" not in torch_here, f"the venv installed its own torch: {torch_here}"
    return d


@pytest.fixture(scope="module")
def mar(ts_venv, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mars")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    # `xaiserve export torchserve` with the venv's Python (the one that has torch-model-archiver)
    r = subprocess.run(
        [
            str(ts_venv / "bin" / "python"),
            "-m",
            "xaiserve.service.cli",
            "export",
            "torchserve",
            "scenes-nemu",
            "--out",
            str(out),
            "--model-store",
            str(DEFAULT_STORE),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    path = Path(json.loads(r.stdout.strip().splitlines()[-1])["mar"])
    names = zipfile.ZipFile(path).namelist()
    assert {"handler.py", "manifest.json", "xaiserve_archive.json", "MAR-INF/MANIFEST.json"} <= set(names)
    assert any(n.endswith(".onnx") for n in names)
    return path


@pytest.fixture(scope="module")
def torchserve(ts_venv, mar, tmp_path_factory):
    work = tmp_path_factory.mktemp("tsrun")
    ports = {k: free_port() for k in ("http", "mgmt", "metrics", "grpc", "grpc_mgmt")}
    (work / "config.properties").write_text(
        "\n".join(
            [
                f"inference_address=http://127.0.0.1:{ports['http']}",
                f"management_address=http://127.0.0.1:{ports['mgmt']}",
                f"metrics_address=http://127.0.0.1:{ports['metrics']}",
                "grpc_inference_address=127.0.0.1",
                "grpc_management_address=127.0.0.1",
                f"grpc_inference_port={ports['grpc']}",
                f"grpc_management_port={ports['grpc_mgmt']}",
                "disable_token_authorization=true",
                "enable_model_api=true",
                "install_py_dep_per_model=false",
                "default_workers_per_model=1",
                "number_of_netty_threads=2",
                "netty_client_threads=2",
                "vmargs=-Xmx512m -XX:+UseSerialGC",
                f"model_store={mar.parent}",
                "",
            ]
        )
    )
    env = dict(
        os.environ,
        PATH=f"{ts_venv / 'bin'}:{os.environ['PATH']}",
        PYTHONPATH=str(ROOT),
        OMP_NUM_THREADS="1",
        LOG_LOCATION=str(work / "logs"),
        METRICS_LOCATION=str(work / "logs"),
    )
    log = open(work / "torchserve.log", "w")
    proc = subprocess.Popen(
        [
            str(ts_venv / "bin" / "torchserve"),
            "--start",
            "--foreground",
            "--ncs",
            "--ts-config",
            str(work / "config.properties"),
            "--model-store",
            str(mar.parent),
        ],
        cwd=work,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{ports['http']}"
    try:
        deadline = time.time() + 90
        while True:
            assert proc.poll() is None, (work / "torchserve.log").read_text()[-3000:]
            try:
                if urllib.request.urlopen(f"{base}/ping", timeout=2).status == 200:
                    break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            assert time.time() < deadline, "TorchServe did not answer /ping in 90 s"
            time.sleep(0.5)
        # register the archive, batching up to 4 requests for 300 ms
        reg = urllib.request.Request(
            f"http://127.0.0.1:{ports['mgmt']}/models?url={mar.name}&batch_size=4&max_batch_delay=300"
            "&initial_workers=1&synchronous=true",
            method="POST",
        )
        assert urllib.request.urlopen(reg, timeout=120).status == 200
        yield base, f"127.0.0.1:{ports['grpc']}", work
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def xaiserve_stub():
    with running_server(DEFAULT_STORE, job_workers=0, max_delay_ms=1.0) as srv:
        yield srv.stub()


def post(url: str, body: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/octet-stream"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def explain(stub, data: bytes) -> pb.ExplainResponse:
    return stub.Explain(
        pb.ExplainRequest(
            model="scenes-nemu", image=pb.Image(encoded=data), options=pb.ExplainOptions(return_output=True)
        )
    )


def test_http_answers_like_xaiserve(torchserve, xaiserve_stub):
    base, _, _ = torchserve
    data = png(50, 38, seed=1)
    code, got = post(f"{base}/predictions/scenes-nemu", data)
    assert code == 200, got
    ref = explain(xaiserve_stub, data)
    mask = decode_array(got["mask"])
    assert mask.shape == (50, 38) and got["method"] == "nem_u" and got["model"] == "scenes-nemu:1"
    np.testing.assert_allclose(mask, from_tensor(ref.mask), atol=1e-5)
    np.testing.assert_allclose(np.asarray(got["output"], np.float32), from_tensor(ref.output), rtol=1e-4, atol=1e-5)


def test_a_bad_image_fails_alone_in_its_batch(torchserve, xaiserve_stub):
    base, _, _ = torchserve
    bodies = [png(64, 64, seed=2), b"\x89PNG\r\n\x1a\n not an image", png(64, 64, seed=3), png(64, 64, seed=2)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda b: post(f"{base}/predictions/scenes-nemu", b), bodies))
    codes = [c for c, _ in answers]
    assert codes == [200, 400, 200, 200], answers[1]
    assert answers[1][1]["code"] == "INVALID_ARGUMENT" and "could not be decoded" in answers[1][1]["error"]
    assert max(a["batch_size"] for c, a in answers if c == 200) >= 2, "the requests were not batched together"
    np.testing.assert_allclose(
        decode_array(answers[0][1]["mask"]), from_tensor(explain(xaiserve_stub, bodies[0]).mask), atol=1e-5
    )
    assert np.array_equal(decode_array(answers[0][1]["mask"]), decode_array(answers[3][1]["mask"]))


def _torchserve_grpc(ts_venv: Path, work: Path):
    """TorchServe's own inference.proto (from its jar), compiled into a private pool."""
    import grpc_tools
    from grpc_tools import protoc

    jar = next((ts_venv / "lib").glob("python*/site-packages/ts/frontend/model-server.jar"))
    src = work / "proto"
    with zipfile.ZipFile(jar) as z:
        for name in ("proto/inference.proto", "google/rpc/status.proto"):
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes(z.read(name))
    out = work / "ts.desc"
    include = Path(grpc_tools.__file__).parent / "_proto"
    assert (
        protoc.main(
            [
                "protoc",
                f"-I{src / 'proto'}",
                f"-I{src}",
                f"-I{include}",
                "--include_imports",
                f"--descriptor_set_out={out}",
                "inference.proto",
            ]
        )
        == 0
    )
    pool = descriptor_pool.DescriptorPool()
    for f in descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file:
        pool.Add(f)
    cls = lambda n: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"org.pytorch.serve.grpc.inference.{n}"))
    return cls("PredictionsRequest"), cls("PredictionResponse")


def test_grpc_answers_like_xaiserve_and_refuses_a_bad_image(torchserve, ts_venv, xaiserve_stub):
    _, address, work = torchserve
    Req, Resp = _torchserve_grpc(ts_venv, work)
    data = png(40, 56, seed=4)
    with grpc.insecure_channel(address) as ch:
        predict = ch.unary_unary(
            "/org.pytorch.serve.grpc.inference.InferenceAPIsService/Predictions",
            request_serializer=Req.SerializeToString,
            response_deserializer=Resp.FromString,
        )
        got = json.loads(predict(Req(model_name="scenes-nemu", input={"data": data}), timeout=60).prediction)
        # TorchServe's gRPC frontend answers a request its handler marked 400 with status OK and the
        # handler's body (it passes per-request statuses on over HTTP only): the error is in the body
        bad = json.loads(
            predict(Req(model_name="scenes-nemu", input={"data": b"GIF89a broken"}), timeout=60).prediction
        )
    np.testing.assert_allclose(decode_array(got["mask"]), from_tensor(explain(xaiserve_stub, data).mask), atol=1e-5)
    assert bad["code"] == "INVALID_ARGUMENT" and "could not be decoded" in bad["error"], bad
