"""DALI training loader (CPU-only DALI here, GPU DALI where there is one) against the torch loader.

Same seed → the same batches, bit for bit, with the default `resize="exact"`: DALI evaluates OpenCV's
fixed-point INTER_LINEAR arithmetic on gathered pixels (see `dali_loader`'s docstring). `resize="fast"` (one
`fn.resize`, float interpolation rounded to nearest) cannot be bit-identical: OpenCV truncates twice in its
fixed-point vertical pass and ends ~1/8 grey level lower on average, so ~12 % of resized pixels differ by
exactly 1; that mode is held to max |diff| <= 1 and a mean |diff| below 0.2, with identical labels and draws.

From an npy cache (`tools.cache_dataset --format npy`: images stored at the training scale) DALI reads the crop
with `fn.readers.numpy` and must equal both the torch loader on the cache and the torch loader on the PNGs.

Also: resume from start_iter = the tail of a run from 0; skipped unreadable files are redrawn identically;
`build_train_loader`'s choice (auto → torch on CPU; dali forced without DALI → a clear error).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import sys
from pathlib import Path

import pytest
import torch

from daformer_fast.config import parse_config
from daformer_fast.data.loader import build_train_loader
from daformer_fast.data.synthetic import make_synthetic

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ITERS = 5


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("syn"), n_source=12, n_target=8, n_val=2, size=(128, 64), seed=0,
                          quiet=True)  # fmt: skip


def _data(root: Path, **over):
    data = parse_config({"data": {
        "source": {"root": str(root / "source"), "scale": [112, 56]},  # 128x64 → 112x56
        "target": {"root": str(root / "target"), "scale": [96, 48]},  # 128x64 → 96x48
        "crop": [32, 32], "rcs": {"min_pixels": 20}, "workers": 0,
    }}).data  # fmt: skip
    return dataclasses.replace(data, **over)


def _run(data, mode="dacs", loader="torch", start=0, stop=ITERS, **dali_kw):
    data = dataclasses.replace(data, loader=loader)
    if dali_kw:
        from daformer_fast.data.dali_loader import DaliTrainLoader

        it = DaliTrainLoader(data, mode=mode, num_classes=19, seed=0, start_iter=start, max_iters=stop, device=DEVICE,
                             **dali_kw)  # fmt: skip
    else:
        it = build_train_loader(data, mode=mode, num_classes=19, seed=0, start_iter=start, max_iters=stop,
                                device=DEVICE if loader == "dali" else "cpu")  # fmt: skip
        # A failed self-check would silently compare the torch loader with itself.
        assert it.loader_check["loader"] == loader, it.loader_check
    return [{k: v.cpu() for k, v in b.items()} for b in it]


def _assert_same(ref: list[dict], got: list[dict]) -> None:
    assert len(ref) == len(got)
    for t, (a, b) in enumerate(zip(ref, got)):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, (t, k)
            assert torch.equal(a[k], b[k]), f"iteration {t}, {k}: max diff {(a[k].long() - b[k].long()).abs().max()}"


def test_dali_equals_torch_dacs_rcs(bench):
    pytest.importorskip("nvidia.dali")
    data = _data(bench)
    ref = _run(data)
    assert set(ref[0]) == {"img", "gt", "target_img", "rcs_class", "failed", "valid_hw", "target_valid_hw"}
    assert (torch.cat([b["rcs_class"] for b in ref]) >= 0).all()  # RCS is on
    _assert_same(ref, _run(data, loader="dali"))


@pytest.mark.parametrize("mode", ["source_only", "target_only"])
def test_dali_equals_torch_modes_with_padding(bench, mode):
    # 64x64 crops of 112x56 / 96x48 images: crops are clipped, then padded (image 0, label 255); plans come from
    # a DataLoader worker process.
    pytest.importorskip("nvidia.dali")
    data = _data(bench, crop=(64, 64))
    ref = _run(data, mode)
    assert (ref[0]["gt"] == 255).any()
    # 112x56 source, 96x48 target: only the rows below the real pixels are padding.
    assert ref[0]["valid_hw"].tolist() == [[56 if mode == "source_only" else 48, 64]] * 2
    _assert_same(ref, _run(data, mode, plan_workers=1))


def test_resume_equals_tail(bench):
    pytest.importorskip("nvidia.dali")
    data = _data(bench)
    _assert_same(_run(data, loader="dali", start=0, stop=ITERS)[2:], _run(data, loader="dali", start=2, stop=ITERS))
    assert _run(data, loader="dali", start=ITERS, stop=ITERS) == []


def test_skipped_files_redrawn_identically(bench, tmp_path):
    pytest.importorskip("nvidia.dali")
    root = tmp_path / "damaged"
    shutil.copytree(bench, root)
    for p in sorted((root / "source" / "labels").glob("*_labelTrainIds.png"))[:4]:
        p.write_bytes(b"not a png")
    for p in sorted((root / "target" / "leftImg8bit" / "train").rglob("*.png"))[:3]:
        p.write_bytes(b"")
    data = _data(root)
    ref = _run(data, stop=8)
    assert sum(int(b["failed"].sum()) for b in ref) > 0
    _assert_same(ref, _run(data, loader="dali", stop=8))


def test_fast_resize_within_one_grey_level(bench):
    pytest.importorskip("nvidia.dali")
    data = _data(bench)
    ref, got = _run(data), _run(data, resize="fast")
    for a, b in zip(ref, got):
        for k in ("gt", "rcs_class", "failed"):
            assert torch.equal(a[k], b[k])
        for k in ("img", "target_img"):
            d = (a[k].int() - b[k].int()).abs()
            assert d.max() <= 1 and d.float().mean() < 0.2, (k, d.max(), d.float().mean())


def _npy_cached(data, out: Path, sides=("source", "target")):
    from daformer_fast.tools.cache_dataset import cache_dataset

    """`data` with the datasets of `sides` replaced by their npy caches, written under `out`."""
    roots = {side: cache_dataset(getattr(data, side), out, fmt="npy", quiet=True, say=None).root for side in sides}
    return dataclasses.replace(data, **{s: dataclasses.replace(getattr(data, s), root=str(r))
                                        for s, r in roots.items()})  # fmt: skip


@pytest.mark.parametrize("sides", [("source", "target"), ("target",)])
def test_dali_reads_npy_cache_like_torch(bench, tmp_path, monkeypatch, sides):
    pytest.importorskip("nvidia.dali")
    from daformer_fast.data import dali_loader

    monkeypatch.setattr(dali_loader, "NPY_CHUNK_ITERS", 2)  # 5 iterations: pipelines of 2, 2 and 1 iterations
    data = _data(bench, crop=(64, 64))  # 112x56 source, 96x48 target: clipped and padded crops too
    cached = _npy_cached(data, tmp_path, sides)
    ds = dali_loader.PlanDataset(cached, mode="dacs", num_classes=19, seed=0)
    item = ds[0]
    assert item["target_img_path"].endswith(".npy") and len(item["target_img"]) == 3  # ROI start, end, flip
    assert item["img_path"].endswith(".npy") == ("source" in sides)
    ref = _run(data)
    assert (ref[0]["gt"] == 255).any()
    _assert_same(ref, _run(cached))  # the torch loader on the cache: the PNG batches
    built = []
    build = dali_loader._build_pipeline
    monkeypatch.setattr(dali_loader, "_build_pipeline", lambda *a, **kw: built.append(kw["files"]) or build(*a, **kw))
    _assert_same(ref, _run(cached, loader="dali"))
    # The self-check's pipeline (2 iterations), then the run's: files in plan order, 2 samples per iteration.
    assert [len(f[1]) for f in built] == [4, 4, 4, 2] and all((f[0] is None) == ("source" not in sides) for f in built)
    _assert_same(ref[3:], _run(cached, loader="dali", start=3))


def test_auto_picks_torch_on_cpu(bench, caplog, monkeypatch):
    data = _data(bench, loader="auto")
    monkeypatch.setattr("daformer_fast.utils._logged", set())  # the choice is logged once per process
    with caplog.at_level(logging.INFO, logger="daformer_fast.data"):
        it = build_train_loader(data, mode="dacs", num_classes=19, seed=0, max_iters=1, device="cpu")
    assert isinstance(it, torch.utils.data.DataLoader)
    assert "torch DataLoader" in caplog.text


def test_forced_dali_without_dali_is_a_clear_error(bench, monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # makes `import nvidia.dali` raise ImportError
    with pytest.raises(RuntimeError, match="data.loader=dali but NVIDIA DALI cannot be imported"):
        build_train_loader(_data(bench, loader="dali"), mode="dacs", num_classes=19, seed=0, max_iters=1)
