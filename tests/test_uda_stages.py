"""CPU tests of the UDA stages (daformer_fast/uda/, and the ClassMix and augmentation ops of daformer_fast/ops/ the
fast step runs) against hand-computed values, kornia 0.5.8 and the original's per-sample order.

kornia 0.5.8 (the version DAFormer pins) is a test oracle only; its tests are skipped where it is not installed.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from daformer_fast.config import ScheduleConfig, UDAConfig
from daformer_fast.ops.augment import (
    JitterParams,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    blur_kernel_size,
    color_jitter,
    gaussian_kernel1d,
    hsv_to_rgb,
    rgb_to_hsv,
)
from daformer_fast.ops.classmix_aug import gaussian_blur, gaussian_blur_ref, masks_from_chosen, mix, mix_and_jitter
from daformer_fast.uda.augment import (
    apply_strong,
    color_jitter_original,
    draw_strong_params,
    gaussian_blur_original,
    strong_on_device,
)
from daformer_fast.uda.classmix import chosen_classes, class_masks_original, draw_class_keys
from daformer_fast.uda.ema import ema_weight, ema_weights, update_ema
from daformer_fast.uda.fdist import downscale_label_ratio, feature_distance
from daformer_fast.uda.losses import acc_seg, seg_ce_loss
from daformer_fast.uda.pseudo_label import pseudo_label
from daformer_fast.uda.schedule import lr_at, set_lrs

MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)
THINGS = (6, 7, 11, 12, 13, 14, 15, 16, 17, 18)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------------
# EMA (docs/recipe.md §2.2 step 1)


@pytest.mark.parametrize("t,expected", [(0, 0.0), (1, 0.5), (9, 0.9), (99, 0.99), (999, 0.999), (5000, 0.999)])
def test_ema_weight(t, expected):
    assert ema_weight(t, 0.999) == pytest.approx(expected, abs=1e-12)


def test_update_ema_tiny():
    teacher = [torch.tensor([1.0, 2.0]), torch.tensor([[-4.0]])]
    student = [torch.tensor([3.0, 4.0]), torch.tensor([[8.0]])]
    update_ema(teacher, student, ema_weights(0, 0.999))  # copy
    assert torch.equal(teacher[0], student[0]) and torch.equal(teacher[1], student[1])
    teacher = [torch.tensor([1.0, 2.0]), torch.tensor([[-4.0]])]
    update_ema(teacher, student, ema_weights(1, 0.999))  # a = 0.5
    torch.testing.assert_close(teacher[0], torch.tensor([2.0, 3.0]))
    torch.testing.assert_close(teacher[1], torch.tensor([[2.0]]))
    update_ema(teacher, student, ema_weights(9, 0.999))  # a = 0.9: 0.9·2 + 0.1·3
    torch.testing.assert_close(teacher[0], torch.tensor([2.1, 3.1]))
    update_ema(teacher, student, ema_weights(5000, 0.999))
    torch.testing.assert_close(teacher[0], torch.tensor([0.999 * 2.1 + 0.001 * 3, 0.999 * 3.1 + 0.001 * 4]))
    # The original's three roundings in float32: a·θ_T and (1 − a)·θ_S each rounded, then their sum.
    t32, s32 = torch.tensor([2.1, -1e-3, 7.25]), torch.tensor([3.0, 5e-4, -1.5])
    a, b = torch.tensor(0.999, dtype=torch.float64).float(), torch.tensor(1 - 0.999, dtype=torch.float64).float()
    expected = (a * t32) + (b * s32)
    update_ema([t32], [s32], ema_weights(5000, 0.999))
    assert torch.equal(t32, expected)
    assert ema_weights(0, 0.999) is None
    with pytest.raises(ValueError):
        update_ema(teacher, student[:1], ema_weights(1, 0.999))


def test_update_ema_parameters_only():
    student = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3))
    teacher = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3))
    student.train()(torch.randn(4, 2, 5, 5))  # student BN stats move away from the teacher's
    update_ema(teacher.parameters(), student.parameters(), ema_weights(0, 0.999))
    for pt, ps in zip(teacher.parameters(), student.parameters(), strict=True):
        assert torch.equal(pt, ps) and pt.requires_grad  # in place, leaf stays a leaf
    assert torch.equal(teacher[1].running_mean, torch.zeros(3))
    assert teacher[1].num_batches_tracked.item() == 0


# ---------------------------------------------------------------------------------------------------------------
# LR schedule (docs/recipe.md §1.5)


@pytest.mark.parametrize(
    "t,backbone,head",
    [(0, 6.0e-11, 6.0e-10), (100, 3.990e-6, 3.990e-5), (750, 2.9438e-5, 2.9438e-4), (1499, 5.7713e-5, 5.7713e-4),
     (1500, 5.775e-5, 5.775e-4), (4000, 5.4e-5, 5.4e-4), (20000, 3.0e-5, 3.0e-4), (39999, 1.5e-9, 1.5e-8)],
)  # fmt: skip
def test_lr_check_values(t, backbone, head):
    cfg = ScheduleConfig()
    assert lr_at(t, 6e-5, cfg, 40000) == pytest.approx(backbone, rel=2e-4)
    assert lr_at(t, 6e-4, cfg, 40000) == pytest.approx(head, rel=2e-4)


def test_lr_warmup_multiplies_decayed_value():
    cfg = ScheduleConfig()
    t = 1000
    assert lr_at(t, 6e-5, cfg, 40000) == pytest.approx(6e-5 * (1 - t / 40000) * (1e-6 + (1 - 1e-6) * t / 1500))


def test_lr_poly10_rises_when_min_lr_exceeds_lr0():
    cfg = ScheduleConfig(min_lr=1e-4, warmup="none")
    assert lr_at(0, 6e-5, cfg, 40000) == pytest.approx(6e-5)
    assert lr_at(20000, 6e-5, cfg, 40000) == pytest.approx(8e-5)
    assert lr_at(40000, 6e-5, cfg, 40000) == pytest.approx(1e-4)
    assert lr_at(20000, 6e-4, cfg, 40000) == pytest.approx(3.5e-4)  # the head still decays


def test_set_lrs_uses_initial_lr():
    a, b = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [a], "lr": 6e-5, "initial_lr": 6e-5},
                             {"params": [b], "lr": 6e-4, "initial_lr": 6e-4}])  # fmt: skip
    set_lrs(opt, 100, ScheduleConfig(), 40000)
    set_lrs(opt, 100, ScheduleConfig(), 40000)  # idempotent: always from initial_lr
    assert opt.param_groups[0]["lr"] == pytest.approx(3.990e-6, rel=2e-4)
    assert opt.param_groups[1]["lr"] == pytest.approx(3.990e-5, rel=2e-4)
    with pytest.raises(ValueError, match="initial_lr"):
        set_lrs(torch.optim.SGD([a], lr=0.1), 0, ScheduleConfig(), 40000)


# ---------------------------------------------------------------------------------------------------------------
# Loss normalisation (docs/recipe.md §2.6)


def _hand_logits():
    ln3 = math.log(3.0)
    # pixels (0,0) (0,1) (1,0) (1,1); two classes
    logits = torch.tensor([[1.0, ln3], [ln3, ln3]]), torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    labels = torch.tensor([[[0, 255], [1, 0]]])
    return torch.stack(logits).unsqueeze(0), labels


def test_seg_ce_mean_over_all_pixels():
    logits, labels = _hand_logits()
    ce = [math.log(1 + math.exp(-1.0)), 0.0, math.log(4.0), math.log(4.0 / 3.0)]  # ignored pixel gives 0
    loss = seg_ce_loss(logits, labels)
    assert loss.item() == pytest.approx(sum(ce) / 4, rel=1e-6)
    torch_mean = F.cross_entropy(logits, labels, ignore_index=255).item()  # what must *not* be used
    assert torch_mean == pytest.approx(sum(ce) / 3, rel=1e-6) and abs(torch_mean - loss.item()) > 1e-2
    weight = torch.tensor([[[1.0, 5.0], [0.5, 2.0]]])
    wloss = seg_ce_loss(logits, labels, weight)
    assert wloss.item() == pytest.approx((ce[0] + 0.5 * ce[2] + 2 * ce[3]) / 4, rel=1e-6)


def test_seg_ce_upsamples_bilinear():
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    labels = torch.randint(0, 3, (2, 8, 8))
    labels[0, :2] = 255
    up = F.interpolate(logits, size=(8, 8), mode="bilinear", align_corners=False)
    expected = F.cross_entropy(up, labels, ignore_index=255, reduction="sum") / labels.numel()
    loss = seg_ce_loss(logits, labels)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_acc_seg_counts_ignored_as_wrong():
    logits, labels = _hand_logits()  # argmax: 0, 0, 0, 0 → correct at (0,0) and (1,1)
    assert acc_seg(logits, labels).item() == pytest.approx(50.0)


# ---------------------------------------------------------------------------------------------------------------
# Pseudo-labels (docs/recipe.md §2.3)


def _pseudo_logits():
    low = torch.tensor([0.0, 0.5, 0.0])  # max prob 0.452 < 0.5, label 1
    high = torch.tensor([10.0, 0.0, 0.0])  # confident, label 0
    tie = torch.tensor([0.0, 0.0, -100.0])  # max prob exactly 0.5
    logits = low.view(1, 3, 1, 1).repeat(2, 1, 4, 4)
    logits[0, :, 0] = high.view(3, 1)  # sample 0: 4 confident pixels in row 0
    logits[1, :, 2] = high.view(3, 1)  # sample 1: row 2 confident, row 3 exactly at the threshold
    logits[1, :, 3] = tie.view(3, 1)
    return logits


def test_pseudo_weight_batch_scalar_and_crop():
    logits = _pseudo_logits()
    label, weight = pseudo_label(logits, (4, 4), threshold=0.5, ignore_top=1, ignore_bottom=1)
    assert label.dtype == torch.int64 and weight.dtype == torch.float32 and weight.shape == (2, 4, 4)
    q = 12 / 32  # whole batch (per image: 4/16 and 8/16), threshold inclusive, counted before the crop
    expected = torch.zeros(2, 4, 4)
    expected[:, 1:3] = q
    torch.testing.assert_close(weight, expected, rtol=0, atol=0)
    assert (label[0, 0] == 0).all() and (label[0, 1:] == 1).all() and (label[1, :2] == 1).all()
    _, weight_strict = pseudo_label(logits, (4, 4), threshold=0.5000001, ignore_top=0, ignore_bottom=0)
    torch.testing.assert_close(weight_strict, torch.full((2, 4, 4), 8 / 32), rtol=0, atol=0)


def test_pseudo_label_upsamples_before_softmax():
    logits = torch.randn(2, 5, 3, 3)
    label, weight = pseudo_label(logits, (6, 6), threshold=0.4, ignore_top=0, ignore_bottom=2)
    prob = torch.softmax(F.interpolate(logits, size=(6, 6), mode="bilinear", align_corners=False), dim=1)
    pmax, pl = prob.max(dim=1)
    assert torch.equal(label, pl)
    q = (pmax >= 0.4).float().mean()
    torch.testing.assert_close(weight[:, :4], q.expand(2, 4, 6))
    assert (weight[:, 4:] == 0).all()


# ---------------------------------------------------------------------------------------------------------------
# ClassMix (docs/recipe.md §2.4)


def class_masks(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The fast step's ClassMix masks: the batched class choice looked up at every pixel."""
    return masks_from_chosen(labels, chosen_classes(labels, draw_class_keys(labels.shape[0], generator)))


