"""The "sift_ablation" and "sift_rise" job methods (service/jobs/contract.py): SIFT-based saliency
([THESIS] ch. 4, handlers/sift) as queued jobs.

validate() (SubmitJob time) checks what can be known before queueing, each an INVALID_ARGUMENT:
the model kind (sift_ablation: a classifier with a torch form, for gradients; sift_rise: a
classifier or an encoder in any form, a masking network standing for the model it explains), every
SiftParams field in range (eta > 0, ...) and none of the other method's, the image decodes, and
its SIFT keypoints exist (a flat image has none) and are at most `max_keypoints` (the decoder's
memory grows with K). run() decomposes the image, runs the method with progress after every
iteration or batch of masks and a cancellation check before each, and returns
pb.JobResult(sift=pb.SiftResult(...)): the keypoints, the gains along the path or the per-keypoint
importance and uncertainty, both heatmaps at the request image's resolution, PNGs.
"""

from __future__ import annotations

import copy
import json
import threading
import time
import weakref
from abc import ABC, abstractmethod

import numpy as np
import torch

from xaiserve.errors import FailedPrecondition, InvalidArgument
from xaiserve.handlers.ablation.path import affine_path, saturation
from xaiserve.handlers.ablation.reductions import SIGNED
from xaiserve.handlers.sift.ablation import SiftAblation, SiftAblationConfig, keypoints_of
from xaiserve.handlers.sift.decomposition import DecompositionConfig, decompose
from xaiserve.handlers.sift.keypoints import KeypointConfig, Keypoints
from xaiserve.handlers.sift.rise import SiftRise, SiftRiseConfig, SiftRiseProgress, normalised
from xaiserve.methods import MASK_KINDS
from xaiserve.proto.explain.v1 import explainer_pb2 as pb
from xaiserve.service.images import decode_image, preview_shape, to_channels, to_input_geometry, to_model_input
from xaiserve.service.jobs.ablation import _Serialised
from xaiserve.service.jobs.contract import JobContext
from xaiserve.service.jobs.relax import onnx_embed, torch_embed
from xaiserve.service.registry import ModelEntry, Registry
from xaiserve.service.render import sift as render
from xaiserve.service.render.ablation import denormalise
from xaiserve.service.tensors import to_tensor

MAX_KEYPOINTS = 1024

# SiftParams fields that belong to one method only (the rest are shared)
ABLATION_ONLY = (
    "score",
    "num_slices",
    "saturation",
    "ramp_saturation",
    "max_iterations",
    "step_size",
    "stop_saturation",
    "reduction",
    "metric_weights",
)
RISE_ONLY = ("num_masks", "p_keep", "batch_size", "seed")


def _f32(v: float) -> float:
    """float32 on the wire: 0.01 arrives as 0.009999999776; keep the decimal the client meant."""
    return float(np.format_float_positional(np.float32(v), unique=True))


def _is_set(p: pb.SiftParams, name: str) -> bool:
    field = pb.SiftParams.DESCRIPTOR.fields_by_name[name]
    return p.HasField(name) if field.has_presence else bool(getattr(p, name))


_HOST_COPIES: "weakref.WeakKeyDictionary[torch.nn.Module, torch.nn.Module]" = weakref.WeakKeyDictionary()
_HOST_LOCK = threading.Lock()


def _host_module(registry, entry):
    """The frozen module on the CPU. The SIFT decomposition is sparse host-side work (scipy, sparse
    CSR matrices) and its tensors live on the CPU, so on a GPU worker SIFT jobs run on a CPU copy of
    the model instead of the registry's device copy (a deliberate limit: see docs/METHODS.md)."""
    module = registry.torch_module(entry)
    try:
        device = next(module.parameters()).device
    except StopIteration:
        return module
    if device.type == "cpu":
        return module
    with _HOST_LOCK:  # one CPU copy per registry module, not one per job
        host = _HOST_COPIES.get(module)
        if host is None:
            host = _HOST_COPIES[module] = copy.deepcopy(module).cpu()
        return host


