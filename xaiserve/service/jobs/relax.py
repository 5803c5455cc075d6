"""The "relax" job method (service/jobs/contract.py): RELAX / U-RELAX of an encoder, as a queued job.

validate() runs at SubmitJob time and rejects everything that can be known then: an unknown model
(NOT_FOUND), a model that is not an encoder (a NEM-U model is accepted and its frozen encoder is
explained), parameters out of range, an image that does not decode or cannot be fed to the model
(INVALID_ARGUMENT). run() embeds batches of masked images with the encoder's ONNX graph through
ONNX Runtime (the torch module where a model has no ONNX file), reports progress with the current
importance map once per batch, checks for cancellation before every batch, and returns the maps as
float32 tensors, a PNG, the parameters actually used (defaults and seed filled in) and timings.

Devices (Registry.device, the worker's `device` setting): on the CPU as above. On a GPU, with
ONNX Runtime's CUDA provider the graph runs there with its input and output bound to torch tensors
on the device (IOBinding: no host copies); without it, an encoder with a torch form runs as that
module on the device, its forwards under the registry's autocast dtype (Registry.forward_dtype).
Either way the masks, the masked batch and the float64 statistics stay on the device: the image
goes there once and the maps come back once, here, at the adapter boundary. A job that sets no
batch_size takes the largest that fits in half the free device memory (registry.config.batch_by_memory);
a forward that runs out of memory is halved, counted (xaiserve_device_oom_total) and the job goes on.
"""

from __future__ import annotations

import dataclasses
import json
import time

import numpy as np
import torch

from xaiserve.devices import memory_batch
from xaiserve.errors import FailedPrecondition, InvalidArgument
from xaiserve.handlers.relax.embed import ort_iobinding_embed, torch_embed
from xaiserve.handlers.relax.relax import Embed, Relax, RelaxConfig, RelaxProgress
from xaiserve.proto.explain.v1 import explainer_pb2 as pb
from xaiserve.service.gpu_metrics import count_oom
from xaiserve.service.images import decode_image, preview_shape, to_input_geometry, to_model_input
from xaiserve.service.jobs.contract import JobContext
from xaiserve.service.registry import ModelEntry, OnnxModel, Registry
from xaiserve.service.render.relax import normalise, render_png
from xaiserve.service.tensors import to_tensor

DEFAULT_BATCH_SIZE = 64
MAX_NUM_MASKS = 100_000
MAX_BATCH_SIZE = 4096
MEMORY_BATCH_MAX = 1024  # batches chosen from free memory stop here (progress and stopping stay frequent)

# proto field -> RelaxConfig field, for the `optional` scalars (unset = the RelaxConfig default)
_OPTIONAL = ("num_masks", "cells", "p_keep", "noise_mean", "noise_std", "target_error", "gamma", "batch_size", "seed")


def onnx_embed(model: OnnxModel) -> Embed:
    """An embed function over an encoder's ONNX Runtime session: torch batch in, torch embeddings out.
    OnnxModel.run takes and returns the kind's names (image -> output) whatever the graph calls them."""
    names_in, names_out = model.input_names, model.output_names
    in_name = "image" if "image" in names_in else names_in[0]
    out_name = "output" if "output" in names_out else names_out[0]

    def embed(batch: torch.Tensor) -> torch.Tensor:
        arr = batch.detach().to(torch.float32).contiguous().numpy()
        return torch.from_numpy(model.run({in_name: arr})[out_name])

    return embed


def iobinding_embed(model: OnnxModel, device: torch.device) -> Embed:
    """handlers.relax.embed.ort_iobinding_embed over a registry session (the kind's tensor names
    mapped to the graph's): a batch made on the GPU is never copied to the host."""
    names_in, names_out = model.input_names, model.output_names
    return ort_iobinding_embed(
        model.session,
        model._in["image" if "image" in names_in else names_in[0]],
        model._out["output" if "output" in names_out else names_out[0]],
        device,
    )


def ort_on_cuda(model: OnnxModel) -> bool:
    """Whether the session runs on ONNX Runtime's CUDA provider."""
    return "CUDAExecutionProvider" in model.session.get_providers()


