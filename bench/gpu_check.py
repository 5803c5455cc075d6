#!/usr/bin/env python3
"""GPU check: xaiserve's torch methods on this machine's GPU, against the same code on its CPU.

Runs on a machine with an NVIDIA GPU and torch built with CUDA, with nothing of this project
installed: it imports xaiserve from this checkout (sys.path) and needs only torch and numpy;
captum (gradient baselines through captum), onnx + onnxruntime(-gpu) (RELAX through ONNX Runtime's
CUDA provider with IOBinding) are used when present and their rows say "skipped" otherwise.

Model: a ResNet-18 layout (BasicBlocks [2, 2, 2, 2], widths 64..512, 224 x 224 RGB) defined here,
random weights, batch-norm statistics taken from a few batches of noise images (so activations
keep their scale); the encoder is its pooled 512-d output, the classifier adds a 1000-way head.
Random weights make the explanations meaningless and the timings honest: the cost of a forward
pass does not depend on the weights.

Measured, per device (cuda:0 and cpu), each contestant interleaved with its baseline in one run:
  relax        RELAX masks/s (N = 3000 on the GPU; on the CPU as many as its time share allows)
               vs a bare batched forward of the same batch size, same autocast    goal >= 0.9x
  relax-ort    the same through ONNX Runtime CUDA + IOBinding vs its bare forward  goal >= 0.9x
  ablation     one ablation-path iteration (T = 14 slices, 64 x 64 masks, progress heatmap
               included) vs one forward+backward pass of the T slice images       goal <= 1.1x
  gradients    each gradient method (batch 1) vs one forward+backward pass           (reported)
  nem-u        NEM-U mask latency (batch 1; a U-Net decoder on the model's pyramid, strides
               2..32) vs the bare forward of the encoder                           goal <= 1.3x
  precision    forward throughput float32 vs bfloat16 autocast, and the RELAX map under bf16 vs
               float32 (correlation, largest difference): what "auto" precision relies on
  memory       the RELAX batch and ablation slices chosen from free memory (GPU), and a real
               out-of-memory drill: the per-process memory cap lowered so that a forward chunk
               fails, halved until it fits, same map as without the failures

    python bench/gpu_check.py [--json gpu_check.json] [--budget-s 420]
    python bench/gpu_check.py --dry-run [--json out.json]     # tiny sizes on the CPU, seconds (CI)

Prints one table; --json writes every row and the environment. Whole run: under 8 minutes
(--budget-s bounds the CPU side, which scales its sizes to the time left).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's xaiserve, installed or not

try:
    import numpy  # noqa: F401  (torch's tensors <-> numpy in the methods)
    import torch
    import torch.nn.functional as F
    from torch import nn
except ImportError as e:  # pragma: no cover - the one hard requirement
    print(f"gpu_check: needs torch and numpy ({e})", file=sys.stderr)
    sys.exit(2)

try:
    from xaiserve.devices import forward_dtype, memory_batch
    from xaiserve.handlers import saliency
    from xaiserve.handlers.ablation.optimiser import AblationConfig, AblationPath
    from xaiserve.handlers.nem.decoder import DecoderArch
    from xaiserve.handlers.nem.models import NemU
    from xaiserve.handlers.relax import Relax, RelaxConfig
    from xaiserve.handlers.relax.embed import ort_iobinding_embed, torch_embed
except ImportError as e:  # pragma: no cover
    print(f"gpu_check: cannot import xaiserve from {ROOT} ({e}); run it from a checkout", file=sys.stderr)
    sys.exit(2)


def _importable(name: str) -> bool:
    """Whether `name` imports here (not only whether it is installed: a broken install counts as absent)."""
    try:
        importlib.import_module(name)
    except Exception:  # noqa: BLE001 - ImportError, or whatever a broken package raises on import
        return False
    return True


HAVE_CAPTUM = _importable("captum.attr")
HAVE_ORT = _importable("onnxruntime")
HAVE_ONNX = _importable("onnx")
CAPTUM_METHODS = {"saliency", "integrated_gradients", "gradient_shap", "gradcam"}


# --- the model ---------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.down is None else self.down(x)))


class ResNet18(nn.Module):
    """ResNet-18 layout with the feature pyramid NEM-U reads: features(x) -> (output, [stem, l1..l4])."""

    def __init__(self, width: int = 64, num_classes: int = 0):
        super().__init__()
        w = (width, 2 * width, 4 * width, 8 * width)
        self.stem = nn.Sequential(nn.Conv2d(3, w[0], 7, 2, 3, bias=False), nn.BatchNorm2d(w[0]), nn.ReLU())
        layers, cin = [], w[0]
        for i, c in enumerate(w):
            layers.append(nn.Sequential(BasicBlock(cin, c, 1 if i == 0 else 2), BasicBlock(c, c, 1)))
            cin = c
        self.layers = nn.ModuleList(layers)
        self.fc = nn.Linear(cin, num_classes) if num_classes else None
        self.output_dim = num_classes or cin
        self.pyramid_channels = (w[0], *w)
        self.pyramid_strides = (2, 4, 8, 16, 32)

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        s = self.stem(x)
        h = F.max_pool2d(s, 3, 2, 1)
        pyr = [s]
        for layer in self.layers:
            h = layer(h)
            pyr.append(h)
        out = h.mean(dim=(2, 3))
        return (self.fc(out) if self.fc is not None else out), pyr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)[0]


def build(width: int, classes: int, size: int, seed: int) -> ResNet18:
    """Random weights; batch-norm running statistics from noise batches (train mode, no gradients)."""
    torch.manual_seed(seed)
    m = ResNet18(width, classes)
    m.train()
    with torch.no_grad():
        for _ in range(3):
            m(torch.randn(8, 3, size, size))
    m.eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def test_image(size: int) -> torch.Tensor:
    """A normalised image with structure (gradients, stripes, a bright disc) instead of pure noise."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    disc = ((xx - 0.3) ** 2 + (yy + 0.2) ** 2 < 0.12).float()
    img = torch.stack([0.5 + 0.4 * torch.sin(6 * xx), 0.5 + 0.3 * yy, 0.3 + 0.6 * disc])
    return ((img - 0.45) / 0.25).float()


