"""PhotoMetricDistortion of the supervised baselines' loaders (docs/architectures.md §3), the loaders' behaviour with
it off, and the baselines' epoch order."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from daformer_fast.config import parse_config
from daformer_fast.data.photometric import PhotometricDraw, apply_photometric, draw_photometric
from daformer_fast.data.plan import draw_crop, epoch_permutation, item_rng, photometric_rng
from daformer_fast.data.datasets import read_label
from daformer_fast.data.torch_loader import TrainDataset, build_torch_loader

B = 2
SRC_HW, TGT_HW = (40, 56), (20, 48)
"""Image sizes of the tiny benchmark; the configs' scales equal them, so nothing is resized (the hashes below then
depend on no interpolation code), and the 24-row crop pads the 20-row target images."""


def _write(path: Path, a: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)


def _label(rng: np.random.Generator, hw: tuple[int, int]) -> np.ndarray:
    """8x8 blocks of classes 0..5, the last row ignored (255)."""
    blocks = rng.integers(0, 6, size=(hw[0] // 8 + 1, hw[1] // 8 + 1)).astype(np.uint8)
    lbl = np.kron(blocks, np.ones((8, 8), np.uint8))[: hw[0], : hw[1]].copy()
    lbl[-1] = 255
    return lbl


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """5 GTA-layout source images (with RCS statistics) and 3 Cityscapes-layout target images of random pixels."""
    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(123)
    stats = []
    for i in range(5):
        lbl = _label(rng, SRC_HW)
        _write(root / "source" / "images" / f"{i:05d}.png", rng.integers(0, 256, (*SRC_HW, 3), dtype=np.uint8))
        label_path = root / "source" / "labels" / f"{i:05d}_labelTrainIds.png"
        _write(label_path, lbl)
        values, counts = np.unique(lbl[lbl != 255], return_counts=True)
        stats.append({**{str(int(v)): int(n) for v, n in zip(values, counts)}, "file": str(label_path)})
    (root / "source" / "sample_class_stats.json").write_text(json.dumps(stats))
    for i in range(3):
        name = f"city_{i:06d}_000019"
        _write(root / "target" / "leftImg8bit" / "train" / "city" / f"{name}_leftImg8bit.png",
               rng.integers(0, 256, (*TGT_HW, 3), dtype=np.uint8))  # fmt: skip
        _write(root / "target" / "gtFine" / "train" / "city" / f"{name}_gtFine_labelTrainIds.png", _label(rng, TGT_HW))
    return root


def _dataset(root: Path, mode: str, *overrides: str, seed: int = 0, rank: int = 0) -> TrainDataset:
    cfg = parse_config(
        {"data": {
            "source": {"name": "gta", "root": str(root / "source"), "scale": [SRC_HW[1], SRC_HW[0]]},
            "target": {"name": "cityscapes", "root": str(root / "target"), "scale": [TGT_HW[1], TGT_HW[0]]},
            "crop": [24, 32], "batch_size": B, "workers": 0, "rcs": {"min_pixels": 100},
        }},
        list(overrides),
    )  # fmt: skip
    return TrainDataset(cfg.data, mode=mode, num_classes=cfg.model.num_classes, seed=seed, rank=rank)


def _batches(ds: TrainDataset, start: int, stop: int) -> list[dict[str, torch.Tensor]]:
    return list(build_torch_loader(ds, start_iter=start, max_iters=stop, workers=0))


def _digest(batches: list[dict[str, torch.Tensor]]) -> str:
    h = hashlib.sha256()
    for batch in batches:
        for k in sorted(batch):
            v = batch[k].contiguous()
            h.update(f"{k}:{v.dtype}:{tuple(v.shape)}".encode())
            h.update(v.numpy().tobytes())
    return h.hexdigest()[:16]


# Batches of iterations 0..3 (seed 0, rank 0) with the option off. dacs: as the loaders drew them before
# PhotoMetricDistortion existed (the baselines' were 8ba0013d0d8c97f9 and 0f085fd42e2fccd9 then, and still were with
# the option in place, until they began to walk an epoch permutation instead of drawing uniform images).
_DIGESTS = {
    "dacs": "93d35d55552d3254",
    "source_only": "e9325cf1a7fa5358",
    "target_only": "cf0210f8204383a9",
}


@pytest.mark.parametrize("mode", sorted(_DIGESTS))
def test_batches_with_the_option_off_are_unchanged(tiny, mode):
    assert _digest(_batches(_dataset(tiny, mode), 0, 4)) == _DIGESTS[mode]


# ---------------------------------------------------------------------------------------------------------------
# The transform
# ---------------------------------------------------------------------------------------------------------------


def _only(**step) -> PhotometricDraw:
    """A draw with the given steps on and the others off."""
    base = {"brightness": None, "contrast_first": True, "contrast": None, "saturation": None, "hue": None}
    return PhotometricDraw(**{**base, **step})


GREYS = np.array([[[0, 1, 100], [200, 250, 255]]], np.uint8)


@pytest.mark.parametrize(
    "step, expected",
    [
        # x + β in float32, clipped, truncated: 0.7 and 0.5 fractions are dropped, not rounded.
        ({"brightness": 10.7}, [0 + 10, 1 + 10, 110, 210, 255, 255]),
        ({"brightness": -0.5}, [0, 0, 99, 199, 249, 254]),
        # float32 arithmetic: 0.99999999 is 1.0 in float32, so 100 + β is exactly 101 (float64 would give 100).
        ({"brightness": 0.99999999}, [1, 2, 101, 201, 251, 255]),
        # x · α without mean subtraction: 1 · 1.5 = 1.5 → 1, 255 · 0.5 = 127.5 → 127.
        ({"contrast": 1.5}, [0, 1, 150, 255, 255, 255]),
        ({"contrast": 0.5, "contrast_first": False}, [0, 0, 50, 100, 125, 127]),
    ],
)
def test_brightness_and_contrast_truncate(step, expected):
    img = np.repeat(GREYS.reshape(1, 6, 1), 3, axis=2)  # grey pixels: all channels alike
    out = apply_photometric(img, _only(**step))
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.repeat(np.array(expected, np.uint8).reshape(1, 6, 1), 3, axis=2))


PIXELS = np.array([[[200, 100, 50], [30, 60, 90], [10, 200, 120], [255, 255, 255], [0, 0, 0], [120, 40, 200]]],
                  np.uint8)  # fmt: skip


def test_opencv_rgb_conversions_are_the_bgr_ones_on_swapped_channels():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (31, 17, 3), dtype=np.uint8)
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
    np.testing.assert_array_equal(hsv, cv2.cvtColor(np.ascontiguousarray(img[..., ::-1]), cv2.COLOR_BGR2HSV))
    hsv[..., 0] %= 180
    np.testing.assert_array_equal(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB),
                                  cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[..., ::-1])  # fmt: skip
    assert hsv[..., 0].max() < 180  # the 8-bit convention: H in degrees / 2


def _rgb_to_hsv(p) -> tuple[int, int, int]:
    """8-bit HSV by the textbook formulas: V = max, S = 255·(V − min)/V, H = hue in degrees / 2, rounded."""
    r, g, b = (float(x) for x in p)
    v, m = max(r, g, b), min(r, g, b)
    if v == m:
        return 0, 0, int(v)
    d = v - m
    deg = 60 * (g - b) / d if v == r else 120 + 60 * (b - r) / d if v == g else 240 + 60 * (r - g) / d
    return int(round((deg % 360) / 2)) % 180, int(round(255 * d / v)), int(v)


def _hsv_to_rgb(h: int, s: int, v: int) -> list[int]:
    """The inverse textbook formulas, rounded."""
    deg, s = 2.0 * h, s / 255
    i, f = int(deg // 60) % 6, deg / 60 - int(deg // 60)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return [int(round(x)) for x in rgb]


@pytest.mark.parametrize("step", [{"saturation": 0.5}, {"saturation": 1.37}, {"hue": -18}, {"hue": 17}])
def test_saturation_and_hue_follow_the_hsv_formulas(step):
    out = apply_photometric(PIXELS, _only(**step))
    for p, got in zip(PIXELS[0], out[0]):
        h, s, v = _rgb_to_hsv(p)
        if "saturation" in step:
            s = min(int(s * step["saturation"]), 255)  # float32 product truncated, as brightness/contrast
        else:
            h = (h + step["hue"]) % 180
        assert got.tolist() == _hsv_to_rgb(h, s, v), (p, step)


def test_saturation_and_hue_by_hand():
    # (200, 100, 50): V 200, S 255·150/200 = 191.25 → 191, H 60°·50/150 = 20° → 10.
    # S · 0.5 = 95.5 → 95; back: B = 200·(1 − 95/255) = 125.49 → 125, G = 200·(1 − 95/255 · 2/3) = 150.3 → 150.
    assert apply_photometric(PIXELS, _only(saturation=0.5))[0, 0].tolist() == [200, 150, 125]
    # H 10 − 18 → 172 (344°, sector 300°–360°): G = 200·(1 − 191/255) = 50.2 → 50,
    # B = 200·(1 − 191/255 · 44/60) = 90.1 → 90.
    assert apply_photometric(PIXELS, _only(hue=-18))[0, 0].tolist() == [200, 50, 90]
    # Grey, white and black have no hue or saturation to change.
    for step in ({"saturation": 1.4}, {"hue": 17}):
        np.testing.assert_array_equal(apply_photometric(PIXELS, _only(**step))[0, 3:5], PIXELS[0, 3:5])


def test_steps_run_in_the_original_order():
    """brightness → contrast (mode 1) → saturation → hue → contrast (mode 0), each step on the previous output."""
    img = np.random.default_rng(1).integers(0, 256, (9, 11, 3), dtype=np.uint8)
    steps = {"brightness": 20.5, "contrast": 1.3, "saturation": 0.8, "hue": 7}
    by_hand = {True: img, False: img}
    for first in (True, False):
        x = apply_photometric(img, _only(brightness=steps["brightness"]))
        if first:
            x = apply_photometric(x, _only(contrast=steps["contrast"]))
        x = apply_photometric(x, _only(saturation=steps["saturation"]))
        x = apply_photometric(x, _only(hue=steps["hue"]))
        if not first:
            x = apply_photometric(x, _only(contrast=steps["contrast"]))
        by_hand[first] = x
        np.testing.assert_array_equal(apply_photometric(img, PhotometricDraw(contrast_first=first, **steps)), x)
    assert not np.array_equal(by_hand[True], by_hand[False])  # the contrast position matters
    assert not np.shares_memory(apply_photometric(img, _only()), img)  # nothing on: an unchanged copy
    np.testing.assert_array_equal(apply_photometric(img, _only()), img)


class _Script:
    """A stand-in Generator that returns scripted values and records each call."""

    def __init__(self, ints, unis):
        self.ints, self.unis, self.calls = list(ints), list(unis), []

    def integers(self, low, high=None):
        self.calls.append(("integers", low, high))
        return self.ints.pop(0)

    def uniform(self, low, high):
        self.calls.append(("uniform", low, high))
        return self.unis.pop(0)


SWITCH, BETA, ALPHA, DELTA = ("integers", 2, None), ("uniform", -32, 32), ("uniform", 0.5, 1.5), ("integers", -18, 18)


@pytest.mark.parametrize(
    "ints, unis, calls, draw",
    [
        # everything on, mode 1: contrast right after brightness
        ([1, 1, 1, 1, 1, -18], [5.5, 1.25, 0.75], [SWITCH, BETA, SWITCH, SWITCH, ALPHA, SWITCH, ALPHA, SWITCH, DELTA],
         PhotometricDraw(5.5, True, 1.25, 0.75, -18)),
        # everything off, mode 0: five switches, nothing else
        ([0, 0, 0, 0, 0], [], [SWITCH] * 5, PhotometricDraw(None, False, None, None, None)),
        # mode 0: the contrast switch and α come after the hue
        ([1, 0, 0, 1, 17, 1], [-32.0, 1.49], [SWITCH, BETA, SWITCH, SWITCH, SWITCH, DELTA, SWITCH, ALPHA],
         PhotometricDraw(-32.0, False, 1.49, None, 17)),
        # mode 1 with contrast off: its switch is still drawn, before saturation's
        ([0, 1, 0, 1, 0], [0.6], [SWITCH, SWITCH, SWITCH, SWITCH, ALPHA, SWITCH],
         PhotometricDraw(None, True, None, 0.6, None)),
    ],
)  # fmt: skip
def test_draw_order(ints, unis, calls, draw):
    rng = _Script(ints, unis)
    assert draw_photometric(rng) == draw
    assert rng.calls == calls and not rng.ints and not rng.unis


def test_draw_ranges():
    rng = np.random.default_rng(0)
    draws = [draw_photometric(rng) for _ in range(4000)]
    for name in ("brightness", "contrast", "saturation", "hue"):
        assert 0.45 < np.mean([getattr(d, name) is not None for d in draws]) < 0.55, name
    assert 0.45 < np.mean([d.contrast_first for d in draws]) < 0.55
    hues = {d.hue for d in draws if d.hue is not None}
    assert hues == set(range(-18, 18))  # 17 is the largest: the upper bound is excluded
    betas = [d.brightness for d in draws if d.brightness is not None]
    assert -32 <= min(betas) < -31 and 31 < max(betas) < 32
    for name in ("contrast", "saturation"):
        values = [getattr(d, name) for d in draws if getattr(d, name) is not None]
        assert 0.5 <= min(values) < 0.52 and 1.48 < max(values) < 1.5


# ---------------------------------------------------------------------------------------------------------------
# In the plan and the torch loader
# ---------------------------------------------------------------------------------------------------------------


def test_draws_come_from_a_child_of_the_sample_stream(tiny):
    ss = np.random.SeedSequence([5, 1, 3, 0, 0])
    assert photometric_rng(5, 1, 3, 0, 0).integers(1 << 62) == np.random.default_rng(ss.spawn(1)[0]).integers(1 << 62)
    off = _dataset(tiny, "source_only", seed=5, rank=1).planner
    on = _dataset(tiny, "source_only", "data.photometric=true", seed=5, rank=1).planner
    again = _dataset(tiny, "source_only", "data.photometric=true", seed=5, rank=1).planner
    other_seed = _dataset(tiny, "source_only", "data.photometric=true", seed=6, rank=1).planner
    draws = []
    for k in range(12):
        a, b = off.plan(k).labelled, on.plan(k).labelled
        assert a.photometric is None
        t, j = divmod(k, B)
        assert b.photometric == draw_photometric(photometric_rng(5, 1, t, j, 0)) == again.plan(k).labelled.photometric
        np.testing.assert_array_equal(a.label, b.label)  # every other decision is the one made without it
        assert dataclasses.replace(a, label=None, image=None) == dataclasses.replace(b, label=None, image=None,
                                                                                      photometric=None)  # fmt: skip
        draws.append(b.photometric)
    # Samples and seeds draw differently (two draws may still agree: all five switches off has probability 1/32).
    assert len(set(draws)) >= 8 and [other_seed.plan(k).labelled.photometric for k in range(12)] != draws


@pytest.mark.parametrize("mode", ["target_only", "dacs"])
def test_torch_loader_distorts_the_real_pixels_of_every_crop(tiny, mode):
    """On = the off batch with each crop's planned distortion applied to its real pixels; padding stays 0."""
    off = _batches(_dataset(tiny, mode), 0, 3)
    ds = _dataset(tiny, mode, "data.photometric=true")
    on = _batches(ds, 0, 3)
    images = [("img", "valid_hw", "labelled")] + ([("target_img", "target_valid_hw", "unlabelled")] * (mode == "dacs"))
    changed = 0
    for t, (a, b) in enumerate(zip(off, on)):
        assert a.keys() == b.keys()
        for k in a.keys() - {img for img, _, _ in images}:
            assert torch.equal(a[k], b[k]), k
        for j in range(B):
            for img, valid, side in images:
                h, w = a[valid][j].tolist()
                draw = getattr(ds.planner.plan(t * B + j), side).photometric
                expected = a[img][j].permute(1, 2, 0).numpy().copy()
                expected[:h, :w] = apply_photometric(expected[:h, :w], draw)
                np.testing.assert_array_equal(b[img][j].permute(1, 2, 0).numpy(), expected)
                assert not b[img][j, :, h:].any() and not b[img][j, :, :, w:].any()
                changed += not torch.equal(a[img][j], b[img][j])
    assert changed > 0
    assert mode != "target_only" or off[0]["valid_hw"][0, 0] == TGT_HW[0] < 24  # the padded case was exercised