class RelaxJobMethod:
    """JobMethod "relax". `batch_size` is the default masks per forward batch (the request may
    override it up to `max_batch_size`); `max_num_masks` bounds N."""

    name = "relax"

    def __init__(
        self,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_num_masks: int = MAX_NUM_MASKS,
        max_batch_size: int = MAX_BATCH_SIZE,
    ):
        if not 1 <= batch_size <= max_batch_size:
            raise ValueError(f"default batch_size {batch_size} must be in 1..{max_batch_size}")
        self.batch_size = batch_size
        self.max_num_masks = max_num_masks
        self.max_batch_size = max_batch_size

    # -- request -> configuration ----------------------------------------------------------------
    def config(self, request: pb.JobRequest) -> RelaxConfig:
        """RelaxConfig from the request's RelaxParams (unset fields: METHODS.md defaults)."""
        which = request.WhichOneof("params")
        if which not in (None, "relax"):
            raise InvalidArgument(
                f"method 'relax' takes relax parameters (JobRequest.relax), but {which} parameters were given"
            )
        p = request.relax
        kw: dict = {"batch_size": self.batch_size}
        for name in _OPTIONAL:
            if p.HasField(name):
                kw[name] = getattr(p, name)
        for name in ("p_keep", "noise_mean", "noise_std", "target_error", "gamma"):
            if name in kw:  # float32 on the wire: 0.01 arrives as 0.009999999776; keep the decimal
                kw[name] = float(np.format_float_positional(np.float32(kw[name]), unique=True))
        if p.masking:
            kw["masking"] = p.masking.strip().lower()
        if p.threshold:
            kw["threshold"] = p.threshold.strip().lower()
        if p.estimator:
            kw["estimator"] = p.estimator.strip().lower()
        kw["adaptive"] = bool(p.adaptive)
        kw["two_pass"] = bool(p.two_pass)
        if "num_masks" in kw and kw["num_masks"] > self.max_num_masks:
            raise InvalidArgument(
                f"relax parameter num_masks = {kw['num_masks']} is more than this server's limit of {self.max_num_masks}; "
                "use fewer masks or adaptive = true with a target_error"
            )
        if not 1 <= kw["batch_size"] <= self.max_batch_size:
            raise InvalidArgument(f"relax parameter batch_size = {kw['batch_size']}: use 1..{self.max_batch_size}")
        return RelaxConfig(**kw)  # range checks, InvalidArgument naming the parameter

    def models(self, request: pb.JobRequest, registry: Registry) -> tuple[ModelEntry, ModelEntry]:
        """(the requested entry, the encoder RELAX explains). NotFound / InvalidArgument otherwise."""
        entry = registry.resolve(request.model)
        if entry.kind == "encoder":
            encoder = entry
        elif entry.kind == "nem_u":
            encoder = registry.frozen_for(entry)  # NEM-U explains a frozen encoder: RELAX explains it too
            if encoder.kind != "encoder":
                raise FailedPrecondition(f"{entry.id} explains {encoder.id}, which is a {encoder.kind}, not an encoder")
        else:
            encoders = sorted(e.id for e in registry.entries() if e.kind == "encoder")
            raise InvalidArgument(
                f"RELAX explains representations, but model {entry.id} is a {entry.kind}; "
                f"use an encoder: {', '.join(encoders) or '(none in this store)'}"
            )
        if "onnx" in encoder.files:
            registry.path(encoder, "onnx")  # FailedPrecondition now, not a failed job later
        elif "torch" not in registry.forms(encoder):
            raise FailedPrecondition(
                f"encoder {encoder.id} has neither an ONNX graph nor a torch form in the model store"
            )
        return entry, encoder

    def _input(
        self, request: pb.JobRequest, encoder: ModelEntry, cfg: RelaxConfig
    ) -> tuple[np.ndarray, tuple[int, int]]:
        """(the normalised model input, the image's own height and width)."""
        if not request.HasField("image"):
            raise InvalidArgument("the job has no image: set JobRequest.image (PNG/JPEG bytes or a raw tensor)")
        arr = decode_image(request.image, encoder.input)
        x = to_model_input(arr, encoder.input)
        cfg.check_image(*x.shape)
        return x, (int(arr.shape[0]), int(arr.shape[1]))

    # -- JobMethod ---------------------------------------------------------------------------------
    def validate(self, request: pb.JobRequest, registry: Registry) -> None:
        cfg = self.config(request)
        _, encoder = self.models(request, registry)
        self._input(request, encoder, cfg)

    def run(self, request: pb.JobRequest, registry: Registry, ctx: JobContext) -> pb.JobResult:
        t_start = time.perf_counter()
        cfg = self.config(request)
        entry, encoder = self.models(request, registry)
        x, (h, w) = self._input(request, encoder, cfg)
        t_decoded = time.perf_counter()
        spec = encoder.input
        # results at the image's own resolution and geometry (letterbox padding cut away); progress
        # previews in the same geometry at the model's scale
        ph, pw = preview_shape(h, w, max(spec.height, spec.width))
        dev, dtype = registry.device, None
        session = registry.onnx(encoder) if "onnx" in encoder.files else None
        # a graph with a fixed batch of 1 is run row by row by OnnxModel.run: no binding for it
        on_gpu_graph = (
            session is not None and dev.type == "cuda" and ort_on_cuda(session) and session.fixed_batch is None
        )
        if session is not None and (dev.type == "cpu" or on_gpu_graph or "torch" not in registry.forms(encoder)):
            if on_gpu_graph:
                embed, backend = iobinding_embed(session, dev), "onnxruntime-cuda"
            else:
                embed, backend, dev = onnx_embed(session), "onnxruntime", torch.device("cpu")
        else:  # no graph, or a GPU that ONNX Runtime cannot use: the torch module on the device
            dtype = registry.forward_dtype
            embed, backend = torch_embed(registry.torch_module(encoder), dtype), "torch"
            if dev.type == "cuda" and registry.config.batch_by_memory and not request.relax.HasField("batch_size"):
                c, hh, ww = (int(v) for v in x.shape)

                def probe(k: int) -> None:
                    with torch.no_grad():
                        embed(torch.zeros((k, c, hh, ww), device=dev))

                b = memory_batch(
                    probe,
                    dev,
                    cfg.batch_size,
                    lo=cfg.batch_size,
                    hi=max(cfg.batch_size, min(MEMORY_BATCH_MAX, self.max_batch_size)),
                )
                cfg = dataclasses.replace(cfg, batch_size=b)
        t_loaded = time.perf_counter()
        ctx.check_cancelled()

        def progress(p: RelaxProgress) -> None:
            finite = np.isfinite(p.max_std_error)
            ctx.report(
                p.fraction,
                heatmap=normalise(to_input_geometry(p.importance.cpu().numpy(), spec, ph, pw, clip=False)),
                score=float(p.max_std_error) if finite else None,
                metrics={"masks": float(p.num_masks), "masks_per_second": float(p.masks_per_second)},
                message=f"{p.num_masks} masks" + (f", max standard error {p.max_std_error:.4f}" if finite else ""),
            )

        def should_stop() -> bool:
            ctx.check_cancelled()  # raises JobCancelled: checked before every batch of masks
            return False

        relax = Relax(embed, cfg, mean=encoder.input.mean, std=encoder.input.std, on_oom=count_oom(self.name))
        out = relax.attribute(torch.from_numpy(x).to(dev), progress=progress, should_stop=should_stop)
        t_relax = time.perf_counter()

        imp, unc = (
            to_input_geometry(t.cpu().numpy().astype(np.float32), spec, h, w, clip=False)
            for t in (out.importance, out.uncertainty)
        )
        # U-RELAX ([RELAX] eq. 13) re-applied at the image's resolution: R where U < the threshold
        ur = np.where(unc < out.threshold, imp, 0.0).astype(np.float32)
        png = render_png(imp, unc, ur)
        params = {
            **cfg.to_dict(),
            "model": entry.id,
            "encoder": encoder.id,
            "backend": backend,
            "device": str(dev),
            "forward_dtype": str(dtype).replace("torch.", "") if dtype is not None else "float32",
            "forward_batch": out.forward_batch,
            "input_shape": [int(v) for v in x.shape],
            "image_size": [h, w],
            "resize": spec.resize,
            "converged": out.converged,
            "estimator_used": out.estimator,
        }
        result = pb.JobResult(
            relax=pb.RelaxResult(
                importance=to_tensor(imp),
                uncertainty=to_tensor(unc),
                u_relax=to_tensor(ur),
                threshold=out.threshold,
                num_masks=out.num_masks,
                achieved_error=out.achieved_error,
                png=png,
                masks_per_second=out.masks_per_second,
            ),
            parameters_json=json.dumps(params, sort_keys=True),
        )
        t_end = time.perf_counter()
        result.timings.update(
            {
                "run": t_end - t_start,
                "decode": t_decoded - t_start,
                "load": t_loaded - t_decoded,
                "relax": t_relax - t_loaded,
                "model": out.model_seconds,
                "mask_wait": out.wait_seconds,
                "statistics": out.stats_seconds,
                "render": t_end - t_relax,
            }
        )
        return result
