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
from PIL import Image

from daformer_fast.config import parse_config
from daformer_fast.data.datasets import DatasetError, list_samples, read_image, read_label, rescale_size
from daformer_fast.data.npy_cache import NPY_INDEX, npy_file_size
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


# ---------------------------------------------------------------------------------------------------------------
# --format npy: the decode-free cache
# ---------------------------------------------------------------------------------------------------------------


def _npy_cache(data: dict, out: Path, side: str = "source"):
    ds = getattr(parse_config(data).data, side)
    return cache_dataset(ds, out, fmt="npy", quiet=True, say=None)


def _with_root(data: dict, side: str, root: Path, scale=None) -> dict:
    d = json.loads(json.dumps(data))
    d["data"][side]["root"] = str(root)
    if scale is not None:
        d["data"][side]["scale"] = scale
    return d


def test_npy_cli_round_trip_disk_use_and_identical_batches(bench, tmp_path, capsys):
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(json.dumps(_data(bench)))
    out = tmp_path / "cache"
    assert main([str(cfg_file), "--out", str(out), "--format", "npy", "--nproc", "2", "--quiet"]) == 0
    printed = capsys.readouterr().out
    # 10 images 72x48x3 and 10 labels 72x48, each behind a 128-byte .npy header: 10 * (10496 + 3584) = 140800 bytes.
    assert npy_file_size((48, 72, 3)) == 128 + 48 * 72 * 3 and npy_file_size((48, 72)) == 128 + 48 * 72
    assert "gta at 80x48: 10 images, 0.1 MB" in printed
    src_cache, tgt_cache = out / "source_80x48_npy", out / "target_train_72x40_npy"
    overrides = shlex.split(printed.strip().splitlines()[-1].strip())[1:]
    assert overrides == [f"data.source.root={src_cache}", "data.source.scale=[80,48]",
                         f"data.target.root={tgt_cache}", "data.target.scale=[72,40]"]  # fmt: skip
    files = sorted(p.relative_to(src_cache).as_posix() for p in src_cache.rglob("*.npy"))
    labels = [f"labels/{i:05d}_labelTrainIds.npy" for i in range(10)]
    assert files == [f"images/{i:05d}.npy" for i in range(10)] + labels
    assert sum(p.stat().st_size for p in src_cache.rglob("*.npy")) == 140800

    # Round trip: every array is resize_pair's output of the original, bit for bit, uint8 C-order.
    orig = bench / "source"
    for i in range(10):
        img, lbl = resize_pair(read_image(orig / "images" / f"{i:05d}.png"),
                               read_label(orig / "labels" / f"{i:05d}_labelTrainIds.png"), (80, 48))  # fmt: skip
        a, b = np.load(src_cache / "images" / f"{i:05d}.npy"), np.load(src_cache / labels[i])
        assert a.dtype == b.dtype == np.uint8 and a.shape == (48, 72, 3) and b.shape == (48, 72)
        np.testing.assert_array_equal(a, img)
        np.testing.assert_array_equal(b, lbl)
    # RCS statistics: the same counts, the label paths renamed to the cached files.
    stats, cached = json.loads((orig / STATS[0]).read_text()), json.loads((src_cache / STATS[0]).read_text())
    assert [{k: v for k, v in s.items() if k != "file"} for s in stats] == \
           [{k: v for k, v in s.items() if k != "file"} for s in cached]  # fmt: skip
    assert [s["file"] for s in cached] == [Path(s["file"]).with_suffix(".npy").as_posix() for s in stats]
    assert all((src_cache / s["file"]).is_file() for s in cached)
    index = json.loads((src_cache / NPY_INDEX).read_text())
    assert index["complete"] and index["scale"] == [80, 48] and len(index["samples"]) == 10
    assert index["source"]["files"][3] == ["images/00003.png", "labels/00003_labelTrainIds.png", 64, 96]
    assert index["samples"][3] == ["00003", "images/00003.npy", "labels/00003_labelTrainIds.npy", 48, 72]

    # Same plan, same seed: byte-identical batches to the PNG originals, in every mode.
    base, cached_cfg = parse_config(_data(bench)), parse_config(_data(bench), overrides)
    _assert_same(_batches(base), _batches(cached_cfg))
    _assert_same(_batches(base, "target_only", 2), _batches(cached_cfg, "target_only", 2))
    _assert_same(_batches(base, "source_only", 3), _batches(cached_cfg, "source_only", 3))

    # Resumable and idempotent: a second run writes nothing and touches no file.
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert main([str(cfg_file), "--out", str(out), "--format", "npy", "--nproc", "1", "--quiet"]) == 0
    assert "0 files written, 20 already cached" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == mtimes


