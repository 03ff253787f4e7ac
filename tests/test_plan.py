"""Crop rules of the sample plan (docs/recipe.md §1.6, §3.1–3.2), replayed by hand from the same Generator; item
plans."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest

from daformer_fast.config import parse_config
from daformer_fast.data import plan
from daformer_fast.data.dali_loader import read_image_header
from daformer_fast.data.datasets import DatasetError
from daformer_fast.data.plan import ItemPlanner, crop_box, draw_crop, random_crop, sample_crop
from daformer_fast.data.synthetic import make_synthetic
from daformer_fast.data.torch_loader import decode_image

CROP = (8, 8)


def _patch_label() -> np.ndarray:
    """20x20 of class 0 with a 6x6 block of class 1 in the top-left corner and a few ignore pixels."""
    lbl = np.zeros((20, 20), np.uint8)
    lbl[:6, :6] = 1
    lbl[19, :] = 255
    return lbl


def _accepted(crop: np.ndarray, ratio: float) -> bool:
    """The mmseg rule written independently: >1 class after dropping 255, top class share < ratio."""
    values, counts = np.unique(crop, return_counts=True)
    counts = counts[values != 255]
    return len(counts) > 1 and counts.max() / counts.sum() < ratio


def _hand_boxes(seed: int, shape, crop, n: int) -> list[tuple[int, int, int, int]]:
    """The first n boxes the Generator yields: y offset first, then x, each uniform in [0, margin] inclusive."""
    rng = np.random.default_rng(seed)
    boxes = []
    for _ in range(n):
        y0 = int(rng.integers(0, shape[0] - crop[0] + 1))
        x0 = int(rng.integers(0, shape[1] - crop[1] + 1))
        boxes.append((y0, y0 + crop[0], x0, x0 + crop[1]))
    return boxes


def test_crop_box_offsets_are_uniform_and_inclusive():
    rng = np.random.default_rng(0)
    ys, xs = zip(*[(b[0], b[2]) for b in (crop_box(rng, (12, 10), (8, 8)) for _ in range(3000))])
    assert set(ys) == set(range(5)) and set(xs) == set(range(3))
    assert crop_box(rng, (4, 5), (8, 8)) == (0, 8, 0, 8)  # smaller than the crop: offset 0, box clipped later


def test_cat_max_ratio_replayed_by_hand():
    lbl = _patch_label()
    accepted_early = fallback = 0
    for seed in range(300):
        box = random_crop(np.random.default_rng(seed), lbl, CROP, cat_max_ratio=0.75)
        hand = _hand_boxes(seed, lbl.shape, CROP, 11)
        ok = [_accepted(lbl[y0:y1, x0:x1], 0.75) for y0, y1, x0, x1 in hand]
        if any(ok[:10]):
            expected = hand[ok.index(True)]  # the first box passing one of the 10 checks
            accepted_early += 1
            y0, y1, x0, x1 = box
            assert _accepted(lbl[y0:y1, x0:x1], 0.75)
        else:
            expected = hand[10]  # 10 failed checks: the 11th box is returned without a check
            fallback += 1
        assert box == expected, seed
    # Valid crops are rare here (~6 % of offsets), so both branches occur many times.
    assert accepted_early > 50 and fallback > 50


def test_cat_max_ratio_fallback_consumes_exactly_eleven_boxes():
    lbl = np.zeros((20, 20), np.uint8)  # every crop is one class: all 10 checks fail
    rng = np.random.default_rng(5)
    box = random_crop(rng, lbl, CROP, cat_max_ratio=0.75)
    replay = np.random.default_rng(5)
    hand = [(int(replay.integers(0, 13)), int(replay.integers(0, 13))) for _ in range(11)]
    assert (box[0], box[2]) == hand[10]
    assert rng.random() == replay.random()  # no further draw was made


def test_cat_max_ratio_one_is_a_single_plain_crop():
    lbl = np.zeros((20, 20), np.uint8)
    rng = np.random.default_rng(11)
    box = random_crop(rng, lbl, CROP, cat_max_ratio=1.0)
    assert box == _hand_boxes(11, lbl.shape, CROP, 1)[0]
    replay = np.random.default_rng(11)
    replay.integers(0, 13), replay.integers(0, 13)
    assert rng.random() == replay.random()
    with pytest.raises(ValueError, match="needs the label"):
        random_crop(rng, None, CROP)


def test_ignore_pixels_do_not_count():
    crop = np.full((8, 8), 255, np.uint8)
    crop[0, :3] = 1
    crop[1, :2] = 2  # 3 vs 2 pixels of labelled classes: 60 % < 75 % although 255 dominates
    lbl = np.zeros((20, 20), np.uint8)
    lbl[:8, :8] = crop
    # Only the top-left box (offset 0, 0) passes; a generator that yields it first must return it.
    for seed in range(200):
        hand = _hand_boxes(seed, (20, 20), CROP, 1)[0]
        if hand[0] == 0 and hand[2] == 0:
            assert random_crop(np.random.default_rng(seed), lbl, CROP, 0.75) == hand
            break
    else:
        pytest.fail("no seed starts at offset (0, 0)")
    assert _accepted(crop, 0.75) and not _accepted(np.full((8, 8), 255, np.uint8), 0.75)


def _coord_image(h: int, w: int) -> np.ndarray:
    """uint8 image whose channels encode (row, column, 7): every crop identifies its box."""
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([yy, xx, np.full_like(yy, 7)], axis=-1).astype(np.uint8)


def _replay_rcs(seed, img, lbl, crop, cls, min_px, flip_prob=0.5):
    """sample_crop's draws by hand (cat_max_ratio 1): per attempt y0, x0, flip; up to 10 re-checks."""
    rng = np.random.default_rng(seed)
    for attempt in range(11):
        y0 = int(rng.integers(0, img.shape[0] - crop[0] + 1))
        x0 = int(rng.integers(0, img.shape[1] - crop[1] + 1))
        flip = rng.random() < flip_prob
        out_i, out_l = img[y0:y0 + crop[0], x0:x0 + crop[1]], lbl[y0:y0 + crop[0], x0:x0 + crop[1]]
        if flip:
            out_i, out_l = out_i[:, ::-1], out_l[:, ::-1]
        if np.count_nonzero(out_l == cls) > min_px or attempt == 10:
            return out_i, out_l, attempt, rng