class _SiftJob(ABC):
    """What both SIFT job methods share; each subclass says which model it explains and how its
    parameters become a config."""

    name = ""
    other: tuple[str, ...] = ()  # the other method's fields, refused

    def __init__(self, *, max_keypoints: int = MAX_KEYPOINTS):
        if max_keypoints < 1:
            raise ValueError(f"max_keypoints must be >= 1, got {max_keypoints}")
        self.max_keypoints = max_keypoints

    # -- request -> configuration ----------------------------------------------------------------
    def params(self, request: pb.JobRequest) -> pb.SiftParams:
        which = request.WhichOneof("params")
        if which not in (None, "sift"):
            raise InvalidArgument(
                f"method {self.name!r} takes params.sift (SiftParams), but the request sets params.{which}"
            )
        p = request.sift
        wrong = [n for n in self.other if _is_set(p, n)]
        if wrong:
            owner = "sift_rise" if self.name == "sift_ablation" else "sift_ablation"
            raise InvalidArgument(
                f"SiftParams {', '.join(wrong)} belong to method {owner!r}, not {self.name!r}; leave them unset"
            )
        return p

    def shared(self, p: pb.SiftParams) -> dict:
        """Keyword arguments common to both configs (keypoints, cells, heatmaps)."""
        kp: dict = {"max_keypoints": self.max_keypoints}
        if p.HasField("contrast_threshold"):
            kp["contrast_threshold"] = _f32(p.contrast_threshold)
        if p.HasField("edge_threshold"):
            kp["edge_threshold"] = _f32(p.edge_threshold)
        cells: dict = {"smooth": not p.hard_cells}
        for name in ("eta", "sparsity"):
            if p.HasField(name):
                cells[name] = _f32(getattr(p, name))
        if p.HasField("layers_per_octave"):
            cells["layers_per_octave"] = p.layers_per_octave
        out: dict = {"keypoints": KeypointConfig(**kp), "cells": DecompositionConfig(**cells)}
        for name in ("sigma_lp", "sigma_hp"):
            if p.HasField(name):
                out[name] = _f32(getattr(p, name))
        return out

    def target(self, p: pb.SiftParams, entry: ModelEntry) -> int | None:
        if not p.HasField("target_label"):
            return None
        if entry.kind != "classifier":
            raise InvalidArgument(f"target_label applies to classifiers; {entry.id} is a {entry.kind}")
        k = entry.output_dim or len(entry.labels)
        if p.target_label < 0 or (k and p.target_label >= k):
            names = f" ({', '.join(entry.labels)})" if entry.labels else ""
            raise InvalidArgument(
                f"target_label {p.target_label} is out of range for {entry.id}, which has {k} classes: 0..{k - 1}{names}"
            )
        return p.target_label

    def image(self, request: pb.JobRequest, entry: ModelEntry) -> tuple[np.ndarray, np.ndarray]:
        """(the decoded request image HWC [0, 1], the model input CHW normalised)."""
        if not request.HasField("image"):
            raise InvalidArgument("image is missing: set image.encoded (PNG/JPEG bytes) or image.tensor")
        arr = decode_image(request.image, entry.input)
        return arr, to_model_input(arr, entry.input)

    def keypoints(self, x: np.ndarray, cfg, entry: ModelEntry) -> Keypoints:
        """The keypoints of the model input; InvalidArgument for a flat image or K above the limit."""
        return keypoints_of(torch.from_numpy(x), cfg.keypoints, entry.input.mean, entry.input.std)

    def prepare(self, request: pb.JobRequest, registry: Registry, ctx: JobContext):
        """What both methods do first: the model, the config and target, the decoded image and its
        model input, the preview size, the keypoints (and the seconds they took) and the
        decomposition ([THESIS] sec. 4.1), checking for cancellation between the steps."""
        entry = self.model(request, registry)
        cfg, target = self.config(request, entry)
        arr, x_np = self.image(request, entry)
        preview = preview_shape(int(arr.shape[0]), int(arr.shape[1]), max(entry.input.height, entry.input.width))
        x = torch.from_numpy(x_np)
        t0 = time.perf_counter()
        kp = self.keypoints(x_np, cfg, entry)
        kp_s = time.perf_counter() - t0
        ctx.check_cancelled()
        dec = decompose(x, kp, cfg.cells)
        ctx.check_cancelled()
        return entry, cfg, target, arr, x_np, preview, x, kp, kp_s, dec

    @abstractmethod
    def model(self, request: pb.JobRequest, registry: Registry) -> ModelEntry:
        """The model the method explains (NotFound / InvalidArgument when it does not apply)."""

    @abstractmethod
    def config(self, request: pb.JobRequest, entry: ModelEntry):
        """The method's config from the request's SiftParams (InvalidArgument on a bad value)."""

    # -- JobMethod ---------------------------------------------------------------------------------
    def validate(self, request: pb.JobRequest, registry: Registry) -> None:
        entry = self.model(request, registry)
        cfg, _ = self.config(request, entry)
        _, x = self.image(request, entry)
        self.keypoints(x, cfg, entry)

    def _common_result(
        self, dec, entry: ModelEntry, arr: np.ndarray, vor: torch.Tensor, band: torch.Tensor
    ) -> pb.SiftResult:
        spec = entry.input
        h, w = int(arr.shape[0]), int(arr.shape[1])
        vor_in = to_input_geometry(vor.numpy(), spec, h, w)
        band_in = to_input_geometry(band.numpy(), spec, h, w)
        kps = [
            pb.SiftKeypoint(row=float(r), col=float(c), sigma=float(s))
            for (r, c), s in zip(dec.keypoints.positions, dec.keypoints.sigmas)
        ]
        return pb.SiftResult(
            keypoints=kps,
            heatmap_voronoi=to_tensor(vor_in.astype(np.float32)),
            heatmap_bandpass=to_tensor(band_in.astype(np.float32)),
            heatmap_png=render.heatmaps_png(to_channels(arr, 3), vor_in, band_in),
            reconstruction_error=dec.reconstruction_error,
        )


