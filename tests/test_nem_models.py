"""NEM-U / NEMt modules: tiny end-to-end training, frozen encoder untouched, labels, load_module errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from xaiserve.errors import FailedPrecondition, InvalidArgument
from xaiserve.handlers.loading import load_module
from xaiserve.handlers.nem import DecoderArch, NemT, NemU
from xaiserve.handlers.nem.build import arch_of, build_from_arch
from xaiserve.handlers.nets import EncoderArch, FrozenSpec, frozen_spec_from_arch, require_pyramid
from xaiserve.service.registry import ModelEntry
from xaiserve.training.datasets.lesions import lesions
from xaiserve.training.nem_train import NemTrainConfig, nemt_step, nemu_step, relevance_mass, train_nemt, train_nemu

TINY = EncoderArch(stem=4, widths=(8, 8, 8), blocks=(1, 1, 1))


@pytest.fixture(scope="module")
def tiny_data():
    return lesions(size=32, sizes={"train": 48, "val": 16, "test": 16})


@pytest.mark.slow
def test_nemu_training_lowers_the_loss_and_leaves_the_encoder_frozen(tiny_data):
    torch.manual_seed(0)
    enc = FrozenSpec(TINY).build()
    before_enc = {k: v.clone() for k, v in enc.state_dict().items()}
    x = tiny_data.normalise(tiny_data.split("val").images)
    probe = NemU(FrozenSpec(TINY).build(), DecoderArch(widths=(8, 8)))
    probe.load_state_dict(NemU(enc, DecoderArch(widths=(8, 8))).state_dict())
    # batch norm in training mode (batch statistics) on both sides: the comparison sees only the weights
    with torch.no_grad():
        loss0 = nemu_step(probe.train(), x)[0].item()
    model, history, metrics = train_nemu(
        enc, tiny_data, NemTrainConfig(epochs=5, batch_size=8), decoder=DecoderArch(widths=(8, 8)), progress=False
    )
    assert len(history) == 5 and loss0 > history[-1]["train_loss"] + 1e-3
    # the returned decoder is the epoch with the best validation relevance mass (model selection)
    assert sum(r["selected"] for r in history) == 1
    best = max(r["val_relevance_mass"] for r in history)
    assert metrics["val"]["relevance_mass"] == pytest.approx(best, abs=1e-5)
    for k, v in model.frozen.state_dict().items():
        assert torch.equal(v, before_enc[k]), f"frozen parameter {k} changed"


@pytest.mark.slow
def test_nemt_bank_training_lowers_the_loss(tiny_data):
    torch.manual_seed(0)
    cls = FrozenSpec(TINY, num_classes=4).build()
    x = tiny_data.normalise(tiny_data.split("val").images)
    t = torch.full((len(x),), 2, dtype=torch.int64)
    fresh = NemT(
        FrozenSpec(TINY, num_classes=4).build(),
        DecoderArch(widths=(8, 8)),
        num_classes=4,
        conditional=False,
        smoothing=5,
    )
    model, history, _ = train_nemt(
        cls,
        tiny_data,
        NemTrainConfig(epochs=3, batch_size=16),
        form="preservation",
        decoder=DecoderArch(widths=(8, 8)),
        smoothing=5,
        progress=False,
    )
    fresh.frozen.load_state_dict(model.frozen.state_dict())
    with torch.no_grad():
        torch.manual_seed(1)  # the same random smoothing kernels on both sides
        before = nemt_step(fresh.train(), x, t, "preservation", only=2)[0].item()
        torch.manual_seed(1)
        after = nemt_step(model.train(), x, t, "preservation", only=2)[0].item()
    assert after < before - 1e-3
    assert {r["class"] for r in history} == {0, 1, 2, 3}


@pytest.mark.slow
def test_nemt_labels_argmax_and_range_checks():
    torch.manual_seed(0)
    cls = FrozenSpec(TINY, num_classes=3).build()
    model = NemT(cls, DecoderArch(widths=(8, 8)), num_classes=3, conditional=False, smoothing=5).eval()
    x = torch.randn(4, 3, 32, 32)
    mask, logits, label = model(x, torch.tensor([-1, 0, 2, -1]))
    assert mask.shape == (4, 1, 32, 32) and logits.shape == (4, 3)
    assert label.tolist() == [int(logits[0].argmax()), 0, 2, int(logits[3].argmax())]
    # the label selects that class's network
    with torch.no_grad():
        _, pyr = cls.features(x)
        alone = model.mask_from(pyr, label, only=2)
    torch.testing.assert_close(mask[2], alone[2])
    with pytest.raises(InvalidArgument, match=r"outside the classifier's range: use 0\.\.2"):
        model(x, torch.tensor([0, 3, 1, 1]))
    with pytest.raises(InvalidArgument):
        model(x, torch.tensor([-2, 0, 0, 0]))


@pytest.mark.slow
def test_conditional_nemt_depends_on_the_label():
    torch.manual_seed(0)
    cls = FrozenSpec(TINY, num_classes=3).build()
    model = NemT(cls, DecoderArch(widths=(8, 8)), num_classes=3, conditional=True, smoothing=5).eval()
    nn.init.normal_(model.decoders[0].film.weight, std=0.5)
    x = torch.randn(2, 3, 32, 32)
    m0 = model(x, torch.tensor([0, 0]))[0]
    m1 = model(x, torch.tensor([1, 1]))[0]
    assert (m0 - m1).abs().max() > 1e-3
    loss, _ = nemt_step(model, x, torch.tensor([0, 1]), "deletion")
    loss.backward()
    assert model.decoders[0].film.weight.grad is not None


def test_relevance_mass_by_hand():
    gt = torch.tensor([[[True, False], [False, False]]])
    mask = torch.tensor([[[[1.0, 0.5], [0.0, 0.5]]]])  # min-max normalised: unchanged
    assert relevance_mass(mask, gt).item() == pytest.approx(1.0 / 2.0)


def _entry(kind: str, arch: dict, files: dict) -> ModelEntry:
    return ModelEntry.from_dict(
        {
            "name": "m",
            "version": "1",
            "kind": kind,
            "files": files,
            "arch": arch,
            "input": {"height": 32, "width": 32, "channels": 3},
        }
    )


def test_load_module_round_trip_and_clear_errors(tmp_path):
    spec = FrozenSpec(TINY, num_classes=4)
    cls = spec.build().eval()
    torch.save(cls.state_dict(), tmp_path / "w.pt")
    back = load_module(_entry("classifier", spec.to_arch(), {"state_dict": "w.pt"}), tmp_path)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(back(x), cls(x))

    (tmp_path / "bad.pt").write_bytes(b"this is not a checkpoint")
    with pytest.raises(FailedPrecondition, match="corrupt or not a torch state dict"):
        load_module(_entry("classifier", spec.to_arch(), {"state_dict": "bad.pt"}), tmp_path)
    with pytest.raises(FailedPrecondition, match="is missing"):
        load_module(_entry("classifier", spec.to_arch(), {"state_dict": "nope.pt"}), tmp_path)
    no_pyramid = {k: v for k, v in spec.to_arch().items() if k != "pyramid"}
    with pytest.raises(FailedPrecondition, match="no feature pyramid"):
        load_module(_entry("classifier", no_pyramid, {"state_dict": "w.pt"}), tmp_path)
    with pytest.raises(FailedPrecondition, match="not supported"):
        load_module(_entry("classifier", {"type": "vit"}, {"state_dict": "w.pt"}), tmp_path)
    other = FrozenSpec(EncoderArch(stem=4, widths=(8, 16, 8)), num_classes=4).to_arch()
    with pytest.raises(FailedPrecondition, match="do not fit the architecture"):
        load_module(_entry("classifier", other, {"state_dict": "w.pt"}), tmp_path)
    with pytest.raises(FailedPrecondition, match="does not expose a feature pyramid"):
        require_pyramid(nn.Linear(3, 4))
    with pytest.raises(FailedPrecondition, match="does not expose a feature pyramid"):
        NemU(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()))


def test_masking_network_arch_round_trip(tmp_path):
    torch.manual_seed(0)
    spec = FrozenSpec(TINY, num_classes=3)
    model = NemT(spec.build(), DecoderArch(widths=(8, 8)), num_classes=3, conditional=True, smoothing=5).eval()
    arch = arch_of(model, spec.to_arch())
    torch.save(model.state_dict(), tmp_path / "w.pt")
    back = load_module(_entry("nemt", arch, {"state_dict": "w.pt"}), tmp_path)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([-1, 1])
    torch.testing.assert_close(back(x, t)[0], model(x, t)[0])
    assert frozen_spec_from_arch(arch["frozen"]).num_classes == 3
    with pytest.raises(FailedPrecondition, match="not a nem_u arch"):
        build_from_arch("nem_u", arch)


@pytest.mark.slow
def test_fused_bank_equals_the_separate_networks():
    from xaiserve.handlers.nem.decoder import bank_forward

    torch.manual_seed(0)
    model = NemT(
        FrozenSpec(TINY, num_classes=4).build(), DecoderArch(widths=(8, 6, 4)), num_classes=4, conditional=False
    )
    for p in model.decoders.parameters():
        nn.init.normal_(p, std=0.2)
    for d in model.decoders:  # non-trivial running statistics, so the folding of batch norm is exercised
        for bn in d.norms:
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
    model.eval()
    _, pyr = model.frozen.features(torch.randn(3, 3, 32, 32))
    torch.testing.assert_close(
        bank_forward(model.decoders, pyr), torch.cat([d(pyr) for d in model.decoders], 1), atol=1e-5, rtol=1e-5
    )


@pytest.mark.slow
def test_interrupted_runs_resume_from_the_checkpoint(tmp_path, tiny_data):
    from xaiserve.training.supervised import ClassifierConfig, train_classifier

    ck = tmp_path / "ckpt.pt"
    _, h2, _ = train_classifier(
        tiny_data, ClassifierConfig(epochs=2, batch_size=16), TINY, checkpoint=ck, progress=False
    )
    full, h3, _ = train_classifier(
        tiny_data, ClassifierConfig(epochs=3, batch_size=16), TINY, checkpoint=ck, resume=True, progress=False
    )
    assert len(h3) == 3 and h3[:2] == h2  # the first two epochs come from the checkpoint
    with pytest.raises(FailedPrecondition, match="different configuration"):
        train_classifier(
            tiny_data, ClassifierConfig(epochs=3, batch_size=8), TINY, checkpoint=ck, resume=True, progress=False
        )
    ck.write_bytes(b"garbage")
    with pytest.raises(FailedPrecondition, match="corrupt"):
        train_classifier(
            tiny_data, ClassifierConfig(epochs=3, batch_size=16), TINY, checkpoint=ck, resume=True, progress=False
        )


def test_model_selection_keeps_the_best_validation_epoch_across_a_resume(tmp_path):
    from xaiserve.training.loop import LoopConfig, train_loop

    net = nn.Linear(1, 1, bias=False)
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    scores = {0: 0.2, 1: 0.9, 2: 0.4, 3: 0.5}  # epoch 2 (1-based) is the best

    def step(_):
        return -net.weight.sum(), {}  # every step adds 1 to the weight: epoch e ends at weight e

    def run(epochs: int, resume: bool):
        return train_loop(
            LoopConfig(
                epochs=epochs,
                checkpoint=tmp_path / "ck.pt",
                resume=resume,
                progress=False,
                log_epochs=False,
                select="score",
            ),
            net,
            opt,
            lambda e: [None],
            1,
            step,
            validate=lambda e: {"score": scores[e]},
        )

    with torch.no_grad():
        net.weight.zero_()
    run(3, False)
    assert float(net.weight) == pytest.approx(2.0)  # the state after epoch 2, not epoch 3
    history = run(4, True)  # epoch 4 (0.5) does not beat the checkpoint's best (0.9)
    assert float(net.weight) == pytest.approx(2.0)
    assert [r["selected"] for r in history] == [0.0, 1.0, 0.0, 0.0]
