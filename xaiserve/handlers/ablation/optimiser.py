"""Projected gradient ascent on ablation paths ([THESIS], sec. 2.6.3, Algorithm 2).

    AblationPath(classifier, AblationConfig(...)).attribute(x, baseline=None, target=None,
                 progress=None, should_stop=None) -> AblationOutput

Per iteration (Algorithm 2; one batched forward + backward pass for all slices):
  1. images along the path (1 - phi) x_target + phi x_baseline, the score P and its gradient g
     with respect to the path by autograd (eq. 2.13-2.16, Lemma 4);
  2. mass-neutral step: g <- g - mean_r g, per slice (line 6), so the step keeps mean(phi(t));
  3. phi <- phi + h g / max|g| (L-infinity-normalised step, sec. 2.8.2; ascent, Remark 8);
  4. Gaussian regularisation phi <- gamma_sigma * phi (eq. 2.24, sec. 2.5.1);
  5. optional saturation Pi_sat (eq. 2.26), optionally ramped up (sec. 2.8.5C);
  6. straddling: pinching phi_down <- phi_up + Pi_pinch(phi_down - phi_up) (eq. 2.27-2.29);
  7. projection: monotone in t (envelope midpoint), clamp to [0, 1], constant speed (Lemma 7).
Stops when the saturation (eq. 2.31) exceeds `stop_saturation` after at least `min_iterations`
("saturation"), after `max_iterations` ("max_iterations"), or when `should_stop()` is true ("stopped").
Defaults (METHODS.md, decision 2026-12): the thesis's and the authors' values (L-inf step 0.5,
sigma_regu in image pixels scaled to the mask grid, 6..100 iterations, class-transition floor 0.25),
with a saturation ramp tuned on validation images (SATURATION below).
The optional step-size adaptation of Algorithm 2 line 9 is not implemented (the thesis reports
it as optional; a fixed L-inf step is what sec. 2.8.2 recommends).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from xaiserve.devices import ChunkSize
from xaiserve.errors import FailedPrecondition, InvalidArgument
from xaiserve.handlers.ablation import path as P
from xaiserve.handlers.ablation import reductions as R
from xaiserve.handlers.ablation import scores as S
from xaiserve.handlers.ablation.baseline import SIGMA_MAX, SIGMA_MIN, blur_baseline

# sec. 2.5.1: 7 px at the thesis's 224 px images. The default scales it with the image (2 px at
# 64 px); on lesions validation images 2 px gave pointing game 8/8, 4 px 5/8, 7 px 0/8 (METHODS.md)
SIGMA_REGU_224 = 7.0
# zeta_sat reached at max_iterations by the ramp; tuned on lesions validation images (METHODS.md)
SATURATION = 3.0


@dataclass(frozen=True)
class AblationConfig:
    """Parameters of Algorithm 2; defaults from METHODS.md "Optimised ablation paths" and the proto."""

    score: str = "retaining"  # retaining | dissipating | contrastive | straddling (sec. 2.3)
    num_slices: int = 14  # T interior slices (sec. 2.6.1)
    mask_size: int = 64  # masks are mask_size x mask_size, upsampled to the image
    # Gaussian regularisation (sec. 2.5.1) in IMAGE pixels (the thesis's unit); None = 7 px at 224 px,
    # scaled with the image side. The optimiser scales it to the mask grid by sqrt(mask area /
    # image area), as the authors' code does (mask_sigma)
    sigma_regu: float | None = None
    # zeta_sat of eq. 2.26 (0 = off), reached at the last iteration by the ramp (sec. 2.8.5C): weak
    # at the start, so the first steps follow the classifier, strong enough late that the 0.8 stop
    # is reachable (a constant 0.8 left the saturation at 0.50-0.72 on lesion test images)
    saturation: float = SATURATION
    ramp_saturation: bool = True  # zeta_i = zeta_sat * i / max_iterations
    min_iterations: int = 6  # the saturation stop is not taken before this many (the authors' floor)
    max_iterations: int = 100  # the authors' cap
    step_size: float = 0.5  # L-inf norm of each step (sec. 2.8.2: "on the order of 1"; the authors' default)
    stop_saturation: float = 0.8  # eq. 2.31
    pinch: float = 0.5  # zeta_pinch of eq. 2.29 (straddling only); the thesis gives no value
    reduction: str = "transition"  # transition | average | influence | contrastive (sec. 2.7.2)
    transition_floor: float = R.TRANSITION_FLOOR  # class transition never below this share of the path
    window: int = 0  # eq. 2.37 taper width in image pixels, 0 = off (see reductions.window)
    baseline_sigma_min: float = SIGMA_MIN  # sec. 2.7.1
    baseline_sigma_max: float = SIGMA_MAX
    require_baseline_change: bool = True  # fail when no blur changes the decision (sec. 2.7.1: "imperative")

    def check(self) -> None:
        """Raise InvalidArgument naming the first bad parameter."""
        if self.score not in S.SCORES:
            raise InvalidArgument(f"score {self.score!r} is unknown; use one of {', '.join(S.SCORES)}")
        if self.reduction not in R.REDUCTIONS:
            raise InvalidArgument(f"reduction {self.reduction!r} is unknown; use one of {', '.join(R.REDUCTIONS)}")
        if self.reduction == "contrastive" and self.score != "straddling":
            raise InvalidArgument("reduction 'contrastive' (eq. 2.36) needs score 'straddling' (two paths)")
        if not 2 <= self.num_slices <= 256:
            raise InvalidArgument(f"num_slices is {self.num_slices}; use 2 to 256 interior slices (default 14)")
        if self.mask_size < 2:
            raise InvalidArgument(f"mask_size is {self.mask_size}; use at least 2 (default 64)")
        for name in ("sigma_regu", "step_size"):
            v = getattr(self, name)
            if v is None and name == "sigma_regu":
                continue
            if not (math.isfinite(v) and v > 0):
                raise InvalidArgument(f"{name} is {v}; it must be a positive number")
        if self.step_size > 1.0:
            raise InvalidArgument(
                f"step_size is {self.step_size}; an L-inf step above 1 leaves the [0, 1] range of the masks"
            )
        if not (math.isfinite(self.saturation) and self.saturation >= 0):
            raise InvalidArgument(f"saturation is {self.saturation}; zeta_sat must be >= 0 (0 = off)")
        if self.saturation > 50:
            raise InvalidArgument(
                f"saturation is {self.saturation}; zeta_sat above 50 binarises the path at once (sec. 2.5.2 uses < 1)"
            )
        if not 1 <= self.max_iterations <= 10000:
            raise InvalidArgument(f"max_iterations is {self.max_iterations}; use 1 to 10000 (default 100)")
        # min_iterations above max_iterations is allowed: the run then ends at max_iterations
        if not 0 <= self.min_iterations <= 10000:
            raise InvalidArgument(f"min_iterations is {self.min_iterations}; use 0 to 10000 (default 6)")
        if not (math.isfinite(self.transition_floor) and 0 <= self.transition_floor < 1):
            raise InvalidArgument(
                f"transition_floor is {self.transition_floor}; use a share of the path in [0, 1) (default 0.25)"
            )
        if not (math.isfinite(self.stop_saturation) and 0 < self.stop_saturation <= 1):
            raise InvalidArgument(f"stop_saturation is {self.stop_saturation}; use a value in (0, 1] (default 0.8)")
        if not (math.isfinite(self.pinch) and 0 <= self.pinch <= 1):
            raise InvalidArgument(f"pinch is {self.pinch}; zeta_pinch must be in [0, 1]")
        if self.window < 0:
            raise InvalidArgument(f"window is {self.window}; use 0 (off) or a taper width in pixels")
        if not (0 < self.baseline_sigma_min <= self.baseline_sigma_max):
            raise InvalidArgument("baseline sigmas must satisfy 0 < baseline_sigma_min <= baseline_sigma_max")

    def image_sigma(self, height: int, width: int) -> float:
        """sigma_regu in image pixels: as given, or 7 px at 224 px scaled with the image side (sqrt of its area)."""
        if self.sigma_regu is not None:
            return float(self.sigma_regu)
        return SIGMA_REGU_224 * math.sqrt(height * width) / 224.0

    def mask_sigma(self, height: int, width: int) -> float:
        """sigma_regu on the mask grid: image pixels times sqrt(mask area / image area), as the authors' code."""
        return self.image_sigma(height, width) * math.sqrt(self.mask_size * self.mask_size / float(height * width))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class AblationProgress:
    """What the optimiser reports after each iteration."""

    iteration: int  # iterations done (1-based)
    max_iterations: int
    score: float  # score of the path evaluated in this iteration (before its update)
    saturation: float  # eq. 2.31 of the updated path
    heatmap: torch.Tensor  # [H, W] current heatmap (the configured reduction, oriented, [0, 1])

    @property
    def fraction(self) -> float:
        return min(1.0, self.iteration / self.max_iterations)


