"""sift_rise: RISE / RELAX-style random sampling of keypoint gains (beyond [THESIS]; sec. 4.4 names it).

    out = SiftRise(forward, SiftRiseConfig(num_masks=1000), kind="classifier", mean=..., std=...).attribute(x)
    out.importance, out.uncertainty, out.std_error     # [K], one value per keypoint
    out.heatmap_voronoi, out.heatmap_bandpass           # [H, W]

Sec. 4.3.2 / 4.4: with the SIFT basis "the feature could be directly turned on or off individually",
with none of the sub-resolution choices pixel RISE needs. Each mask M(n) in {0, 1}^K switches every
keypoint on with probability p_keep (independently); the image D_SIFT(M(n)) goes through the
model and gives the score s_n: the target-class probability for a classifier (RISE), the cosine
similarity of the representation to that of x for an encoder ([RELAX] eq. 3). Per keypoint the
one-pass weighted estimator of handlers.relax (Algorithm 1 / eq. 12-13 of [RELAX], batched with
Chan's merge) gives the importance R_j = sum_n M_j(n) s_n / sum_n M_j(n) = E[s | keypoint j on]
and the uncertainty U_j, the weighted variance of s over the masks that keep j, plus the
standard error of R_j. No optimisation, no interpolation: the model runs forward only (ONNX works).

Heatmaps: the importance min-max scaled to [0, 1] (R_j - E[s] orders the keypoints the same way:
E[s | on] - E[s | off] = (R_j - E[s]) / (1 - p_keep)) through the two extractions of
heatmaps.extract (eq. 4.46-4.48).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch

from xaiserve.errors import Cancelled, FailedPrecondition, InvalidArgument
from xaiserve.handlers.relax import estimator as est
from xaiserve.handlers.relax.relax import cosine
from xaiserve.handlers.sift.ablation import check_heatmap_sigmas, keypoints_of
from xaiserve.handlers.sift.decomposition import DecompositionConfig, SiftDecoder, decompose
from xaiserve.handlers.sift.heatmaps import SIGMA_HP, SIGMA_LP, extract
from xaiserve.handlers.sift.keypoints import KeypointConfig, Keypoints

KINDS = ("classifier", "encoder")


@dataclass(frozen=True)
class SiftRiseConfig:
    """Parameters. N = 1000 masks: with K ~ 20-100 keypoints each R_j averages ~500 scores, a
    standard error of ~0.02 std(s) (RISE's 4000-8000 masks are for pixel grids)."""

    keypoints: KeypointConfig = KeypointConfig()
    cells: DecompositionConfig = DecompositionConfig()
    num_masks: int = 1000
    p_keep: float = 0.5
    batch_size: int = 64
    seed: int = 0
    w_init: float = 1e-8  # Algorithm 1's initial W
    sigma_lp: float = SIGMA_LP
    sigma_hp: float = SIGMA_HP

    def check(self) -> None:
        self.keypoints.check()
        self.cells.check()
        if not 1 <= self.num_masks <= 1_000_000:
            raise InvalidArgument(f"num_masks is {self.num_masks}; use 1 to 1000000 (default 1000)")
        if not (math.isfinite(self.p_keep) and 0 < self.p_keep < 1):
            raise InvalidArgument(f"p_keep is {self.p_keep}; the probability of keeping a keypoint must be in (0, 1)")
        if not 1 <= self.batch_size <= 4096:
            raise InvalidArgument(f"batch_size is {self.batch_size}; use 1 to 4096 (default 64)")
        if not -(2**63) <= self.seed < 2**63:
            raise InvalidArgument("seed must fit in a signed 64-bit integer")
        check_heatmap_sigmas(self.sigma_lp, self.sigma_hp)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SiftRiseProgress:
    num_masks: int
    max_masks: int
    heatmap: torch.Tensor  # [H, W] Voronoi heatmap of the current importance
    max_std_error: float

    @property
    def fraction(self) -> float:
        return min(1.0, self.num_masks / self.max_masks)


@dataclass
class SiftRiseOutput:
    keypoints: Keypoints
    decoder: SiftDecoder
    importance: torch.Tensor  # [K] R_j = E[s | j on] (eq. 12 of [RELAX] per keypoint)
    uncertainty: torch.Tensor  # [K] U_j, weighted variance of s over the masks keeping j (eq. 13)
    std_error: torch.Tensor  # [K] standard error of R_j
    heatmap_voronoi: torch.Tensor  # [H, W] in [0, 1]
    heatmap_bandpass: torch.Tensor  # [H, W] in [0, 1]
    num_masks: int
    mean_score: float  # E[s] over all masks
    reference_score: float  # s of D(1) (~ x): the probability of the target, or 1 for an encoder
    target: int  # -1 for an encoder
    timings: dict[str, float] = field(default_factory=dict)  # seconds: keypoints, decompose, model, run


def normalised(v: torch.Tensor) -> torch.Tensor:
    """Min-max scaling of v [K] to [0, 1] (all zeros when v is constant)."""
    lo, hi = float(v.min()), float(v.max())
    return (v - lo) / (hi - lo) if hi > lo else torch.zeros_like(v)


class SiftRise:
    """Random on/off keypoint gains for a model `forward` (a batch [B, C, H, W] -> [B, D]: logits
    for kind "classifier", a representation for "encoder")."""

    def __init__(
        self,
        forward: Callable[[torch.Tensor], torch.Tensor],
        config: SiftRiseConfig | None = None,
        *,
        kind: str = "classifier",
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ):
        if kind not in KINDS:
            raise InvalidArgument(f"sift_rise explains a classifier or an encoder, not a {kind}")
        self.forward = forward
        self.config = config or SiftRiseConfig()
        self.config.check()
        self.kind = kind
        self.mean, self.std = mean, std

    def _outputs(self, images: torch.Tensor) -> torch.Tensor:
        out = self.forward(images)
        out = out[0] if isinstance(out, (tuple, list)) else out
        out = torch.as_tensor(out).reshape(images.shape[0], -1)
        if not torch.isfinite(out).all():
            raise FailedPrecondition("the model's outputs are NaN or infinite on the reconstructed images")
        return out

    @torch.no_grad()
    def attribute(
        self,
        x: torch.Tensor,
        target: int | None = None,
        progress: Callable[[SiftRiseProgress], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        decoder: SiftDecoder | None = None,
    ) -> SiftRiseOutput:
        """Importance and uncertainty of every keypoint of x [C, H, W]; `should_stop` is asked before
        every batch (true ends the run with the masks so far; before the first batch: Cancelled)."""
        cfg = self.config
        t_run = time.perf_counter()
        if x.dim() != 3:
            raise InvalidArgument(f"x has shape {tuple(x.shape)}; give one image [C, H, W]")
        x = x.detach().float()
        timings = {"keypoints": 0.0, "decompose": 0.0, "model": 0.0}
        if decoder is None:
            t0 = time.perf_counter()
            kp = keypoints_of(x, cfg.keypoints, self.mean, self.std)
            timings["keypoints"] = time.perf_counter() - t0
            decoder = decompose(x, kp, cfg.cells)
            timings["decompose"] = decoder.seconds
        K = decoder.num_keypoints
        t0 = time.perf_counter()
        ref = self._outputs(torch.cat([x[None], decoder.decode(torch.ones(K))]))  # f(x), f(D(1))
        timings["model"] += time.perf_counter() - t0
        if self.kind == "classifier":
            classes = ref.shape[1]
            if target is None:
                target = int(ref[0].argmax())
            if not 0 <= target < classes:
                raise InvalidArgument(
                    f"target label {target} is out of range for a classifier with {classes} classes (0..{classes - 1})"
                )

            def score(out: torch.Tensor) -> torch.Tensor:
                return torch.log_softmax(out.double(), dim=1).exp()[:, target]
        else:
            if target is not None:
                raise InvalidArgument("target_label applies to classifiers; an encoder's representation has no labels")
            h = ref[:1]

            def score(out: torch.Tensor) -> torch.Tensor:
                return cosine(h, out).double()

        reference = float(score(ref[1:2])[0])
        gen = torch.Generator().manual_seed(cfg.seed)
        stats = est.init_stats((K,), w_init=cfg.w_init)
        n, total = 0, 0.0
        while n < cfg.num_masks:
            if should_stop is not None and should_stop():
                break
            b = min(cfg.batch_size, cfg.num_masks - n)
            masks = (torch.rand((b, K), generator=gen) < cfg.p_keep).to(torch.float32)
            t0 = time.perf_counter()
            s = score(self._outputs(decoder.decode(masks)))
            timings["model"] += time.perf_counter() - t0
            stats = est.update_batch(stats, masks, s)
            total += float(s.sum())
            n += b
            if progress is not None:
                se = est.standard_error(stats)
                heat = decoder.voronoi(normalised(stats.mean.float()))[0].clamp(0.0, 1.0)
                progress(SiftRiseProgress(n, cfg.num_masks, heat, float(se.max())))
        if n == 0:
            raise Cancelled("sift_rise was stopped before the first batch of masks; there is no result")
        importance = stats.mean.float()
        vor, band = extract(
            decoder, normalised(importance), mean=self.mean, std=self.std, sigma_lp=cfg.sigma_lp, sigma_hp=cfg.sigma_hp
        )
        timings["run"] = time.perf_counter() - t_run
        return SiftRiseOutput(
            keypoints=decoder.keypoints,
            decoder=decoder,
            importance=importance,
            uncertainty=est.variance(stats).float(),
            std_error=est.standard_error(stats).float(),
            heatmap_voronoi=vor,
            heatmap_bandpass=band,
            num_masks=n,
            mean_score=total / n,
            reference_score=reference,
            target=-1 if target is None else target,
            timings=timings,
        )
