"""Pre-resized dataset cache: loading from the cache gives the same training batches as loading the original."""

from __future__ import annotations

import json
import logging
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from daformer_fast.config import parse_config
from daformer_fast.data.datasets import DatasetError, read_image, read_label, rescale_size
from daformer_fast.data.pipeline import resize_pair
from daformer_fast.data.torch_loader import TrainDataset, build_torch_loader
from daformer_fast.tools.cache_dataset import cache_dataset, cache_dir, main
from daformer_fast.data.synthetic import make_synthetic

STATS = ("sample_class_stats.json", "sample_class_stats_dict.json", "samples_with_class.json")


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("syn"), n_source=10, n_target=6, n_val=2, size=(96, 64), seed=0,
                          quiet=True)  # fmt: skip


def _data(root: Path) -> dict:
    # Source 96x64 -> 72x48 (f = 0.75), target 96x64 -> 60x40 (f = 0.625): both really resize.
    return {"data": {
        "source": {"name": "gta", "root": str(root / "source"), "scale": [80, 48]},
        "target": {"name": "cityscapes", "root": str(root / "target"), "scale": [72, 40]},
        "crop": [32, 32], "batch_size": 2, "workers": 0, "rcs": {"min_pixels": 20},
    }}  # fmt: skip


def _batches(cfg, mode: str = "dacs", iters: int = 6) -> list[dict[str, torch.Tensor]]:
    ds = TrainDataset(cfg.data, mode=mode, num_classes=19, seed=5)
    return list(build_torch_loader(ds, start_iter=0, max_iters=iters, workers=0))


def _assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k


def test_cli_cache_gives_identical_batches(bench, tmp_path, capsys):
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(json.dumps(_data(bench)))  # JSON is YAML
    out = tmp_path / "cache"
    assert main([str(cfg_file), "--out", str(out), "--nproc", "2", "--quiet"]) == 0
    printed = capsys.readouterr().out
    line = printed.strip().splitlines()[-1].strip()
    assert line.startswith("--set ")
    overrides = shlex.split(line)[1:]
    src_cache, tgt_cache = out / "source_80x48", out / "target_train_72x40"
    assert overrides == [f"data.source.root={src_cache}", "data.source.scale=[80,48]",
                         f"data.target.root={tgt_cache}", "data.target.scale=[72,40]"]  # fmt: skip
    assert "source: gta" in printed and "20 files written" in printed  # 10 images + 10 labels

    # Same layout and file names, at the training size.
    rel = sorted(p.relative_to(src_cache).as_posix() for p in src_cache.rglob("*.png"))
    assert rel == [f"images/{i:05d}.png" for i in range(10)] + [f"labels/{i:05d}_labelTrainIds.png" for i in range(10)]
    assert read_image(src_cache / "images" / "00003.png").shape == (48, 72, 3)
    assert read_label(src_cache / "labels" / "00003_labelTrainIds.png").shape == (48, 72)
    tgt_imgs = sorted(p.relative_to(tgt_cache).as_posix() for p in (tgt_cache / "leftImg8bit").rglob("*.png"))
    assert len(tgt_imgs) == 6 and all(p.startswith("leftImg8bit/train/") for p in tgt_imgs)
    assert not (tgt_cache / "leftImg8bit" / "val").exists()
    # Pixels are exactly resize_pair's output (lossless storage).
    orig = bench / "source"
    img = read_image(orig / "images" / "00003.png")
    img, lbl = resize_pair(img, read_label(orig / "labels" / "00003_labelTrainIds.png"), (80, 48))
    np.testing.assert_array_equal(read_image(src_cache / "images" / "00003.png"), img)
    np.testing.assert_array_equal(read_label(src_cache / "labels" / "00003_labelTrainIds.png"), lbl)
    # RCS statistics copied unchanged: counts stay at the original resolution.
    for name in STATS:
        assert (src_cache / name).read_bytes() == (orig / name).read_bytes()
    assert (tgt_cache / "train.txt").read_bytes() == (bench / "target" / "train.txt").read_bytes()

    # The point of it all: identical training batches, in every mode.
    base = parse_config(_data(bench))
    cached = parse_config(_data(bench), overrides)
    assert cached.data.source.root == str(src_cache)
    _assert_same(_batches(base), _batches(cached))
    _assert_same(_batches(base, "target_only", 2), _batches(cached, "target_only", 2))

    # Idempotent: a second run writes nothing and touches no file.
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert main([str(cfg_file), "--out", str(out), "--nproc", "1", "--quiet"]) == 0
    assert "0 files written, 20 already cached" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == mtimes


