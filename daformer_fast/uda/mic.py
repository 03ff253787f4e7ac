"""Masked Image Consistency (MIC, Hoyer et al., CVPR 2023): the stages of its pass on the DAFormer step.

After DAFormer's ClassMix backward the step trains the student once more, on a batch whose images are masked by
random blocks (docs/mic.md §1): the batch of the mode (`mic_batch`, §3), colour-augmented in the `*aug` modes
(`draw_mic_aug`, §5: the gates once per batch, blur always eligible, one op order and one σ for the batch), then
multiplied by a block keep-mask in normalised space (`draw_block_uniforms` + `block_keep_mask`, §2), so that a
masked pixel takes the dataset's mean colour. The targets are DAFormer's unmixed pseudo-labels and weights, or
those of a separate MIC teacher (§4). Every draw comes from the step's CPU generator (§7), so the pass needs no
host synchronisation and a resumed run repeats an uninterrupted one.

Shape legend: B batch, H/W crop size, h/w mask grid.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from daformer_fast.config import MICConfig, UDAConfig
from daformer_fast.ops.augment import JitterParams
from daformer_fast.uda.augment import StrongParams, draw_strong_params

__all__ = ["block_keep_mask", "draw_block_uniforms", "draw_mic_aug", "mic_batch", "mic_threshold"]


def draw_block_uniforms(batch_size: int, size: tuple[int, int], block_size: int, generator: torch.Generator):
    """U(0, 1) per mask cell and image, (B, 1, h, w) float32 on CPU, h = round(H / block_size) (Python's round,
    half to even, as the original), likewise w."""
    h, w = round(size[0] / block_size), round(size[1] / block_size)
    return torch.rand(batch_size, 1, max(h, 1), max(w, 1), generator=generator)


def block_keep_mask(uniforms_B1hw: torch.Tensor, size: tuple[int, int], ratio: float) -> torch.Tensor:
    """Keep-mask (B, 1, H, W) float: 1 where the cell's uniform is > `ratio` (strict), upsampled by nearest
    neighbour, so a cell is masked with probability `ratio`; the one channel broadcasts over the image's three."""
    keep_B1hw = (uniforms_B1hw > ratio).float()
    return F.interpolate(keep_B1hw, size=size, mode="nearest")


def draw_mic_aug(batch_size: int, generator: torch.Generator, uda: UDAConfig) -> StrongParams:
    """The colour augmentation of the `*aug` modes (docs/mic.md §5). The same draws as DAFormer's mixed-image
    augmentation (`draw_strong_params`), then the original's batch-level call made explicit: the op order and the
    blur σ of sample 0 serve the whole batch, and the blur is eligible whatever `uda.blur` says."""
    params = draw_strong_params(batch_size, generator, _with_blur(uda))
    j = params.jitter_params
    shared = JitterParams(j.brightness_B, j.contrast_B, j.saturation_B, j.hue_B, j.order_B4[:1].expand_as(j.order_B4))
    return StrongParams(params.jitter, params.blur, shared, params.sigma_B[:1].expand_as(params.sigma_B))


def _with_blur(uda: UDAConfig) -> UDAConfig:
    return uda if uda.blur else dataclasses.replace(uda, blur=True)


def mic_batch(
    mode: str,
    img_B3HW: torch.Tensor,
    gt_BHW: torch.Tensor,
    tgt_B3HW: torch.Tensor,
    pl_BHW: torch.Tensor,
    pw_BHW: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(images, labels, pixel weights or None) that the masked pass trains on, by mode (docs/mic.md §3):
    `*trg*` the target batch with its pseudo-labels and weights, `*src*` the source batch with its labels and no
    weights, plain `separate*` image 0 of each domain (the source half with weight 1)."""
    kind = mode.removesuffix("aug")
    if kind == "separatetrg":
        return tgt_B3HW, pl_BHW, pw_BHW
    if kind == "separatesrc":
        return img_B3HW, gt_BHW, None
    if kind == "separate":
        images = torch.cat([img_B3HW[:1], tgt_B3HW[:1]])
        labels = torch.cat([gt_BHW[:1].to(pl_BHW.dtype), pl_BHW[:1]])
        return images, labels, torch.cat([torch.ones_like(pw_BHW[:1]), pw_BHW[:1]])
    raise ValueError(f"unknown MIC mode {mode!r}")


def mic_threshold(mic: MICConfig, uda: UDAConfig) -> float:
    """The separate MIC teacher's confidence threshold; None (no confidence weighting) is threshold 0, at which
    every pixel is confident and the weight is exactly 1 (the ignored rows still get 0)."""
    if mic.pseudo_threshold == "same":
        return uda.pseudo_threshold
    return 0.0 if mic.pseudo_threshold is None else mic.pseudo_threshold
