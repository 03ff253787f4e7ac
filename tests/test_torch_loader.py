"""Torch training loader on a tiny synthetic benchmark: batch contract, determinism, modes, bad data, generator."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from daformer_fast.config import parse_config
from daformer_fast.data.datasets import DatasetError, read_image, read_label
from daformer_fast.data.npy_cache import read_npy_crop
from daformer_fast.data.pipeline import resize_pair
from daformer_fast.data.plan import epoch_permutation, item_rng, sample_crop
from daformer_fast.data.synthetic import ensure_synthetic, make_synthetic
from daformer_fast.data.torch_loader import FailureMonitor, TrainDataset, build_torch_loader
from daformer_fast.tools.cache_dataset import cache_dataset

B = 2


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("syn"), n_source=10, n_target=6, n_val=2, size=(96, 64), seed=0,
                          quiet=True)  # fmt: skip


def _cfg(root: Path, *overrides: str):
    return parse_config(
        {"data": {
            "source": {"name": "gta", "root": str(root / "source"), "scale": [80, 48]},
            "target": {"name": "cityscapes", "root": str(root / "target"), "scale": [80, 48]},
            "crop": [32, 32], "batch_size": B, "workers": 0, "rcs": {"min_pixels": 20},
        }},
        overrides,
    )  # fmt: skip


def _dataset(root: Path, mode: str = "dacs", seed: int = 0, rank: int = 0, *overrides: str) -> TrainDataset:
    cfg = _cfg(root, *overrides)
    return TrainDataset(cfg.data, mode=mode, num_classes=cfg.model.num_classes, seed=seed, rank=rank)


def _batches(ds: TrainDataset, start: int, stop: int, workers: int = 0) -> list[dict[str, torch.Tensor]]:
    return list(build_torch_loader(ds, start_iter=start, max_iters=stop, workers=workers))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_batch_contract(bench):
    ds = _dataset(bench)
    batches = _batches(ds, 0, 3)
    assert len(batches) == 3
    for batch in batches:
        assert set(batch) == {"img", "gt", "target_img", "rcs_class", "failed", "valid_hw", "target_valid_hw"}
        assert batch["img"].dtype == torch.uint8 and batch["img"].shape == (B, 3, 32, 32)
        assert batch["target_img"].dtype == torch.uint8 and batch["target_img"].shape == (B, 3, 32, 32)
        assert batch["gt"].dtype == torch.int64 and batch["gt"].shape == (B, 32, 32)
        assert batch["rcs_class"].dtype == torch.int64 and batch["rcs_class"].shape == (B,)
        assert batch["failed"].dtype == torch.int64 and batch["failed"].tolist() == [0] * B
        for k in ("valid_hw", "target_valid_hw"):  # images are larger than the crop: nothing padded
            assert batch[k].dtype == torch.int64 and batch[k].tolist() == [[32, 32]] * B
        values = set(batch["gt"].unique().tolist())
        assert values <= set(range(19)) | {255} and values - {255}
        assert set(batch["rcs_class"].tolist()) <= set(ds.planner.rcs.classes.tolist())
        assert not torch.equal(batch["img"], batch["target_img"])


def _replay_dacs_item(ds: TrainDataset, seed: int, rank: int, t: int, j: int):
    """Item (t, j) by hand: RCS class/image, resize, crop with re-crop; then an independent target image."""
    data = ds.data
    rng = item_rng(seed, rank, t, j, 0)
    c, i = ds.planner.rcs.sample(rng)
    s = ds.planner.main.samples[i]
    img, lbl = resize_pair(read_image(s.img), read_label(s.label), data.source.scale)
    img, lbl = sample_crop(rng, img, lbl, data.crop, cat_max_ratio=data.cat_max_ratio, flip_prob=data.flip_prob,
                           rcs_class=c, rcs_min_pixels=data.rcs.min_pixels * data.rcs.min_crop_ratio)  # fmt: skip
    rng = item_rng(seed, rank, t, j, 1)
    ts = ds.planner.other.samples[int(rng.integers(len(ds.planner.other.samples)))]
    timg, _ = resize_pair(read_image(ts.img), None, data.target.scale)
    timg, _ = sample_crop(rng, timg, None, data.crop, flip_prob=data.flip_prob)
    return c, img, lbl, timg


def test_items_follow_seed_rank_iteration_index(bench):
    ds = _dataset(bench, "dacs", 3, 1)
    batches = _batches(ds, 0, 4)
    for t, batch in enumerate(batches):
        for j in range(B):
            c, img, lbl, timg = _replay_dacs_item(ds, 3, 1, t, j)
            assert batch["rcs_class"][j].item() == c
            np.testing.assert_array_equal(batch["img"][j].permute(1, 2, 0).numpy(), img)
            np.testing.assert_array_equal(batch["gt"][j].numpy(), lbl)
            np.testing.assert_array_equal(batch["target_img"][j].permute(1, 2, 0).numpy(), timg)


def test_determinism_workers_resume_rank_seed(bench):
    ref = _batches(_dataset(bench), 0, 8, workers=0)
    par = _batches(_dataset(bench), 0, 8, workers=2)
    assert len(ref) == len(par) == 8
    assert all(_same(a, b) for a, b in zip(ref, par))
    resumed = _batches(_dataset(bench), 5, 8, workers=0)
    assert len(resumed) == 3 and all(_same(a, b) for a, b in zip(ref[5:], resumed))
    # Iterations differ from each other, and ranks / seeds draw different batches.
    assert not _same(ref[0], ref[1])
    rank1 = _batches(_dataset(bench, "dacs", 0, 1), 0, 3)
    seed1 = _batches(_dataset(bench, "dacs", 1, 0), 0, 3)
    for other in (rank1, seed1):
        assert not any(torch.equal(a["img"], b["img"]) for a, b in zip(ref, other))
        assert not any(torch.equal(a["target_img"], b["target_img"]) for a, b in zip(ref, other))


def test_source_only_mode(bench):
    ds = _dataset(bench, "source_only")
    assert ds.planner.rcs is None and ds.planner.other is None
    batch = _batches(ds, 0, 1)[0]
    assert set(batch) == {"img", "gt", "rcs_class", "failed", "valid_hw"}
    assert batch["rcs_class"].tolist() == [-1] * B
    # The baselines: the image at the item's place in the epoch permutation, then the cat_max_ratio crop; by hand.
    for j in range(B):
        rng = item_rng(0, 0, 0, j, 0)
        s = ds.planner.main.samples[epoch_permutation(0, 0, 0, 10)[j]]
        img, lbl = resize_pair(read_image(s.img), read_label(s.label), (80, 48))
        img, lbl = sample_crop(rng, img, lbl, (32, 32), cat_max_ratio=0.75, flip_prob=0.5)
        np.testing.assert_array_equal(batch["img"][j].permute(1, 2, 0).numpy(), img)
        np.testing.assert_array_equal(batch["gt"][j].numpy(), lbl)


def test_target_only_mode_uses_target_labels(bench):
    ds = _dataset(bench, "target_only")
    assert [s.label.name for s in ds.planner.main.samples][:1] == ["alpha_000000_000019_gtFine_labelTrainIds.png"]
    assert len(ds.planner.main.samples) == 6 and ds.planner.other is None and ds.planner.rcs is None
    batch = _batches(ds, 2, 3)[0]
    assert "target_img" not in batch
    for j in range(B):
        rng = item_rng(0, 0, 2, j, 0)
        s = ds.planner.main.samples[epoch_permutation(0, 0, 0, 6)[2 * B + j]]
        assert "gtFine/train" in s.label.as_posix()
        img, lbl = resize_pair(read_image(s.img), read_label(s.label), (80, 48))
        img, lbl = sample_crop(rng, img, lbl, (32, 32), cat_max_ratio=0.75, flip_prob=0.5)
        np.testing.assert_array_equal(batch["img"][j].permute(1, 2, 0).numpy(), img)
        np.testing.assert_array_equal(batch["gt"][j].numpy(), lbl)


@pytest.fixture
def copy(bench, tmp_path) -> Path:
    shutil.copytree(bench, tmp_path / "syn")
    return tmp_path / "syn"


def _items_until(ds: TrainDataset, pred, limit: int = 200):
    for k in range(limit):
        item = ds[k]
        if pred(item):
            return item
    pytest.fail("condition never met")


def test_corrupt_image_is_skipped_with_warning(copy, caplog):
    bad = copy / "source" / "images" / "00003.png"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    ds = _dataset(copy, "source_only")
    with caplog.at_level(logging.WARNING, logger="daformer_fast.data"):
        failed = sum(int(ds[k]["failed"]) for k in range(60))
    ours = [r for r in caplog.records if r.name == "daformer_fast.data"]
    warnings = [r.getMessage() for r in ours if r.levelno == logging.WARNING]
    assert failed > 0 and failed == len(warnings)
    assert all("skipping unreadable sample" in w and str(bad) in w for w in warnings)
    # A skipped draw is replaced by another sample: every item still has a full image.
    item = _items_until(ds, lambda it: it["failed"] > 0)
    assert item["img"].shape == (3, 32, 32)
    # In dacs mode the target side counts into `failed` too.
    tbad = copy / "target" / "leftImg8bit" / "train" / "alpha" / "alpha_000000_000019_leftImg8bit.png"
    tbad.write_bytes(b"not a png")
    ds = _dataset(copy, "dacs")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="daformer_fast.data"):
        _items_until(ds, lambda it: it["failed"] > 0)
    assert any(str(tbad) in r.getMessage() or str(bad) in r.getMessage() for r in caplog.records)


def test_strict_raises_naming_the_file(copy):
    bad = copy / "source" / "images" / "00003.png"
    bad.write_bytes(b"\x89PNG garbage")
    ds = _dataset(copy, "source_only", 0, 0, "data.strict=true")
    with pytest.raises(DatasetError, match=r"cannot read image .*00003\.png"):
        for k in range(200):
            ds[k]


def test_size_mismatch_raises_naming_both_files(copy):
    lbl = copy / "source" / "labels" / "00003_labelTrainIds.png"
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(lbl)
    ds = _dataset(copy, "source_only")  # not strict: a mismatch is never skipped
    with pytest.raises(DatasetError, match="size mismatch") as e:
        for k in range(200):
            ds[k]
    msg = str(e.value)
    assert str(copy / "source" / "images" / "00003.png") in msg and str(lbl) in msg
    assert "96x64" in msg and "12x10" in msg


def test_label_values_out_of_range_raise(copy):
    lbl = copy / "source" / "labels" / "00003_labelTrainIds.png"
    arr = np.array(Image.open(lbl))
    arr[0, :3] = [40, 100, 19]
    Image.fromarray(arr).save(lbl)
    ds = _dataset(copy, "source_only")  # not strict: wrong ids are not an unreadable file to skip
    with pytest.raises(DatasetError, match=r"00003_labelTrainIds\.png: label values 19, 40, 100 outside 0\.\.18"):
        for k in range(200):
            ds[k]


def test_failure_monitor_stops_above_one_percent():
    ok = {"failed": torch.zeros(2, dtype=torch.int64), "target_img": torch.zeros(2, 3, 1, 1)}
    mon = FailureMonitor(max_ratio=0.01, min_draws=100)
    for _ in range(30):
        mon.update(ok)
    assert (mon.failed, mon.draws) == (0, 120)
    mon.update({**ok, "failed": torch.tensor([1, 0])})  # 1 of 125 = 0.8 %: fine
    assert (mon.failed, mon.draws) == (1, 125)
    with pytest.raises(DatasetError, match=r"3 of 131 sample draws failed \(> 1%\)"):
        mon.update({**ok, "failed": torch.tensor([1, 1])})  # 3 of 131 = 2.3 %
    # Source-only batches count one draw per sample; nothing is decided before min_draws.
    mon = FailureMonitor(max_ratio=0.01, min_draws=100)
    mon.update({"failed": torch.tensor([5, 5])})
    assert (mon.failed, mon.draws) == (10, 12)
    mon = FailureMonitor(max_ratio=0.01, min_draws=100)
    for _ in range(50):
        mon.update({"failed": torch.zeros(2, dtype=torch.int64)})
    with pytest.raises(DatasetError):
        mon.update({"failed": torch.tensor([2, 0])})  # 2 of 102


def _hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}  # fmt: skip


def test_synthetic_generator_is_deterministic(bench, tmp_path):
    again = make_synthetic(tmp_path / "a", n_source=10, n_target=6, n_val=2, size=(96, 64), seed=0, quiet=True)
    h0, h1 = _hashes(bench), _hashes(again)
    assert h0 == h1 and len(h0) == 10 * 3 + 8 * 3 + 3 + 3 + 2  # images, ids, train ids; JSONs; split lists
    other = make_synthetic(tmp_path / "b", n_source=3, n_target=1, n_val=1, size=(96, 64), seed=1, quiet=True)
    h2 = _hashes(other)
    for name in ("source/images/00000.png", "source/labels/00000.png", "source/labels/00002_labelTrainIds.png",
                 "target/leftImg8bit/train/alpha/alpha_000000_000019_leftImg8bit.png"):  # fmt: skip
        assert h2[name] != h0[name], name
    # Domains look different: same geometry generator, different appearance statistics.
    src = read_image(bench / "source" / "images" / "00000.png").reshape(-1, 3).astype(float)
    tgt = read_image(next((bench / "target" / "leftImg8bit" / "train").rglob("*.png"))).reshape(-1, 3).astype(float)
    assert np.abs(src.mean(0) - tgt.mean(0)).max() > 5 or np.abs(src.std(0) - tgt.std(0)).max() > 5


def test_synthetic_rare_classes_are_rare(tmp_path):
    root = make_synthetic(tmp_path, n_source=150, n_target=1, n_val=1, size=(64, 32), seed=0, quiet=True)
    with_class = json.loads((root / "source" / "samples_with_class.json").read_text())
    n_images = {int(c): len(v) for c, v in with_class.items()}
    assert n_images[0] == n_images[10] == 150  # road and sky in every image
    for rare in (15, 16, 17):  # bus, train, motorcycle
        assert 0 < n_images.get(rare, 0) < 0.15 * 150, (rare, n_images)
    assert set(n_images) == set(range(19))  # every class occurs somewhere


def test_synthetic_source_only_and_bad_counts(tmp_path, capsys):
    from daformer_fast.tools.make_synthetic import main as make_main

    args = ["--n-source", "2", "--n-target", "0", "--n-val", "0", "--size", "64x32"]
    assert make_main([str(tmp_path / "s"), *args]) == 0
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["source"]
    assert len(json.loads((tmp_path / "s" / "source" / "sample_class_stats.json").read_text())) == 2
    assert make_main([str(tmp_path / "e"), "--n-source", "0"]) == 2
    assert "n_source >= 1" in capsys.readouterr().err


def test_ensure_synthetic_generates_only_without_the_statistics(tmp_path):
    kw = {"n_source": 2, "n_target": 1, "n_val": 0, "size": (64, 32), "quiet": True}
    assert ensure_synthetic(tmp_path, **kw) is True
    first = _hashes(tmp_path)
    marker = tmp_path / "source" / "images" / "00000.png"
    marker.write_bytes(b"edited")
    assert ensure_synthetic(tmp_path, **kw) is False  # present: nothing is rewritten
    assert marker.read_bytes() == b"edited"
    (tmp_path / "source" / "sample_class_stats.json").unlink()  # as after an interrupted generation
    assert ensure_synthetic(tmp_path, **kw) is True
    assert _hashes(tmp_path) == first


def _npy_dataset(root: Path, out: Path, mode: str, *overrides: str) -> TrainDataset:
    """The torch loader on npy caches of both sides of `root` (tools.cache_dataset --format npy)."""
    cfg = _cfg(root)
    sets = []
    for side in ("source", "target"):
        res = cache_dataset(getattr(cfg.data, side), out, fmt="npy", quiet=True, say=None)
        sets.append(f"data.{side}.root={res.root}")
    cfg = _cfg(root, *sets, *overrides)
    return TrainDataset(cfg.data, mode=mode, num_classes=cfg.model.num_classes, seed=0)


def test_npy_crop_through_mmap_equals_the_slice_of_the_full_array(bench, tmp_path):
    ds = _npy_dataset(bench, tmp_path / "c", "dacs")
    path = ds.planner.main.samples[3].img
    full = np.load(path)
    assert full.shape == (48, 72, 3)
    for box in ((0, 48, 0, 72), (5, 37, 11, 43), (47, 48, 71, 72), (16, 48, 40, 72)):
        part = read_npy_crop(path, box)
        assert isinstance(part.base, np.memmap) or isinstance(part, np.memmap)  # a view of the map, not a read
        np.testing.assert_array_equal(part, full[box[0]:box[1], box[2]:box[3]])
    # The loader's crop of a planned item: the slice of the full array, flipped as planned, channels first.
    for k in range(6):
        p = ds.planner.plan(k).labelled
        y0, y1, x0, x1 = p.box
        want = np.load(p.img_path)[y0:y1, x0:x1]
        want = want[:, ::-1] if p.flip else want
        assert torch.equal(ds[k]["img"], torch.from_numpy(np.ascontiguousarray(want)).permute(2, 0, 1))
    # A crop as large as the image, unflipped, is the whole (read-only) map: the loader copies it out.
    whole = _npy_dataset(bench, tmp_path / "c", "source_only", "data.crop=[48,72]", "data.flip_prob=0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when it wraps a read-only array
        item = whole[0]
    path = whole.planner.plan(0).labelled.img_path
    assert torch.equal(item["img"], torch.from_numpy(np.load(path)).permute(2, 0, 1))


def test_truncated_npy_is_skipped_and_stops_a_strict_run(bench, tmp_path, caplog):
    ds = _npy_dataset(bench, tmp_path / "c", "source_only")
    bad = ds.planner.main.samples[3].img
    bad.write_bytes(bad.read_bytes()[:1000])
    with caplog.at_level(logging.WARNING, logger="daformer_fast.data"):
        failed = sum(int(ds[k]["failed"]) for k in range(60))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "skipping" in r.getMessage()]
    assert failed > 0 and failed == len(warnings)
    assert all(f"truncated {bad}: 1000 bytes, its header promises 10496" in w for w in warnings)
    lbl = ds.planner.main.samples[5].label  # a truncated label is skipped the same way
    lbl.write_bytes(lbl.read_bytes()[:300])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="daformer_fast.data"):
        _ = [ds[k] for k in range(60)]
    assert any(f"truncated {lbl}" in r.getMessage() for r in caplog.records)
    strict = TrainDataset(dataclasses.replace(ds.data, strict=True), mode="source_only", num_classes=19, seed=0)
    with pytest.raises(DatasetError, match=r"truncated .*(00003|00005_labelTrainIds)\.npy: (1000|300) bytes"):
        for k in range(200):
            strict[k]