# --- timing ------------------------------------------------------------------------------------------
def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn: Callable[[], Any], dev: torch.device) -> float:
    sync(dev)
    t0 = time.perf_counter()
    fn()
    sync(dev)
    return time.perf_counter() - t0


def interleaved(
    contestants: dict[str, Callable[[], Any]], dev: torch.device, reps: int, warm: bool = True
) -> dict[str, float]:
    """Median seconds per contestant, the contestants taking turns (ABAB...) after one warm-up each."""
    if warm:
        for fn in contestants.values():
            timed(fn, dev)
    times: dict[str, list[float]] = {k: [] for k in contestants}
    for _ in range(reps):
        for k, fn in contestants.items():
            times[k].append(timed(fn, dev))
    return {k: statistics.median(v) for k, v in times.items()}


@dataclass
class Row:
    section: str
    device: str
    what: str
    value: float | None = None  # the contestant
    baseline: float | None = None  # what it is compared with
    unit: str = ""
    ratio: float | None = None
    goal: str = ""
    ok: bool | None = None
    note: str = ""


@dataclass
class Check:
    dry_run: bool
    budget_s: float
    rows: list[Row] = field(default_factory=list)
    t0: float = field(default_factory=time.perf_counter)

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.t0)

    def add(self, row: Row) -> None:
        self.rows.append(row)
        print(f"  {row.section:10s} {row.device:7s} {row.what}: " + _fmt_row(row), flush=True)

    def section(self, name: str, dev: torch.device, fn: Callable[[], None]) -> None:
        """Run a section; an exception becomes a row saying what failed (the check goes on)."""
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - report and continue: one broken section must not hide the others
            self.add(Row(name, str(dev), "FAILED", note=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"))
            traceback.print_exc(limit=4)
        finally:
            if dev.type == "cuda":
                torch.cuda.empty_cache()


def _fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    if unit == "s":
        return f"{v * 1e3:.2f} ms" if v < 1 else f"{v:.2f} s"
    if abs(v) >= 100:
        return f"{v:,.0f} {unit}".strip()
    return f"{v:.4g} {unit}".strip()


def _fmt_row(r: Row) -> str:
    parts = [_fmt(r.value, r.unit)]
    if r.baseline is not None:
        parts.append(f"vs {_fmt(r.baseline, r.unit)}")
    if r.ratio is not None:
        parts.append(f"= {r.ratio:.3f}x")
    if r.goal:
        parts.append(f"(goal {r.goal}: {'ok' if r.ok else 'MISSED'})")
    if r.note:
        parts.append(f"[{r.note}]")
    return " ".join(parts)


# --- sizes -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sizes:
    size: int = 224
    width: int = 64
    num_masks: int = 3000
    relax_batch: int = 64  # the server's default relax_batch_size; on the GPU the batch comes from free memory
    cells: int = 7
    slices: int = 14
    mask_size: int = 64
    ablation_iterations: int = 6
    reps: int = 3
    latency_reps: int = 30
    ig_steps: int = 32
    samples: int = 16  # SmoothGrad and GradientShap draws (SaliencyConfig's defaults)
    decoder: tuple[int, ...] = (48, 32, 16, 8)


FULL = Sizes()
DRY = Sizes(
    size=32,
    width=8,
    num_masks=64,
    relax_batch=16,
    cells=4,
    slices=4,
    mask_size=8,
    ablation_iterations=3,
    reps=1,
    latency_reps=2,
    ig_steps=4,
    samples=2,
    decoder=(8, 8, 8, 8),
)


# --- sections ----------------------------------------------------------------------------------------
def check_precision(ck: Check, dev: torch.device, sz: Sizes, enc: nn.Module, x: torch.Tensor) -> None:
    low = torch.bfloat16 if dev.type == "cpu" or torch.cuda.is_bf16_supported() else torch.float16
    batch = torch.randn(sz.relax_batch, 3, sz.size, sz.size, device=dev)
    f32, lowp = torch_embed(enc, None), torch_embed(enc, low)
    with torch.no_grad():
        t = interleaved({"f32": lambda: f32(batch), "low": lambda: lowp(batch)}, dev, max(3, sz.reps))
    ck.add(
        Row(
            "precision",
            str(dev),
            f"forward {str(low).replace('torch.', '')} autocast vs float32, batch {sz.relax_batch}",
            sz.relax_batch / t["low"],
            sz.relax_batch / t["f32"],
            "img/s",
            (sz.relax_batch / t["low"]) / (sz.relax_batch / t["f32"]),
        )
    )
    n = min(sz.num_masks, 512 if dev.type == "cuda" else 128)
    cfg = RelaxConfig(num_masks=n, batch_size=sz.relax_batch, cells=sz.cells, seed=0)
    a = Relax(f32, cfg).attribute(x).importance.double()
    b = Relax(lowp, cfg).attribute(x).importance.double()
    r = float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])
    rel = float((a - b).abs().max() / (a.max() - a.min()).clamp_min(1e-12))
    ck.add(
        Row(
            "precision",
            str(dev),
            f"RELAX map {str(low).replace('torch.', '')} vs float32 (N = {n}, same masks)",
            r,
            None,
            "corr",
            note=f"largest difference {rel:.2e} of the map's range",
        )
    )


