"""Strong augmentation of the mixed image: the random draws, and the original's per-sample order (docs/recipe.md §2.5).

The math (kornia-0.5.8 colour jitter, the blur's taps) is `ops.augment`; the fast step applies it through the ops
`ops.classmix_aug.mix_and_jitter` and `ops.classmix_aug.gaussian_blur`. This module holds what is stage-level:

* `draw_strong_params`: every random number of one strong transform. The two switches are shared by the batch:
  jitter iff U > color_jitter_probability (so with probability 0.8 — the config's "probability" is that of
  *skipping*), blur iff U > 0.5; σ ~ U(0.15, 1.15) per sample; factors and op order per sample. Every call draws
  the same amount of randomness from the explicit CPU generator whatever the switches say, so the stream does not
  depend on them.
* the `*_original` twins (`train.path: original`): the same transform from the same draws, one image at a time
  and one op after another as the original applies kornia (host-syncing by design).

Shape legend: B batch, H/W image resolution.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from daformer_fast.config import UDAConfig
from daformer_fast.ops.augment import (
    JitterParams,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    blur_kernel_size,
    color_jitter,
    gaussian_kernel1d,
    jitter_normalised,
)
from daformer_fast.ops.classmix_aug import gaussian_blur
from daformer_fast.utils import to_device

__all__ = ["StrongParams", "apply_strong", "color_jitter_original", "draw_strong_params", "gaussian_blur_original",
           "strong_on_device"]  # fmt: skip


class StrongParams(NamedTuple):
    jitter: bool | torch.Tensor
    """Batch-shared switch: apply colour jitter (a 0-dim bool tensor after `strong_on_device`)."""
    blur: bool | torch.Tensor
    """Batch-shared switch: apply Gaussian blur (likewise)."""
    jitter_params: JitterParams
    sigma_B: torch.Tensor


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def draw_strong_params(batch_size: int, generator: torch.Generator, cfg: UDAConfig) -> StrongParams:
    """All randomness of one strong transform, on CPU, in a fixed order and amount (switches, b, c, s, hue,
    order, σ). Ranges as kornia's `_range_bound`: brightness within [0, 2], contrast/saturation ≥ 0, |hue| ≤ 0.5."""
    u_jitter, u_blur = torch.rand(2, generator=generator, dtype=torch.float64).tolist()  # CPU: no device sync
    s = cfg.color_jitter_strength
    jitter_params = JitterParams(
        brightness_B=_uniform(batch_size, max(1 - s, 0.0), min(1 + s, 2.0), generator),
        contrast_B=_uniform(batch_size, max(1 - s, 0.0), 1 + s, generator),
        saturation_B=_uniform(batch_size, max(1 - s, 0.0), 1 + s, generator),
        hue_B=_uniform(batch_size, max(-s, -0.5), min(s, 0.5), generator),
        # argsort of i.i.d. uniform keys = one uniformly random permutation per sample (randperm(4) each).
        order_B4=torch.argsort(torch.rand(batch_size, 4, generator=generator), dim=1),
    )
    sigma_B = 0.15 + torch.rand(batch_size, generator=generator, dtype=torch.float64)
    return StrongParams(
        jitter=u_jitter > cfg.color_jitter_probability,  # "probability" is that of skipping (docs/recipe.md §2.5)
        blur=cfg.blur and u_blur > 0.5,
        jitter_params=jitter_params,
        sigma_B=sigma_B,
    )


def strong_on_device(params: StrongParams, device: torch.device | str) -> StrongParams:
    """The draws on `device`, the switches as 0-dim bool tensors: the form the fast step's `apply_strong` reads, so
    that its ops do not depend on the switches (the same kernels every iteration, as CUDA-graph replay needs)."""
    flag = lambda b: to_device(torch.tensor(bool(b)), device)  # noqa: E731
    return StrongParams(flag(params.jitter), flag(params.blur),
                        JitterParams(*(to_device(t, device) for t in params.jitter_params)),
                        to_device(params.sigma_B, device))  # fmt: skip


# --------------------------------------------------------------------------------------------------------------
# The original's order.

_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def color_jitter_original(img01_B3HW: torch.Tensor, params: JitterParams) -> torch.Tensor:
    """The original's order: one image at a time, its four ops one after another (host-syncing by design).

    Batched equivalent: `ops.augment.color_jitter`.
    """
    out = []
    for i in range(img01_B3HW.shape[0]):
        x = img01_B3HW[i : i + 1]
        factors = (params.brightness_B, params.contrast_B, params.saturation_B, params.hue_B)
        for op in params.order_B4[i].tolist():
            x = _OPS[op](x, factors[op][i : i + 1])
        out.append(x)
    return torch.cat(out)


def gaussian_blur_original(img_B3HW: torch.Tensor, sigma_B: torch.Tensor) -> torch.Tensor:
    """Per-sample 2-D kernel (outer product of the 1-D ones) and one depthwise conv per image, as kornia does.

    Batched equivalent: `ops.classmix_aug.gaussian_blur_ref`.
    """
    B, C, H, W = img_B3HW.shape
    ky, kx = blur_kernel_size(H), blur_kernel_size(W)
    out = []
    for i in range(B):
        sigma = sigma_B[i : i + 1].to(img_B3HW.device)
        k2d = gaussian_kernel1d(ky, sigma)[0][:, None] * gaussian_kernel1d(kx, sigma)[0][None, :]
        x = F.pad(img_B3HW[i : i + 1], (kx // 2, kx // 2, ky // 2, ky // 2), mode="reflect")
        out.append(F.conv2d(x, k2d.to(x.dtype).expand(C, 1, ky, kx), groups=C))
    return torch.cat(out)


def apply_strong(
    x_B3HW: torch.Tensor,
    mean: Sequence[float] | torch.Tensor,
    std: Sequence[float] | torch.Tensor,
    params: StrongParams,
    original: bool = False,
) -> torch.Tensor:
    """Colour jitter then blur of a normalised batch by drawn `params`.

    original: the per-sample twins, each op applied only if its (host) switch is on; returns the input itself when
    both are off. Otherwise the batched ops (`ops.augment.color_jitter`, the `gaussian_blur` op) run whatever the
    switches say and `torch.where` keeps their result only where the switch (`strong_on_device`) is on: an exact
    selection, so the values equal applying only the enabled ops, with no branch on a drawn value."""
    if original:
        if params.jitter:
            x_B3HW = jitter_normalised(x_B3HW, mean, std, params.jitter_params, color_jitter_original)
        if params.blur:
            x_B3HW = gaussian_blur_original(x_B3HW, to_device(params.sigma_B, x_B3HW.device))
        return x_B3HW
    x_B3HW = torch.where(params.jitter, jitter_normalised(x_B3HW, mean, std, params.jitter_params), x_B3HW)
    return torch.where(params.blur, gaussian_blur(x_B3HW, params.sigma_B), x_B3HW)