def test_rcs_recrop_replayed_by_hand():
    img = _coord_image(40, 40)
    lbl = np.zeros((40, 40), np.uint8)
    lbl[30:36, 2:8] = 17  # 36 pixels of a rare class in one corner
    recropped = gave_up = 0
    for seed in range(150):
        out_i, out_l = sample_crop(np.random.default_rng(seed), img, lbl, (10, 10), rcs_class=17, rcs_min_pixels=12)
        exp_i, exp_l, attempts, _ = _replay_rcs(seed, img, lbl, (10, 10), 17, 12)
        np.testing.assert_array_equal(out_i, exp_i)
        np.testing.assert_array_equal(out_l, exp_l)
        if np.count_nonzero(exp_l == 17) > 12:
            assert np.count_nonzero(out_l == 17) > 12
            recropped += attempts > 0
        else:
            gave_up += 1
    assert recropped > 20 and gave_up > 5  # both the successful re-crop and the give-up path were exercised


def test_rcs_recrop_stops_after_ten_rechecks():
    img = _coord_image(30, 30)
    lbl = np.zeros((30, 30), np.uint8)  # class 17 absent: every check fails
    rng = np.random.default_rng(3)
    out_i, _ = sample_crop(rng, img, lbl, (10, 10), rcs_class=17, rcs_min_pixels=0)
    exp_i, _, attempts, replay = _replay_rcs(3, img, lbl, (10, 10), 17, 0)
    assert attempts == 10
    np.testing.assert_array_equal(out_i, exp_i)
    assert rng.random() == replay.random()  # exactly 11 crops (33 draws) were made
    # Without an RCS class a single crop is drawn.
    rng = np.random.default_rng(3)
    sample_crop(rng, img, lbl, (10, 10))
    replay = np.random.default_rng(3)
    replay.integers(0, 21), replay.integers(0, 21), replay.random()
    assert rng.random() == replay.random()