def _chosen_sets(labels, mask):
    """Per sample: the set of its classes that are pasted; asserts every class is pasted whole or not at all."""
    out = []
    for lab, m in zip(labels, mask[:, 0], strict=True):
        pasted = set()
        for c in lab.unique().tolist():
            sel = m[lab == c]
            assert sel.all() or not sel.any(), "mask must be a union of whole classes"
            if sel.all():
                pasted.add(c)
        out.append(frozenset(pasted))
    return out


def test_classmix_uniform_over_k_subsets_incl_255():
    base = torch.tensor([[0, 1], [2, 255]])  # every sample has the same 4 classes: n = 4, k = 2
    labels = base.repeat(3000, 1, 1)
    mask = class_masks(labels, _gen(0))
    assert mask.shape == (3000, 1, 2, 2) and mask.dtype == torch.bool
    counts = {}
    for s in _chosen_sets(labels, mask):
        assert len(s) == 2
        counts[s] = counts.get(s, 0) + 1
    assert set(counts) == {frozenset(c) for c in itertools.combinations((0, 1, 2, 255), 2)}
    for n in counts.values():  # 500 expected, std ≈ 20
        assert abs(n - 500) < 100, counts


def test_classmix_candidates_are_batch_union():
    # even samples hold {0, 1}, odd samples {2, 3, 255}: K = {0, 1, 2, 3, 255}, k = 3 for everyone
    labels = torch.tensor([[[0, 1]], [[2, 3]]]).repeat(1000, 1, 1)
    labels[1::2, 0, 1] = 255
    labels = torch.cat([labels, torch.tensor([[[3, 3]]]).expand(2000, 1, 2)], dim=1)  # (2000, 2, 2)
    mask = class_masks(labels, _gen(1))
    sets = _chosen_sets(labels, mask)
    hist = [0, 0, 0]
    for s in sets[0::2]:  # how many of its own two classes sample i gets; hypergeometric(5, 2, 3)
        hist[len(s & {0, 1})] += 1
    freq = [h / 1000 for h in hist]
    for f, p in zip(freq, (0.1, 0.6, 0.3), strict=True):  # per-sample candidates would give (0, 1, 0)
        assert abs(f - p) < 0.05, freq
    assert any(255 in s for s in sets[1::2]) and any(255 not in s for s in sets[1::2])


