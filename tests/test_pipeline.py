"""Deterministic sample transforms (docs/recipe.md §1.3, §1.6): keep-ratio resize, crop/flip/pad, normalisation."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from daformer_fast.data.datasets import rescale_size
from daformer_fast.data.pipeline import apply_crop, normalize, resize_pair

def test_normalize():
    x = torch.randint(0, 256, (2, 3, 4, 5), dtype=torch.uint8)
    mean = np.array([123.675, 116.28, 103.53]).reshape(1, 3, 1, 1)
    std = np.array([58.395, 57.12, 57.375]).reshape(1, 3, 1, 1)
    out = normalize(x)
    assert out.dtype == torch.float32 and out.shape == x.shape
    np.testing.assert_allclose(out.numpy(), (x.numpy().astype(np.float64) - mean) / std, rtol=0, atol=1e-5)
    zero = normalize(torch.zeros(1, 3, 1, 1, dtype=torch.uint8)).flatten().tolist()
    np.testing.assert_allclose(zero, [-2.117904, -2.035714, -1.804444], atol=1e-5)


def test_normalize_zeroes_padding():
    """The reference pads after Normalize with 0 (docs/recipe.md §1.3): padded pixels are exactly 0, not -mean/std."""
    x = torch.randint(0, 256, (3, 3, 5, 6), dtype=torch.uint8)
    valid = torch.tensor([[5, 6], [3, 6], [2, 4]])  # sample 0 unpadded; 1 padded below; 2 below and right
    out = normalize(x, valid)
    ref = normalize(x)
    assert torch.equal(out[0], ref[0])
    assert torch.equal(out[1, :, :3], ref[1, :, :3]) and (out[1, :, 3:] == 0).all()
    assert torch.equal(out[2, :, :2, :4], ref[2, :, :2, :4])
    assert (out[2, :, 2:] == 0).all() and (out[2, :, :, 4:] == 0).all()
    assert not torch.signbit(out).logical_and(out == 0).any()  # +0.0, not -0.0
    assert torch.equal(normalize(x, torch.tensor([[5, 6]] * 3)), ref)  # nothing padded: the host-side shortcut


@pytest.mark.parametrize(
    "size, scale, expected",
    [((1914, 1052), (1280, 720), (1280, 704)),  # GTA, f = 1280/1914
     ((2048, 1024), (1024, 512), (1024, 512)),  # Cityscapes
     ((1280, 760), (1280, 760), (1280, 760)),  # Synthia, unchanged
     ((1920, 1080), (960, 540), (960, 540))],  # ACDC / Dark Zurich
)  # fmt: skip
def test_resize_pair_keeps_ratio(size, scale, expected):
    w, h = size
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    lbl = np.zeros((h, w), np.uint8)
    lbl[:, w // 2:] = 13
    lbl[: h // 3] = 255
    out_i, out_l = resize_pair(img, lbl, scale)
    assert (out_i.shape[1], out_i.shape[0]) == expected == (out_l.shape[1], out_l.shape[0])
    assert out_i.dtype == np.uint8 and out_l.dtype == np.uint8
    assert abs(expected[0] / expected[1] - w / h) < 2 / expected[1]  # ratio kept up to rounding
    assert set(np.unique(out_l).tolist()) == {0, 13, 255}  # nearest: no interpolated label values
    if expected == (w, h):
        assert out_i is img and out_l is lbl
    else:
        np.testing.assert_array_equal(out_i, cv2.resize(img, expected, interpolation=cv2.INTER_LINEAR))
        np.testing.assert_array_equal(out_l, cv2.resize(lbl, expected, interpolation=cv2.INTER_NEAREST))
    # The training scale is a fixed point: resizing the result again changes nothing (cached datasets rely on it).
    assert rescale_size(expected[0], expected[1], scale) == expected
    again_i, again_l = resize_pair(out_i, out_l, scale)
    assert again_i is out_i and again_l is out_l
    assert resize_pair(img, None, scale)[1] is None


def test_normalize_multiplies_by_the_float32_reciprocal():
    """mmcv's arithmetic written independently in numpy: (x − mean) · (1/std computed in float64, then float32)."""
    x = np.broadcast_to(np.arange(256, dtype=np.uint8), (1, 3, 1, 256)).copy()  # every value in every channel
    mean = np.array([123.675, 116.28, 103.53], np.float32).reshape(1, 3, 1, 1)
    stdinv = (1 / np.array([58.395, 57.12, 57.375], np.float64)).astype(np.float32).reshape(1, 3, 1, 1)
    ref = (x.astype(np.float32) - mean) * stdinv
    np.testing.assert_array_equal(normalize(torch.from_numpy(x)).numpy(), ref)
    # The form matters: dividing by the float32 std rounds some values differently, by one ulp.
    div = (x.astype(np.float32) - mean) / np.array([58.395, 57.12, 57.375], np.float32).reshape(1, 3, 1, 1)
    ulps = np.abs(ref.view(np.int32).astype(np.int64) - div.view(np.int32).astype(np.int64))
    assert ulps.max() == 1 and (ulps > 0).sum() > 10


def test_normalize_of_a_channels_last_batch():
    """Evaluation's (B, H, W, 3) batches go in permuted; the result is the same contiguous (B, 3, H, W) tensor."""
    x_BHW3 = torch.randint(0, 256, (2, 5, 6, 3), dtype=torch.uint8)
    out = normalize(x_BHW3.permute(0, 3, 1, 2))
    assert out.is_contiguous() and out.shape == (2, 3, 5, 6)
    assert torch.equal(out, normalize(x_BHW3.permute(0, 3, 1, 2).contiguous()))


def test_apply_crop_by_hand():
    a = np.arange(12, dtype=np.uint8).reshape(3, 4)
    out = apply_crop(a, (1, 3, 1, 4), True, (3, 4), 255)  # rows 1-2, columns 1-3, mirrored, one row/column padded
    np.testing.assert_array_equal(out, [[7, 6, 5, 255], [11, 10, 9, 255], [255, 255, 255, 255]])
    assert out.flags.c_contiguous and out.dtype == np.uint8
    # A box reaching past the image is clipped, then padded; channels are padded along with the pixels.
    img = np.stack([a, a + 100], axis=-1)
    out = apply_crop(img, (1, 5, 0, 4), False, (4, 5), 0)
    assert out.shape == (4, 5, 2)
    np.testing.assert_array_equal(out[:2, :4, 1], a[1:] + 100)
    assert (out[2:] == 0).all() and (out[:, 4:] == 0).all()