def test_rcs_threshold_is_strict():
    img = _coord_image(10, 10)
    lbl = np.zeros((10, 10), np.uint8)
    lbl[:2, :6] = 5  # exactly 12 pixels in the only possible crop
    rng = np.random.default_rng(0)
    sample_crop(rng, img, lbl, (10, 10), rcs_class=5, rcs_min_pixels=12)  # 12 is not > 12: 11 attempts
    replay = np.random.default_rng(0)
    for _ in range(11):
        replay.integers(0, 1), replay.integers(0, 1), replay.random()
    assert rng.random() == replay.random()
    rng = np.random.default_rng(0)
    sample_crop(rng, img, lbl, (10, 10), rcs_class=5, rcs_min_pixels=11.5)  # accepted at once
    replay = np.random.default_rng(0)
    replay.integers(0, 1), replay.integers(0, 1), replay.random()
    assert rng.random() == replay.random()


def test_flip_probability_and_consistency():
    img = _coord_image(6, 9)
    lbl = np.tile(np.arange(9, dtype=np.uint8), (6, 1))
    rng = np.random.default_rng(0)
    n, flips = 4000, 0
    for _ in range(n):
        out_i, out_l = sample_crop(rng, img, lbl, (6, 9), flip_prob=0.5)
        flipped = out_i[0, 0, 1] == 8
        np.testing.assert_array_equal(out_i, img[:, ::-1] if flipped else img)
        np.testing.assert_array_equal(out_l, lbl[:, ::-1] if flipped else lbl)  # label follows the image
        flips += flipped
    assert abs(flips / n - 0.5) < 4 * np.sqrt(0.25 / n)
    for p, expected in ((0.0, 0), (1.0, 200)):
        rng = np.random.default_rng(1)
        assert sum(sample_crop(rng, img, lbl, (6, 9), flip_prob=p)[0][0, 0, 1] == 8 for _ in range(200)) == expected
    # Unlabelled (target) images flip too and return no label.
    out_i, out_l = sample_crop(np.random.default_rng(0), img, None, (6, 9), flip_prob=1.0)
    assert out_l is None
    np.testing.assert_array_equal(out_i, img[:, ::-1])
    assert out_i.flags.c_contiguous


def test_padding_small_images():
    img = _coord_image(5, 7) + 1  # no zero pixel inside the image
    lbl = np.full((5, 7), 3, np.uint8)
    out_i, out_l = sample_crop(np.random.default_rng(0), img, lbl, (8, 10), flip_prob=0.0, cat_max_ratio=0.75)
    assert out_i.shape == (8, 10, 3) and out_l.shape == (8, 10) and out_i.dtype == np.uint8
    np.testing.assert_array_equal(out_i[:5, :7], img)
    assert (out_i[5:] == 0).all() and (out_i[:, 7:] == 0).all()
    np.testing.assert_array_equal(out_l[:5, :7], lbl)
    assert (out_l[5:] == 255).all() and (out_l[:, 7:] == 255).all()
    # Larger in one dimension, smaller in the other: crop rows, pad columns on the right.
    img = _coord_image(12, 6) + 1
    out_i, out_l = sample_crop(np.random.default_rng(4), img, np.zeros((12, 6), np.uint8), (8, 8), flip_prob=0.0)
    y0 = int(out_i[0, 0, 0]) - 1
    assert 0 <= y0 <= 4
    np.testing.assert_array_equal(out_i[:, :6], img[y0:y0 + 8])
    assert (out_i[:, 6:] == 0).all() and (out_l[:, 6:] == 255).all() and (out_l[:, :6] == 0).all()
    # A flipped padded crop: the image content is mirrored, the padding stays at the right/bottom.
    img = _coord_image(5, 7) + 1
    out_i, out_l = sample_crop(np.random.default_rng(0), img, lbl, (8, 10), flip_prob=1.0)
    np.testing.assert_array_equal(out_i[:5, :7], img[:, ::-1])
    assert (out_i[:, 7:] == 0).all() and (out_l[:, 7:] == 255).all()
    # Unlabelled images are padded as well.
    out_i, _ = sample_crop(np.random.default_rng(0), img, None, (8, 10))
    assert out_i.shape == (8, 10, 3)