@dataclass
class AblationOutput:
    path: torch.Tensor  # [T, h, w] at mask resolution (phi(t_k), k = 1..T)
    path_image: torch.Tensor  # [T, H, W] upsampled to the image
    path_down: torch.Tensor | None  # straddling: phi_down [T, h, w]
    times: torch.Tensor  # [T + 2]
    probabilities: torch.Tensor  # [T + 2, K] along phi (phi_up), boundaries included
    probabilities_down: torch.Tensor | None  # straddling: along phi_down
    heatmap_raw: torch.Tensor  # [H, W] reduction before mapping (signed for influence / contrastive)
    heatmap: torch.Tensor  # [H, W] in [0, 1] (reductions.to_unit)
    transition_index: int  # k of t_clt for the transition reduction, else -1
    score: float  # score of the returned path
    score_history: list[float]
    saturation_history: list[float]
    stop_reason: str  # "saturation" | "max_iterations" | "stopped"
    iterations: int
    target: int
    baseline: torch.Tensor  # [C, H, W] normalised
    baseline_sigma: float  # 0 when the baseline was given
    baseline_changes_class: bool
    score_name: str = "retaining"
    transition_floor: float = R.TRANSITION_FLOOR
    timings: dict[str, float] = field(default_factory=dict)  # seconds: run, model, baseline

    def heatmap_for(self, reduction: str, window: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(raw, [0, 1]) heatmap [H, W] of this path under another reduction (sec. 2.7.2), without re-optimising."""
        if reduction not in R.REDUCTIONS:
            raise InvalidArgument(f"reduction {reduction!r} is unknown; use one of {', '.join(R.REDUCTIONS)}")
        paths = self.path[None] if self.path_down is None else torch.stack([self.path, self.path_down])
        probs = (
            self.probabilities[None]
            if self.probabilities_down is None
            else torch.stack([self.probabilities, self.probabilities_down])
        )
        if reduction == "contrastive" and paths.shape[0] != 2:
            raise InvalidArgument("reduction 'contrastive' (eq. 2.36) needs score 'straddling' (two paths)")
        raw, _ = R.reduce(reduction, self.score_name, paths, probs, self.target, floor=self.transition_floor)
        H, W = self.path_image.shape[-2:]
        raw = R.window(P.upsample(raw[None], H, W)[0], window)
        return raw, R.to_unit(raw, signed=reduction in R.SIGNED)

    def path_images(self, x: torch.Tensor) -> torch.Tensor:
        """Intervened images [T + 2, C, H, W] along the path, boundaries included (normalised)."""
        full = P.with_boundaries(self.path_image)
        return S.interpolate(x, self.baseline, full)


class AblationPath:
    """Optimised ablation paths for a frozen classifier (logits [B, K]) on normalised [C, H, W] inputs."""

    def __init__(
        self,
        classifier: torch.nn.Module,
        config: AblationConfig | None = None,
        *,
        slice_batch: int | None = None,
        on_oom: Callable[[int, int], None] | None = None,
    ):
        """Everything runs on the device of the image passed to `attribute` (put it where the
        classifier is). `slice_batch`: slices per forward + backward pass (None: all of them in
        one); a pass that runs out of memory is halved and retried, `on_oom(old, new)` is told."""
        self.classifier = classifier
        self.config = config or AblationConfig()
        self.config.check()
        self.slice_batch = slice_batch
        self.on_oom = on_oom

    @torch.no_grad()
    def _probabilities(self, images: torch.Tensor) -> torch.Tensor:
        return S.class_probabilities(self.classifier, images)

    def attribute(
        self,
        x: torch.Tensor,
        baseline: torch.Tensor | None = None,
        target: int | None = None,
        progress: Callable[[AblationProgress], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> AblationOutput:
        """Optimise a path for the normalised image x [C, H, W]; baseline [C, H, W] or the blur of sec. 2.7.1;
        target: a class index or None for the argmax. `progress` is called after every iteration;
        when `should_stop()` returns true the run ends before the next iteration ("stopped")."""
        # gradients are needed even when the caller runs under no_grad / inference_mode; copies made
        # here are ordinary tensors that autograd may save
        with torch.inference_mode(False), torch.enable_grad():
            x = x.detach().clone().float()
            baseline = None if baseline is None else baseline.detach().clone().float()
            return self._attribute(x, baseline, target, progress, should_stop)

    def _attribute(self, x, baseline, target, progress, should_stop) -> AblationOutput:
        cfg = self.config
        t_run = time.perf_counter()
        if x.dim() != 3:
            raise InvalidArgument(f"x has shape {tuple(x.shape)}; give one image [C, H, W]")
        C, H, W = x.shape
        if cfg.mask_size > min(H, W):
            raise InvalidArgument(
                f"mask_size {cfg.mask_size} is larger than the image ({H} x {W}); use at most {min(H, W)}"
            )
        timings = {"model": 0.0, "baseline": 0.0}

        p_target = self._check_classifier(x)
        K = p_target.shape[0]
        if target is None:
            target = int(p_target.argmax())
        if not 0 <= target < K:
            raise InvalidArgument(
                f"target label {target} is out of range for a classifier with {K} classes (0..{K - 1})"
            )

        baseline_sigma = 0.0
        if baseline is None:
            t0 = time.perf_counter()
            bl = blur_baseline(self.classifier, x, sigma_min=cfg.baseline_sigma_min, sigma_max=cfg.baseline_sigma_max)
            timings["baseline"] = time.perf_counter() - t0
            if not bl.changes_class and cfg.require_baseline_change:
                raise FailedPrecondition(
                    f"no Gaussian blur with sigma in [{cfg.baseline_sigma_min:g}, {cfg.baseline_sigma_max:g}] px changes the "
                    "classifier's decision on this image, so the blurred baseline would not lie in another class "
                    "([THESIS] sec. 2.7.1); send a baseline image of another class in params.baseline"
                )
            baseline, baseline_sigma = bl.image, bl.sigma
        else:
            if tuple(baseline.shape) != (C, H, W):
                raise InvalidArgument(
                    f"baseline has shape {tuple(baseline.shape)}; it must match the image {(C, H, W)}"
                )
        p_baseline = self._probabilities(baseline[None])[0]
        changes = bool(p_baseline.argmax() != p_target.argmax())
        f0, f1 = float(p_target[target]), float(p_baseline[target])

        T, m = cfg.num_slices, cfg.mask_size
        n_paths = S.num_paths(cfg.score)
        paths = torch.stack([P.affine_path(T, m, m, device=x.device) for _ in range(n_paths)])  # [P, T, m, m]
        blur_h = P.gaussian_blur_matrix(m, cfg.mask_sigma(H, W), device=x.device)
        # slices per forward + backward: all of them unless configured smaller or halved after an OOM
        # (read after the run: the size it ended with)
        self.chunk = ChunkSize(
            self.slice_batch or T * (2 if cfg.score in ("contrastive", "straddling") else 1), x.device, self.on_oom
        )

        score_history: list[float] = []
        saturation_history: list[float] = []
        stop_reason = "max_iterations"
        iterations = 0
        for i in range(cfg.max_iterations):
            if should_stop is not None and should_stop():
                stop_reason = "stopped"
                break
            t0 = time.perf_counter()
            value, probs, grad = S.evaluate_with_grad(
                cfg.score, self.classifier, x, baseline, paths, target, f0, f1, self.chunk
            )
            timings["model"] += time.perf_counter() - t0
            self._check_gradient(grad, value, i)
            score_history.append(float(value.detach()))

            with torch.no_grad():
                # Algorithm 2 line 6: remove each slice's spatial mean (mass-neutral step).
                g = grad - grad.mean(dim=(-2, -1), keepdim=True)
                # sec. 2.8.2: L-inf-normalised step, per path (the straddling paths ascend separately).
                norm = g.abs().amax(dim=(1, 2, 3), keepdim=True)
                g = torch.where(norm > 0, g / torch.where(norm > 0, norm, torch.ones_like(norm)), torch.zeros_like(g))
                new = paths + cfg.step_size * g
                new = blur_h @ new @ blur_h.T  # eq. 2.24
                zeta = cfg.saturation * ((i + 1) / cfg.max_iterations if cfg.ramp_saturation else 1.0)
                new = P.saturate(new, zeta)  # eq. 2.26
                if n_paths == 2:
                    new[1] = P.pinch(new[0], new[1], cfg.pinch)  # eq. 2.27
                paths = P.project(new)  # lines 12-15, every path at once
                sat = float(P.saturation(paths).mean())
            saturation_history.append(sat)
            iterations = i + 1
            if progress is not None:
                progress(
                    AblationProgress(
                        iterations,
                        cfg.max_iterations,
                        score_history[-1],
                        sat,
                        self._partial_heatmap(paths, probs, p_target, p_baseline, target, H, W),
                    )
                )
            if sat > cfg.stop_saturation and iterations >= cfg.min_iterations:
                stop_reason = "saturation"
                break

        return self._finish(
            x,
            baseline,
            paths,
            target,
            f0,
            f1,
            p_target,
            p_baseline,
            score_history,
            saturation_history,
            stop_reason,
            iterations,
            baseline_sigma,
            changes,
            timings,
            t_run,
        )

    # -- helpers ----------------------------------------------------------------------------------
    def _check_classifier(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities at x, after checking that the logits are finite and respond to the image.

        Done before the baseline search so that a classifier without usable gradients fails with
        that reason (the logits, not the softmax, are differentiated: a saturated softmax can have
        a vanishing gradient at x and still a useful one along the path).
        """
        with torch.enable_grad():
            xg = x[None].clone().requires_grad_(True)
            logits = self.classifier(xg)
            if logits.dim() != 2:
                raise FailedPrecondition(
                    f"the classifier returned shape {tuple(logits.shape)}; a classifier must return logits [B, K]"
                )
            if not torch.isfinite(logits).all():
                raise FailedPrecondition(
                    "the classifier's outputs on this image are NaN or infinite; it cannot be explained"
                )
            # a random combination of the logits has a zero gradient (almost surely) only if every logit's has
            gen = torch.Generator(device=logits.device).manual_seed(0)
            r = torch.randn(logits.shape, generator=gen, device=logits.device)
            (g,) = torch.autograd.grad((logits.float() * r).sum(), xg)
        if not torch.isfinite(g).all():
            raise FailedPrecondition(
                "the classifier's gradients with respect to the image are NaN or infinite; "
                "ablation paths need a differentiable classifier with finite gradients"
            )
        if float(g.abs().max()) == 0.0:
            raise FailedPrecondition(
                "the classifier's gradients with respect to the image are all zero: its output does not "
                "respond to the image, so no ablation path can be optimised"
            )
        return torch.log_softmax(logits.detach().float(), dim=1).exp()[0]

    @staticmethod
    def _check_gradient(grad: torch.Tensor, value: torch.Tensor, iteration: int) -> None:
        """A classifier without usable gradients must fail the job, not return a meaningless path."""
        if not torch.isfinite(value):
            raise FailedPrecondition(
                f"the classifier's score along the path is {float(value)} at iteration {iteration + 1}; "
                "its outputs are not finite on these inputs"
            )
        largest = float(grad.abs().max())  # one reduction: NaN propagates through max, Inf is the max
        if not math.isfinite(largest):
            raise FailedPrecondition(
                f"the classifier's gradients with respect to the path are NaN or infinite at iteration "
                f"{iteration + 1}; ablation paths need a differentiable classifier with finite gradients"
            )
        if largest == 0.0:
            raise FailedPrecondition(
                f"the classifier's gradients with respect to the path are all zero at iteration "
                f"{iteration + 1}; its output does not respond to the image, so no path can be optimised"
            )

    def _full_probs(
        self, paths: torch.Tensor, probs: torch.Tensor, p_target: torch.Tensor, p_baseline: torch.Tensor
    ) -> torch.Tensor:
        """[P, T + 2, K] class probabilities along each path from the evaluated slices and both ends."""
        T = paths.shape[1]
        cfg = self.config
        first = probs[:T]
        out = [torch.cat([p_target[None], first, p_baseline[None]])]
        if cfg.score == "straddling":
            out.append(torch.cat([p_target[None], probs[T : 2 * T], p_baseline[None]]))
        return torch.stack(out)

    def _heatmap(self, paths: torch.Tensor, full_probs: torch.Tensor, target: int, H: int, W: int):
        cfg = self.config
        raw, k = R.reduce(cfg.reduction, cfg.score, paths, full_probs, target, floor=cfg.transition_floor)
        raw = P.upsample(raw[None], H, W)[0]
        raw = R.window(raw, cfg.window)
        return raw, R.to_unit(raw, signed=cfg.reduction in R.SIGNED), k

    def _partial_heatmap(self, paths, probs, p_target, p_baseline, target, H, W) -> torch.Tensor:
        """The current heatmap for progress events: the updated path with the probabilities of the
        slices evaluated before the update (one iteration stale; no extra classifier pass)."""
        full = self._full_probs(paths, probs.detach(), p_target, p_baseline)
        return self._heatmap(paths, full, target, H, W)[1]

    @torch.no_grad()
    def _finish(
        self,
        x,
        baseline,
        paths,
        target,
        f0,
        f1,
        p_target,
        p_baseline,
        score_history,
        saturation_history,
        stop_reason,
        iterations,
        baseline_sigma,
        changes,
        timings,
        t_run,
    ) -> AblationOutput:
        cfg = self.config
        C, H, W = x.shape
        t0 = time.perf_counter()
        value, probs = S.evaluate_chunked(cfg.score, self.classifier, x, baseline, paths, target, f0, f1, self.chunk)
        timings["model"] += time.perf_counter() - t0
        full = self._full_probs(paths, probs, p_target, p_baseline)
        raw, heat, k = self._heatmap(paths, full, target, H, W)
        timings["run"] = time.perf_counter() - t_run
        T = cfg.num_slices
        return AblationOutput(
            path=paths[0],
            path_image=P.upsample(paths[0], H, W),
            path_down=paths[1] if paths.shape[0] == 2 else None,
            times=P.all_times(T, device=x.device),
            probabilities=full[0],
            probabilities_down=full[1] if full.shape[0] == 2 else None,
            heatmap_raw=raw,
            heatmap=heat,
            transition_index=k,
            score=float(value),
            score_history=score_history,
            saturation_history=saturation_history,
            stop_reason=stop_reason,
            iterations=iterations,
            target=target,
            baseline=baseline,
            baseline_sigma=baseline_sigma,
            baseline_changes_class=changes,
            score_name=cfg.score,
            transition_floor=cfg.transition_floor,
            timings=timings,
        )
