"""The fast path: Explain and Denoise on micro-batched ONNX Runtime sessions.

Thin adapter: validation and preprocessing (service.images), one batcher per model (service.batcher),
the model math lives in the exported graphs and in handlers/.

The event loop only does I/O. Per request it runs the cheap checks (model, options, the image's
header or tensor shape, the response size against max_message_mb) and hands every pixel-sized step
(decoding, resizing, MRC parsing, rendering, response building) to a bounded CPU pool (`CpuPool`)
and the model calls to the batchers' inference pool. `Admission` bounds the requests in progress
(and optionally per caller): beyond the bound a request is refused at once, before any decoding,
so an overloaded server answers refusals in microseconds and spends its cores on work it accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
import time
from collections import Counter as _Tally
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from prometheus_client import Counter

from xaiserve.handlers import fidelity as fid_score
from xaiserve.methods import GRADIENT_METHODS, MASK_KINDS, METHODS
from xaiserve.proto.explain.v1 import explainer_pb2 as pb
from xaiserve.service import dicom_out
from xaiserve.service.batcher import DEFERRED, MicroBatcher, resolve_threadsafe
from xaiserve.service.config import ServerConfig
from xaiserve.service.errors import FailedPrecondition, InvalidArgument, ResourceExhausted, Unavailable
from xaiserve.service.images import (
    ImageHeader,
    decode_image_source,
    png_bound,
    probe_image,
    resize_mask,
    to_model_input,
)
from xaiserve.service.mask_wire import fill_mask
from xaiserve.service.model_input import fast_model_input
from xaiserve.service.registry import ModelEntry, Registry
from xaiserve.service.tensors import tensor_message_bytes, to_tensor

__all__ = ["GRADIENT_METHODS", "Admission", "CpuPool", "ExplainPlan", "FastPath", "Overloaded"]

T = TypeVar("T")
# Low cardinality: why a request was refused before any work ("server", "caller", "cpu_pool").
REFUSED = Counter("xaiserve_admission_refused", "Requests refused at admission, before any decoding", ["reason"])
# A response above this size is serialised in the CPU pool rather than by grpc on the event loop.
OFFLOAD_SERIALIZE_BYTES = 1 << 20
# Masks of images up to this many pixels are rendered on the thread that ran the model (a 224 x 224
# mask: tens of microseconds, less than a hand-off); larger ones go to the CPU pool, which bounds the
# threads doing such GIL-holding work (two at once made the event loop wait 0.3 s on 2000 x 2000 images).
RENDER_INLINE_PIXELS = 512 * 512
# NEMt: the target counts as present in the kept region when x * m gives it more than this probability
ABSENT_BELOW = 0.5


@dataclass(frozen=True)
class ExplainPlan:
    """What FastPath.plan_explain decided for one Explain request."""

    method: str  # "" = the masking network's own mask, else a method of the methods table
    frozen: ModelEntry  # the model explained (the entry itself for a classifier or encoder)
    target: int  # the label to explain, -1 = the predicted one
    fmt: Any  # the DICOM output format, falsy for none
    one: bool  # the common case: one CPU-pool task per request (FastPath._explain_one)


class Overloaded(ResourceExhausted):
    """RESOURCE_EXHAUSTED because of load, not because of the request (admission, the decode pool's
    backlog): the same request can succeed later. A stream answers such a frame with this status
    and goes on, without counting it towards max_consecutive_errors (service/streams.py)."""


class CpuPool:
    """A fixed set of threads for decoding and encoding, with a bounded backlog.

    Pillow, numpy, zlib and mrcfile release the GIL on large buffers, so the event loop keeps
    answering while these threads work. A task beyond `max_pending` (running + waiting) is refused
    with RESOURCE_EXHAUSTED instead of queueing without bound."""

    def __init__(self, threads: int, max_pending: int, name: str = "cpu"):
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)
        self.threads, self.max_pending = threads, max_pending
        self._lock = threading.Lock()
        self._pending = 0
        self.submitted = 0  # tasks accepted so far (tests and operators: was any work done?)

    @property
    def pending(self) -> int:
        return self._pending

    def _done(self, _f: Future) -> None:
        with self._lock:
            self._pending -= 1

    def start(self, fn: Callable[..., T], *args: Any) -> Future:
        """Queue fn(*args) (on the event loop); RESOURCE_EXHAUSTED beyond max_pending. Nothing waits
        for the returned future: `fn` answers its caller itself (FastPath's one task per request)."""
        with self._lock:
            if self._pending >= self.max_pending:
                REFUSED.labels("cpu_pool").inc()
                raise Overloaded(f"the server's decode pool has {self.max_pending} tasks waiting; retry with backoff")
            self._pending += 1
            self.submitted += 1
        try:
            fut = self._pool.submit(fn, *args)
        except RuntimeError:  # shut down
            self._done(None)  # type: ignore[arg-type]
            raise Unavailable("the server is shutting down; retry on another replica") from None
        # The count drops when the thread is done, not when the caller stops waiting: a cancelled
        # call whose decode already runs still occupies its thread.
        fut.add_done_callback(self._done)
        return fut

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.wrap_future(self.start(fn, *args))

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class Admission:
    """Bounds the fast-path requests in progress, overall and (optionally) per principal.

    Used on the event loop only (no lock). `slot` raises RESOURCE_EXHAUSTED at once when full:
    the refusal costs no decoding and no queueing."""

    def __init__(self, limit: int, per_principal: int = 0):
        self.limit, self.per_principal = limit, per_principal
        self.inflight = 0
        self._by: _Tally[str] = _Tally()

    @contextlib.contextmanager
    def slot(self, principal: str = "") -> Iterator[None]:
        if self.inflight >= self.limit:
            REFUSED.labels("server").inc()
            raise Overloaded(
                f"the server is at its limit of {self.limit} requests in progress (max_inflight); "
                "retry with backoff or add replicas"
            )
        if self.per_principal and self._by[principal] >= self.per_principal:
            REFUSED.labels("caller").inc()
            raise Overloaded(
                f"this caller already has {self.per_principal} requests in progress (max_inflight_per_principal); "
                "wait for answers before sending more"
            )
        self.inflight += 1
        self._by[principal] += 1
        try:
            yield
        finally:
            self.inflight -= 1
            self._by[principal] -= 1
            if not self._by[principal]:
                del self._by[principal]


class FastPath:
    def __init__(self, registry: Registry, config: ServerConfig):
        self.registry = registry
        self.config = config
        self.executor = ThreadPoolExecutor(max_workers=config.inference_threads, thread_name_prefix="infer")
        self._batchers: dict[str, MicroBatcher] = {}
        # Unary calls and stream frames hold an admission slot each while they run; a call that was
        # cancelled leaves its slot while its decode still runs, hence the allowance beyond max_inflight.
        self.cpu = CpuPool(config.decode_threads, 2 * config.max_inflight, "decode")
        self.admission = Admission(config.max_inflight, config.max_inflight_per_principal)
        self.max_message_bytes = config.max_message_mb * 1024 * 1024

    def batcher(self, entry: ModelEntry) -> MicroBatcher:
        # per entry key (id + content digest): after a reload swaps a version, calls that resolved
        # the old entry finish on its batcher and session
        b = self._batchers.get(entry.key)
        if b is None:
            onnx = self.registry.onnx(entry)
            b = MicroBatcher(
                entry.id,
                onnx.run,
                self.executor,
                max_rows=self.config.max_batch if entry.kind != "denoiser" else max(self.config.max_batch, 64),
                max_delay_ms=self.config.max_delay_ms,
                max_queue=self.config.max_queue,
                concurrency=1 if entry.kind == "denoiser" else self._calls_per_model(),
            )
            self._batchers[entry.key] = b
        return b

    def _calls_per_model(self) -> int:
        """Model calls one model may run at once: up to inference_threads, as far as the cores hold
        their intra-op threads (1 thread each on 2 cores: 2 calls, so one busy model uses both cores;
        a session with every core's threads: 1)."""
        from xaiserve.service.registry import available_cores

        per_call = self.registry.onnx_intra_op_threads()
        if per_call <= 0:
            return 1
        return max(1, min(self.config.inference_threads, available_cores() // per_call))

    def retire(self, keys) -> None:
        """Stop the batchers of entries a reload removed or replaced, once their queued calls are answered."""
        for k in keys:
            b = self._batchers.pop(k, None)
            if b is not None:
                asyncio.get_running_loop().create_task(b.drain_and_stop(), name=f"retire-{k}")

    async def close(self) -> None:
        for b in self._batchers.values():
            await b.stop()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.cpu.shutdown()

    # -- admission and offloading ----------------------------------------------------------------
    def check_response_size(self, bound: int, what: str, hint: str) -> None:
        """Refuse up front a request whose response could exceed max_message_mb."""
        if bound > self.max_message_bytes:
            raise ResourceExhausted(
                f"the response would need up to {bound} bytes ({what}), more than max_message_mb = "
                f"{self.config.max_message_mb} ({self.max_message_bytes} bytes); {hint}"
            )

    @staticmethod
    def _explain_size(h: int, w: int, out_dim: int, png: bool) -> int:
        n = tensor_message_bytes((h, w)) + tensor_message_bytes((max(out_dim, 1),)) + 512
        return n + (png_bound(h, w, 1) + png_bound(h, w, 3) if png else 0)

    def _explain_bound(self, hdr: ImageHeader, opts: pb.ExplainOptions, frozen: ModelEntry) -> tuple[int, str, str]:
        h, w, png = hdr.height, hdr.width, opts.return_png
        out_dim = max(frozen.output_dim, len(frozen.labels))
        n = self._explain_size(h, w, out_dim, png)
        what = f"a {h} x {w} float32 mask" + (" and its two PNG renderings" if png else "")
        if n <= self.max_message_bytes:
            return n, what, ""
        lo, hi = 1, max(h, w)  # the largest square image whose answer fits, for the message
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (
                (mid, hi) if self._explain_size(mid, mid, out_dim, png) <= self.max_message_bytes else (lo, mid - 1)
            )
        hint = f"send a smaller image (at most {lo * lo} pixels, e.g. {lo} x {lo})" + (
            " or leave return_png off" if png else ""
        )
        return n, what, hint

    @staticmethod
    def _prepare(image: pb.Image, spec, pixels: bool = True) -> tuple[np.ndarray, np.ndarray, Any]:
        if not pixels:  # only the model input and the image's size are needed: no full float copy
            fast = fast_model_input(image, spec)  # service/model_input.py; None: not an 8-bit PNG/JPEG
            if fast is not None:
                return fast[0], fast[1], None
        arr, source = decode_image_source(image, spec)  # source: what a DICOM result references (DICOM input)
        return arr, to_model_input(arr, spec)[None], source

    def warm_image_path(self) -> int:
        """Run the per-frame CPU steps once on tiny synthetic images, before the server answers:
        decoding (fast and full path, JPEG and PNG), fitting to each model's input and every mask
        encoding. The first decode in a process imports Pillow's image plugins and the first
        encoding its PNG path: measured 25-40 ms on the first frame of the first stream on a busy
        2-core machine (up to 140 ms), which made the frames behind it wait and, under LATEST, be
        replaced (bench/bench_stream.py). The registry warms the model calls; no model runs here.
        Returns the number of input specs warmed."""
        import io

        from PIL import Image as PILImage

        from xaiserve.service.mask_wire import RESOLUTIONS, with_stream_defaults

        rng = np.random.default_rng(0)
        images = []
        for fmt, mode in (("JPEG", "RGB"), ("PNG", "RGB"), ("PNG", "L")):
            buf = io.BytesIO()
            shape = (24, 32, 3) if mode == "RGB" else (24, 32)
            PILImage.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(buf, format=fmt)
            images.append(pb.Image(encoded=buf.getvalue()))
        options = [with_stream_defaults(pb.ExplainOptions()), pb.ExplainOptions(return_png=True)]
        options += [pb.ExplainOptions(mask_encoding=pb.MASK_PNG, mask_resolution=r) for r in RESOLUTIONS]
        specs: dict[tuple, Any] = {}
        for e in self.registry.entries():
            if e.kind != "denoiser":  # images in, a mask out
                specs.setdefault((e.input.height, e.input.width, e.input.channels, e.input.resize), e.input)
        for spec in specs.values():
            for img in images:
                for pixels in (False, True):
                    image, x, _ = self._prepare(img, spec, pixels)
                mask = np.full(x.shape[2:], 0.5, np.float32)
                for opts in options:
                    self._render(pb.ExplainResponse(), image, mask, opts, spec)
        return len(specs)

    @staticmethod
    def _render(
        resp: pb.ExplainResponse, image: np.ndarray, mask: np.ndarray, opts: pb.ExplainOptions, spec=None
    ) -> None:
        # the mask in the encoding and on the grid opts ask for (float32 over the input by default),
        # undoing the model's resize (letterbox padding cut away): service/mask_wire.py
        fill_mask(resp, image, mask, opts, spec)

    async def serialize(self, resp: Any) -> Any:
        """The response as bytes, serialised in the CPU pool when it is large (grpc would do it on
        the event loop); small ones are returned as they are."""
        if resp.ByteSize() > OFFLOAD_SERIALIZE_BYTES:
            return await self.cpu.run(resp.SerializeToString)
        return resp

    # ---------------------------------------------------------------------------------------
    def plan_explain(
        self,
        request: pb.ExplainRequest,
        entry: ModelEntry,
        prepared: tuple[np.ndarray, np.ndarray] | None = None,
        header: ImageHeader | None = None,
    ) -> ExplainPlan:
        """The checks Explain makes on the event loop before any pixel is decoded (method, target,
        output format, the answer's size from the image's header) and what they decided; every
        protocol runs them (explain.v1 here, the Open Inference Protocol in service/oip.py).
        `header`: request.image's header when the caller has already probed it."""
        opts = request.options
        method = opts.method.strip() or entry.default_method  # manifest default_method (checked below)
        if not method:
            if entry.kind not in MASK_KINDS:
                offered = [m for m in self.registry.methods(entry) if METHODS[m].rpc == "Explain"]
                raise InvalidArgument(
                    f"model {entry.id} is a {entry.kind}, not a masking network; name a nem_u/nemt model, "
                    f"or set options.method to one of {', '.join(offered) or '(none for this model)'}"
                )
            method = entry.kind
        spec = self.registry.check_method(entry, method)
        if spec.rpc != "Explain":
            raise InvalidArgument(
                f"method {method!r} is served by {spec.rpc}, not Explain"
                + ("; submit it as a job" if spec.rpc == "SubmitJob" else "")
            )
        method = "" if spec.own else method
        frozen = self.registry.frozen_for(entry)
        n_labels = len(frozen.labels) or frozen.output_dim
        target = -1
        if opts.HasField("target_label"):
            if frozen.kind != "classifier":
                raise InvalidArgument(
                    f"target_label applies to classifiers and NEMt models; {entry.id} explains an {frozen.kind}"
                )
            if not 0 <= opts.target_label < n_labels:
                raise InvalidArgument(
                    f"target_label {opts.target_label} is out of range for {frozen.id}: labels 0..{n_labels - 1} ({', '.join(frozen.labels)})"
                )
            target = int(opts.target_label)
        fmt = dicom_out.check_output_format(opts.output_format, opts.dicom_overlay)
        if header is not None:
            hdr = header
        else:
            hdr = probe_image(request.image) if prepared is None else ImageHeader(*prepared[0].shape)
        size, what, hint = self._explain_bound(hdr, opts, frozen)
        if fmt:  # the DICOM result comes on top of the mask
            size += dicom_out.bound(hdr.height, hdr.width, 1, fmt, opts.dicom_overlay)
            what, hint = f"{what} and its DICOM result", hint or "send a smaller image, or leave dicom_overlay off"
        self.check_response_size(size, what, hint)
        # the common case (a NEM-U mask, no second model pass): one task per request, see _explain_one
        one = not method and entry.kind != "nemt" and not fmt and not opts.fidelity
        return ExplainPlan(method, frozen, target, fmt, one)

    async def explain(
        self,
        request: pb.ExplainRequest,
        *,
        timeout: float | None,
        entry: ModelEntry | None = None,
        prepared: tuple[np.ndarray, np.ndarray] | None = None,
        plan: ExplainPlan | None = None,
    ) -> pb.ExplainResponse:
        """`prepared`: (image HWC in [0, 1], model input [1, C, H, W]) that the caller has already
        made (the Open Inference Protocol's raw tensors, in the model's input layout); request.image
        is then not read. `plan`: what plan_explain decided for this request, when the caller has
        already run it."""
        t0 = time.perf_counter()
        entry = entry or self.registry.resolve(request.model)
        opts = request.options
        plan = plan or self.plan_explain(request, entry, prepared)
        method, frozen, target, fmt = plan.method, plan.frozen, plan.target, plan.fmt
        if plan.one:
            resp = await self._explain_one(request, entry, opts, prepared, timeout)
            resp.timing.total_ms = (time.perf_counter() - t0) * 1e3
            return resp
        if prepared is None:
            image, x, source = await self.cpu.run(
                self._prepare, request.image, entry.input, bool(opts.return_png or fmt)
            )
        else:
            (image, x), source = prepared, None
        if fmt:
            dicom_out.check_source(fmt, dicom_out.require_source(source))

        resp = pb.ExplainResponse(model=entry.id, target_label=-1, method=method or entry.kind)
        if method:
            mask, label, out, timing = await self._gradient(method, frozen, x, target, timeout)
            queue_s, infer_s, bsize = 0.0, timing, 1
        else:
            feeds = {"image": x}
            if entry.kind == "nemt":
                feeds["target"] = np.array([target], dtype=np.int64)
            res, bt = await self.batcher(entry).submit(feeds, timeout=timeout)
            mask, out = res["mask"][0, 0], res["output"][0]
            label = int(res["label"][0]) if "label" in res else -1
            queue_s, infer_s, bsize = bt.queue_s, bt.inference_s, bt.batch_rows
        if entry.kind == "nemt" or (method and frozen.kind == "classifier"):
            resp.target_label = label
        if opts.return_output:
            if out is None:
                res, _ = await self.batcher(frozen).submit({"image": x}, timeout=self._left(t0, timeout))
                out = res["output"][0]
            resp.output.CopyFrom(to_tensor(out.astype(np.float32)))
        if opts.fidelity or entry.kind == "nemt":
            fid, p_kept = await self._fidelity(
                frozen, x, mask, out, label, entry.kind == "nemt", self._left(t0, timeout)
            )
            if opts.fidelity:
                resp.fidelity = fid
            if p_kept is not None:
                # NEMt: "where is class k" may have no answer; say so instead of a silent empty mask
                resp.target_probability = p_kept
                resp.target_absent = bool(float(mask.max()) < 0.5 or not p_kept > ABSENT_BELOW)
        await self.cpu.run(self._render, resp, image, mask, opts, entry.input)
        if fmt:
            resp.dicom, resp.dicom_overlay = await self.cpu.run(
                dicom_out.explain_result,
                fmt,
                source,
                image,
                mask,
                entry,
                resp.method,
                resp.target_label,
                opts.dicom_overlay,
            )
        resp.timing.queue_ms = queue_s * 1e3
        resp.timing.inference_ms = infer_s * 1e3
        resp.timing.inference_share_ms = infer_s * 1e3 / max(bsize, 1)  # this request is one row of the batch
        resp.timing.batch_size = bsize
        resp.timing.total_ms = (time.perf_counter() - t0) * 1e3
        return resp

    def _explain_one(
        self,
        request: pb.ExplainRequest,
        entry: ModelEntry,
        opts: pb.ExplainOptions,
        prepared: tuple[np.ndarray, np.ndarray] | None,
        timeout: float | None,
        build: Callable[[np.ndarray, dict[str, np.ndarray], Any], Any] | None = None,
    ) -> asyncio.Future:
        """A masking network's own mask (nem_u) with no second model pass, checked on the loop by
        `plan_explain` (plan.one): the image is decoded and queued to the model's batcher by one
        CPU-pool task; the thread that runs the batch (that pool thread itself when the request is
        alone: the pool has nothing else queued and the batcher is idle) renders the mask and builds
        the response; the event loop only awaits the answer, which comes with one loop wake-up per
        batch. Same decoding, batching, metrics, errors and bytes as the step-by-step path (decode task, batcher, render task) it replaces: 3 thread hand-offs and
        their loop wake-ups per request become 1-2 (docs/ARCHITECTURE.md, fast path).

        `build(image, outputs, timing)`: what the future answers instead of the ExplainResponse,
        made on the same thread (the Open Inference Protocol builds its output tensors there, so it
        costs no second task)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()
        batcher = self.batcher(entry)
        spec = entry.input

        def post(image: np.ndarray, res: dict[str, np.ndarray], bt: Any) -> Any:
            if image.shape[0] * image.shape[1] > RENDER_INLINE_PIXELS:  # large: rendered in the CPU pool

                def render() -> None:
                    try:
                        resolve_threadsafe([(fut, make(image, res, bt), None)])
                    except BaseException as e:  # noqa: BLE001
                        resolve_threadsafe([(fut, None, e)])

                self.cpu.start(render)
                return DEFERRED
            return make(image, res, bt)

        def explain_response(image: np.ndarray, res: dict[str, np.ndarray], bt: Any) -> pb.ExplainResponse:
            resp = pb.ExplainResponse(model=entry.id, target_label=-1, method=entry.kind)
            if opts.return_output:
                resp.output.CopyFrom(to_tensor(res["output"][0].astype(np.float32)))
            self._render(resp, image, res["mask"][0, 0], opts, spec)
            resp.timing.queue_ms = bt.queue_s * 1e3
            resp.timing.inference_ms = bt.inference_s * 1e3
            resp.timing.inference_share_ms = bt.inference_s * 1e3 / max(bt.batch_rows, 1)
            resp.timing.batch_size = bt.batch_rows
            return resp

        make = build or explain_response
        if prepared is not None:  # nothing to decode: queued from here, answered by a model thread
            image, x = prepared
            batcher.put(batcher.item({"image": x}, fut, timeout, functools.partial(post, image)))
            return fut

        def work() -> None:  # a CPU-pool thread
            try:
                if fut.done():  # the caller went away while this waited for a thread
                    return
                image, x, _ = self._prepare(request.image, spec, bool(opts.return_png))
                # alone (nothing else for the pool, the batcher idle): this thread runs the model too
                solo = self.cpu.pending <= 1
                batcher.put(batcher.item({"image": x}, fut, timeout, functools.partial(post, image)), solo=solo)
            except BaseException as e:  # noqa: BLE001 - the caller's status (decode error, queue full, ...)
                resolve_threadsafe([(fut, None, e)])

        self.cpu.start(work)
        return fut

    @staticmethod
    def _left(t0: float, timeout: float | None) -> float | None:
        return None if timeout is None else timeout - (time.perf_counter() - t0)

    async def _fidelity(
        self,
        frozen: ModelEntry,
        x: np.ndarray,
        mask: np.ndarray,
        out: np.ndarray | None,
        label: int,
        kept: bool,
        timeout: float | None,
    ) -> tuple[float, float | None]:
        """(fidelity, target probability on x * m or None) from one batched pass of the frozen model.

        fidelity: handlers/fidelity.py, the evaluation's definition ([NEM-U] sec. 3.1): with m the
        min-max normalised mask, softmax(Phi(x * m))_target for a classifier (target = the explained
        label, else the argmax on x), cos(Phi(x), Phi(x * m)) for an encoder. kept (NEMt): the target's
        probability on x times the served mask itself (not normalised), for target_absent."""
        if "onnx" not in frozen.files:
            raise FailedPrecondition(f"fidelity needs the ONNX graph of {frozen.id}, which the store does not have")
        m = mask.astype(np.float32)
        if m.shape != x.shape[2:]:
            m = resize_mask(m, x.shape[2], x.shape[3])
        images = [x * fid_score.normalise_map(m).astype(np.float32)[None, None]]
        if kept:
            images.append(x * m[None, None])
        if out is None:
            images.insert(0, x)
        res, _ = await self.batcher(frozen).submit({"image": np.concatenate(images, axis=0)}, timeout=timeout)
        o = res["output"]
        ref = o[:1] if out is None else out[None]
        rest = o[1:] if out is None else o
        kind = "classifier" if frozen.kind == "classifier" else "encoder"
        target = np.array([label if label >= 0 else int(np.argmax(ref[0]))])
        fid = float(fid_score.fidelity(kind, ref, rest[:1], target if kind == "classifier" else None)[0])
        p_kept = float(fid_score.softmax(rest[1:2])[0, target[0]]) if kept and kind == "classifier" else None
        return fid, p_kept

    async def _gradient(self, method: str, frozen: ModelEntry, x: np.ndarray, target: int, timeout: float | None):
        """Gradient baselines ([RELAX] sec. 4.2) on the frozen torch module, in the thread pool."""
        if frozen.kind not in ("encoder", "classifier"):
            raise InvalidArgument(f"{method} needs an encoder or classifier; {frozen.id} is a {frozen.kind}")
        from xaiserve.handlers import saliency

        module = self.registry.torch_module(frozen)

        def work():
            import torch

            t = time.perf_counter()
            xt = torch.from_numpy(x.copy()).to(self.registry.device)  # the module lives there (Registry.device)
            with torch.no_grad():
                out = module(xt)
            tgt = None
            label = -1
            if frozen.kind == "classifier":
                label = int(out.argmax(dim=1)[0]) if target < 0 else target
                tgt = label
            maps = saliency.attribute(method, module, xt, kind=frozen.kind, target=tgt)
            return np.asarray(maps[0], dtype=np.float32), label, out[0].float().cpu().numpy(), time.perf_counter() - t

        fut = asyncio.get_running_loop().run_in_executor(self.executor, work)
        return await (asyncio.wait_for(fut, timeout) if timeout is not None else fut)

    # ---------------------------------------------------------------------------------------
    async def denoise(
        self, request: pb.DenoiseRequest, *, timeout: float | None, entry: ModelEntry | None = None
    ) -> pb.DenoiseResponse:
        t0 = time.perf_counter()
        entry = entry or self.registry.resolve(request.model)
        self.registry.check_method(entry, "denoise")  # a denoiser with its graph (the methods table)
        from xaiserve.service.denoise import particles_from_request, to_mrc_bytes

        # one CPU-pool task per request: parse the particles, check the answer's size, queue them;
        # the thread that runs the batch builds the response (as _explain_one)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()
        batcher = self.batcher(entry)
        resp = pb.DenoiseResponse(model=entry.id)

        def post(res: dict[str, np.ndarray], bt: Any) -> pb.DenoiseResponse:
            n = res["denoised"].shape[0]
            den = res["denoised"][:, 0].astype(np.float32)
            resp.denoised.CopyFrom(to_tensor(den))
            if request.return_mrc:
                resp.mrc = to_mrc_bytes(den)
            resp.timing.queue_ms = bt.queue_s * 1e3
            resp.timing.inference_ms = bt.inference_s * 1e3
            resp.timing.inference_share_ms = bt.inference_s * 1e3 * n / max(bt.batch_rows, 1)
            resp.timing.batch_size = bt.batch_rows
            return resp

        def work() -> None:  # a CPU-pool thread
            try:
                if fut.done():
                    return
                particles = particles_from_request(request, entry, self.config.max_denoise_batch)
                n, _, h, w = particles.shape
                bound = tensor_message_bytes((n, h, w)) * (2 if request.return_mrc else 1) + 1024 + 512
                self.check_response_size(
                    bound,
                    f"{n} denoised particles of {h} x {w}" + (" as a tensor and as MRC" if request.return_mrc else ""),
                    "send fewer particles per request" + (" or leave return_mrc off" if request.return_mrc else ""),
                )
                batcher.put(batcher.item({"particles": particles}, fut, timeout, post), solo=self.cpu.pending <= 1)
            except BaseException as e:  # noqa: BLE001 - the caller's status
                resolve_threadsafe([(fut, None, e)])

        self.cpu.start(work)
        resp = await fut
        resp.timing.total_ms = (time.perf_counter() - t0) * 1e3
        return resp
