"""The "ablation_path" job method (service/jobs/contract.py): validate at submit time, run on a worker.

validate() checks everything knowable before the job is queued (INVALID_ARGUMENT / NOT_FOUND):
the model is a classifier, the image and an optional baseline image decode, the target label is
in range, and every AblationParams field is in range (AblationConfig.check). run() loads the
frozen classifier as a torch module (Registry.torch_module -> handlers.nets.load_module),
optimises the path (Algorithm 2, [THESIS]), reports progress every iteration, stops within one
iteration of a cancellation and returns pb.JobResult(ablation=pb.AblationResult(...)).
"""

from __future__ import annotations

import dataclasses
import json
import time

import numpy as np
import torch

from xaiserve.devices import memory_batch
from xaiserve.errors import InvalidArgument
from xaiserve.handlers.ablation.optimiser import AblationConfig, AblationOutput, AblationPath, AblationProgress
from xaiserve.handlers.ablation.path import affine_path, saturation, upsample, with_boundaries
from xaiserve.handlers.ablation.scores import interpolate
from xaiserve.handlers.saliency.methods import module_lock
from xaiserve.methods import MASK_KINDS
from xaiserve.proto.explain.v1 import explainer_pb2 as pb
from xaiserve.service.gpu_metrics import count_oom
from xaiserve.service.images import decode_image, preview_shape, to_channels, to_input_geometry, to_model_input
from xaiserve.service.registry import ModelEntry, Registry
from xaiserve.service.render import ablation as render
from xaiserve.service.tensors import to_tensor

DEFAULT_MASK_SIZE = 64


