"""The device setting from the configuration to the jobs, and the device metrics.

- the setting (cpu | cuda | cuda:N | auto) is read by the one configuration parser from flags, the
  environment and files, refused with the setting's name when malformed, and resolved at start: on
  this machine (no GPU) auto is the CPU and cuda stops the server and the worker at start;
- the registry moves each torch module to its device once, and job methods read the device there;
- the RELAX and ablation jobs on a torch-only model run on the registry's device through the
  adapters, and an out-of-memory error halves the batch, the job finishes, the event is counted in
  xaiserve_device_oom_total (simulated with torch.OutOfMemoryError: see test_device_methods.py);
- GPU metrics: a real server here (nvidia-ml-py installed, no NVIDIA driver) exports no
  xaiserve_gpu_* series at all and xaiserve_device_info{device="cpu"}; the exposition of readings is
  tested on readings built in memory, since no real NVML device can be read here.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image as PILImage
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.jobs_support import RecordingContext
from tests.serverutil import running_server
from tests.test_device_methods import OomAbove
from xaiserve.devices import DeviceUnavailable, batch_for_memory, forward_dtype, memory_batch, resolve_device
from xaiserve.handlers.nets import EncoderArch, FrozenSpec
from xaiserve.proto.explain.v1 import explainer_pb2 as pb
from xaiserve.service import gpu_metrics
from xaiserve.service.config import ConfigError, load_config
from xaiserve.service.jobs.ablation import AblationJobMethod
from xaiserve.service.jobs.relax import RelaxJobMethod, iobinding_embed, onnx_embed
from xaiserve.service.modelstore import add_entry
from xaiserve.service.registry import OnnxModel, Registry, RegistryConfig
from xaiserve.service.tensors import from_tensor

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
SIZE = 24
ARCH = EncoderArch(stem=8, widths=(8, 16), blocks=(1, 1))
MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


def _entry(name: str, kind: str, spec: FrozenSpec, **kw) -> dict:
    return {
        "name": name,
        "version": "1",
        "kind": kind,
        "files": {"state_dict": f"{name}/1/weights.pt"},
        "input": {"height": SIZE, "width": SIZE, "channels": 3, "mean": MEAN, "std": STD},
        "arch": spec.to_arch(),
        **kw,
    }


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """A torch-only encoder and classifier (state dicts, no ONNX graph), and an ONNX-only encoder."""
    root = tmp_path_factory.mktemp("device_store")
    torch.manual_seed(0)
    for name, kind, spec, kw in (
        ("enc", "encoder", FrozenSpec(ARCH), {"output_dim": ARCH.embed_dim}),
        ("clf", "classifier", FrozenSpec(ARCH, 2), {"output_dim": 2, "labels": ["a", "b"]}),
    ):
        (root / name / "1").mkdir(parents=True)
        torch.save(spec.build().state_dict(), root / name / "1" / "weights.pt")
        add_entry(root, _entry(name, kind, spec, **kw))
    module = FrozenSpec(ARCH).build().eval()
    (root / "oenc/1").mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (torch.zeros(1, 3, SIZE, SIZE),),
            str(root / "oenc/1/model.onnx"),
            input_names=["image"],
            output_names=["output"],
            dynamic_axes={"image": {0: "b"}, "output": {0: "b"}},
            dynamo=False,
            opset_version=17,
        )
    add_entry(
        root,
        {
            "name": "oenc",
            "version": "1",
            "kind": "encoder",
            "files": {"onnx": "oenc/1/model.onnx"},
            "input": {"height": SIZE, "width": SIZE, "channels": 3, "mean": MEAN, "std": STD},
            "output_dim": ARCH.embed_dim,
        },
    )
    return root


def _png(seed: int = 0) -> bytes:
    a = (np.random.default_rng(seed).random((SIZE, SIZE, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    PILImage.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


class OomRegistry(Registry):
    """The real registry, except that its torch modules fail with CUDA's out-of-memory error above
    `limit` images per forward (what a full GPU does; the allocator cannot be made to fail here)."""

    limit = 4

    def torch_module(self, model):
        return OomAbove(super().torch_module(model), self.limit)


def _oom_count(method: str) -> float:
    return REGISTRY.get_sample_value("xaiserve_device_oom_total", {"method": method}) or 0.0


# --- the setting -----------------------------------------------------------------------------------
def test_the_device_setting_is_read_like_every_other_setting(tmp_path):
    assert load_config(None, env={}).device == "auto"
    assert load_config(None, env={"XAISERVE_DEVICE": "cuda:1"}).device == "cuda:1"
    f = tmp_path / "c.yaml"
    f.write_text("device: cpu\nprecision: bfloat16\nbatch_by_memory: false\n")
    cfg = load_config(f, env={})
    assert (cfg.device, cfg.precision, cfg.batch_by_memory) == ("cpu", "bfloat16", False)
    for source in ({"env": {"XAISERVE_DEVICE": "gpu"}}, {"flags": {"device": "cuda:x"}}):
        with pytest.raises(ConfigError, match="device must be cpu, cuda, cuda:N") as e:
            load_config(None, **({"env": {}} | source))
        assert e.value.setting == "device"
    with pytest.raises(ConfigError, match="precision"):
        load_config(None, env={"XAISERVE_PRECISION": "int8"})


def test_resolution_on_a_machine_without_a_gpu():
    assert resolve_device("auto") == torch.device("cpu") == resolve_device(" CPU ")
    for setting in ("cuda", "cuda:0", "cuda:3"):
        with pytest.raises(DeviceUnavailable, match="sees no CUDA device"):
            resolve_device(setting)
    assert forward_dtype("auto", torch.device("cpu")) is None
    assert forward_dtype("bfloat16", torch.device("cpu")) is torch.bfloat16
    # batch sizes from memory: a power of two in half the free memory; the configured size on the CPU
    assert batch_for_memory(8 << 30, 10 << 20, fraction=0.5) == 256
    assert batch_for_memory(8 << 30, 10 << 20, fraction=0.5, hi=100) == 64
    assert batch_for_memory(1 << 20, 10 << 20) == 1
    assert memory_batch(lambda k: None, torch.device("cpu"), 48) == 48


@pytest.mark.slow
def test_serve_and_worker_refuse_a_cuda_device_at_start(store, tmp_path):
    with pytest.raises(DeviceUnavailable, match="cuda"):
        with running_server(store, device="cuda"):
            pass
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "xaiserve.service.cli",
            "worker",
            "--queue",
            f"sqlite:///{tmp_path / 'q.sqlite'}",
            "--store",
            str(store),
            "--device",
            "cuda:0",
            "--metrics-port",
            "-1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 2 and "device cuda:0" in proc.stderr and "no CUDA device" in proc.stderr, proc.stderr
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "xaiserve.service.cli",
            "serve",
            "--model-store",
            str(store),
            "--device",
            "cuda",
            "--port",
            "0",
            "--metrics-port",
            "-1",
            "--state-dir",
            str(tmp_path / "state"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 2 and "xaiserve serve: device cuda:" in proc.stderr, proc.stderr[-2000:]
    proc = subprocess.run(
        [sys.executable, "-m", "xaiserve.service.cli", "worker", "--queue", "sqlite:///x", "--device", "gpu0"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 2 and "'gpu0' is not one of cpu, cuda, cuda:N" in proc.stderr, proc.stderr


def test_the_registry_puts_modules_on_its_device_once(store):
    reg = Registry(RegistryConfig(store=store, device="cpu", precision="auto"))
    m = reg.torch_module("enc")
    assert reg.torch_module("enc") is m and reg.device == torch.device("cpu") and reg.forward_dtype is None
    assert {p.device.type for p in m.parameters()} == {"cpu"}
    # a device this machine lacks is refused by torch when the module moves (a CPU build asserts)
    with pytest.raises((RuntimeError, AssertionError)):
        Registry(RegistryConfig(store=store, device="cuda:0")).torch_module("clf")


# --- the jobs on the registry's device, out of memory ----------------------------------------------------
def test_relax_job_on_a_torch_encoder_halves_its_forward_on_out_of_memory(store):
    reg = OomRegistry(RegistryConfig(store=store, device="cpu"))
    before = _oom_count("relax")
    req = pb.JobRequest(
        method="relax",
        model="enc",
        image=pb.Image(encoded=_png()),
        relax=pb.RelaxParams(num_masks=32, batch_size=16, seed=2, cells=4),
    )
    ctx = RecordingContext()
    res = RelaxJobMethod().run(req, reg, ctx)
    params = json.loads(res.parameters_json)
    assert params["backend"] == "torch" and params["device"] == "cpu" and params["forward_batch"] == 4
    assert _oom_count("relax") - before == 2  # 16 -> 8 -> 4
    plain = RelaxJobMethod().run(req, Registry(RegistryConfig(store=store, device="cpu")), RecordingContext())
    np.testing.assert_allclose(from_tensor(res.relax.importance), from_tensor(plain.relax.importance), atol=1e-6)
    assert json.loads(plain.parameters_json)["forward_batch"] == 16 and len(ctx.reports) == 2


def test_ablation_job_halves_its_slices_on_out_of_memory(store):
    reg = OomRegistry(RegistryConfig(store=store, device="cpu"))
    before = _oom_count("ablation_path")
    req = pb.JobRequest(
        method="ablation_path",
        model="clf",
        image=pb.Image(encoded=_png(1)),
        ablation=pb.AblationParams(num_slices=6, mask_size=8, max_iterations=2, baseline=pb.Image(encoded=_png(2))),
    )
    res = AblationJobMethod().run(req, reg, RecordingContext())
    params = json.loads(res.parameters_json)
    assert params["device"] == "cpu" and params["slice_batch"] == 3
    assert _oom_count("ablation_path") - before == 1 and res.ablation.iterations == 2


def test_onnx_runtime_with_bound_torch_tensors_equals_the_plain_session(store):
    """The IOBinding embed a CUDA worker uses, run here with the CPU provider and CPU tensors."""
    model = OnnxModel(store / "oenc/1/model.onnx", intra_op_threads=1, prefer_cuda=False, kind="encoder")
    bound, plain = iobinding_embed(model, torch.device("cpu")), onnx_embed(model)
    for b in (1, 5, 3):
        x = torch.randn(b, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(b))
        torch.testing.assert_close(bound(x), plain(x), rtol=1e-6, atol=1e-6)


# --- metrics --------------------------------------------------------------------------------------------
def _scrape(url: str) -> dict[str, list]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def test_a_server_without_a_gpu_exports_no_gpu_series_and_its_device(store):
    import pynvml  # installed (a dependency): NVML itself is what is missing here

    with pytest.raises(pynvml.NVMLError):
        pynvml.nvmlInit()
    with running_server(store, device="cpu") as srv:
        resp = srv.stub().Explain(
            pb.ExplainRequest(
                model="enc", image=pb.Image(encoded=_png()), options=pb.ExplainOptions(method="saliency")
            ),
            timeout=60,
        )
        assert resp.method == "saliency" and from_tensor(resp.mask).shape == (SIZE, SIZE)
        fams = _scrape(srv.metrics_url)
    assert not [n for n in fams if n.startswith("xaiserve_gpu_")]
    info = [s.labels for s in fams["xaiserve_device_info"]]
    assert info == [{"device": "cpu"}]
    assert gpu_metrics.register("cpu", CollectorRegistry()) is False and gpu_metrics.gpu_names() == []


def test_gpu_readings_are_exposed_per_device():
    class Readings:  # an in-memory source in place of NVML, which cannot run here
        names = ["NVIDIA H200", "NVIDIA H200"]

        def read(self):
            return [
                gpu_metrics.GpuReading(0, "NVIDIA H200", 0.87, 40 << 30, 141 << 30),
                gpu_metrics.GpuReading(1, "NVIDIA H200", 0.0, 1 << 30, 141 << 30),
            ]

    reg = CollectorRegistry()
    reg.register(gpu_metrics.GpuCollector(Readings()))
    fams = {f.name: f.samples for f in text_string_to_metric_families(generate_latest(reg).decode())}
    assert sorted(fams) == sorted(gpu_metrics.GPU_METRICS)
    util = {s.labels["gpu"]: s.value for s in fams["xaiserve_gpu_utilization_ratio"]}
    assert util == {"0": 0.87, "1": 0.0}
    used = {s.labels["gpu"]: s.value for s in fams["xaiserve_gpu_memory_used_bytes"]}
    assert used == {"0": float(40 << 30), "1": float(1 << 30)}
    assert {s.labels["name"] for s in fams["xaiserve_gpu_memory_total_bytes"]} == {"NVIDIA H200"}

    class Broken(Readings):
        def read(self):
            raise RuntimeError("GPU has fallen off the bus")

    reg = CollectorRegistry()
    reg.register(gpu_metrics.GpuCollector(Broken()))
    assert b"xaiserve_gpu" not in generate_latest(reg)  # a failed reading: no samples, /metrics still answers
