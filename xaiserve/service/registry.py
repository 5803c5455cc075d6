"""Model registry: reads model_store/manifest.json, loads and warms models, resolves `name[:version]`.

Manifest entry (one per model version), see docs/MODEL_STORE.md:
    name, version, kind (nem_u | nemt | encoder | classifier | denoiser), description,
    files {onnx, state_dict | torchscript | exported_program, card, ...} relative to the store,
    input {height, width, channels, mean, std, resize}, io (the kind's tensor names -> the ONNX
    graph's, where they differ), labels, output_dim, explains ("name:version" of the frozen model),
    arch (what handlers.nets needs to rebuild the torch module), metrics. Checked against the JSON
    Schema of service/manifest_schema.py: a bad entry is skipped with its reason (`unavailable()`),
    and the others serve. `reload()` swaps the served set atomically (service/reload.py).

ONNX graph contract (batch axis dynamic everywhere):
    nem_u      image[B,C,H,W] -> mask[B,1,H,W], output[B,D]
    nemt       image[B,C,H,W], target[B] int64 (-1 = argmax) -> mask[B,1,H,W], output[B,K], label[B] int64
    encoder    image -> output[B,D];  classifier  image -> output[B,K] (logits)
    denoiser   particles[B,1,H,W] -> denoised[B,1,H,W] (raw units in and out)
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from xaiserve.clinical.windowing import parse_dicom_defaults
from xaiserve.errors import FailedPrecondition, InvalidArgument, NotFound, quote
from xaiserve.methods import JOB_METHODS, MASK_KINDS, METHODS, MethodSpec, supported_methods, why_not
from xaiserve.methods import KINDS as KIND_TABLE
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
    # the kind's tensor names -> the ONNX graph's names, where they differ (OnnxModel infers the rest)
    io: dict[str, str] = field(default_factory=dict)
    # (key, mtime_ns, size) of its model files when the manifest was read: a file replaced in place
    # changes the entry's key, so a reload (SIGHUP) loads it afresh
    files_stamp: tuple = ()
    # manifest default_method: the Explain method used when a request names none ("" = none; a
    # masking network runs its own graph then). Checked against the methods table at load.
    default_method: str = ""

    @property
    def id(self) -> str:
        return f"{self.name}:{self.version}"

    @functools.cached_property
    def key(self) -> str:
        """The id plus a digest of the entry's content: sessions and batchers are cached under it, so
        an entry rewritten under the same name:version gets fresh ones while in-flight calls finish
        on the old. (Computed once per entry: it is read on every call.)"""
        blob = json.dumps([self.raw, list(self.files_stamp)], sort_keys=True, default=str).encode()
        return f"{self.id}@{hashlib.sha1(blob).hexdigest()[:12]}"

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
                resize=str(inp.get("resize", "stretch")),
                dicom=parse_dicom_defaults(
                    inp.get("dicom"), int(inp.get("channels", 1)), what=f"{d.get('name', '?')}:{d.get('version', '?')}"
                ),
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
                io={str(k): str(v) for k, v in d.get("io", {}).items()},
                default_method=str(d.get("default_method", "")),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"manifest entry {d.get('name', '?')}:{d.get('version', '?')} is malformed: {e}") from e


def _converts_at_load(entry: "ModelEntry") -> bool:
    """An ONNX-only entry whose torch form is converted from the graph at load (`torch_form.from: onnx`),
    when the converter is installed (checked without importing it or torch)."""
    import importlib.util

    tf = entry.raw.get("torch_form")
    return isinstance(tf, dict) and tf.get("from") == "onnx" and importlib.util.find_spec("onnx2torch") is not None


def _version_key(v: str) -> tuple:
    parts = []
    for p in v.replace("-", ".").split("."):
        parts.append((0, int(p), "") if p.isdigit() else (1, 0, p))
    return tuple(parts)


class ManifestError(ValueError):
    """The manifest file itself cannot be read (not JSON, no models list): nothing in it can be served."""


@dataclass(frozen=True)
class BadEntry:
    """A manifest entry that is not served, and why (ListModels shows it as unavailable)."""

    name: str
    version: str
    kind: str
    reason: str
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.name}:{self.version}"


def scan_manifest(store: Path) -> tuple[list[ModelEntry], list[BadEntry]]:
    """(valid entries, bad entries with the reason) of store/manifest.json: the JSON Schema and the
    checks of service.manifest_schema, duplicates, and missing model files. Raises FileNotFoundError
    when there is no manifest and ValueError when it is not JSON (there is nothing to serve then)."""
    from xaiserve.service.manifest_schema import MODEL_FILES, entry_problems, unknown_fields

    store = Path(store)
    path = store / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(
            f"no manifest at {path}; run `xaiserve train ...` and `xaiserve export ...`, or point --model-store at a store"
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{path} is not valid JSON ({e}); fix it, or restore it from git") from None
    models = data.get("models", []) if isinstance(data, dict) else None
    if not isinstance(models, list):
        raise ManifestError(f"{path} must be an object with a 'models' list")
    good: list[ModelEntry] = []
    bad: list[BadEntry] = []
    seen: set[str] = set()
    for d in models:
        name = str(d.get("name", "?")) if isinstance(d, dict) else "?"
        version = str(d.get("version", "?")) if isinstance(d, dict) else "?"
        kind = str(d.get("kind", "")) if isinstance(d, dict) else ""
        problems = entry_problems(d)
        if not problems and f"{name}:{version}" in seen:
            problems = [f"a second entry for {name}:{version}; the first is served"]
        if not problems:
            missing = [
                f"files.{k}: {d['files'][k]} is missing from the store"
                for k in MODEL_FILES
                if k in d["files"] and not (store / d["files"][k]).exists()
            ]
            problems = missing
        if not problems:
            try:
                stamp = tuple(
                    (k, (store / d["files"][k]).stat().st_mtime_ns, (store / d["files"][k]).stat().st_size)
                    for k in MODEL_FILES
                    if k in d["files"]
                )
                good.append(replace(ModelEntry.from_dict(d), files_stamp=stamp))
            except (ValueError, OSError) as e:
                problems = [str(e)]
        if problems:
            bad.append(BadEntry(name, version, kind, "; ".join(problems), d if isinstance(d, dict) else {}))
            continue
        seen.add(f"{name}:{version}")
        extra = unknown_fields(d)
        if extra:
            log.warning(
                "manifest entry has fields the registry does not read (typos?)",
                extra={"model": f"{name}:{version}", "fields": extra},
            )
    # a masking network whose frozen model is listed but bad is not served either (one whose frozen
    # model is not listed at all still serves its own graph; methods on the frozen model are refused)
    ids = {e.id for e in good} | {e.name for e in good}
    for e in [e for e in good if e.kind in MASK_KINDS and e.explains not in ids]:
        why = next((b.reason for b in bad if e.explains in (b.id, b.name)), None)
        if why is not None:
            good.remove(e)
            bad.append(
                BadEntry(e.name, e.version, e.kind, f"explains {e.explains}, which is unavailable: {why}", e.raw)
            )
    return good, bad


def manifest_stamp(store: Path) -> tuple[int, int, int] | None:
    """(mtime_ns, inode, size) of store/manifest.json, None when there is none: what the reload
    watcher compares (an atomic replace changes the inode even within one mtime tick)."""
    try:
        st = (Path(store) / "manifest.json").stat()
    except FileNotFoundError:
        return None
    return (st.st_mtime_ns, st.st_ino, st.st_size)


def read_manifest(store: Path) -> list[ModelEntry]:
    """The valid entries of store/manifest.json; bad ones are logged with the reason and skipped."""
    good, bad = scan_manifest(Path(store))
    for b in bad:
        log.error("manifest entry skipped", extra={"model": b.id, "reason": b.reason})
    return good


def available_cores() -> int:
    """CPU cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota
    (/sys/fs/cgroup/cpu.max, what a Kubernetes CPU limit sets), rounded up, at least 1."""
    import math
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max" and int(period) > 0:
            cores = min(cores, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def serving_intra_op_threads(cores: int, models: int, concurrent_calls: int) -> int:
    """Intra-op threads per ONNX Runtime session for a server: the cores shared by the model calls
    that can run at once (one per model, at most `concurrent_calls`), at least 1. More threads than
    that only contend: on 2 cores a 64 x 64 masking network answered fastest and cheapest with 1."""
    return max(1, cores // max(1, min(concurrent_calls, models)))


def ort_providers(prefer_cuda: bool = True, cuda_device: int = 0) -> list:
    """ONNX Runtime's providers: CUDA (on device `cuda_device`) first when present and preferred."""
    import onnxruntime as ort

    avail = ort.get_available_providers()
    if prefer_cuda and "CUDAExecutionProvider" in avail:
        cuda: Any = (
            "CUDAExecutionProvider" if cuda_device == 0 else ("CUDAExecutionProvider", {"device_id": cuda_device})
        )
        return [cuda, "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def io_map(
    kind: str, inputs: list[tuple[str, str, list]], outputs: list[str], io: dict[str, str], what: str = "the ONNX graph"
) -> tuple[dict[str, str], dict[str, str]]:
    """The kind's tensor names (xaiserve.methods KINDS) -> the graph's, for inputs and outputs.

    inputs: (name, element type, shape) of the graph's inputs. A name comes from `io` when the
    manifest maps it, else is the kind's own name when the graph has it, else is inferred when that
    is unambiguous: the only rank-4 float input is the image, the only output left is the output.
    FailedPrecondition otherwise, naming the graph's tensors and the `io` entry that would fix it."""
    spec = KIND_TABLE[kind]
    in_names = [n for n, _, _ in inputs]
    listing = (
        f"{what} has inputs {', '.join(f'{n} {t}{list(s)}' for n, t, s in inputs)} and outputs {', '.join(outputs)}"
    )
    for k, v in io.items():
        if v not in in_names and v not in outputs:
            raise FailedPrecondition(f"io.{k} names {quote(v, 80)}, which {what} does not have; {listing}")

    def pick(canon: str, avail: list[str], candidates: list[str]) -> str:
        if canon in io:
            return io[canon]
        if canon in avail:
            return canon
        if len(candidates) == 1:
            return candidates[0]
        example = ", ".join(f'"{c}": "..."' for c in (*spec.inputs, *spec.outputs))
        raise FailedPrecondition(
            f"cannot tell which tensor is {canon!r}: {listing}; map them in the manifest entry's io "
            f"({{{example}}}, or `xaiserve models add ... --io {canon}=NAME`)"
        )

    ins: dict[str, str] = {}
    for canon in spec.inputs:
        left = [n for n, t, sh in inputs if n not in ins.values()]
        if canon in ("image", "particles"):
            cands = [n for n, t, sh in inputs if n in left and "float" in t and len(sh) == 4]
        else:
            cands = [n for n, t, sh in inputs if n in left and "int" in t]
        ins[canon] = pick(canon, left, cands)
    extra = [n for n in in_names if n not in ins.values()]
    if extra:
        raise FailedPrecondition(f"{what} takes inputs {', '.join(extra)} that a {kind} does not feed; {listing}")
    outs: dict[str, str] = {}
    for canon in spec.outputs:
        left = [n for n in outputs if n not in outs.values()]
        outs[canon] = pick(canon, left, left if len(spec.outputs) == 1 else [])
    return ins, outs