def test_draw_crop_clips_the_box_and_crops_the_label_as_sample_crop():
    img = _coord_image(5, 7) + 1
    lbl = np.arange(35, dtype=np.uint8).reshape(5, 7)
    box, flip, out_l = draw_crop(np.random.default_rng(0), (5, 7), lbl, (8, 10), flip_prob=1.0)
    assert box == (0, 5, 0, 7) and flip  # offset 0 and clipped: the real pixels are 5x7
    np.testing.assert_array_equal(out_l, sample_crop(np.random.default_rng(0), img, lbl, (8, 10), flip_prob=1.0)[1])
    np.testing.assert_array_equal(out_l[:5, :7], lbl[:, ::-1])
    # Unlabelled: the box comes from the size alone (here clipped to 7 columns) and there is no label.
    box, flip, out_l = draw_crop(np.random.default_rng(1), (12, 7), None, (8, 8), flip_prob=0.0)
    replay = np.random.default_rng(1)
    y0, x0 = int(replay.integers(0, 5)), int(replay.integers(0, 1))
    assert out_l is None and not flip and box == (y0, y0 + 8, 0, 7) and x0 == 0


def test_check_counts_are_the_named_constants(monkeypatch):
    """The loops run exactly CAT_MAX_CHECKS / RCS_CHECKS checks: with 3, every failing check draws 4 boxes."""
    monkeypatch.setattr(plan, "CAT_MAX_CHECKS", 3)
    monkeypatch.setattr(plan, "RCS_CHECKS", 3)
    lbl = np.zeros((20, 20), np.uint8)  # one class: every cat_max_ratio and every RCS check fails
    rng = np.random.default_rng(5)
    random_crop(rng, lbl, CROP, cat_max_ratio=0.75)
    replay = np.random.default_rng(5)
    for _ in range(4):
        replay.integers(0, 13), replay.integers(0, 13)
    assert rng.random() == replay.random()
    rng = np.random.default_rng(6)
    draw_crop(rng, (20, 20), lbl, CROP, rcs_class=3, rcs_min_pixels=0)
    replay = np.random.default_rng(6)
    for _ in range(4):
        replay.integers(0, 13), replay.integers(0, 13), replay.random()
    assert rng.random() == replay.random()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tiny synthetic benchmark: source 96x64 → 72x48 (scale 80x48), target → 60x40 (72x40); 32x48 crops, RCS."""
    root = make_synthetic(tmp_path_factory.mktemp("syn"), n_source=8, n_target=4, n_val=1, size=(96, 64), quiet=True)
    return parse_config({"data": {
        "source": {"root": str(root / "source"), "scale": [80, 48]},
        "target": {"root": str(root / "target"), "scale": [72, 40]},
        "crop": [32, 48], "rcs": {"min_pixels": 20}, "workers": 0,
    }}).data  # fmt: skip


def _planner(data, reader, mode: str = "dacs", **over) -> ItemPlanner:
    return ItemPlanner(dataclasses.replace(data, **over), mode=mode, num_classes=19, seed=4, rank=1,
                       read_image=reader)  # fmt: skip


def test_plans_do_not_depend_on_how_images_are_read(data):
    """Both loaders' plans: decoding the image (torch) or reading its header (DALI) gives the same decisions."""
    decoded, header = _planner(data, decode_image), _planner(data, read_image_header)
    for k in range(12):
        a, b = decoded.plan(k), header.plan(k)
        assert (a.iteration, a.index) == (b.iteration, b.index) == divmod(k, 2)
        for sa, sb in ((a.labelled, b.labelled), (a.unlabelled, b.unlabelled)):
            assert sb.image is None and sa.image.shape == (64, 96, 3) and sa.src_hw == sb.src_hw == (64, 96)
            np.testing.assert_array_equal(sa.label, sb.label)
            assert dataclasses.replace(sa, image=None, label=None) == dataclasses.replace(sb, label=None)
        assert a.labelled.rcs_class >= 0 and a.unlabelled.rcs_class == -1 and a.unlabelled.label is None
    # 96x64 → 72x48 source (scale 80x48), 60x40 target: the 32x48 crop is clipped to 40 rows on the target only.
    p = decoded.plan(0)
    assert p.labelled.size_hw == (48, 72) and p.unlabelled.size_hw == (40, 60)
    assert p.labelled.valid_hw == (32, 48) and p.unlabelled.valid_hw == (32, 48)
    p = _planner(data, decode_image, crop=(44, 48)).plan(0)
    assert p.labelled.valid_hw == (44, 48) and p.unlabelled.valid_hw == (40, 48) and p.unlabelled.box[:2] == (0, 40)
    assert p.labelled.label.shape == (44, 48) and p.failed == 0