def test_classmix_odd_count_rounds_up():
    labels = torch.tensor([[[0, 1, 2]]]).repeat(50, 1, 1)  # n = 3 → k = 2
    assert all(len(s) == 2 for s in _chosen_sets(labels, class_masks(labels, _gen(2))))


@pytest.mark.parametrize("seed", range(5))
def test_classmix_original_equals_batched(seed):
    g = _gen(100 + seed)
    labels = torch.randint(0, 19, (4, 8, 8), generator=g)
    labels[labels > 15] = 255
    labels[2] = 7  # a sample with a single class
    keys = draw_class_keys(4, _gen(seed))
    assert torch.equal(class_masks(labels, _gen(seed)), class_masks_original(labels, keys))


def test_mix_images_labels_weights():
    mask = torch.tensor([[[[True, False], [False, True]]]])
    img_a, img_b = torch.full((1, 3, 2, 2), 1.0), torch.full((1, 3, 2, 2), -1.0)
    out = mix(mask, img_a, img_b)
    assert torch.equal(out[:, 0], torch.tensor([[[1.0, -1.0], [-1.0, 1.0]]])) and out.shape == (1, 3, 2, 2)
    lab = mix(mask, torch.tensor([[[255, 3], [3, 4]]]), torch.tensor([[[9, 9], [9, 9]]]))
    assert torch.equal(lab, torch.tensor([[[255, 9], [9, 4]]]))  # pasted 255 stays 255
    w = mix(mask, torch.ones(1, 2, 2), torch.full((1, 2, 2), 0.3))
    assert torch.equal(w, torch.tensor([[[1.0, 0.3], [0.3, 1.0]]]))


