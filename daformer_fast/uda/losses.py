"""Segmentation loss and accuracy with the original's normalisation (docs/recipe.md §2.6, §8 item 1).

mmseg 0.16 (`CrossEntropyLoss` + `BaseDecodeHead.losses`) upsamples the 1/4-resolution logits bilinearly
(align_corners=False) to the label size, takes the per-pixel cross-entropy with ignored pixels set to 0,
multiplies by an optional per-pixel weight, and averages over **all** B·H·W pixels, ignored ones included:

    L = Σ_px w_px · CE_px · [y_px ≠ ignore] / (B·H·W)

`F.cross_entropy(..., ignore_index=255, reduction="mean")` divides by the number of valid pixels instead, which
changes the effective loss scale (and with it the balance against the mixed and FD losses); it must not be used.

Shape legend: B batch, K classes, H/W label resolution, h/w logit resolution.
"""

from __future__ import annotations

import torch

from daformer_fast.ops.dispatch import Impl
from daformer_fast.ops.seg_ce import seg_ce, upsample_logits

__all__ = ["acc_seg", "seg_ce_loss", "upsample_logits"]


def seg_ce_loss(
    logits_BKhw: torch.Tensor | tuple[torch.Tensor, ...],
    labels_BHW: torch.Tensor,
    weight_BHW: torch.Tensor | None = None,
    ignore_index: int = 255,
    impl: Impl | None = None,
) -> torch.Tensor:
    """Pixel-weighted cross-entropy averaged over every label pixel (ignored pixels count in the denominator).

    Args:
        logits_BKhw: raw class scores at any resolution; upsampled to the label size first. A tuple (a head with
            auxiliary outputs while training, DANet) gives the sum of each output's loss with the same labels and
            weights, each of weight 1, as the original sums its decode-head losses (docs/architectures.md §2.3).
        labels_BHW: int64 class ids, `ignore_index` for unlabelled pixels.
        weight_BHW: optional per-pixel weights (ClassMix: 1 on pasted source pixels, the pseudo-label
            confidence q elsewhere, 0 in the pseudo-label crop rows).
        ignore_index: label value that contributes zero loss.
        impl: implementation (`ops.seg_ce`: the plain-PyTorch reference or the fused upsample + CE kernel); None takes
            the process default.

    Returns:
        A 0-dim loss tensor.
    """
    if isinstance(logits_BKhw, tuple):
        losses = [seg_ce(x, labels_BHW, weight_BHW, ignore_index, impl=impl) for x in logits_BKhw]
        return torch.stack(losses).sum()
    return seg_ce(logits_BKhw, labels_BHW, weight_BHW, ignore_index, impl=impl)


@torch.no_grad()
def acc_seg(logits_BKhw: torch.Tensor, labels_BHW: torch.Tensor) -> torch.Tensor:
    """Logged pixel accuracy in percent: 100 · #(argmax == label) / (B·H·W); ignored pixels count as wrong.

    Logging only (mmseg's `accuracy` with topk 1 on the upsampled logits). Returns a 0-dim float tensor so the
    caller decides when to read it (the read is a host sync).
    """
    logits_BKHW = upsample_logits(logits_BKhw, labels_BHW.shape[-2:])
    correct_BHW = logits_BKHW.argmax(dim=1) == labels_BHW
    return correct_BHW.float().mean() * 100.0