def check_relax(ck: Check, dev: torch.device, sz: Sizes, enc: nn.Module, x: torch.Tensor) -> None:
    dtype = forward_dtype("auto", dev)
    embed = torch_embed(enc, dtype)
    c, h, w = x.shape
    b = sz.relax_batch
    if dev.type == "cuda":

        def probe(k: int) -> None:
            with torch.no_grad():
                embed(torch.zeros((k, c, h, w), device=dev))

        b = memory_batch(probe, dev, b, lo=b, hi=1024)  # the RELAX job's rule (service/jobs/relax.py)
    batch = torch.randn(b, c, h, w, device=dev)
    with torch.no_grad():
        per_batch = timed(lambda: embed(batch), dev)
    # the CPU side gets what its share of the time allows (the GPU side does N = 3000)
    n = sz.num_masks
    if dev.type == "cpu" and not ck.dry_run:
        n = int(max(2 * b, min(n, (ck.left() / 12) / max(per_batch, 1e-6) * b)))
        n -= n % b
    cfg = RelaxConfig(num_masks=n, batch_size=b, cells=sz.cells, seed=1)
    relax = Relax(embed, cfg)
    steps = math.ceil(n / b)

    def bare() -> None:
        with torch.no_grad():
            for _ in range(steps):
                embed(batch)

    reps = sz.reps if dev.type == "cuda" else 1
    t = interleaved({"bare": bare, "relax": lambda: relax.attribute(x)}, dev, reps, warm=dev.type == "cuda")
    rate, bare_rate = n / t["relax"], steps * b / t["bare"]
    prec = "float32" if dtype is None else str(dtype).replace("torch.", "")
    ck.add(
        Row(
            "relax",
            str(dev),
            f"RELAX N = {n}, batch {b} ({prec}) vs bare batched forward",
            rate,
            bare_rate,
            "img/s",
            rate / bare_rate,
            ">= 0.9x",
            rate / bare_rate >= 0.9,
            note="N reduced to the CPU's time share" if n != sz.num_masks else "",
        )
    )


