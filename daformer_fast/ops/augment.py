"""The math of DACS's strong augmentation (docs/recipe.md §2.5): kornia-0.5.8 colour jitter and the Gaussian blur's
taps.

Semantics are those of kornia 0.5.8 as DAFormer calls it (`ColorJitter(0.2, 0.2, 0.2, 0.2)` and
`GaussianBlur2d`), which differ from torchvision:

* brightness is **additive**: x ← clamp(x + (b − 1), 0, 1);
* contrast is **multiplicative without a mean**: x ← clamp(x·c, 0, 1);
* saturation and hue go through kornia's RGB↔HSV (eps 1e-6 in S = Δ/(V + eps), H in [0, 2π)):
  S ← clamp(S·s, 0, 1), resp. H ← fmod(H + 2π·h, 2π) (may be negative; HSV→RGB wraps it with floor/mod);
* the four ops run in a random order, drawn per sample (DAFormer calls ColorJitter on 1-image batches);
* blur: kernel size per dimension = largest odd ≤ ceil(0.1·size) (51 at 512), normalised Gaussian on integer
  offsets, reflect padding. It runs on the normalised image, which equals blurring the raw image because the
  kernel sums to 1.

`color_jitter` evaluates, at each of the 4 steps, the affine branch (brightness/contrast) and one HSV round trip
(saturation/hue) for the whole batch and selects per sample with torch.where: the whole chain is pointwise, so it
fuses under torch.compile, and the selection keeps each sample bit-identical to applying its op alone (the
original's order: `uda.augment.color_jitter_original`).

The random draws (switches, factors, order, σ) are `uda.augment.draw_strong_params`; the ops that use this math
are `ops.classmix_aug.mix_and_jitter` and `ops.classmix_aug.gaussian_blur`.

Shape legend: B batch, H/W image resolution.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from daformer_fast.utils import to_device

__all__ = [
    "JitterParams", "adjust_brightness", "adjust_contrast", "adjust_hue", "adjust_saturation", "blur_kernel_size",
    "color_jitter", "gaussian_kernel1d", "hsv_to_rgb", "jitter_normalised", "rgb_to_hsv",
]  # fmt: skip

TWO_PI = 2.0 * math.pi


class JitterParams(NamedTuple):
    """Per-sample colour-jitter parameters, kornia's conventions: factors b, c, s ∈ [0.8, 1.2], hue h ∈ [−0.2, 0.2]
    in turns, order_B4[i] a permutation of (0 brightness, 1 contrast, 2 saturation, 3 hue)."""

    brightness_B: torch.Tensor
    contrast_B: torch.Tensor
    saturation_B: torch.Tensor
    hue_B: torch.Tensor
    order_B4: torch.Tensor


# --------------------------------------------------------------------------------------------------------------
# kornia-0.5.8 colour ops on [0, 1] RGB.


def rgb_to_hsv(img01_B3HW: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RGB in [0, 1] → HSV with H in [0, 2π), S = Δ/(V + eps), V = max (kornia 0.5.8 conventions)."""
    r, g, b = img01_B3HW.unbind(-3)
    v = img01_B3HW.amax(-3)
    delta = v - img01_B3HW.amin(-3)
    s = delta / (v + eps)
    safe = torch.where(delta == 0, torch.ones_like(delta), delta)  # grey pixels: every numerator below is 0
    # Sector offset by the first channel holding the max (R, then G, then B), as kornia's tie rule.
    h = torch.where(r == v, (g - b) / safe, torch.where(g == v, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    h = (h / 6.0) % 1.0 * TWO_PI
    return torch.stack((h, s, v), dim=-3)


def hsv_to_rgb(hsv_B3HW: torch.Tensor) -> torch.Tensor:
    """HSV (H in radians, any real value: wrapped with floor/mod) → RGB, the textbook sector formula."""
    h, s, v = hsv_B3HW.unbind(-3)
    h6 = h / TWO_PI * 6.0
    sector = torch.floor(h6) % 6
    f = h6 % 6 - sector
    p = v * (1.0 - s)
    q = v * (1.0 - f * s)
    t = v * (1.0 - (1.0 - f) * s)
    # The textbook sector table (sector: R, G, B) = 0: v t p, 1: q v p, 2: p v t, 3: p q v, 4: t p v, 5: v p q,
    # written as selects rather than a lookup tensor, whose host→device copy would be a sync on CUDA.
    r = torch.where((sector == 0) | (sector == 5), v, torch.where(sector == 1, q, torch.where(sector == 4, t, p)))
    g = torch.where((sector == 1) | (sector == 2), v, torch.where(sector == 0, t, torch.where(sector == 3, q, p)))
    b = torch.where((sector == 3) | (sector == 4), v, torch.where(sector == 2, t, torch.where(sector == 5, q, p)))
    return torch.stack((r, g, b), dim=-3)


def _per_sample(x_B: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return x_B.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def adjust_brightness(img01_B3HW: torch.Tensor, factor_B: torch.Tensor) -> torch.Tensor:
    """Additive brightness: clamp(x + (factor − 1), 0, 1) (kornia's ColorJitter passes factor − 1)."""
    return (img01_B3HW + _per_sample(factor_B - 1, img01_B3HW)).clamp(0.0, 1.0)


def adjust_contrast(img01_B3HW: torch.Tensor, factor_B: torch.Tensor) -> torch.Tensor:
    """Mean-free contrast: clamp(x · factor, 0, 1)."""
    return (img01_B3HW * _per_sample(factor_B, img01_B3HW)).clamp(0.0, 1.0)


def adjust_saturation(img01_B3HW: torch.Tensor, factor_B: torch.Tensor) -> torch.Tensor:
    """S ← clamp(S · factor, 0, 1) through HSV."""
    h, s, v = rgb_to_hsv(img01_B3HW).unbind(-3)
    s = (s * _per_sample(factor_B, s)).clamp(0.0, 1.0)
    return hsv_to_rgb(torch.stack((h, s, v), dim=-3))


def adjust_hue(img01_B3HW: torch.Tensor, hue_B: torch.Tensor) -> torch.Tensor:
    """H ← fmod(H + 2π·hue, 2π) through HSV; `hue_B` in turns (kornia's ColorJitter passes hue · 2π)."""
    h, s, v = rgb_to_hsv(img01_B3HW).unbind(-3)
    h = torch.fmod(h + _per_sample(hue_B * TWO_PI, h), TWO_PI)
    return hsv_to_rgb(torch.stack((h, s, v), dim=-3))


def color_jitter(img01_B3HW: torch.Tensor, params: JitterParams) -> torch.Tensor:
    """Batched kornia-0.5.8 ColorJitter with per-sample factors and per-sample op order; input and output in [0, 1].

    Equivalent per-sample loop: `uda.augment.color_jitter_original`.
    """
    x = img01_B3HW
    shift = _per_sample(params.brightness_B - 1, x)
    contrast = _per_sample(params.contrast_B, x)
    saturation = _per_sample(params.saturation_B, x[:, 0])
    hue_rad = _per_sample(params.hue_B * TWO_PI, x[:, 0])
    for step in range(4):
        op_B = params.order_B4[:, step]
        op_B111, op_B11 = op_B.view(-1, 1, 1, 1), op_B.view(-1, 1, 1)
        affine = torch.where(op_B111 == 0, x + shift, x * contrast).clamp(0.0, 1.0)
        h, s, v = rgb_to_hsv(x).unbind(1)
        # Each sample changes only its own op's channel, so the round trip equals adjust_saturation / adjust_hue.
        s = torch.where(op_B11 == 2, (s * saturation).clamp(0.0, 1.0), s)
        h = torch.where(op_B11 == 3, torch.fmod(h + hue_rad, TWO_PI), h)
        x = torch.where(op_B111 < 2, affine, hsv_to_rgb(torch.stack((h, s, v), dim=1)))
    return x


def _norm_stats(values: Sequence[float] | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values.to(device=like.device, dtype=like.dtype).view(1, 3, 1, 1)
    return to_device(torch.tensor(values, dtype=like.dtype), like.device).view(1, 3, 1, 1)


def jitter_normalised(
    x_B3HW: torch.Tensor,
    mean: Sequence[float] | torch.Tensor,
    std: Sequence[float] | torch.Tensor,
    params: JitterParams,
    jitter_fn: Callable[[torch.Tensor, JitterParams], torch.Tensor] = color_jitter,
) -> torch.Tensor:
    """Colour jitter of a normalised batch: de-normalise to [0, 1], jitter, re-normalise (the original's in-place
    steps); mean/std are the 0–255 RGB statistics; `params` may be on the host."""
    mean_1311, std_1311 = _norm_stats(mean, x_B3HW), _norm_stats(std, x_B3HW)
    x01 = (x_B3HW * std_1311 + mean_1311) / 255.0
    jp = JitterParams(*(to_device(t, x_B3HW.device) for t in params))
    return (jitter_fn(x01, jp) * 255.0 - mean_1311) / std_1311


# --------------------------------------------------------------------------------------------------------------
# Gaussian blur taps.


def blur_kernel_size(size: int) -> int:
    """Largest odd integer ≤ ceil(0.1·size): 51 at 512, 7 at 64 (original: floor(c − 0.5 + c mod 2))."""
    c = math.ceil(0.1 * size)  # float64 product then ceil, as the original's numpy (exact for all sizes)
    return c if c % 2 == 1 else c - 1


def gaussian_kernel1d(kernel_size: int, sigma_B: torch.Tensor) -> torch.Tensor:
    """Normalised Gaussian weights exp(−x²/2σ²) on integer offsets centred on 0, one row per σ: (B, kernel_size)."""
    x = torch.arange(kernel_size, dtype=torch.float64, device=sigma_B.device) - kernel_size // 2
    sigma_B1 = sigma_B.to(torch.float64).view(-1, 1)
    weights = torch.exp(-(x**2) / (2.0 * sigma_B1**2))
    # Built in float64 and rounded once: the 51 taps then sum to 1 in float32 up to one ulp.
    return (weights / weights.sum(dim=1, keepdim=True)).float()
