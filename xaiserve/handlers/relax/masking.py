"""How a mask removes information from the image ([RELAX] sec. 3.1 and Appendix A; [SSL-XAI] sec.
3.2.3 and 5.4).

Every strategy has the form   x_bar = fill + M_eff * (keep - fill),   broadcast over channels, on the
model's normalised input; the reference representation is always h = f(x) (eq. 1).

- "zero"  (sec. 3.1, "pixel scaling"): keep = x, fill = 0, i.e. x_bar = x * M. On the normalised
  tensor, 0 is the dataset mean.
- "noise" (Appendix A, eq. A1): fill = D with D_ij ~ N(mu, sigma) drawn afresh for every mask, in
  normalised units (so N(0, 1) is the per-channel data distribution). Eq. A1 prints
  X*M - D*(1-M); the minus sign is a typo for the blend described in the text (METHODS.md).
- Perceptual components ([SSL-XAI]): the masked-out part is replaced by the image deprived of one
  concept, computed in pixel space ([0, 1], undoing the model's mean/std):
  - "colour":     fill = grayscale(x) (ITU-R 601 luma), exactly X_MC of sec. 3.2.3.
  - "shape":      keep = edge map E(x) (Canny), fill = 0 (black): X_MS = E * M of sec. 3.2.3, the
                  masks applied directly to the edge map (sec. 5.4).
  - "texture":    fill = Gaussian blur of x, and M_eff = max(M, E) so edges are never blurred
                  (M_t = M OR E of sec. 3.2.3). Deviation: [SSL-XAI] blurs and keeps the *grayscale*
                  image; we blur the colour image and keep x, so the masked-out part loses only its
                  texture and the reference stays h = f(x) as for every other strategy.
  - "brightness": fill = x with the CIE-LAB lightness lowered by `brightness_delta` (sec. 5.4).
  - "sharpness":  fill = x sharpened with the Laplacian kernel (sec. 5.4: "we replace the mask
                  with a ... sharpened part"; importance comes from the difference between the
                  sharpened image and the input).
  The estimator always weights by the random mask M (not M_eff).
- Canny here is the textbook pipeline in torch (Gaussian sigma 1, Sobel, non-maximum suppression,
  hysteresis with thresholds 0.1 / 0.2 of the largest gradient magnitude); [SSL-XAI] uses OpenCV's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

MASKINGS = ("zero", "noise", "colour", "shape", "texture", "brightness", "sharpness")
PERCEPTUAL = ("colour", "shape", "texture", "brightness", "sharpness")
COLOUR_ONLY = ("colour",)  # meaningless on a single-channel model

_LUMA = (0.299, 0.587, 0.114)


# --- pixel-space transforms ([C, H, W] in [0, 1]) -----------------------------------------------
def luma(img: torch.Tensor) -> torch.Tensor:
    """[C,H,W] -> [H,W] luma (ITU-R 601-2, as Pillow's "L"); single channel passes through."""
    if img.shape[0] == 1:
        return img[0]
    w = torch.tensor(_LUMA, dtype=img.dtype, device=img.device).view(3, 1, 1)
    return (img[:3] * w).sum(0)


def grayscale(img: torch.Tensor) -> torch.Tensor:
    """The image without colour, replicated to its channel count."""
    return luma(img)[None].expand_as(img).contiguous()


def _gauss1d(sigma: float, limit: int, device: torch.device | None = None) -> torch.Tensor:
    r = max(1, min(int(math.ceil(3 * sigma)), limit))
    t = torch.arange(-r, r + 1, dtype=torch.float32, device=device)
    k = torch.exp(-(t * t) / (2 * sigma * sigma))
    return k / k.sum()


def gaussian_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of [C,H,W], reflect padding (radius 3 sigma, capped by the image)."""
    c, h, w = img.shape
    k = _gauss1d(sigma, min(h, w) - 1, img.device).to(img.dtype)
    r = k.numel() // 2
    x = img[:, None]  # [C,1,H,W], channels as batch
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))
    return x[:, 0]


def _shifted(a: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """a[y + dy, x + dx] with replicated borders."""
    h, w = a.shape
    p = F.pad(a[None, None], (1, 1, 1, 1), mode="replicate")[0, 0]
    return p[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]


def canny(gray: torch.Tensor, *, sigma: float = 1.0, low: float = 0.1, high: float = 0.2) -> torch.Tensor:
    """Binary edge map [H,W] (bool) of a [H,W] image: blur, Sobel, non-maximum suppression, hysteresis."""
    g = gaussian_blur(gray[None], sigma)[0] if min(gray.shape) > 1 else gray
    gx = (_shifted(g, -1, 1) + 2 * _shifted(g, 0, 1) + _shifted(g, 1, 1)) - (
        _shifted(g, -1, -1) + 2 * _shifted(g, 0, -1) + _shifted(g, 1, -1)
    )
    gy = (_shifted(g, 1, -1) + 2 * _shifted(g, 1, 0) + _shifted(g, 1, 1)) - (
        _shifted(g, -1, -1) + 2 * _shifted(g, -1, 0) + _shifted(g, -1, 1)
    )
    mag = torch.hypot(gx, gy)
    top = float(mag.max())
    if top <= 0:
        return torch.zeros_like(gray, dtype=torch.bool)
    # quantise the gradient direction to 0, 45, 90, 135 degrees (rows grow downwards)
    sector = torch.remainder(torch.round(torch.atan2(gy, gx) / (math.pi / 4)), 4).long()
    keep = torch.zeros_like(mag, dtype=torch.bool)
    for k, (dy, dx) in enumerate(((0, 1), (1, 1), (1, 0), (1, -1))):
        local = (mag >= _shifted(mag, dy, dx)) & (mag >= _shifted(mag, -dy, -dx))
        keep |= (sector == k) & local
    nms = torch.where(keep, mag, torch.zeros_like(mag))
    strong = nms >= high * top
    weak = nms >= low * top
    # hysteresis: grow strong edges along 8-connected weak ones until nothing changes
    for _ in range(gray.numel()):
        grown = weak & (F.max_pool2d(strong[None, None].float(), 3, 1, 1)[0, 0] > 0)
        if torch.equal(grown, strong):
            break
        strong = grown
    return strong


def _srgb_to_linear(c: torch.Tensor) -> torch.Tensor:
    return torch.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def _linear_to_srgb(c: torch.Tensor) -> torch.Tensor:
    return torch.where(c <= 0.0031308, 12.92 * c, 1.055 * c.clamp_min(0) ** (1 / 2.4) - 0.055)


_RGB2XYZ = torch.tensor(
    [[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750], [0.0193339, 0.1191920, 0.9503041]],
    dtype=torch.float64,
)
_WHITE = torch.tensor([0.95047, 1.0, 1.08883], dtype=torch.float64)
_D = 6 / 29


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB [3,H,W] in [0,1] -> CIE-LAB [3,H,W] (D65): L in [0,100]."""
    m, white = _RGB2XYZ.to(rgb.device), _WHITE.to(rgb.device)  # module constants live on the CPU
    xyz = torch.einsum("ij,jhw->ihw", m, _srgb_to_linear(rgb.double())) / white.view(3, 1, 1)
    f = torch.where(xyz > _D**3, xyz.clamp_min(0) ** (1 / 3), xyz / (3 * _D * _D) + 4 / 29)
    return torch.stack([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """CIE-LAB [3,H,W] -> sRGB [3,H,W] clipped to [0,1]."""
    fy = (lab[0] + 16) / 116
    f = torch.stack([fy + lab[1] / 500, fy, fy - lab[2] / 200])
    xyz = torch.where(f > _D, f**3, 3 * _D * _D * (f - 4 / 29)) * _WHITE.to(lab.device).view(3, 1, 1)
    lin = torch.einsum("ij,jhw->ihw", torch.linalg.inv(_RGB2XYZ).to(lab.device), xyz)
    return _linear_to_srgb(lin).clamp(0, 1)


def darken(img: torch.Tensor, delta_l: float) -> torch.Tensor:
    """Lower the CIE-LAB lightness by delta_l ([SSL-XAI] sec. 5.4, "Brightness"); gray stays gray."""
    rgb = img if img.shape[0] == 3 else img[:1].expand(3, -1, -1)
    lab = rgb_to_lab(rgb)
    lab = torch.stack([(lab[0] - delta_l).clamp(0, 100), lab[1], lab[2]])
    out = lab_to_rgb(lab).to(img.dtype)
    return out if img.shape[0] == 3 else out[:1].expand_as(img).contiguous()


def sharpen(img: torch.Tensor) -> torch.Tensor:
    """Laplacian sharpening x - lap(x), kernel [[0,-1,0],[-1,5,-1],[0,-1,0]] ([SSL-XAI] sec. 5.4)."""
    k = torch.tensor([[0.0, -1.0, 0.0], [-1.0, 5.0, -1.0], [0.0, -1.0, 0.0]], dtype=img.dtype, device=img.device).view(
        1, 1, 3, 3
    )
    out = F.conv2d(F.pad(img[:, None], (1, 1, 1, 1), mode="replicate"), k)[:, 0]
    return out.clamp(0, 1)


# --- the perturbation ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Perturbation:
    """x_bar = fill + M_eff * (keep - fill) with M_eff = max(M, floor) when `floor` is set.

    keep/fill are [C,H,W] in the model's normalised units; fill None means zeros; `noise` =
    (mean, std) draws the fill afresh per mask from the noise generator.
    """

    keep: torch.Tensor
    fill: torch.Tensor | None = None
    noise: tuple[float, float] | None = None
    floor: torch.Tensor | None = None

    def apply(self, masks: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """masks [B,H,W] -> masked inputs [B,C,H,W] (float32, contiguous)."""
        m = masks if self.floor is None else torch.maximum(masks, self.floor)
        m = m[:, None].to(self.keep.dtype)
        if self.noise is not None:
            mu, sd = self.noise
            fill = torch.randn(
                (masks.shape[0], *self.keep.shape), generator=generator, dtype=self.keep.dtype, device=self.keep.device
            )
            fill = fill.mul_(sd).add_(mu)
            return torch.addcmul(fill, m, self.keep[None] - fill)
        if self.fill is None:
            return self.keep[None] * m
        return torch.addcmul(self.fill[None], m, (self.keep - self.fill)[None])


def make_perturbation(
    x: torch.Tensor,
    masking: str = "zero",
    *,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    noise_mean: float = 0.0,
    noise_std: float = 1.0,
    blur_sigma: float = 0.0,
    brightness_delta: float = 30.0,
) -> Perturbation:
    """Build the perturbation of a normalised image x [C,H,W]; mean/std undo the normalisation for
    the perceptual transforms (default: x is already in [0,1]). blur_sigma 0 = max(1, min(H,W)/32)."""
    if masking not in MASKINGS:
        raise ValueError(f"unknown masking {masking!r}; use one of {MASKINGS}")
    x = x.to(torch.float32).contiguous()
    if masking == "zero":
        return Perturbation(x)
    if masking == "noise":
        return Perturbation(x, noise=(float(noise_mean), float(noise_std)))
    c, h, w = x.shape
    mu = torch.tensor(mean if mean is not None else (0.0,) * c, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    sd = torch.tensor(std if std is not None else (1.0,) * c, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    img = (x * sd + mu).clamp(0, 1)

    def norm(a: torch.Tensor) -> torch.Tensor:
        return ((a - mu) / sd).to(torch.float32).contiguous()

    if masking == "colour":
        if c != 3:
            raise ValueError("colour masking needs a 3-channel (RGB) model")
        return Perturbation(x, fill=norm(grayscale(img)))
    if masking == "shape":
        edges = canny(luma(img)).to(torch.float32)
        return Perturbation(norm(edges[None].expand(c, h, w)), fill=norm(torch.zeros_like(img)))
    if masking == "texture":
        sigma = blur_sigma if blur_sigma > 0 else max(1.0, min(h, w) / 32)
        edges = canny(luma(img)).to(torch.float32)
        return Perturbation(x, fill=norm(gaussian_blur(img, sigma)), floor=edges)
    if masking == "brightness":
        return Perturbation(x, fill=norm(darken(img, brightness_delta)))
    return Perturbation(x, fill=norm(sharpen(img)))  # sharpness