# ---------------------------------------------------------------------------------------------------------------
# Colour jitter (docs/recipe.md §2.5) against kornia 0.5.8


def _test_image(B=3, H=12, W=10, seed=0):
    x = torch.rand(B, 3, H, W, generator=_gen(seed))
    x[:, :, 0, 0] = 0.5  # grey
    x[:, :, 0, 1] = torch.tensor([1.0, 0.0, 0.0]).view(1, 3)  # pure red
    x[:, :, 0, 2] = torch.tensor([0.3, 0.7, 0.7]).view(1, 3)  # max tie G/B
    x[:, :, 0, 3] = torch.tensor([0.9, 0.9, 0.1]).view(1, 3)  # max tie R/G
    x[:, :, 0, 4] = 0.0
    x[:, :, 0, 5] = 1.0
    return x


def _explicit_params():
    return JitterParams(
        brightness_B=torch.tensor([0.85, 1.17, 1.05]),
        contrast_B=torch.tensor([1.19, 0.81, 0.95]),
        saturation_B=torch.tensor([0.83, 1.2, 1.1]),
        hue_B=torch.tensor([-0.19, 0.13, 0.02]),
        order_B4=torch.tensor([[3, 1, 0, 2], [0, 2, 3, 1], [2, 3, 1, 0]]),
    )