def check_relax_ort(ck: Check, dev: torch.device, sz: Sizes, enc: nn.Module, x: torch.Tensor, tmp: Path) -> None:
    if not (HAVE_ORT and HAVE_ONNX):
        ck.add(
            Row("relax-ort", str(dev), "RELAX through ONNX Runtime", note="skipped: onnx / onnxruntime not installed")
        )
        return
    import onnxruntime as ort

    want = "CUDAExecutionProvider" if dev.type == "cuda" else "CPUExecutionProvider"
    if want not in ort.get_available_providers():
        ck.add(Row("relax-ort", str(dev), "RELAX through ONNX Runtime", note=f"skipped: onnxruntime has no {want}"))
        return
    path = tmp / f"encoder-{sz.size}.onnx"
    if not path.exists():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                enc.cpu() if dev.type == "cpu" else enc,
                (torch.zeros(1, 3, sz.size, sz.size, device=dev),),
                str(path),
                input_names=["image"],
                output_names=["output"],
                dynamic_axes={"image": {0: "b"}, "output": {0: "b"}},
                dynamo=False,
                opset_version=17,
            )
    so = ort.SessionOptions()
    so.log_severity_level = 3
    providers: list[Any] = [(want, {"device_id": dev.index or 0})] if dev.type == "cuda" else [want]
    sess = ort.InferenceSession(str(path), sess_options=so, providers=providers)
    embed = ort_iobinding_embed(sess, "image", "output", dev)
    b = sz.relax_batch
    n = sz.num_masks if dev.type == "cuda" or ck.dry_run else min(sz.num_masks, 4 * b)
    batch = torch.randn(b, *x.shape, device=dev)
    steps = math.ceil(n / b)
    relax = Relax(embed, RelaxConfig(num_masks=n, batch_size=b, cells=sz.cells, seed=1))

    def bare() -> None:
        for _ in range(steps):
            embed(batch)

    t = interleaved({"bare": bare, "relax": lambda: relax.attribute(x)}, dev, sz.reps if dev.type == "cuda" else 1)
    rate, bare_rate = n / t["relax"], steps * b / t["bare"]
    ck.add(
        Row(
            "relax-ort",
            str(dev),
            f"RELAX N = {n}, batch {b}, ONNX Runtime {want[:-17]} + IOBinding vs its bare forward",
            rate,
            bare_rate,
            "img/s",
            rate / bare_rate,
            ">= 0.9x",
            rate / bare_rate >= 0.9,
        )
    )


def check_ablation(ck: Check, dev: torch.device, sz: Sizes, cls: nn.Module, x: torch.Tensor) -> None:
    T = sz.slices
    k = sz.ablation_iterations
    cfg = AblationConfig(
        num_slices=T,
        mask_size=sz.mask_size,
        max_iterations=k,
        min_iterations=k,
        stop_saturation=1.0,
        require_baseline_change=False,
    )
    baseline = torch.zeros_like(x)  # given: the blur search (before the first iteration) is not an iteration
    stamps: list[float] = []

    def on_progress(_p) -> None:
        sync(dev)
        stamps.append(time.perf_counter())

    def path() -> None:
        stamps.clear()
        AblationPath(cls, cfg).attribute(x, baseline=baseline, target=3, progress=on_progress)

    imgs = torch.stack([x * (1 - i / (T + 1)) for i in range(1, T + 1)])

    def bare() -> None:
        xs = imgs.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(torch.log_softmax(cls(xs).double(), 1)[:, 3].sum(), xs)

    iters: list[float] = []
    bares: list[float] = []
    reps = sz.reps if dev.type == "cuda" else 1
    path()  # warm-up
    timed(bare, dev)
    for _ in range(reps):
        path()
        iters += [b - a for a, b in zip(stamps, stamps[1:])]  # iteration i+1's end minus iteration i's end
        bares += [timed(bare, dev) for _ in range(3)]
    it, ba = statistics.median(iters), statistics.median(bares)
    ck.add(
        Row(
            "ablation",
            str(dev),
            f"one iteration, T = {T}, {sz.mask_size}x{sz.mask_size} masks vs {T} forward+backward",
            it,
            ba,
            "s",
            it / ba,
            "<= 1.1x",
            it / ba <= 1.1,
        )
    )
    if dev.type == "cuda":
        count = T

        def probe(kk: int) -> None:
            xs = x[None].expand(kk, *x.shape).clone().requires_grad_(True)
            cls(xs).float().sum().backward()

        ck.add(
            Row(
                "memory",
                str(dev),
                "ablation slices per pass from free memory",
                float(min(count, memory_batch(probe, dev, count, hi=count))),
                None,
                "slices",
                note=f"of {count}",
            )
        )