class OnnxModel:
    """One ONNX Runtime session; `run` is thread-safe (ORT sessions are).

    With `kind`, feeds and results use the kind's tensor names (image, output, ...) whatever the
    graph calls them (`io_map`), and a graph with a fixed batch of 1 is run row by row. Without it,
    the graph's own names pass through."""

    def __init__(
        self,
        path: Path,
        *,
        intra_op_threads: int = 0,
        inter_op_threads: int = 1,
        prefer_cuda: bool = True,
        kind: str | None = None,
        io: dict[str, str] | None = None,
        allow_spinning: bool = False,
        cuda_device: int = 0,
    ):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = intra_op_threads
        so.inter_op_num_threads = inter_op_threads
        # Spinning (ONNX Runtime's default) keeps idle pool threads busy-waiting for the next op:
        # at 30 fps a session then burned 2-14x the CPU of its work. Off, they sleep.
        flag = "1" if allow_spinning else "0"
        so.add_session_config_entry("session.intra_op.allow_spinning", flag)
        so.add_session_config_entry("session.inter_op.allow_spinning", flag)
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        self.path = path
        try:
            self.session = ort.InferenceSession(
                str(path), sess_options=so, providers=ort_providers(prefer_cuda, cuda_device)
            )
        except Exception as e:  # noqa: BLE001 - ORT raises its own exception types on a bad file
            raise FailedPrecondition(
                f"{Path(path).name} is not an ONNX graph ONNX Runtime can load ({e.__class__.__name__}: "
                f"{quote(str(e).splitlines()[0] if str(e) else '', 200)})"
            ) from None
        graph_in = [(i.name, i.type, i.shape) for i in self.session.get_inputs()]
        graph_out = [o.name for o in self.session.get_outputs()]
        if kind is None:
            self._in = {n: n for n, _, _ in graph_in}
            self._out = {n: n for n in graph_out}
        else:
            self._in, self._out = io_map(kind, graph_in, graph_out, dict(io or {}), what=Path(path).name)
        self.input_names = list(self._in)
        self.output_names = list(self._out)
        self._fetch = list(self._out.values())
        first = next((sh for n, _, sh in graph_in if n == self._in.get("image", self._in.get("particles"))), None)
        self.fixed_batch = first[0] if first and isinstance(first[0], int) else None

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        graph_feeds = {self._in[k]: v for k, v in feeds.items()}
        rows = int(next(iter(feeds.values())).shape[0])
        if self.fixed_batch == 1 and rows > 1:
            parts = [
                self.session.run(self._fetch, {k: v[i : i + 1] for k, v in graph_feeds.items()}) for i in range(rows)
            ]
            outs = [np.concatenate(col, axis=0) for col in zip(*parts)]
        else:
            outs = self.session.run(self._fetch, graph_feeds)
        return dict(zip(self._out, outs))