def _parameters(cfg, entry: ModelEntry, extra: dict) -> str:
    d = cfg.to_dict()
    d.update({"model": entry.id, "image_size": [entry.input.height, entry.input.width], **extra})
    return json.dumps(d, sort_keys=True, default=str)


class SiftAblationJobMethod(_SiftJob):
    """JobMethod "sift_ablation": the ablation path over SIFT keypoint gains ([THESIS] sec. 4.3)."""

    name = "sift_ablation"
    other = RISE_ONLY

    def model(self, request: pb.JobRequest, registry: Registry) -> ModelEntry:
        entry = registry.resolve(request.model)
        if entry.kind in MASK_KINDS:
            entry = registry.frozen_for(entry)
        if entry.kind != "classifier":
            names = sorted(e.id for e in registry.entries() if e.kind == "classifier" and "torch" in registry.forms(e))
            raise InvalidArgument(
                f"method 'sift_ablation' explains a classifier's decision, but {entry.id} is a {entry.kind}; "
                f"classifiers with a torch form in this store: {', '.join(names) or '(none)'}"
            )
        if "torch" not in registry.forms(entry):
            raise InvalidArgument(
                f"method 'sift_ablation' needs the gradients of {entry.id}, whose store entry has no torch form "
                "(a state dict, TorchScript or torch.export file); ONNX gives no gradients"
            )
        return entry

    def config(self, request: pb.JobRequest, entry: ModelEntry) -> tuple[SiftAblationConfig, int | None]:
        p = self.params(request)
        kw = self.shared(p)
        if p.score:
            kw["score"] = p.score.strip().lower()
        if p.reduction:
            kw["reduction"] = p.reduction.strip().lower()
        for name in ("num_slices", "max_iterations"):
            if p.HasField(name):
                kw[name] = getattr(p, name)
        for name in ("saturation", "step_size", "stop_saturation"):
            if p.HasField(name):
                kw[name] = _f32(getattr(p, name))
        kw["ramp_saturation"] = p.ramp_saturation
        kw["metric_weights"] = p.metric_weights
        cfg = SiftAblationConfig(**kw)
        cfg.check()
        return cfg, self.target(p, entry)

    def run(self, request: pb.JobRequest, registry: Registry, ctx: JobContext) -> pb.JobResult:
        t_run = time.perf_counter()
        entry, cfg, target, arr, x_np, (ph, pw), x, kp, kp_s, dec = self.prepare(request, registry, ctx)
        t0 = time.perf_counter()
        module = _Serialised(_host_module(registry, entry))
        load_s = time.perf_counter() - t0
        s0 = float(saturation(affine_path(cfg.num_slices, 1, 1)))
        done = [0.0]

        def progress(p) -> None:
            # iterations done, or the way from the affine start's saturation to the stopping level
            by_saturation = (p.saturation - s0) / max(1e-6, cfg.stop_saturation - s0)
            done[0] = max(done[0], min(0.99, max(p.fraction, by_saturation)))
            ctx.report(
                done[0],
                heatmap=to_input_geometry(p.heatmap.numpy(), entry.input, ph, pw),
                score=p.score,
                metrics={"saturation": p.saturation, "iteration": float(p.iteration)},
                message=f"iteration {p.iteration}/{p.max_iterations}, {dec.num_keypoints} keypoints",
            )
            ctx.check_cancelled()

        out = SiftAblation(module, cfg, mean=entry.input.mean, std=entry.input.std).attribute(
            x, target=target, progress=progress, should_stop=lambda: ctx.cancelled, decoder=dec
        )
        ctx.check_cancelled()  # a "stopped" path is never returned as a result
        t0 = time.perf_counter()
        result = self._common_result(dec, entry, arr, out.heatmap_voronoi, out.heatmap_bandpass)
        spec = entry.input
        with torch.no_grad():
            images = denormalise(out.path_images().numpy(), spec.mean, spec.std)  # [T + 2, H, W, C]
            kept = out.decoder.voronoi(out.gains).numpy()
            down = None
            if out.gains_down is not None:
                down = (
                    denormalise(out.path_images(down=True).numpy(), spec.mean, spec.std),
                    out.decoder.voronoi(out.gains_down).numpy(),
                    out.probabilities_down[:, out.target].numpy(),
                )
        probs = out.probabilities.numpy()
        label = entry.labels[out.target] if out.target < len(entry.labels) else str(out.target)
        result.strip_png = render.path_strip_png(
            images,
            kept,
            probs[:, out.target],
            out.times.numpy(),
            down=down,
            title=f"{entry.id}: {label} (target {out.target}), SIFT path over {dec.num_keypoints} keypoints, score {out.score:.3f}",
        )
        result.gains.CopyFrom(to_tensor(out.gains.numpy().astype(np.float32)))
        result.times.CopyFrom(to_tensor(out.times.numpy().astype(np.float32)))
        result.probabilities.CopyFrom(to_tensor(probs.astype(np.float32)))
        result.target_probability.extend(float(v) for v in probs[:, out.target])
        result.keypoint_scores.CopyFrom(to_tensor(out.keypoint_scores.numpy().astype(np.float32)))
        result.score_history.extend(out.score_history)
        result.saturation_history.extend(out.saturation_history)
        result.stop_reason = out.stop_reason
        result.iterations = out.iterations
        result.target_label = out.target
        result.score = out.score
        if out.gains_down is not None:
            result.gains_down.CopyFrom(to_tensor(out.gains_down.numpy().astype(np.float32)))
        if out.metric_weights is not None:
            result.metric_weights.CopyFrom(to_tensor(out.metric_weights.numpy().astype(np.float32)))
        if request.sift.return_images:
            result.images.CopyFrom(to_tensor(images.astype(np.float32)))
        timings = dict(out.timings)
        timings.update(
            {
                "keypoints": kp_s,
                "decompose": dec.seconds,
                "load": load_s,
                "render": time.perf_counter() - t0,
                "run": time.perf_counter() - t_run,
            }
        )
        params = _parameters(
            cfg,
            entry,
            {
                "target_label": out.target,
                "target_source": "request" if target is not None else "argmax",
                "num_keypoints": dec.num_keypoints,
                "signed_heatmap": cfg.reduction in SIGNED,
                "baseline_changes_class": out.baseline_changes_class,
                "return_images": request.sift.return_images,
            },
        )
        return pb.JobResult(sift=result, timings=timings, parameters_json=params)


