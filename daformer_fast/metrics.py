"""Segmentation metrics from a confusion matrix, as mmseg 0.16 `eval_metrics` reports them (docs/recipe.md §5).

    conf_KK = confusion_matrix(pred_BHW, label_BHW, num_classes=19)     # on the GPU, accumulate with +=
    m = segmentation_metrics(conf_KK, CITYSCAPES_CLASSES, synthia=True)
    print(format_table(m, CITYSCAPES_CLASSES))

The confusion matrix is indexed [label, pred]. Per class: intersection I = diagonal, union U = row sum + column sum
- I; IoU = I / U, Acc = I / row sum. mIoU and mAcc are NaN-means over classes (a class with zero union, i.e. absent
from both labels and predictions, gives NaN and is excluded — mmseg's `np.nanmean`). aAcc = trace / total. All
values are percentages, as plain floats (not rounded; only `format_table` rounds).

Legend: B batch, H/W image size, K classes.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["SYNTHIA_EXCLUDED_13", "SYNTHIA_EXCLUDED_16", "confusion_matrix", "format_table", "segmentation_metrics"]

# Cityscapes trainIds missing from Synthia: terrain, truck, train (mIoU16); mIoU13 also drops wall, fence, pole.
SYNTHIA_EXCLUDED_16 = (9, 14, 16)
SYNTHIA_EXCLUDED_13 = (3, 4, 5, 9, 14, 16)


def confusion_matrix(
    pred: torch.Tensor, label: torch.Tensor, num_classes: int, ignore_index: int = 255
) -> torch.Tensor:
    """K×K int64 counts, [label, pred], over the pixels whose label is in [0, K) (so `ignore_index` is skipped).

    Works on any device and any matching shapes. Label values outside [0, K) other than `ignore_index` are also
    skipped; mmseg would still count their predictions in the union, which cannot happen with trainId files.
    """
    if pred.shape != label.shape:
        raise ValueError(f"pred shape {tuple(pred.shape)} != label shape {tuple(label.shape)}")
    label = label.reshape(-1).long()
    pred = pred.reshape(-1).long()
    valid = (label >= 0) & (label < num_classes) & (label != ignore_index)
    # One bincount over label*K + pred: a single pass, no per-class loop, int64 so large datasets cannot overflow.
    idx = label[valid] * num_classes + pred[valid]
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _nanmean(values: np.ndarray) -> float:
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else math.nan


def segmentation_metrics(
    conf: torch.Tensor | np.ndarray, class_names: tuple[str, ...] | list[str], *, synthia: bool = False
) -> dict:
    """mIoU / mAcc / aAcc and per-class IoU / Acc (percent) of a [label, pred] confusion matrix.

    Args:
        conf: K×K counts from `confusion_matrix` (summed over the dataset).
        class_names: K names, keys of the per-class dicts.
        synthia: also report `mIoU16` and `mIoU13`, the Synthia→Cityscapes subsets (19 Cityscapes-ordered classes
            required), as NaN-means of the per-class IoUs (not the README's mIoU19·19/16 shortcut).

    Returns:
        {"mIoU", "mAcc", "aAcc", "IoU": {name: value}, "Acc": {name: value}[, "mIoU16", "mIoU13"]}; a class with
        zero union (IoU) or zero label pixels (Acc) has NaN.
    """
    conf_KK = conf.detach().cpu().numpy() if isinstance(conf, torch.Tensor) else np.asarray(conf)
    conf_KK = conf_KK.astype(np.float64)  # the original accumulates float64 histograms
    num_classes = conf_KK.shape[0]
    if conf_KK.shape != (num_classes, num_classes) or len(class_names) != num_classes:
        raise ValueError(f"confusion matrix shape {conf_KK.shape} does not match {len(class_names)} class names")
    intersect = np.diag(conf_KK)
    area_label = conf_KK.sum(axis=1)
    area_union = area_label + conf_KK.sum(axis=0) - intersect
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(area_union > 0, intersect / area_union, np.nan) * 100
        acc = np.where(area_label > 0, intersect / area_label, np.nan) * 100
    total = area_label.sum()
    out = {
        "mIoU": _nanmean(iou),
        "mAcc": _nanmean(acc),
        "aAcc": float(intersect.sum() / total * 100) if total > 0 else math.nan,
        "IoU": {name: float(v) for name, v in zip(class_names, iou)},
        "Acc": {name: float(v) for name, v in zip(class_names, acc)},
    }
    if synthia:
        if num_classes != 19:
            raise ValueError(f"mIoU16/mIoU13 need the 19 Cityscapes classes, got {num_classes}")
        out["mIoU16"] = _nanmean(np.delete(iou, SYNTHIA_EXCLUDED_16))
        out["mIoU13"] = _nanmean(np.delete(iou, SYNTHIA_EXCLUDED_13))
    return out


def format_table(metrics: dict, class_names: tuple[str, ...] | list[str]) -> str:
    """Per-class IoU/Acc table followed by the summary values, two decimals, as mmseg prints it."""
    width = max(len("Class"), *(len(n) for n in class_names))
    lines = [f"{'Class':<{width}} | {'IoU':>6} | {'Acc':>6}", "-" * (width + 18)]
    for name in class_names:
        lines.append(f"{name:<{width}} | {metrics['IoU'][name]:6.2f} | {metrics['Acc'][name]:6.2f}")
    lines.append("-" * (width + 18))
    summary = [k for k in ("mIoU", "mIoU16", "mIoU13", "mAcc", "aAcc") if k in metrics]
    lines.append("  ".join(f"{k}: {metrics[k]:.2f}" for k in summary))
    return "\n".join(lines)