def check_gradients(ck: Check, dev: torch.device, sz: Sizes, cls: nn.Module, x: torch.Tensor) -> None:
    config = saliency.SaliencyConfig(
        ig_steps=sz.ig_steps, smoothgrad_samples=sz.samples, shap_samples=sz.samples, shap_baselines=min(8, sz.samples)
    )

    def bare() -> None:
        xs = x[None].clone().requires_grad_(True)
        torch.autograd.grad(cls(xs)[0, 3], xs)

    for method in saliency.methods_for("classifier"):
        if method in CAPTUM_METHODS and not HAVE_CAPTUM:
            ck.add(Row("gradients", str(dev), method, note="skipped: captum not installed"))
            continue
        reps = sz.latency_reps if dev.type == "cuda" else max(1, sz.reps)
        if dev.type == "cpu" and ck.left() < 30 and not ck.dry_run:
            ck.add(Row("gradients", str(dev), method, note="skipped: time budget"))
            continue
        t = interleaved(
            {"bare": bare, "m": lambda: saliency.attribute(method, cls, x, kind="classifier", target=3, config=config)},
            dev,
            reps,
        )
        ck.add(
            Row(
                "gradients",
                str(dev),
                f"{method} (batch 1) vs one forward+backward",
                t["m"],
                t["bare"],
                "s",
                t["m"] / t["bare"],
            )
        )


def check_nemu(ck: Check, dev: torch.device, sz: Sizes, enc: nn.Module, x: torch.Tensor) -> None:
    model = NemU(enc, DecoderArch(widths=sz.decoder)).to(dev).eval()
    xb = x[None]
    with torch.no_grad():
        mask, _ = model(xb)
        assert mask.shape == (1, 1, sz.size, sz.size), mask.shape
        t = interleaved(
            {"bare": lambda: enc(xb), "nemu": lambda: model(xb)},
            dev,
            sz.latency_reps if dev.type == "cuda" else sz.reps + 2,
        )
    ck.add(
        Row(
            "nem-u",
            str(dev),
            "NEM-U mask (batch 1, float32) vs bare encoder forward",
            t["nemu"],
            t["bare"],
            "s",
            t["nemu"] / t["bare"],
            "<= 1.3x",
            t["nemu"] / t["bare"] <= 1.3,
        )
    )


class _SimulatedCap(nn.Module):
    """Dry run only (no GPU): a chunk above `limit` images raises torch.OutOfMemoryError."""

    def __init__(self, module: nn.Module, limit: int):
        super().__init__()
        self.module, self.limit = module, limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError("simulated: CUDA out of memory")
        return self.module(x)