class SiftRiseJobMethod(_SiftJob):
    """JobMethod "sift_rise": random on/off keypoint gains, importance and uncertainty per keypoint."""

    name = "sift_rise"
    other = ABLATION_ONLY

    def model(self, request: pb.JobRequest, registry: Registry) -> ModelEntry:
        entry = registry.resolve(request.model)
        if entry.kind in MASK_KINDS:
            entry = registry.frozen_for(entry)
        if entry.kind not in ("classifier", "encoder"):
            names = sorted(e.id for e in registry.entries() if e.kind in ("classifier", "encoder"))
            raise InvalidArgument(
                f"method 'sift_rise' explains a classifier or an encoder, but {entry.id} is a {entry.kind}; "
                f"use one of: {', '.join(names) or '(none in this store)'}"
            )
        if not registry.forms(entry):
            raise FailedPrecondition(f"{entry.id} has neither an ONNX graph nor a torch form in the model store")
        return entry

    def config(self, request: pb.JobRequest, entry: ModelEntry) -> tuple[SiftRiseConfig, int | None]:
        p = self.params(request)
        kw = self.shared(p)
        for name in ("num_masks", "batch_size", "seed"):
            if p.HasField(name):
                kw[name] = getattr(p, name)
        if p.HasField("p_keep"):
            kw["p_keep"] = _f32(p.p_keep)
        cfg = SiftRiseConfig(**kw)
        cfg.check()
        return cfg, self.target(p, entry)

    def run(self, request: pb.JobRequest, registry: Registry, ctx: JobContext) -> pb.JobResult:
        t_run = time.perf_counter()
        entry, cfg, target, arr, x_np, (ph, pw), x, kp, kp_s, dec = self.prepare(request, registry, ctx)
        t0 = time.perf_counter()
        if "onnx" in entry.files:
            forward, backend = onnx_embed(registry.onnx(entry)), "onnxruntime"
        else:
            forward, backend = torch_embed(_Serialised(_host_module(registry, entry))), "torch"
        load_s = time.perf_counter() - t0

        def progress(p: SiftRiseProgress) -> None:
            ctx.report(
                p.fraction,
                heatmap=to_input_geometry(p.heatmap.numpy(), entry.input, ph, pw),
                score=p.max_std_error,
                metrics={"masks": float(p.num_masks)},
                message=f"{p.num_masks}/{p.max_masks} masks over {dec.num_keypoints} keypoints, "
                f"max standard error {p.max_std_error:.4f}",
            )

        def should_stop() -> bool:
            ctx.check_cancelled()  # raises JobCancelled: checked before every batch
            return False

        out = SiftRise(forward, cfg, kind=entry.kind, mean=entry.input.mean, std=entry.input.std).attribute(
            x, target=target, progress=progress, should_stop=should_stop, decoder=dec
        )
        t0 = time.perf_counter()
        result = self._common_result(dec, entry, arr, out.heatmap_voronoi, out.heatmap_bandpass)
        spec = entry.input
        v = normalised(out.importance)
        with torch.no_grad():
            images = denormalise(dec.decode(torch.stack([torch.ones_like(v), v])).numpy(), spec.mean, spec.std)
            maps = dec.voronoi(torch.stack([v, normalised(out.uncertainty)])).clamp(0.0, 1.0).numpy()
        what = (
            f"P({entry.labels[out.target] if 0 <= out.target < len(entry.labels) else out.target})"
            if entry.kind == "classifier"
            else "cos(f(x), f(.))"
        )
        result.strip_png = render.tiles_png(
            [
                ("D(1)", images[0]),
                ("D(importance)", images[1]),
                ("importance", maps[0]),
                ("uncertainty", maps[1]),
                ("band-pass", out.heatmap_bandpass.numpy()),
            ],
            title=f"{entry.id}: sift_rise of {what}, {out.num_masks} masks, {dec.num_keypoints} keypoints",
        )
        result.importance.CopyFrom(to_tensor(out.importance.numpy().astype(np.float32)))
        result.keypoint_scores.CopyFrom(to_tensor(out.importance.numpy().astype(np.float32)))
        result.uncertainty.CopyFrom(to_tensor(out.uncertainty.numpy().astype(np.float32)))
        result.std_error.CopyFrom(to_tensor(out.std_error.numpy().astype(np.float32)))
        result.num_masks = out.num_masks
        result.target_label = out.target
        result.score = out.mean_score
        if request.sift.return_images:
            result.images.CopyFrom(to_tensor(images.astype(np.float32)))
        timings = dict(out.timings)
        timings.update(
            {
                "keypoints": kp_s,
                "decompose": dec.seconds,
                "load": load_s,
                "render": time.perf_counter() - t0,
                "run": time.perf_counter() - t_run,
            }
        )
        params = _parameters(
            cfg,
            entry,
            {
                "target_label": out.target,
                "backend": backend,
                "num_keypoints": dec.num_keypoints,
                "reference_score": out.reference_score,
                "return_images": request.sift.return_images,
            },
        )
        return pb.JobResult(sift=result, timings=timings, parameters_json=params)
