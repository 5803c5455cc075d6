"""Checkpoints, ONNX export and loading of the denoisers.

The exported graph follows service/registry.py's denoiser contract: input "particles"
[B,1,H,W] float32, output "denoised" [B,1,H,W] float32 in the same (raw) units, batch axis
dynamic; the per-particle normalisation is inside the graph. The spiral resampling operators are
buffers, so they are ONNX initialisers and part of the state dict (the precomputed geometry is
cached with the model and not recomputed when it is loaded).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xaiserve.handlers.denoise.networks import Denoiser, DenoiserConfig

INPUT_NAME, OUTPUT_NAME = "particles", "denoised"


def save_checkpoint(path: Path, model: Denoiser, extra: dict[str, Any]) -> None:
    """{'config': DenoiserConfig dict, 'state_dict': ..., **extra} to `path` (torch.save)."""
    torch.save({"config": model.config.to_dict(), "state_dict": model.state_dict(), **extra}, path)


def load_checkpoint(path: Path) -> tuple[Denoiser, dict[str, Any]]:
    ck = torch.load(path, map_location="cpu", weights_only=True)
    model = from_state_dict(DenoiserConfig.from_dict(ck["config"]), ck["state_dict"])
    return model, ck


def from_state_dict(config: DenoiserConfig, state_dict: dict[str, torch.Tensor]) -> Denoiser:
    """Rebuild a denoiser, taking the geometry buffers from the state dict instead of recomputing."""
    ops = {k[len("ops.") :]: v for k, v in state_dict.items() if k.startswith("ops.")}
    model = Denoiser(config, operators=ops or None)
    model.load_state_dict(state_dict)
    model.eval()
    return model


def load_denoiser(entry, store: Path) -> Denoiser:
    """The torch module of a manifest entry (kind "denoiser"): entry.arch + files["state_dict"], in
    eval mode and in the inference form (the graph that is exported to ONNX). A missing or corrupt
    file, or weights that do not fit the arch, give FailedPrecondition naming the file."""
    from xaiserve.errors import FailedPrecondition
    from xaiserve.handlers.nets import load_state_dict_file

    rel = entry.files.get("state_dict")
    if not rel:
        raise FailedPrecondition(
            f"model {entry.id} has no 'state_dict' file in its manifest entry; it can only be served via ONNX"
        )
    sd = load_state_dict_file(Path(store) / rel, what=f"model {entry.id} weights")
    try:
        return from_state_dict(DenoiserConfig.from_dict(entry.arch), sd)
    except (KeyError, RuntimeError, TypeError, ValueError) as e:
        raise FailedPrecondition(
            f"model {entry.id}: weights {Path(store) / rel} do not fit arch {entry.arch} ({str(e)[:160]}); re-export it with `xaiserve export denoiser`"
        ) from None


def export_onnx(model: Denoiser, path: Path, opset: int = 18) -> Path:
    """Export with a dynamic batch axis, the spiral network in its inference form (portable gathers,
    regrouped ribbon convolutions, folded batch norms: see layers.SpiralOps.ribbon_conv)."""
    model = model.eval()
    if hasattr(model.ops, "portable"):
        model.ops.portable = True
    size = model.config.size
    example = torch.randn(2, 1, size, size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_program = torch.onnx.export(
            model,
            (example,),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes={"particles": {0: batch}},
            opset_version=opset,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx_program.save(str(path), external_data=False)
    return path


def ort_session(path: Path, threads: int = 1):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def ort_denoise(session, particles: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Run an exported denoiser on [N,1,H,W] float32 in batches."""
    outs = []
    for i in range(0, particles.shape[0], batch_size):
        outs.append(
            session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(particles[i : i + batch_size], np.float32)})[0]
        )
    return np.concatenate(outs, 0)


def onnx_parity(model: Denoiser, path: Path, particles: np.ndarray) -> dict[str, float]:
    """Max absolute and relative difference between torch and ONNX Runtime on `particles`."""
    with torch.no_grad():
        ref = model.eval()(torch.from_numpy(particles)).numpy()
    got = ort_denoise(ort_session(path), particles)
    diff = np.abs(ref - got)
    return {"max_abs": float(diff.max()), "max_rel": float(diff.max() / max(np.abs(ref).max(), 1e-12))}