# ---------------------------------------------------------------------------------------------------------------
# Loader choice
# ---------------------------------------------------------------------------------------------------------------


def test_auto_picks_torch_and_dali_is_refused_with_photometric(tiny, monkeypatch, caplog):
    from daformer_fast.config import ConfigError
    from daformer_fast.data import loader
    from daformer_fast.data.dali_loader import DaliTrainLoader

    monkeypatch.setattr("daformer_fast.utils._logged", set())
    monkeypatch.setattr(loader, "dali_available", lambda: (True, ""))  # as if DALI imported, on a CUDA device
    data = _dataset(tiny, "source_only", "data.photometric=true").data
    kw = dict(mode="source_only", num_classes=19, seed=0, max_iters=2, device="cuda")
    with caplog.at_level("INFO", logger="daformer_fast.data"):
        for _ in range(2):
            got = loader.build_train_loader(data, **kw)
            assert isinstance(got, torch.utils.data.DataLoader)
            assert got.loader_check == {"loader": "torch", "batches_compared": 0,
                                        "check": "not run: data.photometric is applied by the torch loader only"}
    assert [r.getMessage() for r in caplog.records if "photometric" in r.getMessage()] == [
        "data.loader=auto: torch DataLoader (data.photometric is applied by the torch loader only)"]  # once
    dali = dataclasses.replace(data, loader="dali")
    with pytest.raises(ConfigError, match=r"^data\.loader=dali cannot apply data\.photometric .*torch or auto$"):
        loader.build_train_loader(dali, **kw)
    with pytest.raises(ConfigError, match="data.photometric"):
        DaliTrainLoader(dali, mode="source_only", num_classes=19, seed=0, max_iters=2)
    # Off, "auto" on a CUDA device with DALI is DALI again (its self-check decides), so the rule is photometric's.
    stub = {"loader": "torch", "check": "stub", "batches_compared": 0}
    monkeypatch.setattr(loader, "check_dali", lambda *a, **k: stub)
    off = loader.build_train_loader(dataclasses.replace(data, photometric=False), **kw)
    assert off.loader_check["check"] == "stub"


