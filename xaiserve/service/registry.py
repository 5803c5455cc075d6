"""Model registry: reads model_store/manifest.json, loads and warms models, resolves `name[:version]`.

Manifest entry (one per model version), see docs/MODEL_STORE.md:
    name, version, kind (nem_u | nemt | encoder | classifier | denoiser), description,
    files {onnx, state_dict, card, ...} relative to the store, input {height, width, channels,
    mean, std}, labels, output_dim, explains ("name:version" of the frozen model), arch (what
    handlers.nets needs to rebuild the torch module), metrics.

ONNX graph contract (batch axis dynamic everywhere):
    nem_u      image[B,C,H,W] -> mask[B,1,H,W], output[B,D]
    nemt       image[B,C,H,W], target[B] int64 (-1 = argmax) -> mask[B,1,H,W], output[B,K], label[B] int64
    encoder    image -> output[B,D];  classifier  image -> output[B,K] (logits)
    denoiser   particles[B,1,H,W] -> denoised[B,1,H,W] (raw units in and out)
"""
from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from xaiserve.errors import FailedPrecondition, InvalidArgument, NotFound, quote
from xaiserve.methods import KINDS as KIND_TABLE
from xaiserve.methods import JOB_METHODS, MASK_KINDS, METHODS, MethodSpec, supported_methods, why_not
from xaiserve.service.images import InputSpec

log = logging.getLogger("xaiserve.registry")

KINDS = tuple(KIND_TABLE)


@dataclass(frozen=True)
class ModelEntry:
    name: str
    version: str
    kind: str
    files: dict[str, str]
    input: InputSpec
    labels: tuple[str, ...] = ()
    output_dim: int = 0
    explains: str = ""
    description: str = ""
    arch: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.name}:{self.version}"

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "ModelEntry":
        try:
            inp = d["input"]
            spec = InputSpec(
                height=int(inp["height"]),
                width=int(inp["width"]),
                channels=int(inp.get("channels", 1)),
                mean=tuple(float(v) for v in inp.get("mean", [0.0] * int(inp.get("channels", 1)))),
                std=tuple(float(v) for v in inp.get("std", [1.0] * int(inp.get("channels", 1)))),
            )
            kind = str(d["kind"])
            if kind not in KINDS:
                raise ValueError(f"kind {kind!r} is not one of {KINDS}")
            return ModelEntry(
                name=str(d["name"]),
                version=str(d["version"]),
                kind=kind,
                files={str(k): str(v) for k, v in d.get("files", {}).items()},
                input=spec,
                labels=tuple(str(x) for x in d.get("labels", [])),
                output_dim=int(d.get("output_dim", 0)),
                explains=str(d.get("explains", "")),
                description=str(d.get("description", "")),
                arch=dict(d.get("arch", {})),
                metrics=dict(d.get("metrics", {})),
                raw=dict(d),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"manifest entry {d.get('name', '?')}:{d.get('version', '?')} is malformed: {e}") from e


def _version_key(v: str) -> tuple:
    parts = []
    for p in v.replace("-", ".").split("."):
        parts.append((0, int(p), "") if p.isdigit() else (1, 0, p))
    return tuple(parts)


def read_manifest(store: Path) -> list[ModelEntry]:
    path = store / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(f"no manifest at {path}; run `xaiserve train ...` and `xaiserve export ...`, or point --model-store at a store")
    data = json.loads(path.read_text())
    return [ModelEntry.from_dict(d) for d in data.get("models", [])]


def ort_providers(prefer_cuda: bool = True) -> list[str]:
    import onnxruntime as ort

    avail = ort.get_available_providers()
    if prefer_cuda and "CUDAExecutionProvider" in avail:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxModel:
    """One ONNX Runtime session; `run` is thread-safe (ORT sessions are)."""

    def __init__(self, path: Path, *, intra_op_threads: int = 0, inter_op_threads: int = 1, prefer_cuda: bool = True):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = intra_op_threads
        so.inter_op_num_threads = inter_op_threads
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        self.path = path
        self.session = ort.InferenceSession(str(path), sess_options=so, providers=ort_providers(prefer_cuda))
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self.session.run(None, feeds)
        return dict(zip(self.output_names, outs))


@dataclass
class RegistryConfig:
    store: Path
    intra_op_threads: int = 0
    inter_op_threads: int = 1
    prefer_cuda: bool = True
    warmup: bool = True
    # spiral denoisers through handlers/denoise/spiral_runtime.py (the same network with its
    # resampling in compiled loops, 1.5-1.8x faster on CPU) instead of their single ONNX graph
    spiral_runtime: bool = True