def test_unreadable_images_are_redrawn_then_stop_the_run(data, caplog):
    bad = {s.img for s in _planner(data, decode_image, "source_only").main.samples[:4]}

    def flaky(path):
        if path in bad:
            raise DatasetError(f"cannot read image {path}")
        return decode_image(path)

    planner = _planner(data, flaky, "source_only")
    with caplog.at_level(logging.WARNING, logger="daformer_fast.data"):
        plans = [planner.plan(k) for k in range(20)]
    failed = sum(p.failed for p in plans)
    assert failed > 0 and failed == len([r for r in caplog.records if "skipping unreadable sample" in r.getMessage()])
    assert all(p.labelled.img_path not in bad for p in plans)
    with pytest.raises(DatasetError, match="cannot read image"):
        for k in range(20):
            _planner(data, flaky, "source_only", strict=True).plan(k)
    calls = []

    def broken(path):
        calls.append(path)
        raise DatasetError(f"cannot read image {path}")

    with pytest.raises(DatasetError, match=f"{plan.MAX_SAMPLE_DRAWS} unreadable samples in a row in .*source"):
        _planner(data, broken, "source_only").plan(0)
    assert len(calls) == plan.MAX_SAMPLE_DRAWS == 10


def test_npy_cache_plans_read_sizes_from_headers_not_the_reader(data, tmp_path):
    """On an npy cache the planner never calls the executor's reader: sizes come from the .npy headers, and the
    plans are those of the originals (the cache holds the resized images, so size_hw == src_hw)."""
    from daformer_fast.tools.cache_dataset import cache_dataset

    roots = {side: cache_dataset(getattr(data, side), tmp_path, fmt="npy", quiet=True, say=None).root
             for side in ("source", "target")}  # fmt: skip
    cached = dataclasses.replace(data, **{side: dataclasses.replace(getattr(data, side), root=str(roots[side]))
                                          for side in roots})  # fmt: skip

    def never(path):
        raise AssertionError(f"the reader was asked for {path}")

    ours, theirs = _planner(cached, never), _planner(data, decode_image)
    for k in range(8):
        a, b = ours.plan(k), theirs.plan(k)
        for sa, sb in ((a.labelled, b.labelled), (a.unlabelled, b.unlabelled)):
            assert sa.image is None and sa.img_path.suffix == ".npy" and sa.src_hw == sa.size_hw == sb.size_hw
            assert (sa.box, sa.flip, sa.rcs_class, sa.failed) == (sb.box, sb.flip, sb.rcs_class, sb.failed)
            assert (sa.label is None) == (sb.label is None)
            if sa.label is not None:
                np.testing.assert_array_equal(sa.label, sb.label)
    # A cached file that no longer matches the index stops the run, naming both sizes.
    victim = roots["source"] / "images" / "00001.npy"
    np.save(victim, np.zeros((40, 60, 3), np.uint8))
    with pytest.raises(DatasetError, match=r"00001\.npy is 60x40, its npy cache index says 72x48"):
        for k in range(40):
            _planner(cached, never, "source_only", rcs=dataclasses.replace(data.rcs, enabled=False)).plan(k)
