"""Export to the model store: ONNX graph (serving contract of service/registry.py), state dict,
model card and manifest entry; with an ONNX Runtime vs torch parity check.

ONNX I/O (dynamic batch axis everywhere):
    encoder     image[B,C,H,W] -> output[B,D]
    classifier  image -> output[B,K] (logits)
    nem_u       image -> mask[B,1,H,W], output[B,D]
    nemt        image, target[B] int64 (-1 = argmax) -> mask[B,1,H,W], output[B,K], label[B] int64
"""

from __future__ import annotations

import datetime as _dt
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from xaiserve.paths import code_version
from xaiserve.service.modelstore import add_entry

OPSET = 17


class _Serve(nn.Module):
    """Adapts a module to the graph contract's positional inputs/outputs."""

    def __init__(self, module: nn.Module, kind: str):
        super().__init__()
        self.module, self.kind = module, kind

    def forward(self, image: torch.Tensor, target: torch.Tensor | None = None):
        if self.kind == "nemt":
            return self.module(image, target)
        return self.module(image)


IO = {
    "encoder": (["image"], ["output"]),
    "classifier": (["image"], ["output"]),
    "nem_u": (["image"], ["mask", "output"]),
    "nemt": (["image", "target"], ["mask", "output", "label"]),
}


def example_inputs(
    kind: str, channels: int, size: int, batch: int = 2, seed: int = 0, width: int | None = None
) -> tuple[torch.Tensor, ...]:
    """Random normalised inputs size x size (size x width for a non-square model)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, width or size, generator=g)
    if kind == "nemt":
        return x, torch.full((batch,), -1, dtype=torch.int64)
    return (x,)


def export_onnx(module: nn.Module, kind: str, path: Path, inputs: tuple[torch.Tensor, ...]) -> Path:
    """Write the ONNX graph of `module` (eval mode) with named inputs/outputs and a dynamic batch axis."""
    names_in, names_out = IO[kind]
    module = module.eval()
    wrapper = _Serve(module, kind).eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dyn = {n: {0: "batch"} for n in names_in + names_out}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            inputs,
            str(path),
            input_names=names_in,
            output_names=names_out,
            dynamic_axes=dyn,
            opset_version=OPSET,
            dynamo=False,
            do_constant_folding=True,
        )
    import onnx

    onnx.checker.check_model(onnx.load(str(path)))
    return path


def ort_session(path: Path, threads: int = 1):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def onnx_parity(module: nn.Module, kind: str, path: Path, inputs: tuple[torch.Tensor, ...]) -> dict[str, float]:
    """Max abs difference per output between ONNX Runtime and torch on the same inputs (eval mode)."""
    names_in, names_out = IO[kind]
    sess = ort_session(path)
    outs = sess.run(names_out, {n: t.numpy() for n, t in zip(names_in, inputs)})
    with torch.no_grad():
        ref = _Serve(module.eval(), kind)(*inputs)
    ref = ref if isinstance(ref, (tuple, list)) else (ref,)
    return {
        n: float(np.abs(o.astype(np.float64) - r.numpy().astype(np.float64)).max())
        for n, o, r in zip(names_out, outs, ref)
    }


def latency_ratio(
    model_path: Path, frozen_path: Path, feeds: dict[str, np.ndarray], *, rounds: int = 15, reps: int = 10
) -> dict[str, float]:
    """Median ORT latency per image at batch 1 of a mask model and of its frozen model (interleaved
    rounds, one intra-op thread), and their ratio (the latency goal: at most 2x)."""
    import time

    sm, sf = ort_session(model_path), ort_session(frozen_path)
    fm = {i.name: feeds[i.name] for i in sm.get_inputs()}
    ff = {sf.get_inputs()[0].name: feeds["image"]}  # a user's frozen graph may call its input otherwise
    tm, tf = [], []
    for s_, f_ in ((sm, fm), (sf, ff)):
        for _ in range(reps):
            s_.run(None, f_)
    for _ in range(rounds):
        for s_, f_, acc in ((sm, fm, tm), (sf, ff, tf)):
            t0 = time.perf_counter()
            for _ in range(reps):
                s_.run(None, f_)
            acc.append((time.perf_counter() - t0) / reps)
    m, f = float(np.median(tm)), float(np.median(tf))
    return {"ms_per_image": round(m * 1e3, 3), "frozen_ms_per_image": round(f * 1e3, 3), "ratio": round(m / f, 3)}


@dataclass(frozen=True)
class Publication:
    """Everything written for one model version."""

    name: str
    version: str
    kind: str
    description: str
    input: dict[str, Any]  # height, width, channels, mean, std
    labels: tuple[str, ...]
    output_dim: int
    arch: dict[str, Any]
    metrics: dict[str, Any]
    card_sections: dict[str, str]  # title -> markdown body (data, parameters, metrics, decisions, ...)
    explains: str = ""
    default_method: str = ""  # manifest default_method: the Explain method used when a request names none


def render_card(pub: Publication, files: dict[str, str], version: str) -> str:
    lines = [f"# {pub.name}:{pub.version} ({pub.kind})", "", pub.description, ""]
    for title, body in pub.card_sections.items():
        lines += [f"## {title}", "", body.strip(), ""]
    lines += [
        "## Files",
        "",
        *[f"- `{k}`: `{v}`" for k, v in sorted(files.items())],
        "",
        "## Provenance",
        "",
        f"- code version: `{version}`",
        f"- exported: {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- torch {torch.__version__}, ONNX opset {OPSET}",
        "",
    ]
    return "\n".join(lines)


def publish(
    store: Path,
    pub: Publication,
    module: nn.Module,
    *,
    parity_batch: int = 3,
    frozen_onnx: Path | None = None,
    decoder_only: bool = False,
) -> dict[str, Any]:
    """Write model.onnx, weights.pt, card.md under store/<name>/<version>/ and the manifest entry.

    Returns the manifest entry (with the ORT-vs-torch parity in metrics["onnx_max_abs_diff"], and for
    mask models whose frozen model's ONNX is given, the batch-1 latency ratio in metrics["latency"]).
    decoder_only: the masking network of a user's model, which handlers.nets cannot rebuild from an
    arch: only the trained decoder weights are kept (files.decoder_state, for the record) and the
    ONNX graph is what serves."""
    store = Path(store)
    rel = Path(pub.name) / pub.version
    out = store / rel
    out.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    inputs = example_inputs(
        pub.kind,
        int(pub.input["channels"]),
        int(pub.input["height"]),
        batch=parity_batch,
        width=int(pub.input["width"]),
    )
    if pub.kind == "nemt":  # exercise both argmax and explicit targets in the parity check
        targets = (torch.arange(parity_batch, dtype=torch.int64) - 1).clamp(
            max=max(pub.output_dim - 1, 0)
        )  # -1, 0, 1, ...
        inputs = (inputs[0], targets)
    export_onnx(module, pub.kind, out / "model.onnx", inputs)
    parity = onnx_parity(module, pub.kind, out / "model.onnx", inputs)
    if decoder_only:
        torch.save({k: v for k, v in module.state_dict().items() if not k.startswith("frozen.")}, out / "decoder.pt")
    else:
        torch.save(module.state_dict(), out / "weights.pt")
    latency = None
    if frozen_onnx is not None and Path(frozen_onnx).exists():
        one = {"image": inputs[0][:1].numpy(), "target": np.full((1,), -1, np.int64)}
        latency = latency_ratio(out / "model.onnx", Path(frozen_onnx), one)
    files = {
        "onnx": str(rel / "model.onnx"),
        "card": str(rel / "card.md"),
        **({"decoder_state": str(rel / "decoder.pt")} if decoder_only else {"state_dict": str(rel / "weights.pt")}),
    }
    metrics = dict(pub.metrics)
    metrics["onnx_max_abs_diff"] = {k: float(f"{v:.3g}") for k, v in parity.items()}
    if latency is not None:
        metrics["latency"] = latency
    version = code_version()
    sections = dict(pub.card_sections)
    sections["Export check"] = "ONNX Runtime vs torch on random inputs, max abs difference per output: " + ", ".join(
        f"`{k}` {v:.2e}" for k, v in parity.items()
    )
    if latency is not None:
        sections["Latency"] = (
            f"ONNX Runtime, batch 1, one intra-op thread, median of interleaved rounds at export time: {latency['ms_per_image']} ms "
            f"per image, against {latency['frozen_ms_per_image']} ms for a bare forward pass of the frozen model: ratio "
            f"{latency['ratio']}x (limit 2x). Measured on a shared machine; `python bench/bench_nem_latency.py` re-measures it."
        )
    card_pub = Publication(**{**pub.__dict__, "card_sections": sections})
    (out / "card.md").write_text(render_card(card_pub, files, version))
    entry = {
        "name": pub.name,
        "version": pub.version,
        "kind": pub.kind,
        "description": pub.description,
        "files": files,
        "input": pub.input,
        "labels": list(pub.labels),
        "output_dim": int(pub.output_dim),
        "arch": pub.arch,
        "metrics": metrics,
        "code_version": version,
    }
    if pub.explains:
        entry["explains"] = pub.explains
    if pub.default_method:
        entry["default_method"] = pub.default_method
    add_entry(store, entry)
    return entry
