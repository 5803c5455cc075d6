"""SIFT-based ablation paths ([THESIS] sec. 4.3): an ablation path over the K keypoint gains.

    out = SiftAblation(classifier, SiftAblationConfig(), mean=..., std=...).attribute(x, target=None)
    out.gains            # [T + 2, K] theta(t) = 1 - phi(t), boundaries included
    out.heatmap_voronoi, out.heatmap_bandpass, out.keypoint_scores, out.probabilities, ...

The path phi: [0, 1] -> R^K (eq. 4.44) replaces the pixel masks of ch. 2. Following eq. 4.43 the
images along the path are D_SIFT(theta) with theta = (1 - phi) * 1 + phi * 0: the dummy target
(all gains 1, which reconstructs x, eq. 4.14) and the dummy baseline (all gains 0, the implicit
baseline of sec. 4.3.1: a zero tensor, i.e. the normalisation's mean colour).

Each iteration is Algorithm 2 of ch. 2 with the building blocks of handlers.ablation: the scores
(retaining, dissipating, contrastive, straddling; eq. 2.13-2.16, scores.slice_masks/score_value),
the mass-neutral L-inf step, the saturation Pi_sat (eq. 2.26), the pinching of the straddling
paths (eq. 2.27), the monotone projection (path.project_monotone_clamped) and the constant-speed
reparametrisation (Lemma 7), and the path-to-heatmap reductions (sec. 2.7.2, reductions.reduce).
What sec. 4.3.2 drops is the spatial filtering (eq. 2.24): gains have no neighbours.

Metric weights (eq. 4.45, optional): with W_j = ||D(e_j)||_2 normalised to mean 1, the mask space
gets the metric <u, v> = sum_j W_j u_j v_j. It enters where sec. 4.3.3 says: the time
normalisation (mean -> W-weighted mean, so the constant-speed axiom counts a keypoint by its
decoded mass) and the gradient from the differential (g_j = dP/dphi_j / W_j, projected onto the
W-mass-neutral directions).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch

from xaiserve.errors import FailedPrecondition, InvalidArgument
from xaiserve.handlers.ablation import path as P
from xaiserve.handlers.ablation import reductions as R
from xaiserve.handlers.ablation import scores as S
from xaiserve.handlers.ablation.optimiser import AblationConfig, AblationProgress
from xaiserve.handlers.sift.decomposition import DecompositionConfig, SiftDecoder, decompose
from xaiserve.handlers.sift.heatmaps import SIGMA_HP, SIGMA_LP, extract, to_pixels
from xaiserve.handlers.sift.keypoints import KeypointConfig, Keypoints, detect


@dataclass(frozen=True)
class SiftAblationConfig:
    """Parameters; defaults from [THESIS] Table 4.2 (contrastive score, eta = 4, zeta_sat = 0.8,
    transition heatmap) and ch. 2's Algorithm 2 (T = 14, L-inf step 0.1, stop at saturation 0.8)."""

    keypoints: KeypointConfig = KeypointConfig()
    cells: DecompositionConfig = DecompositionConfig()
    score: str = "contrastive"  # retaining | dissipating | contrastive | straddling (sec. 2.3)
    num_slices: int = 14
    saturation: float = 0.8  # zeta_sat of eq. 2.26
    ramp_saturation: bool = False
    max_iterations: int = 60
    step_size: float = 0.1
    stop_saturation: float = 0.8  # eq. 2.31
    pinch: float = 0.5  # eq. 2.29, straddling only
    reduction: str = "transition"  # transition | average | influence | contrastive (sec. 2.7.2)
    metric_weights: bool = False  # eq. 4.45
    sigma_lp: float = SIGMA_LP  # eq. 4.48
    sigma_hp: float = SIGMA_HP

    def check(self) -> None:
        """Raise InvalidArgument naming the first bad parameter."""
        self.keypoints.check()
        self.cells.check()
        # the path parameters are ch. 2's: the same ranges and messages
        AblationConfig(
            score=self.score,
            num_slices=self.num_slices,
            saturation=self.saturation,
            ramp_saturation=self.ramp_saturation,
            max_iterations=self.max_iterations,
            step_size=self.step_size,
            stop_saturation=self.stop_saturation,
            pinch=self.pinch,
            reduction=self.reduction,
        ).check()
        check_heatmap_sigmas(self.sigma_lp, self.sigma_hp)

    def to_dict(self) -> dict:
        return asdict(self)


def check_heatmap_sigmas(sigma_lp: float, sigma_hp: float) -> None:
    for name, v in (("sigma_lp", sigma_lp), ("sigma_hp", sigma_hp)):
        if not (math.isfinite(v) and 0 < v <= 100):
            raise InvalidArgument(f"{name} is {v}; the band-pass heatmap (eq. 4.48) needs a sigma in (0, 100] pixels")


