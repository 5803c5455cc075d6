"""RELAX and U-RELAX ([RELAX], sec. 3): the method object, pure torch, no I/O.

    relax = Relax(embed, RelaxConfig(num_masks=3000))
    out = relax.attribute(x)            # x [C,H,W], normalised as the model expects
    out.importance, out.uncertainty, out.u_relax, out.num_masks, out.achieved_error

`embed` maps a float32 batch [B,C,H,W] to embeddings [B,D] (an ONNX Runtime session, a torch
module, anything). Per batch of masks: generate the masks (masks.py), mask the image (masking.py),
embed, s = cosine similarity to h = f(x) (eq. 3), and merge the batch into the running weighted
statistics (estimator.py, eq. 12-13). After the last batch: U-RELAX (uncertainty.py, eq. 10-11).

Importance is the weighted mean of Algorithm 1, R = sum_n M(n) s_n / sum_n M(n) (eq. 12; the
Parzen form of eq. 7). Eq. 2 divides by N instead; the two differ by the per-pixel factor W/N,
which tends to E[M_ij] = p for every pixel.

Number of masks: a fixed N (default 3000, as in the paper), or `adaptive`: stop after the first
batch at which every pixel's standard error of R is below `target_error` (never before
`min_masks`; at most `num_masks`). Theorem 1's bound is distribution-free and much larger (26,492
masks for t = delta = 0.01); the standard error uses the observed variance instead.

Devices: everything runs on x's device (the caller puts x where the model is): the masks are drawn
there from a generator of that device, masked there, embedded in forward chunks of at most
`forward_batch` images, and the statistics are kept there in float64; the outputs are tensors on
that device. A chunk that runs out of memory is halved and retried (xaiserve.devices.run_chunked;
`on_oom` is told), which changes neither the masks nor the result.

Estimator of R (`estimator`, beyond [RELAX]): "plain" is Algorithm 1's weighted mean of s;
"control_variate" (control_variate.py) estimates the same R (eq. 12) from similarities adjusted by
a regression on pooled mask features fitted on earlier batches, with a smaller standard error for
the same N; "auto" (default) is plain for a fixed N (the paper's estimator) and the control
variate for the adaptive rule, where a smaller standard error means fewer masks. U (eq. 13) and
U-RELAX always use the weighted variance of s itself.
"""

from __future__ import annotations

import contextlib
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from xaiserve.devices import ChunkSize, run_chunked
from xaiserve.errors import Cancelled, InvalidArgument
from xaiserve.handlers.relax import control_variate as cv
from xaiserve.handlers.relax import estimator as est
from xaiserve.handlers.relax.masking import COLOUR_ONLY, MASKINGS, make_perturbation
from xaiserve.handlers.relax.masks import generate_masks, mask_geometry
from xaiserve.handlers.relax.uncertainty import THRESHOLD_RULES, threshold, u_relax

Embed = Callable[[torch.Tensor], torch.Tensor]

# a fixed odd constant to derive the noise generator's seed from the mask seed (splitmix64's)
_NOISE_SEED_SALT = 0x9E3779B97F4A7C15

ESTIMATORS = ("auto", "plain", "control_variate")


