"""Deterministic transforms of a training sample (docs/recipe.md §1.6): keep-ratio resize, crop/flip/pad, normalisation.

The random decisions (which sample, crop box, flip) are `plan`'s; this module only applies them.

Normalisation with the ImageNet mean/std happens on the device (`normalize`), after batching, so loaders move
uint8 (4× less data); training and evaluation share it. The original pads *after* Normalize, with 0 (docs/recipe.md
§1.3, §1.6), so a padded pixel is 0, not (0 − mean)/std; the uint8 crop is padded with 0 here and `normalize` sets the
padding to 0 from the loaders' `valid_hw` (padding is always at the bottom and right).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from daformer_fast.data.datasets import rescale_size, resize_image, resize_label
from daformer_fast.utils import to_device

__all__ = ["IGNORE", "IMAGENET_MEAN", "IMAGENET_STD", "apply_crop", "normalize", "resize_pair"]

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
"""RGB statistics of the original's Normalize (docs/recipe.md §1.3), in 0..255 units."""
IGNORE = 255
"""Label value of unlabelled pixels and of label padding."""


def resize_pair(img: np.ndarray, lbl: np.ndarray | None, scale: tuple[int, int]):
    """Keep-ratio resize (mmcv rule): bilinear image, nearest label."""
    size = rescale_size(img.shape[1], img.shape[0], scale)
    return resize_image(img, size), (resize_label(lbl, size) if lbl is not None else None)


def apply_crop(a: np.ndarray, box: tuple[int, int, int, int], flip: bool, crop: tuple[int, int], fill: int):
    """`a` (H×W or H×W×C) cut to `box` = (y0, y1, x0, x1), mirrored left-right if `flip`, padded at the bottom
    and right to `crop` with `fill`, C-contiguous. A box reaching past the image is clipped to it. Images are
    padded with 0 (zeroed again after normalisation, see `normalize`), labels with 255; a no-op at the paper's
    scales."""
    y0, y1, x0, x1 = box
    out = a[y0:y1, x0:x1]
    if flip:
        out = out[:, ::-1]
    if out.shape[:2] != tuple(crop):
        pad = ((0, crop[0] - out.shape[0]), (0, crop[1] - out.shape[1])) + ((0, 0),) * (out.ndim - 2)
        out = np.pad(out, pad, constant_values=fill)
    return np.ascontiguousarray(out)


@functools.cache
def _norm_stats(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean/std as (1, 3, 1, 1) float32 tensors on `device`, made once: a per-step host→device copy of a Python
    list would block the host on CUDA."""
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    return mean, std


@functools.cache
def _inv_std(device: torch.device) -> torch.Tensor:
    """1/std as a (1, 3, 1, 1) float32 tensor on `device`: computed in float64, then rounded, as mmcv does."""
    return torch.tensor([1.0 / s for s in IMAGENET_STD], dtype=torch.float64).float().view(1, 3, 1, 1).to(device)


def normalize(img_B3HW: torch.Tensor, valid_hw_B2: torch.Tensor | None = None, host_check: bool = True) -> torch.Tensor:
    """uint8 RGB batch → contiguous float32 (x − mean) · (1/std) with the ImageNet statistics, on its device.

    mmcv's Normalize multiplies by the reciprocal (float64, rounded to float32) rather than dividing by std; so
    does this, for training and evaluation alike (a division rounds differently, by an ulp, on some values).

    Args:
        img_B3HW: a loader's `img` or `target_img`. A (B, H, W, 3) uint8 batch such as evaluation's may be passed
            as `x_BHW3.permute(0, 3, 1, 2)`: the result is contiguous (B, 3, H, W) either way.
        valid_hw_B2: the matching `valid_hw` / `target_valid_hw`: per sample, the (h, w) of real pixels. Pixels
            below or right of it are padding and come out exactly 0, as in the original, which pads the
            normalised image with 0. None: no padding.
        host_check: skip the masking when a CPU `valid_hw_B2` says nothing is padded (a host-side test). The fast
            step's device part passes False: it masks always (an exact no-op where nothing is padded), so its ops
            do not depend on the batch's values.
    """
    mean, _ = _norm_stats(img_B3HW.device)
    out = ((img_B3HW.float() - mean) * _inv_std(img_B3HW.device)).contiguous()
    if valid_hw_B2 is None:
        return out
    H, W = out.shape[-2:]
    # Host-side check on a CPU tensor (no device sync): at the paper's scales nothing is ever padded.
    if host_check and valid_hw_B2.device.type == "cpu" and bool((valid_hw_B2 >= torch.tensor([H, W])).all()):
        return out
    valid_hw = to_device(valid_hw_B2, out.device)
    rows_BHW = torch.arange(H, device=out.device).view(1, H, 1) < valid_hw[:, 0].view(-1, 1, 1)
    cols_BHW = torch.arange(W, device=out.device).view(1, 1, W) < valid_hw[:, 1].view(-1, 1, 1)
    return out.masked_fill_(~(rows_BHW & cols_BHW).unsqueeze(1), 0.0)