def test_npy_resume_completes_missing_and_truncated_files(bench, tmp_path):
    res = _npy_cache(_data(bench), tmp_path / "c")
    assert (res.written, res.kept, res.skipped) == (20, 0, [])
    lbl = res.root / "labels" / "00002_labelTrainIds.npy"
    lbl.unlink()
    img = res.root / "images" / "00005.npy"
    full = np.load(img)
    img.write_bytes(img.read_bytes()[:500])  # an interrupted copy
    res = _npy_cache(_data(bench), tmp_path / "c")
    assert (res.written, res.kept) == (2, 18)
    np.testing.assert_array_equal(np.load(img), full)
    assert lbl.is_file()


def test_npy_refusals_name_what_differs(bench, tmp_path):
    root = tmp_path / "syn"
    shutil.copytree(bench / "source", root / "source")
    data = _with_root(_data(bench), "source", root / "source")
    cache = _npy_cache(data, tmp_path / "c").root
    use = _with_root(data, "source", cache)
    assert len(list_samples(parse_config(use).data.source)) == 10

    def refused(d: dict, match: str):
        with pytest.raises(DatasetError, match=match):
            list_samples(parse_config(d).data.source)

    refused(_with_root(data, "source", cache, [72, 40]), r"built at scale 80x48, the config asks for 72x40")
    other = json.loads(json.dumps(use))
    other["data"]["source"]["name"] = "synthia"
    refused(other, r"built for name 'gta', the config has 'synthia'")
    # The cache's statistics replaced.
    stats = cache / STATS[0]
    kept = stats.read_bytes()
    stats.write_text("[]")
    refused(use, r"statistics files changed since it was built \(sample_class_stats\.json\)")
    stats.write_bytes(kept)
    # The source dataset changed: another statistics file, another file list.
    src_stats = root / "source" / STATS[2]
    src_stats.write_text("{}")
    refused(use, r"source dataset .* changed since: the source statistics differ \(samples_with_class\.json\)")
    with pytest.raises(DatasetError, match=r"another dataset version: the source statistics differ"):
        _npy_cache(data, tmp_path / "c")
    shutil.copy(bench / "source" / STATS[2], src_stats)
    moved = root / "source" / "images" / "00009.png"
    moved.rename(moved.with_name("00009.bak"))
    refused(use, r"source file list differs \(10 files then, 9 now")
    moved.with_name("00009.bak").rename(moved)
    assert len(list_samples(parse_config(use).data.source)) == 10  # back as it was: accepted again
    # Another image size: seen by the tool when it resumes (it reads every source header).
    big = np.zeros((70, 100, 3), np.uint8)
    Image.fromarray(big).save(root / "source" / "images" / "00003.png")
    Image.fromarray(big[..., 0]).save(root / "source" / "labels" / "00003_labelTrainIds.png")
    with pytest.raises(DatasetError, match=r"source image sizes differ: images/00003\.png was 96x64, is 100x70 now"):
        _npy_cache(data, tmp_path / "c")
    # An interrupted build is not used.
    index = json.loads((cache / NPY_INDEX).read_text())
    (cache / NPY_INDEX).write_text(json.dumps({**index, "complete": False}))
    refused(use, r"incomplete")


