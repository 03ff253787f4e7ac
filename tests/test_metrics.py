"""Confusion matrix and mIoU/mAcc/aAcc against hand-computed values (mmseg 0.16 `eval_metrics` semantics)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from daformer_fast.config import CITYSCAPES_CLASSES
from daformer_fast.metrics import confusion_matrix, format_table, segmentation_metrics

# [label, pred] counts for 4 classes. Class 3 never occurs in labels or predictions (zero union -> excluded);
# class 2 occurs once and is never predicted (IoU 0, counted).
HAND_CONF = np.array([[3, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
HAND_NAMES = ("a", "b", "c", "d")
# class 0: I=3, label 4, pred 4 -> U=5, IoU 60, Acc 75;  class 1: I=2, label 2, pred 3 -> U=3, IoU 66.67, Acc 100;
# class 2: I=0, U=1 -> IoU 0, Acc 0;  class 3: NaN.  aAcc = 5/7.
HAND_IOU = (60.0, 200.0 / 3, 0.0, math.nan)
HAND_ACC = (75.0, 100.0, 0.0, math.nan)


def _pixels_from_conf(conf: np.ndarray, num_ignored: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffled (pred, label) pixel pairs realising `conf`, plus ignored pixels (label 255) with random preds."""
    labels, preds = [], []
    for i, j in zip(*np.nonzero(conf)):
        labels += [i] * conf[i, j]
        preds += [j] * conf[i, j]
    rng = np.random.default_rng(seed)
    labels += [255] * num_ignored
    preds += list(rng.integers(0, conf.shape[0], num_ignored))
    order = rng.permutation(len(labels))
    return torch.tensor(np.array(preds)[order]), torch.tensor(np.array(labels)[order], dtype=torch.uint8)


def test_confusion_matrix_from_pixels_ignores_255():
    pred, label = _pixels_from_conf(HAND_CONF, num_ignored=5)
    conf = confusion_matrix(pred.reshape(2, 6), label.reshape(2, 6), num_classes=4)
    assert conf.dtype == torch.int64
    np.testing.assert_array_equal(conf.numpy(), HAND_CONF)


def test_hand_computed_metrics():
    m = segmentation_metrics(torch.from_numpy(HAND_CONF), HAND_NAMES)
    for name, iou, acc in zip(HAND_NAMES, HAND_IOU, HAND_ACC):
        assert (math.isnan(m["IoU"][name]) and math.isnan(iou)) or m["IoU"][name] == pytest.approx(iou)
        assert (math.isnan(m["Acc"][name]) and math.isnan(acc)) or m["Acc"][name] == pytest.approx(acc)
    assert m["mIoU"] == pytest.approx((60 + 200 / 3 + 0) / 3)  # the zero-union class is excluded, not a 0
    assert m["mAcc"] == pytest.approx((75 + 100 + 0) / 3)
    assert m["aAcc"] == pytest.approx(500 / 7)
    assert all(isinstance(m[k], float) for k in ("mIoU", "mAcc", "aAcc"))
    assert "mIoU16" not in m


def test_numpy_input_and_empty_matrix():
    m = segmentation_metrics(HAND_CONF, HAND_NAMES)
    assert m["mIoU"] == pytest.approx((60 + 200 / 3) / 3)
    empty = segmentation_metrics(np.zeros((4, 4), dtype=np.int64), HAND_NAMES)
    assert math.isnan(empty["mIoU"]) and math.isnan(empty["aAcc"])


@pytest.mark.parametrize("num_classes", [5, 19])
def test_confusion_matrix_matches_double_loop(num_classes):
    g = torch.Generator().manual_seed(num_classes)
    label = torch.randint(0, num_classes, (3, 17, 23), generator=g)
    label[torch.rand(label.shape, generator=g) < 0.2] = 255
    pred = torch.randint(0, num_classes, (3, 17, 23), generator=g)
    ref = np.zeros((num_classes, num_classes), dtype=np.int64)
    lab, prd = label.numpy(), pred.numpy()
    for i in range(num_classes):
        for j in range(num_classes):
            ref[i, j] = np.sum((lab == i) & (prd == j))
    np.testing.assert_array_equal(confusion_matrix(pred, label.to(torch.uint8), num_classes).numpy(), ref)
    # Out-of-range labels other than 255 are skipped as well (they cannot occur in trainId files).
    label[0, 0, 0] = num_classes
    assert confusion_matrix(pred, label, num_classes).sum() == (label < num_classes).sum()


def test_synthia_subsets():
    conf = np.eye(19, dtype=np.int64) * 10
    conf[9, 9], conf[9, 0] = 0, 10  # every terrain pixel predicted as road: terrain IoU 0, road IoU 10/20 = 50
    conf[14, 14] = conf[16, 16] = 0  # truck and train absent: NaN, excluded everywhere
    m = segmentation_metrics(conf, CITYSCAPES_CLASSES, synthia=True)
    assert m["IoU"]["road"] == pytest.approx(50) and m["IoU"]["terrain"] == 0
    assert math.isnan(m["IoU"]["truck"]) and math.isnan(m["IoU"]["train"])
    assert m["mIoU"] == pytest.approx((50 + 0 + 15 * 100) / 17)
    assert m["mIoU16"] == pytest.approx((50 + 15 * 100) / 16)  # terrain/truck/train dropped
    assert m["mIoU13"] == pytest.approx((50 + 12 * 100) / 13)  # also wall/fence/pole dropped


def test_synthia_subsets_from_per_class_ious():
    rng = np.random.default_rng(0)
    conf = rng.integers(0, 50, (19, 19))
    m = segmentation_metrics(conf, CITYSCAPES_CLASSES, synthia=True)
    iou = [m["IoU"][n] for n in CITYSCAPES_CLASSES]
    assert m["mIoU16"] == pytest.approx(np.mean([v for i, v in enumerate(iou) if i not in (9, 14, 16)]))
    assert m["mIoU13"] == pytest.approx(np.mean([v for i, v in enumerate(iou) if i not in (3, 4, 5, 9, 14, 16)]))
    with pytest.raises(ValueError, match="19"):
        segmentation_metrics(HAND_CONF, HAND_NAMES, synthia=True)


def test_format_table():
    m = segmentation_metrics(HAND_CONF, HAND_NAMES)
    text = format_table(m, HAND_NAMES)
    assert "mIoU: 42.22" in text and "aAcc: 71.43" in text
    assert " 66.67 " in text and "nan" in text
