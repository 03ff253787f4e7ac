"""Segmentation loss and accuracy with the reference's normalisation (DAFormer recipe §2.6, checklist item 1).

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
import torch.nn.functional as F

__all__ = ["acc_seg", "seg_ce_loss", "upsample_logits"]


def upsample_logits(logits_BKhw: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize (align_corners=False) of logits to `size`; a no-op when the size already matches."""
    if tuple(logits_BKhw.shape[-2:]) == tuple(size):
        return logits_BKhw
    return F.interpolate(logits_BKhw, size=size, mode="bilinear", align_corners=False)


def seg_ce_loss(
    logits_BKhw: torch.Tensor,
    labels_BHW: torch.Tensor,
    weight_BHW: torch.Tensor | None = None,
    ignore_index: int = 255,
) -> torch.Tensor:
    """Pixel-weighted cross-entropy averaged over every label pixel (ignored pixels count in the denominator).

    Args:
        logits_BKhw: raw class scores at any resolution; upsampled to the label size first.
        labels_BHW: int64 class ids, `ignore_index` for unlabelled pixels.
        weight_BHW: optional per-pixel weights (ClassMix: 1 on pasted source pixels, the pseudo-label
            confidence q elsewhere, 0 in the pseudo-label crop rows).
        ignore_index: label value that contributes zero loss.

    Returns:
        A 0-dim loss tensor.
    """
    logits_BKHW = upsample_logits(logits_BKhw, labels_BHW.shape[-2:])
    # reduction="none" already gives 0 at ignored pixels; the mean below then divides by B·H·W as mmseg 0.16 does.
    ce_BHW = F.cross_entropy(logits_BKHW, labels_BHW.long(), reduction="none", ignore_index=ignore_index)
    if weight_BHW is not None:
        ce_BHW = ce_BHW * weight_BHW.to(ce_BHW.dtype)
    return ce_BHW.mean()


@torch.no_grad()
def acc_seg(logits_BKhw: torch.Tensor, labels_BHW: torch.Tensor) -> torch.Tensor:
    """Logged pixel accuracy in percent: 100 · #(argmax == label) / (B·H·W); ignored pixels count as wrong.

    Logging only (mmseg's `accuracy` with topk 1 on the upsampled logits). Returns a 0-dim float tensor so the
    caller decides when to read it (the read is a host sync).
    """
    logits_BKHW = upsample_logits(logits_BKhw, labels_BHW.shape[-2:])
    correct_BHW = logits_BKHW.argmax(dim=1) == labels_BHW
    return correct_BHW.float().mean() * 100.0