def _reason(exc: BaseException) -> str:
    """One line saying why a model could not be loaded (the XaiError message, or type: message)."""
    from xaiserve.errors import XaiError

    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = text if isinstance(exc, XaiError) else f"{exc.__class__.__name__}: {text}"
    return text if len(text) <= 400 else text[:400] + "..."


def _check_outputs(entry: ModelEntry, out: dict[str, np.ndarray]) -> None:
    """The warm-up's outputs have the kind's shapes ([2,D] / [2,1,H,W] ...) and the manifest's sizes."""
    s = entry.input
    if entry.kind in ("encoder", "classifier", "nem_u", "nemt"):
        o = out["output"]
        if o.ndim != 2 or o.shape[0] != 2:
            raise FailedPrecondition(f"its output {list(o.shape)} on a batch of 2 is not [2, D]")
        if entry.output_dim and o.shape[1] != entry.output_dim:
            raise FailedPrecondition(
                f"its output has {o.shape[1]} values but the manifest says output_dim {entry.output_dim}"
            )
        if entry.kind in ("classifier", "nemt") and entry.labels and o.shape[1] != len(entry.labels):
            raise FailedPrecondition(f"it returns {o.shape[1]} logits for {len(entry.labels)} labels")
    if entry.kind in MASK_KINDS:
        mk = out["mask"]
        if mk.shape != (2, 1, s.height, s.width):
            raise FailedPrecondition(f"its mask is {list(mk.shape)}, not [2, 1, {s.height}, {s.width}]")