def test_npy_refuses_without_disk_space_and_skips_unreadable(bench, tmp_path, monkeypatch, capsys):
    import daformer_fast.tools.cache_npy as cache_npy

    monkeypatch.setattr(cache_npy.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**6, 10**6 - 1000, 1000))
    ds = parse_config(_data(bench)).data.source
    with pytest.raises(DatasetError, match=r"not enough disk space .* it needs 0\.1 MB, 0\.0 MB are free"):
        cache_dataset(ds, tmp_path / "c", fmt="npy", quiet=True)
    assert "gta at 80x48: 10 images, 0.1 MB" in capsys.readouterr().out
    assert not list((tmp_path / "c").rglob("*.npy")) and not list((tmp_path / "c").rglob(NPY_INDEX))
    monkeypatch.undo()
    root = tmp_path / "syn"
    shutil.copytree(bench / "source", root / "source")
    bad = root / "source" / "images" / "00004.png"
    bad.write_bytes(b"garbage")
    data = _with_root(_data(bench), "source", root / "source")
    res = _npy_cache(data, tmp_path / "c")
    assert (res.written, len(res.skipped)) == (18, 1) and str(bad) in res.skipped[0]
    names = [s.name for s in list_samples(parse_config(_with_root(data, "source", res.root)).data.source)]
    assert names == [f"{i:05d}" for i in range(10) if i != 4]
    with pytest.raises(DatasetError, match=r"cannot read image .*00004\.png"):
        cache_dataset(parse_config(data).data.source, tmp_path / "c", fmt="npy", strict=True, quiet=True)


@pytest.mark.parametrize("nproc", [1, 2])
def test_npy_disk_full_mid_write_leaves_no_partial_file(bench, tmp_path, monkeypatch, nproc):
    import errno

    real = np.lib.format.write_array

    def write_array(f, arr, version=None):  # the disk fills up half-way through image 00006
        if Path(f.name).name.startswith(".00006.npy."):
            f.write(b"\x93NUMPY" + bytes(100))
            raise OSError(errno.ENOSPC, "No space left on device")
        real(f, arr, version=version)

    monkeypatch.setattr(np.lib.format, "write_array", write_array)
    ds = parse_config(_data(bench)).data.source
    out = tmp_path / "c"
    with pytest.raises(DatasetError) as err:
        cache_dataset(ds, out, fmt="npy", nproc=nproc, quiet=True, say=None)
    msg = str(err.value)
    root = out / "source_80x48_npy"
    # One line naming the file and the 140800 bytes of the whole cache (10 images + 10 labels, see above).
    assert "\n" not in msg and f"disk full while writing {root / 'images' / '00006.npy'}:" in msg
    assert "needs 0.1 MB in all" in msg and npy_file_size((48, 72, 3)) * 10 + npy_file_size((48, 72)) * 10 == 140800
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert not (root / "images" / "00006.npy").exists()
    assert not json.loads((root / NPY_INDEX).read_text())["complete"]
    finished = sorted(root.rglob("*.npy"))
    if nproc == 1:  # samples in order, image before label: 00000 .. 00005 are done
        assert [p.relative_to(root).as_posix() for p in finished] == \
               [f"images/{i:05d}.npy" for i in range(6)] + [f"labels/{i:05d}_labelTrainIds.npy" for i in range(6)]
    for p in finished:  # complete arrays, kept for the re-run
        assert p.stat().st_size == npy_file_size(np.load(p).shape)
    monkeypatch.undo()
    res = cache_dataset(ds, out, fmt="npy", nproc=nproc, quiet=True, say=None)
    assert (res.written, res.kept) == (20 - len(finished), len(finished))
    assert json.loads((root / NPY_INDEX).read_text())["complete"]
