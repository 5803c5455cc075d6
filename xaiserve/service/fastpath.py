"""The fast path: Explain and Denoise on micro-batched ONNX Runtime sessions.

Thin adapter: validation and preprocessing (service.images), one batcher per model (service.batcher),
the model math lives in the exported graphs and in handlers/.
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from xaiserve.proto.explain.v1 import explainer_pb2 as pb
from xaiserve.service.batcher import MicroBatcher
from xaiserve.service.config import ServerConfig
from xaiserve.service.errors import FailedPrecondition, InvalidArgument
from xaiserve.service.images import decode_image, encode_png, overlay, resize_mask, to_model_input
from xaiserve.service.registry import MASK_KINDS, ModelEntry, Registry
from xaiserve.service.tensors import to_tensor

GRADIENT_METHODS = ("saliency", "guided_backprop", "smoothgrad", "integrated_gradients", "gradient_shap", "gradcam")


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(a.shape[0], -1).astype(np.float64)
    b = b.reshape(b.shape[0], -1).astype(np.float64)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(axis=1) / np.maximum(den, 1e-12)


class FastPath:
    def __init__(self, registry: Registry, config: ServerConfig):
        self.registry = registry
        self.config = config
        self.executor = ThreadPoolExecutor(max_workers=config.inference_threads, thread_name_prefix="infer")
        self._batchers: dict[str, MicroBatcher] = {}

    def batcher(self, entry: ModelEntry) -> MicroBatcher:
        b = self._batchers.get(entry.id)
        if b is None:
            onnx = self.registry.onnx(entry)
            b = MicroBatcher(
                entry.id, onnx.run, self.executor,
                max_rows=self.config.max_batch if entry.kind != "denoiser" else max(self.config.max_batch, 64),
                max_delay_ms=self.config.max_delay_ms, max_queue=self.config.max_queue,
            )
            self._batchers[entry.id] = b
        return b

    async def close(self) -> None:
        for b in self._batchers.values():
            await b.stop()
        self.executor.shutdown(wait=False, cancel_futures=True)

    # ---------------------------------------------------------------------------------------
    async def explain(self, request: pb.ExplainRequest, *, timeout: float | None, entry: ModelEntry | None = None) -> pb.ExplainResponse:
        t0 = time.perf_counter()
        entry = entry or self.registry.resolve(request.model)
        opts = request.options
        method = opts.method.strip()
        if method and method not in GRADIENT_METHODS:
            raise InvalidArgument(f"options.method {method!r} is unknown; use '' (the model's masking network) or one of {', '.join(GRADIENT_METHODS)}")
        if not method and entry.kind not in MASK_KINDS:
            raise InvalidArgument(
                f"model {entry.id} is a {entry.kind}, not a masking network; name a nem_u/nemt model, "
                f"or set options.method to one of {', '.join(GRADIENT_METHODS)} to explain it with a gradient baseline"
            )
        if entry.kind == "denoiser":
            raise InvalidArgument(f"model {entry.id} is a denoiser; call Denoise")
        frozen = self.registry.frozen_for(entry)
        n_labels = len(frozen.labels) or frozen.output_dim
        target = -1
        if opts.HasField("target_label"):
            if frozen.kind != "classifier":
                raise InvalidArgument(f"target_label applies to classifiers and NEMt models; {entry.id} explains an {frozen.kind}")
            if not 0 <= opts.target_label < n_labels:
                raise InvalidArgument(f"target_label {opts.target_label} is out of range for {frozen.id}: labels 0..{n_labels - 1} ({', '.join(frozen.labels)})")
            target = int(opts.target_label)
        image = decode_image(request.image)
        x = to_model_input(image, entry.input)[None]

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
        if opts.fidelity:
            resp.fidelity = float(await self._fidelity(frozen, x, mask, out, self._left(t0, timeout)))
        h, w = image.shape[:2]
        full = resize_mask(mask, h, w)
        resp.mask.CopyFrom(to_tensor(full.astype(np.float32)))
        if opts.return_png:
            resp.mask_png = encode_png(full)
            resp.overlay_png = encode_png(overlay(image, full))
        resp.timing.queue_ms = queue_s * 1e3
        resp.timing.inference_ms = infer_s * 1e3
        resp.timing.batch_size = bsize
        resp.timing.total_ms = (time.perf_counter() - t0) * 1e3
        return resp

    @staticmethod
    def _left(t0: float, timeout: float | None) -> float | None:
        return None if timeout is None else timeout - (time.perf_counter() - t0)

    async def _fidelity(self, frozen: ModelEntry, x: np.ndarray, mask: np.ndarray, out: np.ndarray | None, timeout: float | None) -> float:
        """cos(Phi(x), Phi(x*m)) on the normalised input (seed 001 sec. 3.1, last paragraph)."""
        if "onnx" not in frozen.files:
            raise FailedPrecondition(f"fidelity needs the ONNX graph of {frozen.id}, which the store does not have")
        m = mask.astype(np.float32)
        if m.shape != x.shape[2:]:
            m = resize_mask(m, x.shape[2], x.shape[3])
        feeds = {"image": np.concatenate([x, x * m[None, None]], axis=0) if out is None else x * m[None, None]}
        res, _ = await self.batcher(frozen).submit(feeds, timeout=timeout)
        o = res["output"]
        ref = o[:1] if out is None else out[None]
        return float(_cosine(ref, o[-1:])[0])

    async def _gradient(self, method: str, frozen: ModelEntry, x: np.ndarray, target: int, timeout: float | None):
        """Gradient baselines (seed 000 sec. 4.2) on the frozen torch module, in the thread pool."""
        if frozen.kind not in ("encoder", "classifier"):
            raise InvalidArgument(f"{method} needs an encoder or classifier; {frozen.id} is a {frozen.kind}")
        from xaiserve.handlers import saliency

        module = self.registry.torch_module(frozen)

        def work():
            import torch

            t = time.perf_counter()
            xt = torch.from_numpy(x.copy())
            with torch.no_grad():
                out = module(xt)
            tgt = None
            label = -1
            if frozen.kind == "classifier":
                label = int(out.argmax(dim=1)[0]) if target < 0 else target
                tgt = label
            maps = saliency.attribute(method, module, xt, kind=frozen.kind, target=tgt)
            return np.asarray(maps[0], dtype=np.float32), label, out[0].numpy(), time.perf_counter() - t

        fut = asyncio.get_running_loop().run_in_executor(self.executor, work)
        return await (asyncio.wait_for(fut, timeout) if timeout is not None else fut)

    # ---------------------------------------------------------------------------------------
    async def denoise(self, request: pb.DenoiseRequest, *, timeout: float | None, entry: ModelEntry | None = None) -> pb.DenoiseResponse:
        t0 = time.perf_counter()
        entry = entry or self.registry.resolve(request.model)
        if entry.kind != "denoiser":
            raise InvalidArgument(f"model {entry.id} is a {entry.kind}, not a denoiser; use ListModels(kind='denoiser')")
        from xaiserve.handlers.denoise.serving import particles_from_request, to_mrc_bytes

        particles = particles_from_request(request, entry, self.config.max_denoise_batch)
        res, bt = await self.batcher(entry).submit({"particles": particles}, timeout=timeout)
        den = res["denoised"][:, 0].astype(np.float32)
        resp = pb.DenoiseResponse(model=entry.id)
        resp.denoised.CopyFrom(to_tensor(den))
        if request.return_mrc:
            resp.mrc = to_mrc_bytes(den)
        resp.timing.queue_ms = bt.queue_s * 1e3
        resp.timing.inference_ms = bt.inference_s * 1e3
        resp.timing.batch_size = bt.batch_rows
        resp.timing.total_ms = (time.perf_counter() - t0) * 1e3
        return resp