def check_oom(ck: Check, dev: torch.device, sz: Sizes, enc: nn.Module, x: torch.Tensor) -> None:
    """A real out-of-memory error on the GPU (the process's memory cap lowered), simulated on the CPU."""
    n, big = (4 * sz.relax_batch, 4 * sz.relax_batch) if dev.type == "cpu" else (2048, 2048)
    cfg = RelaxConfig(num_masks=n, batch_size=n, cells=sz.cells, seed=2)
    events: list[tuple[int, int]] = []
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(dev).total_memory
        used = torch.cuda.memory_allocated(dev)
        # 6 GiB above what is held now: the 2048 masks and masked images (about 2 GiB at 224 x 224)
        # fit, a forward of all 2048 images (about 10 MB each at its peak) does not
        cap_bytes = used + 6 * 2**30
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_bytes / total), dev)
        module: nn.Module = enc
        how = f"memory cap {cap_bytes / 2**30:.1f} GiB"
    else:
        module = _SimulatedCap(enc, max(1, big // 8))
        how = "simulated (no GPU)"
    try:
        out = Relax(
            torch_embed(module), cfg, forward_batch=big, on_oom=lambda o, nn_: events.append((o, nn_))
        ).attribute(x)
    finally:
        if dev.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0, dev)
            torch.cuda.empty_cache()
    ref = Relax(torch_embed(enc), cfg, forward_batch=max(1, out.forward_batch)).attribute(x)
    same = bool(torch.allclose(out.importance, ref.importance, atol=1e-5))
    ck.add(
        Row(
            "memory",
            str(dev),
            f"out-of-memory drill: forward chunk {big} -> {out.forward_batch}",
            float(len(events)),
            None,
            "halvings",
            goal="job goes on, same map",
            ok=same and out.num_masks == n and len(events) > 0,
            note=how,
        )
    )


# --- main --------------------------------------------------------------------------------------------
def environment(devices: list[torch.device]) -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "captum": HAVE_CAPTUM,
        "onnx": HAVE_ONNX,
        "onnxruntime": None,
    }
    if HAVE_ORT:
        import onnxruntime as ort

        env["onnxruntime"] = {"version": ort.__version__, "providers": ort.get_available_providers()}
    for d in devices:
        if d.type == "cuda":
            p = torch.cuda.get_device_properties(d)
            env[str(d)] = {
                "name": p.name,
                "memory_gib": round(p.total_memory / 2**30, 1),
                "capability": f"{p.major}.{p.minor}",
                "bf16": torch.cuda.is_bf16_supported(),
            }
    return env


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, help="write the rows and the environment here")
    ap.add_argument(
        "--dry-run", action="store_true", help="tiny sizes on the CPU only (CI): checks that the script runs"
    )
    ap.add_argument(
        "--budget-s", type=float, default=420.0, help="time for the whole check (the CPU side scales to it)"
    )
    ap.add_argument("--cpu", action="store_true", help="no GPU needed: measure the CPU side only (at full size)")
    args = ap.parse_args(argv)
    sz = DRY if args.dry_run else FULL
    if args.dry_run:
        torch.set_num_threads(1)  # tiny tensors: more threads only add hand-offs
    if args.dry_run or args.cpu:
        devices = [torch.device("cpu")]
    elif not torch.cuda.is_available():
        print(
            f"gpu_check: torch {torch.__version__} sees no CUDA device (CUDA build: {torch.version.cuda}); "
            "run with --dry-run or --cpu",
            file=sys.stderr,
        )
        return 2
    else:
        devices = [torch.device("cuda", 0), torch.device("cpu")]
    ck = Check(args.dry_run, args.budget_s)
    env = environment(devices)
    print(f"gpu_check: {json.dumps(env)}", flush=True)
    if devices[0].type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its kernels once
    x0 = test_image(sz.size)
    enc0 = build(sz.width, 0, sz.size, seed=0)
    cls0 = build(sz.width, 1000 if not args.dry_run else 10, sz.size, seed=1)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        for dev in devices:
            enc, cls, x = enc0.to(dev), cls0.to(dev), x0.to(dev)
            print(f"== {dev}", flush=True)
            ck.section("relax", dev, lambda: check_relax(ck, dev, sz, enc, x))
            ck.section("nem-u", dev, lambda: check_nemu(ck, dev, sz, enc, x))
            ck.section("ablation", dev, lambda: check_ablation(ck, dev, sz, cls, x))
            ck.section("gradients", dev, lambda: check_gradients(ck, dev, sz, cls, x))
            ck.section("precision", dev, lambda: check_precision(ck, dev, sz, enc, x))
            ck.section("relax-ort", dev, lambda: check_relax_ort(ck, dev, sz, enc, x, Path(tmp)))
            ck.section("memory", dev, lambda: check_oom(ck, dev, sz, enc, x))
    seconds = time.perf_counter() - ck.t0
    print_table(ck.rows, seconds)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "env": env,
                    "dry_run": args.dry_run,
                    "seconds": round(seconds, 1),
                    "sizes": asdict(sz),
                    "rows": [asdict(r) for r in ck.rows],
                },
                indent=2,
            )
        )
    failed = [r for r in ck.rows if r.what == "FAILED"]
    return 1 if failed else 0


def print_table(rows: list[Row], seconds: float) -> None:
    head = ("section", "device", "measurement", "value", "baseline", "ratio", "goal", "note")
    body = [
        (
            r.section,
            r.device,
            r.what,
            _fmt(r.value, r.unit),
            _fmt(r.baseline, r.unit),
            "-" if r.ratio is None else f"{r.ratio:.3f}x",
            "" if not r.goal else f"{r.goal} {'ok' if r.ok else 'MISSED'}",
            r.note,
        )
        for r in rows
    ]
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body)]
    line = lambda cells: " | ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    print()
    print(line(head))
    print("-+-".join("-" * w for w in widths))
    for b in body:
        print(line(b))
    print(f"\n{len(rows)} rows in {seconds:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