@dataclass(frozen=True)
class ReloadReport:
    added: list[str]
    removed: list[str]
    retired: list[str]  # cache keys dropped (removed or rewritten entries)
    unavailable: list[str]


@dataclass
class RegistryConfig:
    store: Path
    intra_op_threads: int = 0  # 0: ONNX Runtime's default, or serving_intra_op_threads with concurrent_calls
    inter_op_threads: int = 1
    prefer_cuda: bool = True
    warmup: bool = True
    allow_spinning: bool = False  # ONNX Runtime's idle threads spin-wait (see OnnxModel)
    # > 0 (a server: its inference threads): intra_op_threads = 0 picks serving_intra_op_threads
    # from the available cores, the models in the store and this many concurrent model calls
    concurrent_calls: int = 0
    # spiral denoisers through handlers/denoise/spiral_runtime.py (the same network with its
    # resampling in compiled loops, 1.5-1.8x faster on CPU) instead of their single ONNX graph
    spiral_runtime: bool = True
    # where torch modules live and run: a resolved torch device ("cpu", "cuda:0"; the `device` setting
    # through xaiserve.devices.resolve_device). Job methods read it as Registry.device
    device: str = "cpu"
    # autocast of frozen-model forwards (xaiserve.devices.forward_dtype): auto, float32, bfloat16, float16
    precision: str = "float32"
    # on a GPU, batch sizes of jobs that set none come from free device memory (xaiserve.devices.memory_batch)
    batch_by_memory: bool = True