# ---------------------------------------------------------------------------------------------------------------
# The baselines' epoch order
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode, n", [("source_only", 5), ("target_only", 3)])
def test_baselines_walk_one_permutation_per_epoch(tiny, mode, n):
    """An epoch is ⌊n/B⌋·B items (the original drops each epoch's incomplete batch), each a different image."""
    planner = _dataset(tiny, mode, seed=3, rank=1).planner
    names = [s.img for s in planner.main.samples]
    per_epoch = (n // B) * B
    epochs = []
    for e in range(40):
        got = [names.index(planner.plan(e * per_epoch + p).labelled.img_path) for p in range(per_epoch)]
        assert len(set(got)) == per_epoch  # no image twice within an epoch
        assert got == epoch_permutation(3, 1, e, n)[:per_epoch].tolist()
        epochs.append(tuple(got))
    assert sum(a != b for a, b in zip(epochs, epochs[1:])) > 25  # a new order (almost) every epoch
    # Every image is left out of some epoch and the permutations are uniform enough to visit each equally often.
    counts = np.bincount(np.concatenate(epochs), minlength=n)
    assert counts.min() > 0.6 * counts.mean()
    # A pure function of the item counter: a fresh planner (a resumed run, another worker) agrees at any k.
    fresh = _dataset(tiny, mode, seed=3, rank=1).planner
    for k in (7 * per_epoch + 1, 3, 0):
        assert fresh.plan(k).labelled.img_path == planner.plan(k).labelled.img_path
    # Ranks and seeds walk different orders.
    for other in (_dataset(tiny, mode, seed=3, rank=0).planner, _dataset(tiny, mode, seed=4, rank=1).planner):
        assert [other.plan(k).labelled.img_path for k in range(8 * per_epoch)] != [
            planner.plan(k).labelled.img_path for k in range(8 * per_epoch)]


def test_baseline_items_draw_no_index_and_dacs_draws_as_before(tiny):
    """The baselines' crop and flip are the first draws of the item's stream; dacs has no epoch order."""
    planner = _dataset(tiny, "source_only").planner
    for k in range(6):
        p = planner.plan(k).labelled
        t, j = divmod(k, B)
        i = epoch_permutation(0, 0, k // 4, 5)[k % 4]
        lbl = read_label(planner.main.samples[i].label)
        box, flip, crop = draw_crop(item_rng(0, 0, t, j, 0), lbl.shape, lbl, (24, 32), cat_max_ratio=0.75)
        assert (p.img_path, p.box, p.flip) == (planner.main.samples[i].img, box, flip)
        np.testing.assert_array_equal(p.label, crop)
    dacs = _dataset(tiny, "dacs").planner
    assert dacs.epoch_index(0) is None and dacs.plan(0).labelled.rcs_class >= 0
