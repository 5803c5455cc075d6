"""`xaiserve train ... --device`: every trainer runs on the device it is given, through the code a GPU run takes.

Without a GPU the trainers run with device "cpu" under tests/devicecheck.py's recorder: inside the
training steps, validation and metrics, no tensor is created without a device and nothing is copied
to the host. The host-side data pipeline (datasets, augmentation, the batch generators, the
host-drawn random targets and rotations) is allowed to: its batches go to the device once per step
in training.loop.train_loop. Each trainer returns its model on the CPU, ready for export.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.devicecheck import DeviceRecorder
from xaiserve.handlers.nem import DecoderArch
from xaiserve.handlers.nets import EncoderArch, FrozenSpec
from xaiserve.training.datasets.lesions import lesions
from xaiserve.training.loop import to_device
from xaiserve.training.nem_train import NemTrainConfig, train_nemt, train_nemu
from xaiserve.training.ssl import SimCLRConfig, train_simclr
from xaiserve.training.supervised import ClassifierConfig, train_classifier

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
TINY = EncoderArch(stem=4, widths=(8, 8), blocks=(1, 1))
# the host side: data, augmentation, batch generators, random draws made on the host on purpose
HOST = {
    ("augment.py", "*"),
    ("base.py", "*"),
    ("lesions.py", "*"),
    ("ssl.py", "batches"),
    ("ssl.py", "view"),
    ("ssl.py", "swap_background"),
    ("supervised.py", "batches"),
    ("nem_train.py", "gen"),
    ("nem_train.py", "step"),
    ("nem_train.py", "evaluate_nemu"),  # pointing game and border statistic are numpy metrics, once per eval batch
    ("train.py", "train"),
    ("equivariance.py", "random_angles"),
    ("metrics.py", "as_tensor"),
    ("loop.py", "train_loop"),
}


@pytest.fixture(scope="module")
def data():
    return lesions(size=32, sizes={"train": 32, "val": 16, "test": 16})


def _on_cpu(module: torch.nn.Module) -> bool:
    return {t.device.type for t in [*module.parameters(), *module.buffers()]} == {"cpu"}


def test_to_device_moves_nested_batches():
    batch = (torch.zeros(2), [torch.ones(1), {"m": torch.zeros(3)}], "label")
    moved = to_device(batch, "meta")
    assert (
        moved[0].device.type == "meta" and moved[1][0].device.type == "meta" and moved[1][1]["m"].device.type == "meta"
    )
    assert moved[2] == "label" and to_device(batch, None) is batch


@pytest.mark.slow
def test_classifier_and_encoder_train_on_the_given_device(data):
    with DeviceRecorder(allowed=HOST) as rec:
        cls, hist, metrics = train_classifier(
            data, ClassifierConfig(epochs=1, batch_size=16), TINY, progress=False, device="cpu"
        )
        enc, _, probe = train_simclr(
            data, SimCLRConfig(epochs=1, batch_size=16, bg_swap=0.0), TINY, progress=False, device="cpu"
        )
    assert not rec.findings, rec.report()
    assert _on_cpu(cls) and _on_cpu(enc) and len(hist) == 1 and 0 <= metrics["test_accuracy"] <= 1
    assert 0 <= probe["probe_test_accuracy"] <= 1


def test_masking_networks_train_on_the_given_device(data):
    frozen_enc = FrozenSpec(TINY).build()
    frozen_cls = FrozenSpec(TINY, num_classes=4).build()
    cfg = NemTrainConfig(epochs=1, batch_size=16)
    with DeviceRecorder(allowed=HOST) as rec:
        nemu, _, m1 = train_nemu(
            frozen_enc, data, cfg, decoder=DecoderArch(widths=(8, 8)), progress=False, device="cpu"
        )
        bank, _, m2 = train_nemt(
            frozen_cls, data, cfg, decoder=DecoderArch(widths=(8, 8)), smoothing=5, progress=False, device="cpu"
        )
        cond, _, _ = train_nemt(
            frozen_cls,
            data,
            cfg,
            conditional=True,
            decoder=DecoderArch(widths=(8, 8)),
            smoothing=5,
            progress=False,
            device="cpu",
        )
    assert not rec.findings, rec.report()
    assert _on_cpu(nemu) and _on_cpu(bank) and _on_cpu(cond)
    assert 0 <= m1["test"]["relevance_mass"] <= 1 and 0 <= m2["test"]["relevance_mass"] <= 1


def test_denoiser_trains_on_the_given_device():
    from xaiserve.handlers.denoise.networks import Denoiser, DenoiserConfig
    from xaiserve.handlers.denoise.train import TrainConfig, train
    from xaiserve.training.datasets.cryoem import CryoEMConfig, CryoEMSimulator

    sim = CryoEMSimulator(CryoEMConfig(size=32, snr=1 / 4, sizes={"train": 32, "val": 16, "test": 4}))
    tr, va = sim.generate("train"), sim.generate("val")
    torch.manual_seed(0)
    model = Denoiser(DenoiserConfig(arch="cartesian", size=32, channels=(4, 8)))
    cfg = TrainConfig(epochs=1, batch_size=16, augment_rotations=True, equivariance_particles=4, equivariance_angles=2)
    with DeviceRecorder(allowed=HOST) as rec:
        hist = train(model, tr.noisy, tr.clean, va.noisy, va.clean, cfg, progress=False, device="cpu")
    assert not rec.findings, rec.report()
    assert _on_cpu(model) and [h["epoch"] for h in hist] == [0, 1]


@pytest.mark.slow
@pytest.mark.parametrize("target", ["classifier", "denoiser"])
def test_train_refuses_a_cuda_device_it_does_not_have(tmp_path, target):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "xaiserve.service.cli",
            "train",
            target,
            "--device",
            "cuda",
            "--out" if target == "classifier" else "--run-dir",
            str(tmp_path),
            "--epochs",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr, proc.stderr[-2000:]