class Registry:
    """Resolves model ids, and loads ONNX sessions and torch modules once, on first use or at start."""

    def __init__(self, config: RegistryConfig):
        self.config = config
        self.store = Path(config.store)
        self._lock = threading.RLock()
        self._onnx: dict[str, OnnxModel] = {}
        self._torch: dict[str, Any] = {}
        self.load_seconds: dict[str, float] = {}
        self.reload()

    # -- manifest ------------------------------------------------------------------------------
    def reload(self) -> None:
        entries = read_manifest(self.store) if (self.store / "manifest.json").exists() else []
        by_name: dict[str, dict[str, ModelEntry]] = {}
        for e in entries:
            by_name.setdefault(e.name, {})[e.version] = e
        with self._lock:
            self._by_name = by_name

    def entries(self) -> list[ModelEntry]:
        return [e for vs in self._by_name.values() for e in sorted(vs.values(), key=lambda e: _version_key(e.version))]

    def resolve(self, model_id: str) -> ModelEntry:
        if not model_id or not model_id.strip():
            raise InvalidArgument(f"model is empty; name one of: {', '.join(sorted(self._by_name)) or '(none loaded)'}")
        name, _, version = model_id.strip().partition(":")
        versions = self._by_name.get(name)
        if not versions:
            raise NotFound(f"model {name!r} is not in the store; available: {', '.join(sorted(self._by_name)) or '(none)'}")
        if version:
            if version not in versions:
                raise NotFound(f"model {name!r} has no version {version!r}; versions: {', '.join(sorted(versions, key=_version_key))}")
            return versions[version]
        return versions[max(versions, key=_version_key)]

    def path(self, entry: ModelEntry, key: str) -> Path:
        rel = entry.files.get(key)
        if not rel:
            raise FailedPrecondition(f"model {entry.id} has no {key!r} file in its manifest entry")
        p = self.store / rel
        if not p.exists():
            raise FailedPrecondition(f"model {entry.id}: file {p} is missing from the model store")
        return p

    # -- loading -------------------------------------------------------------------------------
    def onnx(self, model: str | ModelEntry) -> OnnxModel:
        entry = model if isinstance(model, ModelEntry) else self.resolve(model)
        with self._lock:
            m = self._onnx.get(entry.id)
            if m is None:
                t0 = time.perf_counter()
                m = self._spiral_runtime(entry) or OnnxModel(
                    self.path(entry, "onnx"),
                    intra_op_threads=self.config.intra_op_threads,
                    inter_op_threads=self.config.inter_op_threads,
                    prefer_cuda=self.config.prefer_cuda,
                )
                if self.config.warmup:
                    self._warm(entry, m)
                self._onnx[entry.id] = m
                self.load_seconds[entry.id] = time.perf_counter() - t0
                backend = "onnxruntime" if isinstance(m, OnnxModel) else "spiral_runtime"
                log.info("model loaded", extra={"model": entry.id, "backend": backend, "seconds": round(self.load_seconds[entry.id], 4)})
            return m

    def _spiral_runtime(self, entry: ModelEntry):
        """The SpiralRuntime of a spiral denoiser (same interface as OnnxModel), or None: other
        models, the option off, a CUDA session, or an ONNX Runtime whose layouts it cannot follow
        (logged; the single ONNX graph computes the same map, only slower on CPU)."""
        if not (self.config.spiral_runtime and entry.kind == "denoiser" and entry.arch.get("arch") == "spiral"):
            return None
        if "CUDAExecutionProvider" in ort_providers(self.config.prefer_cuda):
            return None  # on a GPU the single graph's GridSample and gathers are not the bottleneck
        self.path(entry, "onnx")  # a missing graph fails the same way with or without the runtime
        if "state_dict" not in entry.files:
            log.info("spiral denoiser without weights; serving its ONNX graph", extra={"model": entry.id})
            return None
        try:
            from xaiserve.handlers.denoise.spiral_runtime import SpiralRuntime, SpiralRuntimeUnavailable
        except ModuleNotFoundError as e:
            if (e.name or "").split(".")[0] not in ("numba", "llvmlite"):
                raise
            # numba is the optional [spiral] extra: the single ONNX graph computes the same map
            log.warning("spiral runtime unavailable: numba is not installed (pip install 'xaiserve[spiral]'); "
                        "serving the ONNX graph", extra={"model": entry.id, "reason": f"no module named {e.name!r}"})
            return None
        try:
            return SpiralRuntime(self.torch_module(entry), threads=self.config.intra_op_threads)
        except SpiralRuntimeUnavailable as e:
            log.warning("spiral runtime unavailable; serving the ONNX graph", extra={"model": entry.id, "reason": str(e)})
            return None

    def _warm(self, entry: ModelEntry, m: OnnxModel) -> None:
        s = entry.input
        if entry.kind == "denoiser":
            feeds = {"particles": np.zeros((1, 1, s.height, s.width), np.float32)}
        else:
            feeds = {"image": np.zeros((1, s.channels, s.height, s.width), np.float32)}
            if "target" in m.input_names:
                feeds["target"] = np.full((1,), -1, np.int64)
        m.run(feeds)

    def torch_module(self, model: str | ModelEntry):
        """The frozen torch module (eval mode, no grad on parameters), for methods that need gradients."""
        entry = model if isinstance(model, ModelEntry) else self.resolve(model)
        with self._lock:
            mod = self._torch.get(entry.id)
            if mod is None:
                from xaiserve.handlers.loading import load_module

                mod = load_module(entry, self.store)
                mod.eval()
                for p in mod.parameters():
                    p.requires_grad_(False)
                self._torch[entry.id] = mod
            return mod

    def forms(self, entry: ModelEntry) -> frozenset[str]:
        """The model forms this store has for `entry` (see xaiserve.methods): "onnx" when its ONNX
        graph is there, "torch" when a torch module can be built from its files. Decided from the
        manifest and the files present, without loading anything, so ListModels stays cheap."""
        have = set()
        if self._present(entry, "onnx"):
            have.add("onnx")
        if self._present(entry, "state_dict"):
            if entry.kind in ("encoder", "classifier"):
                from xaiserve.handlers.nets.encoder import ARCH_TYPE

                if entry.arch.get("type") == ARCH_TYPE and entry.arch.get("pyramid"):
                    have.add("torch")
            else:
                have.add("torch")  # masking networks and denoisers are rebuilt from their own arch
        return frozenset(have)

    def methods(self, entry: ModelEntry, job_methods: Iterable[str] | None = None) -> list[str]:
        """What this server accepts for `entry`, from the methods table (ListModels advertises it)."""
        frozen = self._frozen_or_none(entry)
        return supported_methods(entry.kind, self.forms(entry), frozen.kind if frozen else None,
                                 self.forms(frozen) if frozen else frozenset(), job_methods=job_methods)

    def check_method(self, entry: ModelEntry, method: str, job_methods: Iterable[str] | None = None) -> MethodSpec:
        """The table's spec of `method` if it applies to `entry`; else InvalidArgument (unknown method,
        wrong kind) or FailedPrecondition (the store lacks the model form it needs), saying what applies."""
        spec = METHODS.get(method)
        jobs = set(JOB_METHODS if job_methods is None else job_methods)
        offered = self.methods(entry, job_methods)
        if spec is None or (spec.rpc == "SubmitJob" and method not in jobs):
            known = ", ".join(n for n in METHODS if n not in JOB_METHODS or n in jobs)
            raise InvalidArgument(f"method {quote(method, 64)} is unknown; known: {known}. "
                                  f"{entry.id} supports: {', '.join(offered) or '(none)'}")
        if method in offered:
            return spec
        frozen = self._frozen_or_none(entry)
        reason = why_not(spec, entry.id, entry.kind, self.forms(entry), frozen.id if frozen else entry.id,
                         frozen.kind if frozen else entry.kind, self.forms(frozen) if frozen else frozenset())
        exc = InvalidArgument if (entry.kind not in spec.kinds and (frozen is None or frozen.kind not in spec.kinds)) else FailedPrecondition
        others = [e.id for e in self.entries() if e.id != entry.id and method in self.methods(e, job_methods)]
        raise exc(f"{reason}. {entry.id} supports: {', '.join(offered) or '(none)'}; "
                  f"models in this store with {method!r}: {', '.join(others[:20]) or '(none)'}")

    def _frozen_or_none(self, entry: ModelEntry) -> ModelEntry | None:
        try:
            return self.frozen_for(entry)
        except (NotFound, FailedPrecondition, InvalidArgument):
            return None

    def _present(self, entry: ModelEntry, key: str) -> bool:
        rel = entry.files.get(key)
        return bool(rel) and (self.store / rel).exists()

    def loaded(self, entry: ModelEntry) -> bool:
        return entry.id in self._onnx or entry.id in self._torch

    def load_all(self) -> None:
        """Load and warm every model that has an ONNX file (at server start)."""
        for e in self.entries():
            if "onnx" in e.files:
                self.onnx(e)

    def frozen_for(self, entry: ModelEntry) -> ModelEntry:
        """The frozen model a mask model explains (itself for encoders and classifiers)."""
        if entry.kind in MASK_KINDS:
            if not entry.explains:
                raise FailedPrecondition(f"mask model {entry.id} does not say which model it explains")
            return self.resolve(entry.explains)
        return entry
