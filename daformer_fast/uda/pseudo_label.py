"""Teacher pseudo-labels and their confidence weight (docs/recipe.md §2.2 steps 5–6, §2.3, §8 item 2).

The teacher's logits are upsampled (bilinear, align_corners=False) to the crop size *before* the softmax; the
pseudo-label is the per-pixel argmax, kept even where the teacher is unsure (low-confidence pixels are not
ignored). The confidence enters only through one scalar per batch,

    q = #{pixels of the whole batch with max softmax ≥ threshold} / (B·H·W),

used as the loss weight of every target pixel. Only after q is computed are the top `ignore_top` and bottom
`ignore_bottom` rows zeroed (rectification border and ego vehicle); this happens before mixing, so source pixels
pasted into those rows keep weight 1.

The upsample, softmax, argmax and count are `ops.pseudo_label_argmax` (the plain-PyTorch reference, or a fused kernel
that never stores the full-resolution logits); the weight map is formed here, the same for both.

q stays on the device as a tensor: the original reads it with `.item()`, a host sync this version avoids.

Shape legend: B batch, K classes, H/W crop resolution, h/w logit resolution.
"""

from __future__ import annotations

import torch

from daformer_fast.ops.dispatch import Impl
from daformer_fast.ops.pseudo_label import pseudo_label_argmax

__all__ = ["pseudo_label"]


@torch.no_grad()
def pseudo_label(
    teacher_logits_BKhw: torch.Tensor,
    size: tuple[int, int],
    threshold: float,
    ignore_top: int,
    ignore_bottom: int,
    impl: Impl | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pseudo-labels and per-pixel weights from teacher logits.

    Args:
        teacher_logits_BKhw: teacher scores at any resolution (detached; computed under no_grad).
        size: (H, W) of the target crop.
        threshold: inclusive softmax confidence threshold (0.968 in the paper).
        ignore_top: number of top rows whose weight is set to 0.
        ignore_bottom: number of bottom rows whose weight is set to 0.
        impl: implementation of the upsample/softmax/argmax/count part (`ops.pseudo_label_argmax`); None takes
            the process default.

    Returns:
        label_BHW: int64 argmax class per pixel.
        weight_BHW: float32, q everywhere except the zeroed rows.
    """
    H, W = size
    B = teacher_logits_BKhw.shape[0]
    label_BHW, num_confident = pseudo_label_argmax(teacher_logits_BKhw, (H, W), threshold, impl=impl)
    # Count in int64 and divide in float64, as the original does (`sum().item() / size` in Python), then round
    # once to float32; a float32 mean could differ in the last bit.
    q = (num_confident.double() / (B * H * W)).float()
    rows_H = torch.arange(H, device=label_BHW.device)
    keep_H = (rows_H >= ignore_top) & (rows_H < H - ignore_bottom)
    weight_BHW = torch.where(keep_H.view(1, H, 1), q, torch.zeros((), device=q.device)).expand(B, H, W)
    # A real (not expanded) tensor: callers mix it with torch.where and may write into it.
    return label_BHW, weight_BHW.contiguous()