class Registry:
    """Resolves model ids, and loads ONNX sessions and torch modules once, on first use or at start."""

    def __init__(self, config: RegistryConfig):
        self.config = config
        self.store = Path(config.store)
        self._lock = threading.RLock()
        self._reload_lock = threading.Lock()
        # sessions and modules are cached per ModelEntry.key (id + content digest)
        self._onnx: dict[str, OnnxModel] = {}
        self._torch: dict[str, Any] = {}
        self._forms_cache: dict[str, frozenset[str]] = {}
        self.load_seconds: dict[str, float] = {}
        self._by_name: dict[str, dict[str, ModelEntry]] = {}
        self._unavailable: dict[str, BadEntry] = {}
        self._listeners: list[Callable[[set[str]], None]] = []
        self.manifest_stamp: tuple[int, int, int] | None = None  # (mtime_ns, inode, size) of the manifest read last
        # +1 whenever the served set changes (a reload, an entry marked unavailable): open streams
        # compare it with the value they saw and re-resolve their model only when it moved
        self.generation = 0
        self.reload()

    # -- manifest ------------------------------------------------------------------------------
    def reload(self, *, load: bool = False) -> "ReloadReport":
        """Re-read the manifest and swap the served set in one step (see service/reload.py).

        Entries that are new or changed are checked (schema, files) and, with `load`, loaded and
        warmed BEFORE the swap: a bad one is left out with its reason, and until the swap every call
        resolves against the previous set. After the swap the sessions of removed or replaced
        entries are dropped from the caches (calls that hold them finish on them) and listeners
        hear their keys. A manifest that is not JSON keeps the current set (ValueError)."""
        with self._reload_lock:
            path = self.store / "manifest.json"
            stamp = manifest_stamp(self.store)
            good, bad = scan_manifest(self.store) if path.exists() else ([], [])
            old = {e.key: e for e in self.entries()}
            fresh = [e for e in good if e.key not in old]
            if load:
                for e in list(fresh):
                    if "onnx" not in e.files:
                        continue
                    try:
                        self._load(e)
                    except Exception as exc:  # noqa: BLE001 - any failure makes this entry (only) unavailable
                        good.remove(e)
                        bad.append(BadEntry(e.name, e.version, e.kind, _reason(exc), e.raw))
                # masking networks whose frozen model just failed to load
                ids = {e.id for e in good} | {e.name for e in good}
                failed = {b.id for b in bad} | {b.name for b in bad}
                for e in [e for e in good if e.kind in MASK_KINDS and e.explains not in ids and e.explains in failed]:
                    good.remove(e)
                    bad.append(
                        BadEntry(e.name, e.version, e.kind, f"explains {e.explains}, which is unavailable", e.raw)
                    )
            by_name: dict[str, dict[str, ModelEntry]] = {}
            for e in good:
                by_name.setdefault(e.name, {})[e.version] = e
            keep = {e.key for e in good}
            with self._lock:
                self._by_name = by_name
                self._unavailable = {b.id: b for b in bad}
                self.generation += 1
                retired = {k for k in (*self._onnx, *self._torch) if k not in keep}
                for k in retired:
                    self._onnx.pop(k, None)
                    self._torch.pop(k, None)
                self.manifest_stamp = stamp
            for b in bad:
                log.error("model unavailable", extra={"model": b.id, "reason": b.reason})
            gone = retired | {k for k in old if k not in keep}
            report = ReloadReport(
                added=sorted(e.id for e in fresh if e in good),
                removed=sorted({e.id for e in old.values()} - {e.id for e in good}),
                retired=sorted(gone),
                unavailable=sorted(b.id for b in bad),
            )
            for fn in list(self._listeners):
                try:
                    fn(gone)
                except Exception:  # noqa: BLE001 - a listener must not stop the reload
                    log.exception("reload listener failed")
            return report

    def add_listener(self, fn: Callable[[set[str]], None]) -> None:
        """Call fn(keys of entries no longer served) after every reload (the fast path retires their batchers)."""
        self._listeners.append(fn)

    def entries(self) -> list[ModelEntry]:
        return [e for vs in self._by_name.values() for e in sorted(vs.values(), key=lambda e: _version_key(e.version))]

    def unavailable(self) -> list[BadEntry]:
        """Entries the manifest lists but the server does not serve, with the reason (ListModels)."""
        return sorted(self._unavailable.values(), key=lambda b: (b.name, _version_key(b.version)))

    def _mark_unavailable(self, entry: ModelEntry, exc: BaseException) -> BadEntry:
        bad = BadEntry(entry.name, entry.version, entry.kind, _reason(exc), entry.raw)
        log.error("model unavailable", extra={"model": entry.id, "reason": bad.reason})
        with self._lock:
            versions = self._by_name.get(entry.name, {})
            if versions.get(entry.version) is entry:
                by_name = {n: dict(vs) for n, vs in self._by_name.items()}
                del by_name[entry.name][entry.version]
                if not by_name[entry.name]:
                    del by_name[entry.name]
                self._by_name = by_name
                self._unavailable = {**self._unavailable, bad.id: bad}
                self.generation += 1
        return bad

    def resolve(self, model_id: str) -> ModelEntry:
        if not model_id or not model_id.strip():
            raise InvalidArgument(f"model is empty; name one of: {', '.join(sorted(self._by_name)) or '(none loaded)'}")
        name, _, version = model_id.strip().partition(":")
        by_name, unavailable = self._by_name, self._unavailable
        versions = by_name.get(name)
        if version and f"{name}:{version}" in unavailable and (not versions or version not in versions):
            raise FailedPrecondition(
                f"model {name}:{version} is unavailable: {unavailable[f'{name}:{version}'].reason}"
            )
        if not versions:
            down = [b for b in unavailable.values() if b.name == name]
            if down:
                b = max(down, key=lambda b: _version_key(b.version))
                raise FailedPrecondition(f"model {b.id} is unavailable: {b.reason}")
            raise NotFound(
                f"model {quote(name)} is not in the store; available: {', '.join(sorted(by_name)) or '(none)'}"
            )
        if version:
            if version not in versions:
                raise NotFound(
                    f"model {quote(name)} has no version {quote(version)}; versions: {', '.join(sorted(versions, key=_version_key))}"
                )
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
        """The entry's ONNX session (loaded and warmed once). A graph that does not load or run
        makes the entry unavailable (FailedPrecondition with the reason, now and on later calls)."""
        entry = model if isinstance(model, ModelEntry) else self.resolve(model)
        m = self._onnx.get(entry.key)
        if m is not None:
            return m
        if not self._present(entry, "onnx"):
            self.path(entry, "onnx")  # FailedPrecondition: no ONNX file in the entry
        try:
            return self._load(entry)
        except Exception as exc:  # noqa: BLE001 - recorded as the entry's reason, re-raised as FailedPrecondition
            bad = self._mark_unavailable(entry, exc)
            raise FailedPrecondition(f"model {entry.id} is unavailable: {bad.reason}") from None

    def _load(self, entry: ModelEntry) -> OnnxModel:
        with self._lock:
            m = self._onnx.get(entry.key)
            if m is None:
                t0 = time.perf_counter()
                m = self._spiral_runtime(entry) or OnnxModel(
                    self.path(entry, "onnx"),
                    intra_op_threads=self.onnx_intra_op_threads(),
                    inter_op_threads=self.config.inter_op_threads,
                    prefer_cuda=self.config.prefer_cuda,
                    cuda_device=self.device_index,
                    kind=entry.kind,
                    io=entry.io,
                    allow_spinning=self.config.allow_spinning,
                )
                if self.config.warmup:
                    self._warm(entry, m)
                self._onnx[entry.key] = m
                self.load_seconds[entry.id] = time.perf_counter() - t0
                backend = "onnxruntime" if isinstance(m, OnnxModel) else "spiral_runtime"
                log.info(
                    "model loaded",
                    extra={"model": entry.id, "backend": backend, "seconds": round(self.load_seconds[entry.id], 4)},
                )
            return m

    def onnx_intra_op_threads(self) -> int:
        """Intra-op threads of the ONNX sessions this registry creates (see RegistryConfig)."""
        c = self.config
        if c.intra_op_threads > 0 or c.concurrent_calls <= 0:
            return c.intra_op_threads
        models = sum(1 for e in self.entries() if "onnx" in e.files)
        return serving_intra_op_threads(available_cores(), models, c.concurrent_calls)

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
            log.warning(
                "spiral runtime unavailable: numba is not installed (pip install 'xaiserve[spiral]'); "
                "serving the ONNX graph",
                extra={"model": entry.id, "reason": f"no module named {e.name!r}"},
            )
            return None
        try:
            module = self.torch_module(entry)
            if self.device.type != "cpu":  # the compiled loops run on the CPU: their own copy there
                module = copy.deepcopy(module).cpu()
            return SpiralRuntime(module, threads=self.config.intra_op_threads)
        except SpiralRuntimeUnavailable as e:
            log.warning(
                "spiral runtime unavailable; serving the ONNX graph", extra={"model": entry.id, "reason": str(e)}
            )
            return None

    def _warm(self, entry: ModelEntry, m: OnnxModel) -> None:
        s = entry.input
        if entry.kind == "denoiser":
            feeds = {"particles": np.zeros((1, 1, s.height, s.width), np.float32)}
        else:
            feeds = {"image": np.zeros((1, s.channels, s.height, s.width), np.float32)}
            if "target" in m.input_names:
                feeds["target"] = np.full((1,), -1, np.int64)
        try:
            out = m.run({k: np.concatenate([v, v]) for k, v in feeds.items()})
        except Exception as e:  # noqa: BLE001 - ORT raises its own types; the message says what failed
            raise FailedPrecondition(
                f"its ONNX graph does not run on a {s.channels}x{s.height}x{s.width} input (batch 2) "
                f"({e.__class__.__name__}: {quote(str(e).splitlines()[0] if str(e) else '', 200)}); "
                "check input.height/width/channels in the manifest entry"
            ) from None
        _check_outputs(entry, out)

    @property
    def device(self):
        """The torch.device of every module torch_module returns: where methods put their tensors."""
        import torch

        return torch.device(self.config.device)

    @property
    def device_index(self) -> int:
        """The CUDA device index ONNX Runtime sessions use (0 unless the device is cuda:N)."""
        d = self.config.device
        return int(d.partition(":")[2]) if d.startswith("cuda:") else 0

    @property
    def forward_dtype(self):
        """The autocast dtype for forwards of frozen models on this device, or None (float32)."""
        from xaiserve.devices import forward_dtype

        return forward_dtype(self.config.precision, self.device)

    def torch_module(self, model: str | ModelEntry):
        """The frozen torch module (eval mode, no grad on parameters), for methods that need gradients:
        rebuilt from arch + state_dict (the project's networks), or loaded from the entry's TorchScript
        or torch.export file (handlers.nets.forms); moved to the registry's device once, here."""
        entry = model if isinstance(model, ModelEntry) else self.resolve(model)
        with self._lock:
            mod = self._torch.get(entry.key)
            if mod is None:
                from xaiserve.handlers.loading import load_module

                mod = load_module(entry, self.store)
                mod.eval()
                for p in mod.parameters():
                    p.requires_grad_(False)
                mod.to(self.device)
                self._torch[entry.key] = mod
            return mod

    def forms(self, entry: ModelEntry) -> frozenset[str]:
        """The model forms this store has for `entry` (see xaiserve.methods): "onnx" when its ONNX
        graph is there, "torch" when a torch module can be built from its files. Decided from the
        manifest and the files present, without loading anything, so ListModels stays cheap.
        Cached by the entry's key (id and content digest): a call's method check touches no disk."""
        cached = self._forms_cache.get(entry.key)
        if cached is not None:
            return cached
        forms = self._forms_uncached(entry)
        self._forms_cache[entry.key] = forms
        return forms

    def _forms_uncached(self, entry: ModelEntry) -> frozenset[str]:
        have = set()
        if self._present(entry, "onnx"):
            have.add("onnx")
        if entry.kind in ("encoder", "classifier") and (
            self._present(entry, "torchscript") or self._present(entry, "exported_program")
        ):
            have.add("torch")  # a user's own model (handlers.nets.forms)
        elif entry.kind in ("encoder", "classifier") and "onnx" in have and _converts_at_load(entry):
            have.add("torch")  # a user's ONNX graph converted to torch at load (handlers.nets.onnx_torch)
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
        return supported_methods(
            entry.kind,
            self.forms(entry),
            frozen.kind if frozen else None,
            self.forms(frozen) if frozen else frozenset(),
            job_methods=job_methods,
        )

    def check_method(self, entry: ModelEntry, method: str, job_methods: Iterable[str] | None = None) -> MethodSpec:
        """The table's spec of `method` if it applies to `entry`; else InvalidArgument (unknown method,
        wrong kind) or FailedPrecondition (the store lacks the model form it needs), saying what applies."""
        spec = METHODS.get(method)
        jobs = set(JOB_METHODS if job_methods is None else job_methods)
        offered = self.methods(entry, job_methods)
        if spec is None or (spec.rpc == "SubmitJob" and method not in jobs):
            known = ", ".join(n for n in METHODS if n not in JOB_METHODS or n in jobs)
            raise InvalidArgument(
                f"method {quote(method, 64)} is unknown; known: {known}. "
                f"{entry.id} supports: {', '.join(offered) or '(none)'}"
            )
        if method in offered:
            return spec
        frozen = self._frozen_or_none(entry)
        reason = why_not(
            spec,
            entry.id,
            entry.kind,
            self.forms(entry),
            frozen.id if frozen else entry.id,
            frozen.kind if frozen else entry.kind,
            self.forms(frozen) if frozen else frozenset(),
        )
        exc = (
            InvalidArgument
            if (entry.kind not in spec.kinds and (frozen is None or frozen.kind not in spec.kinds))
            else FailedPrecondition
        )
        others = [e.id for e in self.entries() if e.id != entry.id and method in self.methods(e, job_methods)]
        raise exc(
            f"{reason}. {entry.id} supports: {', '.join(offered) or '(none)'}; "
            f"models in this store with {method!r}: {', '.join(others[:20]) or '(none)'}"
        )

    def _frozen_or_none(self, entry: ModelEntry) -> ModelEntry | None:
        try:
            return self.frozen_for(entry)
        except (NotFound, FailedPrecondition, InvalidArgument):
            return None

    def _present(self, entry: ModelEntry, key: str) -> bool:
        rel = entry.files.get(key)
        return bool(rel) and (self.store / rel).exists()

    def loaded(self, entry: ModelEntry) -> bool:
        return entry.key in self._onnx or entry.key in self._torch

    def load_all(self) -> None:
        """Load and warm every model that has an ONNX file (at server start); one that fails is
        logged and left unavailable with the reason, and the others serve."""
        for e in self.entries():
            if "onnx" in e.files:
                try:
                    self.onnx(e)
                except FailedPrecondition:
                    pass  # recorded by onnx() as the entry's unavailable reason
        # masking networks whose frozen model failed
        failed = {b.id for b in self._unavailable.values()} | {b.name for b in self._unavailable.values()}
        for e in self.entries():
            if e.kind in MASK_KINDS and e.explains in failed and self._frozen_or_none(e) is None:
                self._mark_unavailable(e, FailedPrecondition(f"explains {e.explains}, which is unavailable"))

    def frozen_for(self, entry: ModelEntry) -> ModelEntry:
        """The frozen model a mask model explains (itself for encoders and classifiers)."""
        if entry.kind in MASK_KINDS:
            if not entry.explains:
                raise FailedPrecondition(f"mask model {entry.id} does not say which model it explains")
            return self.resolve(entry.explains)
        return entry