class _Serialised(torch.nn.Module):
    """The registry's shared classifier with each forward pass under handlers.saliency's per-module lock.

    GradCAM (handlers.saliency) registers forward hooks on the same cached module while it holds
    that lock; taking it for our forward passes keeps our activations out of its hooks. Only the
    forward needs it (backward passes run no forward hooks), so a long job and fast saliency
    requests interleave per iteration.
    """

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module
        self.lock = module_lock(module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.lock:
            return self.module(x)


def _num_classes(entry: ModelEntry) -> int:
    return entry.output_dim or len(entry.labels)


def _usable(e: ModelEntry, registry: Registry | None = None) -> bool:
    """A classifier with a torch form (state dict, TorchScript or torch.export): ablation paths need
    gradients, which ONNX Runtime does not give."""
    if e.kind != "classifier":
        return False
    return "torch" in registry.forms(e) if registry is not None else "state_dict" in e.files


def _classifier(request: pb.JobRequest, registry: Registry) -> ModelEntry:
    """The classifier to explain: the requested model, or the classifier a NEMt network explains
    (the methods table's rule for methods that are not the masking network itself)."""
    entry = registry.resolve(request.model)
    if entry.kind in MASK_KINDS:
        entry = registry.frozen_for(entry)
    if not _usable(entry, registry):
        names = sorted({e.id for e in registry.entries() if _usable(e, registry)})
        why = (
            f"is a {entry.kind}; ablation paths explain a classifier's decision"
            if entry.kind != "classifier"
            else "has no torch form (files.state_dict, torchscript or exported_program) in its manifest entry; ablation "
            "paths need the classifier's gradients, which the ONNX graph alone does not give (add one with "
            f"`xaiserve models add {entry.name} model.onnx --torch model.pt2 --kind classifier`)"
        )
        raise InvalidArgument(
            f"model {entry.id} {why}. Classifiers with torch weights in this store: {', '.join(names) if names else '(none)'}"
        )
    return entry


def _params(request: pb.JobRequest) -> pb.AblationParams:
    which = request.WhichOneof("params")
    if which not in (None, "ablation"):
        raise InvalidArgument(f"method 'ablation_path' takes params.ablation, but the request sets params.{which}")
    return request.ablation


def build_config(params: pb.AblationParams, entry: ModelEntry) -> tuple[AblationConfig, int | None]:
    """AblationParams -> (AblationConfig with defaults filled in, requested target or None); InvalidArgument on bad values."""
    side = min(entry.input.height, entry.input.width)
    kw: dict = {}
    if params.score:
        kw["score"] = params.score
    if params.reduction:
        kw["reduction"] = params.reduction
    for name in (
        "num_slices",
        "sigma_regu",
        "saturation",
        "ramp_saturation",
        "min_iterations",
        "max_iterations",
        "step_size",
        "window",
        "stop_saturation",
    ):
        if params.HasField(name):
            kw[name] = getattr(params, name)
    if params.HasField("mask_size"):
        if params.mask_size > side:
            raise InvalidArgument(
                f"mask_size {params.mask_size} is larger than the model's input ({entry.input.height} x {entry.input.width}); "
                f"use at most {side}"
            )
        kw["mask_size"] = params.mask_size
    else:
        kw["mask_size"] = min(DEFAULT_MASK_SIZE, side)
    cfg = AblationConfig(**kw)
    cfg.check()
    target = params.target_label if params.HasField("target_label") else None
    if target is not None:
        k = _num_classes(entry)
        if target < 0 or (k and target >= k):
            names = f" ({', '.join(entry.labels)})" if entry.labels else ""
            raise InvalidArgument(
                f"target_label {target} is out of range for {entry.id}, which has {k} classes: 0..{k - 1}{names}"
            )
    return cfg, target


def _inputs(request: pb.JobRequest, entry: ModelEntry) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(image HWC [0,1] at the model's size, x normalised CHW, baseline normalised CHW or None)."""
    if not request.HasField("image"):
        raise InvalidArgument("image is missing: set image.encoded (PNG/JPEG bytes) or image.tensor")
    arr = decode_image(request.image, entry.input)
    x = to_model_input(arr, entry.input)
    params = request.ablation
    baseline = None
    if params.HasField("baseline"):
        try:
            baseline = to_model_input(decode_image(params.baseline, entry.input), entry.input)
        except InvalidArgument as e:
            raise InvalidArgument(f"params.baseline: {e}") from None
    return arr, x, baseline


class AblationJobMethod:
    """JobMethod "ablation_path": optimised ablation paths ([THESIS], Part II ch. 2) as a queued job."""

    name = "ablation_path"

    def validate(self, request: pb.JobRequest, registry: Registry) -> None:
        entry = _classifier(request, registry)
        build_config(_params(request), entry)
        _inputs(request, entry)

    def run(self, request: pb.JobRequest, registry: Registry, ctx) -> pb.JobResult:
        t_run = time.perf_counter()
        entry = _classifier(request, registry)
        params = _params(request)
        cfg, target = build_config(params, entry)
        arr, x_np, baseline_np = _inputs(request, entry)
        h, w = int(arr.shape[0]), int(arr.shape[1])
        ph, pw = preview_shape(h, w, max(entry.input.height, entry.input.width))
        ctx.check_cancelled()
        t0 = time.perf_counter()
        module = _Serialised(registry.torch_module(entry))
        load_s = time.perf_counter() - t0
        # the adapter boundary: the image goes to the classifier's device once, the result comes back once
        dev = registry.device
        x = torch.from_numpy(x_np).to(dev)
        baseline = torch.from_numpy(baseline_np).to(dev) if baseline_np is not None else None
        slice_batch = _slice_batch(module, x, cfg, dev) if registry.config.batch_by_memory else None
        # params.seed is only recorded: Algorithm 2 as implemented here draws no random numbers, and
        # seeding torch's global generator would reach into other jobs of the same worker process

        # progress: iterations done, or the way from the affine start's saturation to the stopping
        # level (eq. 2.31), whichever is further; kept non-decreasing, 1.0 is left for the result
        s0 = float(saturation(affine_path(cfg.num_slices, 1, 1)))
        done = [0.0]

        def progress(p: AblationProgress) -> None:
            by_saturation = (p.saturation - s0) / max(1e-6, cfg.stop_saturation - s0)
            done[0] = max(done[0], min(0.99, max(p.fraction, by_saturation)))
            ctx.report(
                done[0],
                heatmap=to_input_geometry(p.heatmap.cpu().numpy(), entry.input, ph, pw),
                score=p.score,
                metrics={"saturation": p.saturation, "iteration": float(p.iteration)},
                message=f"iteration {p.iteration}/{p.max_iterations}",
            )
            ctx.check_cancelled()

        optimiser = AblationPath(module, cfg, slice_batch=slice_batch, on_oom=count_oom(self.name))
        out = optimiser.attribute(
            x, baseline=baseline, target=target, progress=progress, should_stop=lambda: ctx.cancelled
        )
        ctx.check_cancelled()  # a "stopped" path is never returned as a result
        out, x = to_host(out), x.cpu()
        t0 = time.perf_counter()
        result = to_result(out, x, entry, return_images=params.return_images, image=arr)
        timings = dict(out.timings)
        timings.update({"render": time.perf_counter() - t0, "load": load_s, "run": time.perf_counter() - t_run})
        parameters = dict(cfg.to_dict())
        parameters.update(
            {
                "model": entry.id,
                "target_label": out.target,
                "target_source": "request" if target is not None else "argmax",
                "image_size": [entry.input.height, entry.input.width],
                # the Gaussian regularisation actually applied (sigma_regu None = 7 px at 224 px, scaled)
                "sigma_image_px": cfg.image_sigma(entry.input.height, entry.input.width),
                "sigma_mask_px": cfg.mask_sigma(entry.input.height, entry.input.width),
                "baseline": "given" if baseline is not None else "blur",
                "baseline_sigma": out.baseline_sigma,
                "baseline_changes_class": out.baseline_changes_class,
                "return_images": params.return_images,
                "seed": params.seed if params.HasField("seed") else None,
                "device": str(dev),
                "slice_batch": optimiser.chunk.size,
            }
        )
        return pb.JobResult(ablation=result, timings=timings, parameters_json=json.dumps(parameters, sort_keys=True))


def _slice_batch(module: torch.nn.Module, x: torch.Tensor, cfg: AblationConfig, dev: torch.device) -> int | None:
    """Slices per forward + backward pass on a GPU: as many of the path's as fit in half the free
    memory by a probe (None on the CPU: all slices in one pass)."""
    if dev.type != "cuda":
        return None
    count = cfg.num_slices * (2 if cfg.score in ("contrastive", "straddling") else 1)

    def probe(k: int) -> None:
        xs = x[None].expand(k, *x.shape).clone().requires_grad_(True)
        (module(xs).float().sum()).backward()

    return min(count, memory_batch(probe, dev, count, hi=count))


def to_host(out: AblationOutput) -> AblationOutput:
    """The output with every tensor on the CPU (the renderings and protobuf read numpy)."""
    moved = {
        f.name: getattr(out, f.name).cpu()
        for f in dataclasses.fields(out)
        if isinstance(getattr(out, f.name), torch.Tensor)
    }
    return dataclasses.replace(out, **moved)


def to_result(
    out: AblationOutput,
    x: torch.Tensor,
    entry: ModelEntry,
    *,
    return_images: bool = False,
    image: np.ndarray | None = None,
) -> pb.AblationResult:
    """Every field of pb.AblationResult from an AblationOutput. With `image` (the decoded request
    image, HWC) the path, path_down, heatmap and heatmap PNG are at its resolution and geometry
    (the model's resize undone, letterbox padding cut away); the strip PNG and `images` show what
    the model saw, at its input size."""
    spec = entry.input

    def back(a: np.ndarray) -> np.ndarray:
        return a if image is None else to_input_geometry(a, spec, int(image.shape[0]), int(image.shape[1]))

    images = render.denormalise(out.path_images(x).numpy(), spec.mean, spec.std)  # [T+2, H, W, C]
    masks = with_boundaries(out.path_image).numpy()
    probs = out.probabilities.numpy()
    label = entry.labels[out.target] if out.target < len(entry.labels) else str(out.target)
    down = None
    path_down_image = None
    if out.path_down is not None:
        path_down_image = upsample(out.path_down, x.shape[1], x.shape[2])
        full_down = with_boundaries(path_down_image)
        imgs_down = render.denormalise(interpolate(x, out.baseline, full_down).numpy(), spec.mean, spec.std)
        down = (imgs_down, full_down.numpy(), out.probabilities_down[:, out.target].numpy())
    times = out.times.numpy()
    strip = render.strip_png(
        images,
        masks,
        probs[:, out.target],
        times,
        title=f"{entry.id}: {label} (target {out.target}), score {out.score:.3f}",
        down=down,
    )
    heat = back(out.heatmap.numpy())
    shown = images[0] if image is None else to_channels(image, 3)
    result = pb.AblationResult(
        path=to_tensor(back(out.path_image.numpy()).astype(np.float32)),
        times=to_tensor(times.astype(np.float32)),
        probabilities=to_tensor(probs.astype(np.float32)),
        heatmap=to_tensor(heat.astype(np.float32)),
        score_history=out.score_history,
        saturation_history=out.saturation_history,
        stop_reason=out.stop_reason,
        target_label=out.target,
        score=out.score,
        baseline_sigma=out.baseline_sigma,
        strip_png=strip,
        heatmap_png=render.heatmap_png(shown, heat),
        iterations=out.iterations,
    )
    if return_images:
        result.images.CopyFrom(to_tensor(images.astype(np.float32)))
    if path_down_image is not None:
        result.path_down.CopyFrom(to_tensor(back(path_down_image.numpy()).astype(np.float32)))
    return result