def test_fixed_point_of_the_resize_rule():
    """A cached image at the training scale is not resized again (the cache relies on it)."""
    assert rescale_size(1914, 1052, (1280, 720)) == (1280, 704) == rescale_size(1280, 704, (1280, 720))
    assert rescale_size(2048, 1024, (1024, 512)) == (1024, 512) == rescale_size(1024, 512, (1024, 512))
    assert rescale_size(1920, 1080, (960, 540)) == (960, 540) == rescale_size(960, 540, (960, 540))
    img = np.zeros((704, 1280, 3), np.uint8)
    assert resize_pair(img, None, (1280, 720))[0] is img
    rng = np.random.default_rng(0)
    for scale in ((1280, 720), (1024, 512), (1280, 760), (960, 540)):
        for w in range(16, 2100, 3):
            for h in rng.integers(16, 2100, 8).tolist():
                size = rescale_size(w, h, scale)
                assert rescale_size(*size, scale) == size, (w, h, scale)


def test_api_idempotent_partial_and_absolute_stats_paths(bench, tmp_path, caplog):
    root = tmp_path / "syn"
    shutil.copytree(bench / "source", root / "source")
    # Statistics written with absolute paths (as the reference tools do) are made relative to the cache root.
    stats_path = root / "source" / "sample_class_stats.json"
    stats = json.loads(stats_path.read_text())
    stats_path.write_text(json.dumps([{**s, "file": str(root / "source" / s["file"])} for s in stats]))
    bad = root / "source" / "images" / "00007.png"
    bad.write_bytes(b"garbage")
    ds = parse_config(_data(root)).data.source
    with caplog.at_level(logging.WARNING, logger="daformer_fast.data"):
        res = cache_dataset(ds, tmp_path / "c", quiet=True)
    assert res.root == cache_dir(ds, tmp_path / "c") == tmp_path / "c" / "source_80x48"
    assert (res.written, res.kept, len(res.skipped)) == (18, 0, 1)
    assert str(bad) in res.skipped[0] and any(str(bad) in r.getMessage() for r in caplog.records)
    assert not (res.root / "images" / "00007.png").exists()
    assert not (res.root / "labels" / "00007_labelTrainIds.png").exists()
    assert json.loads((res.root / "sample_class_stats.json").read_text()) == stats  # relative paths again
    # An interrupted run is completed: only the missing files are written.
    (res.root / "labels" / "00002_labelTrainIds.png").unlink()
    res = cache_dataset(ds, tmp_path / "c", quiet=True)
    assert (res.written, res.kept) == (1, 17)
    # strict data: the unreadable file stops the tool.
    with pytest.raises(DatasetError, match=r"cannot read image .*00007\.png"):
        cache_dataset(ds, tmp_path / "c", strict=True, quiet=True)
    # The same folder name for another dataset (or scale) is refused instead of being mixed.
    other = parse_config(_data(bench)).data.source
    with pytest.raises(DatasetError, match="already holds a different cache"):
        cache_dataset(other, tmp_path / "c", quiet=True)


def test_png_level_zero_is_lossless_too(bench, tmp_path):
    ds = parse_config(_data(bench)).data.target
    a = cache_dataset(ds, tmp_path / "a", png_level=0, quiet=True).root
    b = cache_dataset(ds, tmp_path / "b", png_level=1, quiet=True).root
    pa = sorted(a.rglob("*_leftImg8bit.png"))
    assert len(pa) == 6
    for p in pa:
        q = b / p.relative_to(a)
        assert p.stat().st_size > q.stat().st_size  # stored, not deflated
        np.testing.assert_array_equal(read_image(p), read_image(q))


def test_cli_errors(bench, tmp_path, capsys):
    assert main([str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(json.dumps(_data(tmp_path / "nowhere")))
    assert main([str(cfg), "--out", str(tmp_path / "c"), "--quiet"]) == 2
    assert "no images found for gta dataset" in capsys.readouterr().err
    # data.strict from the config reaches the tool.
    shutil.copytree(bench / "source", tmp_path / "syn" / "source")
    shutil.copytree(bench / "target", tmp_path / "syn" / "target")
    bad = tmp_path / "syn" / "target" / "leftImg8bit" / "train" / "beta" / "beta_000001_000019_leftImg8bit.png"
    bad.write_text("x")
    cfg.write_text(json.dumps(_data(tmp_path / "syn")))
    args = [str(cfg), "--out", str(tmp_path / "c"), "--quiet", "--nproc", "1"]
    assert main(args + ["--set", "data.strict=true"]) == 2
    assert "beta_000001_000019_leftImg8bit.png" in capsys.readouterr().err
    assert main(args) == 0
    assert "1 unreadable images skipped" in capsys.readouterr().out
