"""ImageNet feature distance on thing classes (DAFormer paper §3.3; docs/recipe.md §2.7, §8 item 7).

The student's stage-4 encoder features on the source batch are pulled toward those of the frozen ImageNet
encoder, but only at cells dominated by a "thing" class: the source label is downscaled to the feature grid with
`downscale_label_ratio` (a cell keeps its majority class only if that class covers ≥ min_ratio of it and is not
the ignore label), and the loss is the mean over selected cells of the per-position **L2 norm** (not squared) of
the feature difference over channels. The caller multiplies by λ = 0.005.

Deviation (docs/recipe.md §2.7 suggests it): the original's `mean` over an empty selection is NaN (zero gradient but a
NaN log). Here the masked mean is Σ d·m / max(Σ m, 1), which is 0 with a zero gradient when nothing is selected,
and needs no host sync to find that out.

Shape legend: B batch, C channels, H/W label resolution, h/w feature resolution, K classes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from daformer_fast.utils import to_device

__all__ = ["downscale_label_ratio", "feature_distance"]


@torch.no_grad()
def downscale_label_ratio(
    gt_BHW: torch.Tensor,
    scale_factor: int,
    min_ratio: float,
    n_classes: int,
    ignore_index: int = 255,
) -> torch.Tensor:
    """Majority label per scale_factor × scale_factor cell, or `ignore_index` where it is impure or unlabelled.

    The ignore label counts as an extra class (index n_classes) when taking the majority, so a cell mostly made
    of ignore pixels is ignored even if its best real class is pure among the labelled pixels.

    Args:
        gt_BHW: integer labels in [0, n_classes) or ignore_index.
        scale_factor: cell side in pixels (label size // feature size; 32 for stage 4 at 512).
        min_ratio: minimum share of the majority class (0.75 in the paper).
        n_classes: number of real classes.
        ignore_index: unlabelled value.

    Returns:
        label_Bhw: int64, h = H // scale_factor, w = W // scale_factor.
    """
    if scale_factor < 1:
        raise ValueError(f"scale_factor must be >= 1, got {scale_factor}")
    gt_BHW = gt_BHW.long()
    gt_BHW = torch.where(gt_BHW == ignore_index, n_classes, gt_BHW)
    # One-hot by comparison with the class ids, not F.one_hot: that validates the label range by reading its
    # min/max back to the host, a sync per step.
    classes_K = torch.arange(n_classes + 1, device=gt_BHW.device).view(1, -1, 1, 1)
    onehot_BKHW = (gt_BHW.unsqueeze(1) == classes_K).float()
    # Exact class shares per cell: sums of 0/1 values divided by the cell area.
    ratio_BKhw = F.avg_pool2d(onehot_BKHW, kernel_size=scale_factor, stride=scale_factor)
    ratio_Bhw, label_Bhw = ratio_BKhw.max(dim=1)
    bad_Bhw = (label_Bhw == n_classes) | (ratio_Bhw < min_ratio)
    return torch.where(bad_Bhw, ignore_index, label_Bhw)


def feature_distance(
    feat_student_BChw: torch.Tensor,
    feat_imnet_BChw: torch.Tensor,
    gt_BHW: torch.Tensor,
    classes: Sequence[int] | torch.Tensor | None,
    scale_min_ratio: float,
    n_classes: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked mean L2 distance between student and frozen ImageNet features (before the λ factor).

    Args:
        feat_student_BChw: student stage-4 features (carries the gradient).
        feat_imnet_BChw: ImageNet-encoder stage-4 features (detached).
        gt_BHW: source labels at full resolution.
        classes: class ids whose pure cells count (the thing classes), a sequence or a tensor on the labels' device
            (a captured step must not copy host data per iteration); None = every cell (the "FD all" ablation).
        scale_min_ratio: purity threshold of `downscale_label_ratio`.
        n_classes: number of real classes.

    Returns:
        loss: 0-dim tensor, mean of ‖f_s − f_i‖₂ over the selected cells of the whole batch; 0 if none.
        mask_Bhw: bool, the selected cells.
    """
    B, _, h, w = feat_student_BChw.shape
    dist_Bhw = torch.linalg.vector_norm(feat_student_BChw - feat_imnet_BChw.detach(), ord=2, dim=1)
    if classes is None:
        mask_Bhw = torch.ones((B, h, w), dtype=torch.bool, device=dist_Bhw.device)
    else:
        # The original derives the factor from the widths only (label W // feature w).
        scale_factor = gt_BHW.shape[-1] // w
        label_Bhw = downscale_label_ratio(gt_BHW, scale_factor, scale_min_ratio, n_classes)
        if isinstance(classes, torch.Tensor):  # made once on the device by the caller (the step)
            classes_t = classes.to(label_Bhw.dtype)
        else:
            classes_t = to_device(torch.tensor(list(classes), dtype=label_Bhw.dtype), label_Bhw.device)
        # Brute-force membership, not torch.isin: its sorting path (chosen by a size heuristic) calls unique,
        # a host sync on CUDA.
        mask_Bhw = (label_Bhw.unsqueeze(-1) == classes_t).any(dim=-1)
    # where (not d·m) so that a non-finite distance at an unselected cell cannot poison the sum or its gradient.
    total = torch.where(mask_Bhw, dist_Bhw, 0.0).sum()
    count = mask_Bhw.sum().clamp(min=1).to(total.dtype)
    return total / count, mask_Bhw