def _kornia_params(p: JitterParams, i: int) -> dict:
    """kornia 0.5.8 ColorJitter parameter dict for sample i (p = 1: batch_prob True)."""
    return {"brightness_factor": p.brightness_B[i : i + 1], "contrast_factor": p.contrast_B[i : i + 1],
            "saturation_factor": p.saturation_B[i : i + 1], "hue_factor": p.hue_B[i : i + 1],
            "order": p.order_B4[i], "batch_prob": torch.tensor([True])}  # fmt: skip


def test_hsv_roundtrip_and_hue_wrap():
    x = _test_image()
    hsv = rgb_to_hsv(x)
    assert (hsv[:, 0] >= 0).all() and (hsv[:, 0] < 2 * math.pi).all()
    torch.testing.assert_close(hsv_to_rgb(hsv), x, atol=2e-6, rtol=0)
    shifted = hsv.clone()
    shifted[:, 0] -= 2 * math.pi  # negative hue wraps to the same colour
    torch.testing.assert_close(hsv_to_rgb(shifted), hsv_to_rgb(hsv), atol=2e-6, rtol=0)


def test_jitter_ops_vs_kornia():
    ke = pytest.importorskip("kornia.enhance")
    kc = pytest.importorskip("kornia.color")
    x, p = _test_image(), _explicit_params()
    torch.testing.assert_close(rgb_to_hsv(x), kc.rgb_to_hsv(x), atol=1e-5, rtol=0)
    hsv = kc.rgb_to_hsv(x)
    hsv[:, 0] = torch.fmod(hsv[:, 0] - 0.3 * 2 * math.pi, 2 * math.pi)  # includes negative hues
    torch.testing.assert_close(hsv_to_rgb(hsv), kc.hsv_to_rgb(hsv), atol=1e-5, rtol=0)
    torch.testing.assert_close(adjust_brightness(x, p.brightness_B), ke.adjust_brightness(x, p.brightness_B - 1))
    torch.testing.assert_close(adjust_contrast(x, p.contrast_B), ke.adjust_contrast(x, p.contrast_B))
    torch.testing.assert_close(adjust_saturation(x, p.saturation_B), ke.adjust_saturation(x, p.saturation_B),
                               atol=1e-5, rtol=0)  # fmt: skip
    torch.testing.assert_close(adjust_hue(x, p.hue_B), ke.adjust_hue(x, p.hue_B * 2 * math.pi), atol=1e-5, rtol=0)


def test_color_jitter_vs_kornia_colorjitter():
    ka = pytest.importorskip("kornia.augmentation")
    x, p = _test_image(), _explicit_params()
    jitter = ka.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.2, p=1.0)
    # DAFormer calls ColorJitter on one image at a time: per-sample factors and order
    expected = torch.cat([jitter(x[i : i + 1], params=_kornia_params(p, i)) for i in range(3)])
    torch.testing.assert_close(color_jitter(x, p), expected, atol=1e-5, rtol=0)
    assert not torch.allclose(color_jitter(x, p._replace(order_B4=p.order_B4.flip(1))), expected, atol=1e-3)