@dataclass(frozen=True)
class RelaxConfig:
    """RELAX parameters; defaults from METHODS.md / [RELAX] (N = 3000, 7x7 cells, p = 0.5, zero
    masking, U-RELAX threshold = median with gamma = 1)."""

    num_masks: int = 3000  # fixed N; with adaptive, the maximum
    cells: int = 7  # h = w grid cells (sec. 3.1)
    p_keep: float = 0.5  # probability a cell is kept (sec. 3.1)
    masking: str = "zero"  # see masking.MASKINGS
    noise_mean: float = 0.0  # noise masking (Appendix A), normalised units
    noise_std: float = 1.0
    adaptive: bool = False  # stop when every pixel's standard error of R < target_error
    target_error: float = 0.01
    min_masks: int = 100  # adaptive: the standard error needs some data before it can be trusted
    threshold: str = "median"  # U-RELAX eps rule: "median" or "mean" (eq. 11)
    gamma: float = 1.0  # eps = gamma * rule(U)
    batch_size: int = 64  # masks per forward batch
    two_pass: bool = False  # recompute R and U with the two-pass estimator at the end (Appendix D)
    seed: int = 0  # torch.Generator seed for the masks (noise uses a derived seed)
    w_init: float = 1e-8  # Algorithm 1's initial W ("small positive number")
    blur_sigma: float = 0.0  # texture masking blur in pixels; 0 = max(1, min(H, W) / 32)
    brightness_delta: float = 30.0  # brightness masking: CIE-LAB lightness decrease (of 100)
    # estimator of R: "plain" (Algorithm 1), "control_variate" (control_variate.py, beyond [RELAX])
    # or "auto" = plain for a fixed N, control variate with `adaptive`
    estimator: str = "auto"
    cv_grid: int = 8  # control variate: masks average-pooled to cv_grid x cv_grid (capped by the image size)
    cv_quadratic: bool = True  # control variate: add the squares of the pooled features
    cv_ridge: float = 16.0  # control variate: ridge penalty, in masks' worth of feature variance
    # control variate: the first masks (>= 1 batch, <= num_masks / 2), adjusted with slopes fitted on the later ones
    cv_min_fit: int = 256

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> InvalidArgument:
            return InvalidArgument(f"relax parameter {name} = {getattr(self, name)!r}: {why}")

        for name in ("num_masks", "cells", "min_masks", "batch_size", "seed", "cv_grid", "cv_min_fit"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise bad(name, "must be an integer")
        for name in (
            "p_keep",
            "noise_mean",
            "noise_std",
            "target_error",
            "gamma",
            "w_init",
            "blur_sigma",
            "brightness_delta",
            "cv_ridge",
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise bad(name, "must be a finite number")
        if self.num_masks < 1:
            raise bad("num_masks", "need at least 1 mask (the paper uses 3000)")
        if self.cells < 1:
            raise bad("cells", "need at least 1 grid cell per side (default 7)")
        if not 0.0 < self.p_keep < 1.0:
            raise bad("p_keep", "the probability of keeping a cell must be strictly between 0 and 1 (default 0.5)")
        if self.masking not in MASKINGS:
            raise bad("masking", f"use one of {', '.join(MASKINGS)}")
        if self.noise_std < 0:
            raise bad("noise_std", "must be >= 0")
        if not self.target_error > 0:
            raise bad("target_error", "must be > 0 (default 0.01)")
        if self.min_masks < 1:
            raise bad("min_masks", "must be >= 1")
        if self.threshold not in THRESHOLD_RULES:
            raise bad("threshold", f"use one of {', '.join(THRESHOLD_RULES)}")
        if not self.gamma > 0:
            raise bad("gamma", "must be > 0 (default 1)")
        if self.batch_size < 1:
            raise bad("batch_size", "must be >= 1")
        if not -(2**63) <= self.seed < 2**63:
            raise bad("seed", "must fit in a signed 64-bit integer")
        if self.w_init < 0:
            raise bad("w_init", "must be >= 0")
        if self.blur_sigma < 0:
            raise bad("blur_sigma", "must be >= 0 (0 = automatic)")
        if not 0 <= self.brightness_delta <= 100:
            raise bad("brightness_delta", "is a CIE-LAB lightness change, between 0 and 100")
        if not isinstance(self.estimator, str) or self.estimator not in ESTIMATORS:
            raise bad(
                "estimator",
                f"use one of {', '.join(ESTIMATORS)} (default auto: plain for a fixed N, "
                "control_variate with adaptive)",
            )
        if not isinstance(self.cv_quadratic, bool):
            raise bad("cv_quadratic", "must be true or false")
        if self.cv_grid < 1:
            raise bad("cv_grid", "the control variate's pooling grid needs at least 1 cell per side (default 8)")
        if self.cv_ridge < 0:
            raise bad("cv_ridge", "must be >= 0 (default 16)")
        if self.cv_min_fit < 0:
            raise bad("cv_min_fit", "must be >= 0 (default 256)")

    @property
    def resolved_estimator(self) -> str:
        """The estimator actually used: "auto" -> "control_variate" when adaptive, else "plain"."""
        if self.estimator == "auto":
            return "control_variate" if self.adaptive else "plain"
        return self.estimator

    def check_image(self, channels: int, height: int, width: int) -> None:
        """Checks that need the image size: raise InvalidArgument naming the parameter."""
        if self.cells > min(height, width):
            raise InvalidArgument(
                f"relax parameter cells = {self.cells} is larger than the {height} x {width} model input; use 1..{min(height, width)}"
            )
        if self.masking in COLOUR_ONLY and channels != 3:
            raise InvalidArgument(
                f"masking {self.masking!r} needs an RGB model; this model takes {channels} channel(s)"
            )

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class RelaxProgress:
    """Reported after every batch of masks."""

    num_masks: int  # masks processed so far
    max_masks: int
    fraction: float  # estimated fraction done (adaptive: from the standard error's 1/sqrt(n) decay)
    importance: torch.Tensor  # current R [H,W] float32
    max_std_error: float  # max over pixels of the standard error of R
    seconds: float
    masks_per_second: float


@dataclass(frozen=True)
class RelaxOutput:
    importance: torch.Tensor  # [H,W] float32, R (eq. 12; by the control variate if `estimator` says so)
    uncertainty: torch.Tensor  # [H,W] float32, U / (W - 1) (eq. 13, Algorithm 1)
    u_relax: torch.Tensor  # [H,W] float32, eq. 10
    threshold: float  # eps used for U-RELAX (eq. 11 or median)
    num_masks: int  # N actually used
    achieved_error: float  # max over pixels of the standard error of R
    std_error: torch.Tensor  # [H,W] float32, standard error of R per pixel
    seconds: float  # wall time of attribute()
    model_seconds: float  # time spent inside embed()
    masks_per_second: float
    wait_seconds: float = 0.0  # time the main loop waited for the mask worker (should be ~0)
    stats_seconds: float = 0.0  # similarity + running statistics + standard error
    stopped: bool = False  # should_stop() ended the run early
    converged: bool = False  # adaptive: every pixel's standard error reached target_error
    estimator: str = "plain"  # the estimator of R actually used ("plain" or "control_variate")
    forward_batch: int = 0  # images per forward call at the end (below batch_size after out-of-memory halvings)


def cosine(h: torch.Tensor, hb: torch.Tensor) -> torch.Tensor:
    """eq. 3: cosine similarity of the reference embedding h [1,D] with each row of hb [B,D]."""
    return F.cosine_similarity(hb.float(), h.float().expand_as(hb), dim=1, eps=1e-8)


class Relax:
    """RELAX with uncertainty ([RELAX]). `mean`/`std` (the model's normalisation) are needed only
    by the perceptual maskings, which work in pixel space."""

    def __init__(
        self,
        embed: Embed,
        config: RelaxConfig = RelaxConfig(),
        *,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        forward_batch: int | None = None,
        on_oom: Callable[[int, int], None] | None = None,
    ):
        self.embed = embed
        self.config = config
        self.mean = mean
        self.std = std
        self.forward_batch = forward_batch  # None: batch_size (one forward per batch of masks)
        self.on_oom = on_oom  # (old, new) forward chunk size after an out-of-memory error

    def _embed(self, batch: torch.Tensor) -> torch.Tensor:
        out = self.embed(batch)
        if not isinstance(out, torch.Tensor):
            out = torch.as_tensor(out, device=batch.device)
        return out.reshape(batch.shape[0], -1)

    def _embed_chunked(self, batch: torch.Tensor, chunk: ChunkSize) -> torch.Tensor:
        parts = run_chunked(lambda a, b: self._embed(batch[a:b]), batch.shape[0], chunk)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def attribute(
        self,
        x: torch.Tensor,
        progress: Callable[[RelaxProgress], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> RelaxOutput:
        """Explain the representation of x [C,H,W]. `progress` is called after every batch;
        `should_stop` before every batch (True ends the run with the masks so far)."""
        cfg = self.config
        if x.ndim != 3:
            raise InvalidArgument(f"x must be [C, H, W], got shape {list(x.shape)}")
        c, h, w = (int(v) for v in x.shape)
        cfg.check_image(c, h, w)
        t_start = time.perf_counter()
        geom = mask_geometry(h, w, cfg.cells)
        pert = make_perturbation(
            x.detach(),
            cfg.masking,
            mean=self.mean,
            std=self.std,
            noise_mean=cfg.noise_mean,
            noise_std=cfg.noise_std,
            blur_sigma=cfg.blur_sigma,
            brightness_delta=cfg.brightness_delta,
        )
        use_cv = cfg.resolved_estimator == "control_variate"
        spec = cv.FeatureSpec(min(cfg.cv_grid, h), min(cfg.cv_grid, w), cfg.cv_quadratic)
        dev = x.device
        c_feat = cv.feature_expectations(geom, float(cfg.p_keep), spec, dev) if use_cv else None
        g_mask = torch.Generator(device=dev).manual_seed(cfg.seed)
        g_noise = torch.Generator(device=dev).manual_seed((cfg.seed + _NOISE_SEED_SALT) % 2**64)
        chunk = ChunkSize(self.forward_batch or cfg.batch_size, dev, self.on_oom)
        default_device = torch.get_default_device()  # the mask thread creates tensors where the caller would
        mask_state = g_mask.get_state()

        model_s = wait_s = stats_s = 0.0
        with torch.no_grad():
            stats = est.init_stats((h, w), w_init=cfg.w_init, device=dev)  # of s: eq. 12-13 (U is always from s)
            # control variate: the statistics of the adjusted similarities y (R and its standard
            # error) and the regressions of s on the mask features (control_variate.CVState)
            cv_state = cv.init_state((h, w), spec.num_features, w_init=cfg.w_init, device=dev) if use_cv else None
            head = min(cfg.cv_min_fit, cfg.num_masks // 2)  # the head must leave masks to fit its slopes on
            sizes: list[int] = []
            sims: list[torch.Tensor] = []
            n, stopped, converged, fraction = 0, False, False, 0.0
            max_se = math.inf

            def make_batch(k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
                # a thread starts on the CPU default device; keep the caller's (torch.device(...) blocks)
                with torch.device(default_device) if default_device.type != "cpu" else contextlib.nullcontext():
                    masks = generate_masks(k, geom, p_keep=cfg.p_keep, generator=g_mask, dtype=est.STATS_DTYPE)
                    feats = cv.mask_features(masks, spec) if use_cv else None
                    return masks, pert.apply(masks, g_noise), (masks * masks).sum(0), feats

            # Pipelining: a worker thread draws and applies the next batch of masks (and their
            # squared-weight sum and, for the control variate, their pooled features) while the
            # model runs on the current one (ONNX Runtime and torch release the GIL). Batches are
            # still drawn one after another from the same generators, so the masks do not change;
            # the main thread keeps only the matrix product and merge.
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="relax-masks") as pool:
                pending = pool.submit(make_batch, min(cfg.batch_size, cfg.num_masks))
                t0 = time.perf_counter()
                ref = self._embed(x.detach().to(torch.float32)[None])  # h = f(x), eq. 1, for every masking
                model_s += time.perf_counter() - t0
                track = cfg.adaptive or progress is not None  # the running standard error is needed
                while n < cfg.num_masks:
                    if should_stop is not None and should_stop():
                        stopped = True
                        break
                    t0 = time.perf_counter()
                    masks, batch, w2, feats = pending.result()
                    wait_s += time.perf_counter() - t0
                    b = masks.shape[0]
                    if n + b < cfg.num_masks:
                        pending = pool.submit(make_batch, min(cfg.batch_size, cfg.num_masks - n - b))
                    t0 = time.perf_counter()
                    hb = self._embed_chunked(batch, chunk)
                    t1 = time.perf_counter()
                    model_s += t1 - t0
                    s = cosine(ref, hb)
                    stats = est.update_batch(stats, masks, s, weight_sq=w2)
                    if cv_state is not None:
                        # slopes fitted on other (earlier, or for the head later) masks only: every
                        # correction has expectation 0 (control_variate.py)
                        cv_state = cv.update(
                            cv_state, masks, s, feats, c_feat, ridge=cfg.cv_ridge, min_fit=head, weight_sq=w2
                        )
                    r_stats = stats
                    if cv_state is not None and track:
                        r_stats = cv.current(cv_state, c_feat, ridge=cfg.cv_ridge)
                    sizes.append(b)
                    sims.append(s)
                    n += b
                    if track:
                        max_se = float(est.standard_error(r_stats).max())
                    stats_s += time.perf_counter() - t1
                    if cfg.adaptive and n >= cfg.min_masks and max_se < cfg.target_error:
                        converged = True
                    fraction = max(fraction, self._fraction(n, max_se, converged))
                    if progress is not None:
                        elapsed = time.perf_counter() - t_start
                        progress(
                            RelaxProgress(
                                num_masks=n,
                                max_masks=cfg.num_masks,
                                fraction=fraction,
                                importance=r_stats.mean.to(torch.float32),
                                max_std_error=max_se,
                                seconds=elapsed,
                                masks_per_second=n / elapsed if elapsed > 0 else 0.0,
                            )
                        )
                    if converged:
                        break

            if n == 0:
                raise Cancelled("RELAX was stopped before the first batch of masks; there is no result")
            if cfg.two_pass:

                def replay():
                    g = torch.Generator(device=dev)
                    g.set_state(mask_state)
                    return (
                        generate_masks(k, geom, p_keep=cfg.p_keep, generator=g, dtype=est.STATS_DTYPE) for k in sizes
                    )

                # U (and the plain R) by the two-pass estimator; the control variate's R and standard
                # error are weighted means merged with Chan's exact formula, which two passes would not change
                stats = est.two_pass(replay, torch.cat(sims), w_init=cfg.w_init)

        r_stats = cv.current(cv_state, c_feat, ridge=cfg.cv_ridge) if cv_state is not None else stats
        std_error = est.standard_error(r_stats)
        importance = r_stats.mean.to(torch.float32)
        uncertainty = est.variance(stats).to(torch.float32)  # eq. 13: always the variance of s
        eps = threshold(uncertainty, cfg.threshold, cfg.gamma)
        seconds = time.perf_counter() - t_start
        return RelaxOutput(
            importance=importance,
            uncertainty=uncertainty,
            u_relax=u_relax(importance, uncertainty, eps),
            threshold=eps,
            num_masks=n,
            achieved_error=float(std_error.max()),
            std_error=std_error.to(torch.float32),
            seconds=seconds,
            model_seconds=model_s,
            masks_per_second=n / seconds if seconds > 0 else 0.0,
            wait_seconds=wait_s,
            stats_seconds=stats_s,
            stopped=stopped,
            converged=converged,
            estimator=cfg.resolved_estimator,
            forward_batch=chunk.size,
        )

    def _fraction(self, n: int, max_se: float, converged: bool) -> float:
        cfg = self.config
        if converged:
            return 1.0
        total = float(cfg.num_masks)
        if cfg.adaptive and math.isfinite(max_se) and max_se > 0:
            # the standard error falls like 1/sqrt(n): predict the masks needed to reach the target
            needed = n * (max_se / cfg.target_error) ** 2
            total = min(total, max(needed, float(cfg.min_masks)))
        return min(1.0, n / total)