def keypoints_of(
    x: torch.Tensor, config: KeypointConfig, mean: Sequence[float] | None, std: Sequence[float] | None
) -> Keypoints:
    """The SIFT keypoints of a normalised image x [C, H, W] (detected on its pixels in [0, 1])."""
    pixels = to_pixels(x.detach()[None].float(), mean, std)[0].clamp(0.0, 1.0)
    return detect(pixels.permute(1, 2, 0).numpy(), config)


def weighted_mean(t: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """Mean over the gains (the last two axes, [..., 1, K]), W-weighted when weights are given."""
    if w is None:
        return t.mean(dim=(-2, -1), keepdim=True)
    return (t * w).sum(dim=(-2, -1), keepdim=True) / w.sum()


def constant_speed(phi: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Lemma 7's reparametrisation so that the (W-weighted) mass of phi(t_k) is t_k; phi [..., T, 1, K].

    Without weights this is handlers.ablation.path.constant_speed. With weights the mass is the
    W-weighted mean (eq. 4.45's metric); the search and interpolation are the same.
    """
    if weights is None:
        return P.constant_speed(phi)
    T = phi.shape[-3]
    full = P.with_boundaries(phi)
    mass = weighted_mean(full, weights)[..., 0, 0]  # [..., T + 2]
    mass = torch.cummax(mass, dim=-1).values  # float drift must not make the mass decrease
    mass[..., 0] = 0.0
    mass[..., -1] = torch.clamp(mass[..., -1], min=1.0)
    target = P.interior_times(T, dtype=mass.dtype).expand(*mass.shape[:-1], T).contiguous()
    upper = torch.searchsorted(mass.contiguous(), target, right=True).clamp(1, T + 1)
    lower = upper - 1
    m_lo, m_hi = torch.gather(mass, -1, lower), torch.gather(mass, -1, upper)
    span = m_hi - m_lo
    eta = torch.where(
        span > 0, (target - m_lo) / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(span)
    ).clamp(0.0, 1.0)[..., None, None]
    lo = torch.take_along_dim(full, lower[..., None, None], dim=-3)
    hi = torch.take_along_dim(full, upper[..., None, None], dim=-3)
    return (lo * (1.0 - eta) + hi * eta).clamp(0.0, 1.0)


def saturation(phi: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Saturation level (eq. 2.31) of a gain path [..., T, 1, K], W-weighted with metric weights."""
    per_slice = weighted_mean(2.0 * (phi - 0.5).abs(), weights)[..., 0, 0]
    T = phi.shape[-3]
    return (per_slice.sum(dim=-1) + 1.0) / (T + 1)


@dataclass
class SiftAblationOutput:
    keypoints: Keypoints
    decoder: SiftDecoder
    gains: torch.Tensor  # [T + 2, K] theta(t_k) = 1 - phi(t_k), boundaries included
    gains_down: torch.Tensor | None  # straddling: theta along phi_down
    times: torch.Tensor  # [T + 2]
    probabilities: torch.Tensor  # [T + 2, classes] along the path
    probabilities_down: torch.Tensor | None
    keypoint_scores: torch.Tensor  # [K] the reduction of the path (oriented: high = evidence)
    heatmap_voronoi: torch.Tensor  # [H, W] in [0, 1], eq. 4.46-4.47
    heatmap_bandpass: torch.Tensor  # [H, W] in [0, 1], eq. 4.48
    transition_index: int
    score: float
    score_history: list[float]
    saturation_history: list[float]
    stop_reason: str  # "saturation" | "max_iterations" | "stopped"
    iterations: int
    target: int
    baseline_changes_class: bool  # argmax F(D(0)) != target
    metric_weights: torch.Tensor | None  # [K] normalised to mean 1, when used
    timings: dict[str, float] = field(default_factory=dict)  # seconds: keypoints, decompose, model, run

    @torch.no_grad()
    def path_images(self, down: bool = False) -> torch.Tensor:
        """The reconstructed images D(theta(t_k)) [T + 2, C, H, W] along the path (normalised)."""
        gains = self.gains_down if down and self.gains_down is not None else self.gains
        return self.decoder.decode(gains)


class SiftAblation:
    """SIFT-based ablation paths for a frozen classifier (logits [B, classes]) on normalised [C, H, W]
    inputs; `mean`/`std` (the model's normalisation) give the pixels the keypoints are found on."""

    def __init__(
        self,
        classifier: Callable[[torch.Tensor], torch.Tensor],
        config: SiftAblationConfig | None = None,
        *,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ):
        self.classifier = classifier
        self.config = config or SiftAblationConfig()
        self.config.check()
        self.mean, self.std = mean, std

    def attribute(
        self,
        x: torch.Tensor,
        target: int | None = None,
        progress: Callable[[AblationProgress], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        decoder: SiftDecoder | None = None,
    ) -> SiftAblationOutput:
        """Optimise the keypoint-gain path for x [C, H, W]; `decoder` reuses a decomposition of x."""
        with torch.inference_mode(False), torch.enable_grad():
            return self._attribute(x.detach().clone().float(), target, progress, should_stop, decoder)

    def _probabilities(self, images: torch.Tensor) -> torch.Tensor:
        return S.class_probabilities(self.classifier, images)

    def _attribute(self, x, target, progress, should_stop, decoder) -> SiftAblationOutput:
        cfg = self.config
        t_run = time.perf_counter()
        if x.dim() != 3:
            raise InvalidArgument(f"x has shape {tuple(x.shape)}; give one image [C, H, W]")
        timings = {"keypoints": 0.0, "decompose": 0.0, "model": 0.0}
        if decoder is None:
            t0 = time.perf_counter()
            kp = keypoints_of(x, cfg.keypoints, self.mean, self.std)
            timings["keypoints"] = time.perf_counter() - t0
            decoder = decompose(x, kp, cfg.cells)
            timings["decompose"] = decoder.seconds
        K = decoder.num_keypoints
        weights = None
        if cfg.metric_weights:
            w = decoder.metric_weights()
            if float(w.min()) <= 0:
                raise FailedPrecondition(
                    "a keypoint's feature decodes to an all-zero image, so its metric weight "
                    "(eq. 4.45) is 0; run without metric_weights"
                )
            weights = (w / w.mean()).view(1, K)
        with torch.no_grad():
            p_x = self._probabilities(x[None])[0]
            ends = self._probabilities(decoder.decode(torch.stack([torch.ones(K), torch.zeros(K)])))
        if not (torch.isfinite(p_x).all() and torch.isfinite(ends).all()):
            raise FailedPrecondition(
                "the classifier's outputs on this image are NaN or infinite; it cannot be explained"
            )
        classes = p_x.shape[0]
        if target is None:
            target = int(p_x.argmax())
        if not 0 <= target < classes:
            raise InvalidArgument(
                f"target label {target} is out of range for a classifier with {classes} classes (0..{classes - 1})"
            )
        p_target, p_baseline = ends[0], ends[1]
        f0, f1 = float(p_target[target]), float(p_baseline[target])

        T = cfg.num_slices
        n_paths = S.num_paths(cfg.score)
        paths = torch.stack([P.affine_path(T, 1, K) for _ in range(n_paths)])  # [P, T, 1, K], eq. 4.44
        score_history: list[float] = []
        saturation_history: list[float] = []
        stop_reason, iterations = "max_iterations", 0
        probs = None
        for i in range(cfg.max_iterations):
            if should_stop is not None and should_stop():
                stop_reason = "stopped"
                break
            t0 = time.perf_counter()
            state = paths.clone().requires_grad_(True)
            value, probs, grad = self._gradient(decoder, state, target, f0, f1)
            timings["model"] += time.perf_counter() - t0
            _check_gradient(grad, value, i)
            score_history.append(float(value.detach()))
            with torch.no_grad():
                g = grad if weights is None else grad / weights  # gradient in the metric of eq. 4.45
                g = g - weighted_mean(g, weights)  # mass-neutral step (Algorithm 2 line 6)
                norm = g.abs().amax(dim=(1, 2, 3), keepdim=True)  # L-inf step per path (sec. 2.8.2)
                g = torch.where(norm > 0, g / torch.where(norm > 0, norm, torch.ones_like(norm)), torch.zeros_like(g))
                new = paths + cfg.step_size * g  # no spatial filtering (sec. 4.3.2)
                zeta = cfg.saturation * ((i + 1) / cfg.max_iterations if cfg.ramp_saturation else 1.0)
                new = P.saturate(new, zeta)  # eq. 2.26
                if n_paths == 2:
                    new[1] = P.pinch(new[0], new[1], cfg.pinch)  # eq. 2.27
                paths = constant_speed(P.project_monotone_clamped(new), weights)  # lines 12-15
                sat = float(saturation(paths, weights).mean())
            saturation_history.append(sat)
            iterations = i + 1
            if progress is not None:
                full = self._full_probs(paths, probs.detach(), p_target, p_baseline)
                v, _ = R.reduce(cfg.reduction, cfg.score, paths, full, target)
                heat = R.to_unit(decoder.voronoi(v[0])[0], signed=cfg.reduction in R.SIGNED)
                progress(AblationProgress(iterations, cfg.max_iterations, score_history[-1], sat, heat))
            if sat > cfg.stop_saturation:
                stop_reason = "saturation"
                break

        with torch.no_grad():
            t0 = time.perf_counter()
            value, probs = self._evaluate(decoder, paths, target, f0, f1)
            timings["model"] += time.perf_counter() - t0
            full = self._full_probs(paths, probs, p_target, p_baseline)
            v, k = R.reduce(cfg.reduction, cfg.score, paths, full, target)
            vor, band = extract(
                decoder,
                v[0],
                signed=cfg.reduction in R.SIGNED,
                mean=self.mean,
                std=self.std,
                sigma_lp=cfg.sigma_lp,
                sigma_hp=cfg.sigma_hp,
            )
            gains = 1.0 - P.with_boundaries(paths)[..., 0, :]  # [P, T + 2, K]
        timings["run"] = time.perf_counter() - t_run
        return SiftAblationOutput(
            keypoints=decoder.keypoints,
            decoder=decoder,
            gains=gains[0],
            gains_down=gains[1] if n_paths == 2 else None,
            times=P.all_times(T),
            probabilities=full[0],
            probabilities_down=full[1] if n_paths == 2 else None,
            keypoint_scores=v[0],
            heatmap_voronoi=vor,
            heatmap_bandpass=band,
            transition_index=k,
            score=float(value),
            score_history=score_history,
            saturation_history=saturation_history,
            stop_reason=stop_reason,
            iterations=iterations,
            target=target,
            baseline_changes_class=bool(int(p_baseline.argmax()) != target),
            metric_weights=None if weights is None else weights[0],
            timings=timings,
        )

    def _gradient(self, decoder: SiftDecoder, state: torch.Tensor, target: int, f0: float, f1: float):
        """(score, class probabilities, gradient direction of the score with respect to the path).

        The score is differentiated in float64 down to the logits and the logits' gradient scaled to
        a largest entry of 1 before it goes back through the float32 classifier and decoder: for a
        confident classifier (logit gap of a few hundred) dP/dlogits is ~1e-120, exact in float64
        but zero in float32. Only the direction matters (the step is L-inf normalised, sec. 2.8.2).
        """
        masks = S.slice_masks(self.config.score, state)
        logits = self.classifier(decoder.decode(1.0 - masks[:, 0, :]))
        if logits.dim() != 2:
            raise FailedPrecondition(
                f"the classifier returned shape {tuple(logits.shape)}; a classifier must return logits [B, K]"
            )
        leaf = logits.detach().double().requires_grad_(True)
        probs = torch.log_softmax(leaf, dim=1).exp()
        value = S.score_value(self.config.score, probs[:, target], f0, f1, state.shape[1])
        (g,) = torch.autograd.grad(value, leaf)
        top = g.abs().max()
        if torch.isfinite(top) and top > 0:
            g = g / top
        (grad,) = torch.autograd.grad(logits, state, grad_outputs=g.to(logits.dtype))
        return value.detach().float(), probs.detach().float(), grad

    def _evaluate(self, decoder: SiftDecoder, paths: torch.Tensor, target: int, f0: float, f1: float):
        """One batched pass: (score, class probabilities of the evaluated slices), differentiable in paths."""
        masks = S.slice_masks(self.config.score, paths)  # [B, 1, K]
        images = decoder.decode(1.0 - masks[:, 0, :])  # eq. 4.43: theta = (1 - phi) 1 + phi 0
        probs = self._probabilities(images)
        return S.score_value(self.config.score, probs[:, target], f0, f1, paths.shape[1]), probs

    def _full_probs(self, paths, probs, p_target, p_baseline) -> torch.Tensor:
        """[P, T + 2, classes] along each path from the evaluated slices and both ends."""
        T = paths.shape[1]
        out = [torch.cat([p_target[None], probs[:T], p_baseline[None]])]
        if self.config.score == "straddling":
            out.append(torch.cat([p_target[None], probs[T : 2 * T], p_baseline[None]]))
        return torch.stack(out)


def _check_gradient(grad: torch.Tensor, value: torch.Tensor, iteration: int) -> None:
    """A classifier without usable gradients fails the run instead of returning a meaningless path."""
    if not torch.isfinite(value):
        raise FailedPrecondition(
            f"the classifier's score along the path is {float(value)} at iteration {iteration + 1}; "
            "its outputs are not finite on these inputs"
        )
    largest = float(grad.abs().max())
    if not math.isfinite(largest):
        raise FailedPrecondition(
            f"the classifier's gradients with respect to the keypoint gains are NaN or infinite at "
            f"iteration {iteration + 1}; SIFT ablation needs a differentiable classifier"
        )
    if largest == 0.0:
        raise FailedPrecondition(
            f"the classifier's gradients with respect to the keypoint gains are all zero at iteration "
            f"{iteration + 1}; its output does not respond to the image, so no path can be optimised"
        )