def test_color_jitter_original_equals_batched():
    x, p = _test_image(B=3, H=16, W=16, seed=3), _explicit_params()
    torch.testing.assert_close(color_jitter(x, p), color_jitter_original(x, p), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# Gaussian blur (docs/recipe.md §2.5)


def test_blur_kernel_size():
    assert [blur_kernel_size(s) for s in (512, 64, 1024, 96, 128, 30, 20, 10)] == [51, 7, 103, 9, 13, 3, 1, 1]
    for s in range(8, 1200):  # the reference's formula
        c = math.ceil(0.1 * s)
        assert blur_kernel_size(s) == int(math.floor(c - 0.5 + c % 2))


def test_gaussian_kernel1d_hand_formula():
    k = gaussian_kernel1d(5, torch.tensor([1.0, 0.5]))
    for row, sigma in zip(k, (1.0, 0.5), strict=True):
        w = [math.exp(-(x * x) / (2 * sigma * sigma)) for x in (-2, -1, 0, 1, 2)]
        torch.testing.assert_close(row, torch.tensor([v / sum(w) for v in w]))
    kf = pytest.importorskip("kornia.filters")
    torch.testing.assert_close(gaussian_kernel1d(51, torch.tensor([0.73]))[0], kf.get_gaussian_kernel1d(51, 0.73))


def test_gaussian_blur_vs_kornia():
    kf = pytest.importorskip("kornia.filters")
    x = torch.randn(3, 3, 128, 96, generator=_gen(5))
    sigma = torch.tensor([0.15, 0.6, 1.15], dtype=torch.float64)
    out = gaussian_blur_ref(x, sigma)
    for i in range(3):
        expected = kf.gaussian_blur2d(x[i : i + 1], (13, 9), (sigma[i].item(), sigma[i].item()), "reflect")
        torch.testing.assert_close(out[i : i + 1], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gaussian_blur_original(x, sigma), out, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# The whole strong transform: the fast step's ops and the original's per-sample order


def strong_transform_original(x, mean, std, generator, cfg):
    """The original path's strong augmentation of an already mixed batch: the step's draws, then the per-sample
    ops in the original's order (`apply_strong(..., original=True)`)."""
    return apply_strong(x, mean, std, draw_strong_params(x.shape[0], generator, cfg), original=True)


def strong_transform(x, mean, std, generator, cfg):
    """The fast step's strong augmentation of an already mixed batch, from the same draws as
    `strong_transform_original`: `mix_and_jitter` pasting every pixel (its mix is then the identity), then
    `gaussian_blur`."""
    B, _, H, W = x.shape
    p = draw_strong_params(B, generator, cfg)
    labels = torch.zeros(B, H, W, dtype=torch.long, device=x.device)
    weight = torch.ones(B, H, W, device=x.device)
    every_class = torch.ones(B, 256, dtype=torch.bool, device=x.device)
    jitter = p.jitter_params if p.jitter else None
    out = mix_and_jitter(x, torch.zeros_like(x), labels, labels, weight, every_class, jitter, mean, std)[0]
    return gaussian_blur(out, p.sigma_B) if p.blur else out


def test_strong_params_switches_and_ranges():
    cfg, g = UDAConfig(), _gen(7)
    draws = [draw_strong_params(2, g, cfg) for _ in range(2000)]
    assert abs(sum(d.jitter for d in draws) / 2000 - 0.8) < 0.04  # jitter iff U > 0.2
    assert abs(sum(d.blur for d in draws) / 2000 - 0.5) < 0.04
    jp = [torch.stack(t) for t in zip(*(d.jitter_params for d in draws), strict=True)]
    for t in jp[:3]:
        assert t.min() >= 0.8 and t.max() <= 1.2
    assert jp[3].min() >= -0.2 and jp[3].max() <= 0.2
    assert (jp[4].sort(dim=-1).values == torch.arange(4)).all()  # permutations
    sigma = torch.stack([d.sigma_B for d in draws])
    assert sigma.min() >= 0.15 and sigma.max() <= 1.15
    assert not any(d.blur for d in (draw_strong_params(2, g, UDAConfig(blur=False)) for _ in range(50)))


def _seed_with(want_jitter: bool, want_blur: bool, cfg: UDAConfig) -> int:
    return next(s for s in range(1000) if (lambda p: (p.jitter, p.blur))(draw_strong_params(2, _gen(s), cfg))
                == (want_jitter, want_blur))  # fmt: skip


def test_strong_transform_vs_kornia_pipeline():
    ka = pytest.importorskip("kornia.augmentation")
    kf = pytest.importorskip("kornia.filters")
    cfg = UDAConfig()
    seed = _seed_with(True, True, cfg)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    x = (torch.rand(2, 3, 40, 30, generator=_gen(9)) * 255 - mean) / std
    p = draw_strong_params(2, _gen(seed), cfg)
    jitter = ka.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.2, p=1.0)
    expected = []
    for i in range(2):  # DAFormer's strong_transform on a 1-image batch
        xi = (x[i : i + 1] * std + mean) / 255
        xi = (jitter(xi, params=_kornia_params(p.jitter_params, i)) * 255 - mean) / std
        s = p.sigma_B[i].item()
        expected.append(kf.GaussianBlur2d((3, 3), (s, s))(xi))  # 40 → 3, 30 → 3; default border: reflect
    for transform in (strong_transform, strong_transform_original):
        out = transform(x, MEAN, STD, _gen(seed), cfg)
        torch.testing.assert_close(out, torch.cat(expected), atol=1e-4, rtol=1e-5)


def test_strong_transform_off_is_identity_and_jitter_only():
    cfg = UDAConfig()
    x = torch.randn(2, 3, 16, 16)
    seed = _seed_with(True, False, cfg)
    p = draw_strong_params(2, _gen(seed), cfg)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    expected = (color_jitter((x * std + mean) / 255, p.jitter_params) * 255 - mean) / std
    for transform in (strong_transform, strong_transform_original):
        assert torch.equal(transform(x, MEAN, STD, _gen(_seed_with(False, False, cfg)), cfg), x)
        torch.testing.assert_close(transform(x, MEAN, STD, _gen(seed), cfg), expected)


@pytest.mark.parametrize("seed", range(4))
def test_strong_transform_original_equals_batched(seed):
    cfg = UDAConfig(color_jitter_probability=0.0)
    x = torch.randn(3, 3, 24, 20, generator=_gen(seed))
    out = strong_transform(x, torch.tensor(MEAN), torch.tensor(STD), _gen(seed), cfg)
    ref = strong_transform_original(x, MEAN, STD, _gen(seed), cfg)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_fast_mixed_batch_equals_original_order():
    """The fast step's mixed batch (`chosen_classes`, then the strong draws; `mix_and_jitter`, `gaussian_blur`) and
    the original's per-sample order (`class_masks_original`, per-sample `mix`, `strong_transform_original`) from the
    same generator state, in each of the four jitter/blur cases: masks, labels and weights bit for bit, images bit
    for bit without blur and to fp32 rounding with it (the blur's separable and 2-D forms sum in different orders)."""
    cfg = UDAConfig()

    def after_keys(seed):  # the strong draws follow the class keys, as in the step
        g = _gen(seed)
        torch.rand(2, 256, generator=g, dtype=torch.float64)
        return g

    cases = {(p.jitter, p.blur): s for s in range(40) for p in [draw_strong_params(2, after_keys(s), cfg)]}
    assert len(cases) == 4
    g = _gen(11)
    img, tgt = torch.randn(2, 3, 12, 14, generator=g), torch.randn(2, 3, 12, 14, generator=g)
    gt, pl = torch.randint(0, 19, (2, 12, 14), generator=g), torch.randint(0, 19, (2, 12, 14), generator=g)
    gt[0, :4] = 255
    pw = torch.rand(2, 12, 14, generator=g)
    for (jitter, blur), seed in cases.items():
        g = _gen(seed)
        chosen = chosen_classes(gt, draw_class_keys(2, g))
        aug = draw_strong_params(2, g, cfg)
        fast = mix_and_jitter(img, tgt, gt, pl, pw, chosen, aug.jitter_params if aug.jitter else None, MEAN, STD)
        if aug.blur:
            fast = (gaussian_blur(fast[0], aug.sigma_B), *fast[1:])
        g = _gen(seed)
        masks = class_masks_original(gt, draw_class_keys(2, g))

        def per_sample(a, b):
            return torch.cat([mix(masks[i : i + 1], a[i : i + 1], b[i : i + 1]) for i in range(2)])

        original = (strong_transform_original(per_sample(img, tgt), MEAN, STD, g, cfg), per_sample(gt, pl),
                    per_sample(torch.ones_like(pw), pw), masks)  # fmt: skip
        for name, a, b in zip(("label", "weight", "mask"), fast[1:], original[1:], strict=True):
            assert torch.equal(a, b), (jitter, blur, name)
        if blur:
            torch.testing.assert_close(fast[0], original[0], atol=1e-5, rtol=1e-5)
        else:
            assert torch.equal(fast[0], original[0]), (jitter, blur)
        # The step's select form (switches as device flags, both ops always run) gives the branchy form's values
        # bit for bit, in each case.
        plain = mix(masks, img, tgt)
        assert torch.equal(apply_strong(plain, MEAN, STD, strong_on_device(aug, "cpu")), fast[0]), (jitter, blur)


# ---------------------------------------------------------------------------------------------------------------
# ImageNet feature distance (docs/recipe.md §2.7)


def _fd_label():
    gt = torch.empty(1, 8, 12, dtype=torch.long)
    cells = {(0, 0): [11] * 13 + [0] * 3,  # 0.8125 pure → 11
             (0, 1): [13] * 12 + [2] * 4,  # exactly 0.75 → 13 (kept: only ratio < 0.75 is dropped)
             (0, 2): [12] * 11 + [255] * 5,  # 0.6875 → 255
             (1, 0): [255] * 10 + [6] * 6,  # ignore-dominated → 255 although class 6 is pure among labelled
             (1, 1): [8] * 16,  # vegetation: pure but stuff
             (1, 2): [7] * 16}  # fmt: skip
    for (r, c), values in cells.items():
        gt[0, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4] = torch.tensor(values).view(4, 4)
    return gt


def test_downscale_label_ratio_hand():
    out = downscale_label_ratio(_fd_label(), 4, 0.75, 19)
    assert torch.equal(out, torch.tensor([[[11, 13, 255], [255, 8, 7]]]))


def test_feature_distance_mask_and_l2():
    gt = _fd_label()
    student = torch.full((1, 2, 2, 3), 100.0)
    student[0, :, 0, 0] = torch.tensor([3.0, 4.0])  # ‖·‖ = 5 (squared would be 25)
    student[0, :, 0, 1] = torch.tensor([6.0, 8.0])  # 10
    student[0, :, 1, 2] = torch.tensor([0.0, 1.0])  # 1
    student.requires_grad_(True)
    loss, mask = feature_distance(student, torch.zeros(1, 2, 2, 3), gt, THINGS, 0.75, 19)
    assert torch.equal(mask, torch.tensor([[[True, True, False], [False, False, True]]]))
    assert loss.item() == pytest.approx(16 / 3)
    loss.backward()
    expected = torch.zeros(1, 2, 2, 3)
    expected[0, :, 0, 0] = torch.tensor([3.0, 4.0]) / 5 / 3
    expected[0, :, 0, 1] = torch.tensor([6.0, 8.0]) / 10 / 3
    expected[0, :, 1, 2] = torch.tensor([0.0, 1.0]) / 3
    torch.testing.assert_close(student.grad, expected)
    loss_all, mask_all = feature_distance(student, torch.zeros(1, 2, 2, 3), gt, None, 0.75, 19)
    assert mask_all.all() and loss_all.item() == pytest.approx((16 + 3 * 100 * math.sqrt(2)) / 6)


def test_feature_distance_empty_mask_is_zero():
    student = torch.randn(2, 4, 2, 2, requires_grad=True)
    gt = torch.zeros(2, 64, 64, dtype=torch.long)  # road only: no thing cell
    loss, mask = feature_distance(student, torch.randn(2, 4, 2, 2), gt, THINGS, 0.75, 19)
    assert not mask.any() and torch.isfinite(loss) and loss.item() == 0.0
    loss.backward()
    assert torch.equal(student.grad, torch.zeros_like(student))
