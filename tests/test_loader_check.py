"""The DALI loader's self-check (`loader.check_dali`, run by `build_train_loader`) and its fallback to torch.

DALI runs in its CPU-only mode here; the check is the same code on a GPU. A check that passes must leave the run
the batches of start_iter.. (the check draws nothing); a corrupted DALI graph or a DALI error must be detected,
logged once with its reason, and replaced by the torch loader, which then yields the same batches.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import torch

from daformer_fast.config import parse_config
from daformer_fast.data import dali_loader, loader
from daformer_fast.data.loader import CHECK_BATCHES, build_train_loader, compare_batches
from daformer_fast.data.synthetic import make_synthetic


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("syn"), n_source=6, n_target=4, n_val=1, size=(64, 32), seed=1,
                          quiet=True)  # fmt: skip


@pytest.fixture(autouse=True)
def _fresh_log_once(monkeypatch):
    monkeypatch.setattr("daformer_fast.utils._logged", set())  # log_once: each test sees its own first line


def _data(root: Path, loader_name: str = "dali"):
    data = parse_config({"data": {
        "source": {"root": str(root / "source"), "scale": [56, 28]},  # 64x32 → 56x28: resized
        "target": {"root": str(root / "target"), "scale": [64, 32]},  # 64x32 kept: not resized, compared exactly
        "crop": [16, 16], "rcs": {"min_pixels": 5}, "workers": 0,
    }}).data  # fmt: skip
    return dataclasses.replace(data, loader=loader_name)


def _build(data, start=0, stop=4):
    return build_train_loader(data, mode="dacs", num_classes=19, seed=0, start_iter=start, max_iters=stop)


def _batches(it) -> list[dict]:
    return [{k: v.cpu() for k, v in b.items()} for b in it]


def _torch_batches(bench, start=0, stop=4) -> list[dict]:
    it = _build(_data(bench, "torch"), start, stop)
    assert it.loader_check == {"loader": "torch", "check": "not run: data.loader=torch", "batches_compared": 0}
    return _batches(it)


def _batch(img, valid_hw=((2, 3),)) -> dict:
    return {"img": img, "valid_hw": torch.tensor(valid_hw), "gt": torch.zeros(len(img), 2, 3, dtype=torch.int64)}


# --- the comparison rule ---------------------------------------------------------------------------------------


def test_compare_batches_rule():
    a = torch.full((1, 3, 2, 4), 100, dtype=torch.uint8)  # 2x4 image, of which 2x3 real pixels, column 3 padding
    ref = [_batch(a)]
    one = a.clone()
    one[0, 1, 1, 2] = 101  # a real pixel, 1 grey level off
    resized, kept = [{"img": torch.tensor([True])}], [{"img": torch.tensor([False])}]
    assert compare_batches(ref, [_batch(one)], resized) == ""
    assert compare_batches(ref, [_batch(one)]) == ""  # default: every image resized
    assert "1 pixel values differ" in compare_batches(ref, [_batch(one)], kept)
    two = a.clone()
    two[0, 0, 0, 0] = 98
    assert "max |diff| 2" in compare_batches(ref, [_batch(two)], resized)
    pad = a.clone()
    pad[0, 2, 0, 3] = 101  # padding column: exact even when resized
    assert "1 pixel values differ" in compare_batches(ref, [_batch(pad)], resized)
    lbl = _batch(a)
    lbl["gt"][0, 1, 1] = 1
    assert compare_batches(ref, [lbl]) == "batch 0, gt: 1 values differ"
    assert "int32" in compare_batches(ref, [dict(_batch(a), gt=torch.zeros(1, 2, 3, dtype=torch.int32))])
    assert "fields" in compare_batches(ref, [{"img": a, "valid_hw": torch.tensor([[2, 3]])}])
    assert compare_batches(ref, []) == "0 batches instead of 1"


# --- the check on the real loaders ------------------------------------------------------------------------------


def test_check_passes_and_resume_batches_unchanged(bench, caplog):
    pytest.importorskip("nvidia.dali")
    with caplog.at_level(logging.INFO, logger="daformer_fast.data"):
        it = _build(_data(bench), start=1, stop=4)
    assert isinstance(it, dali_loader.DaliTrainLoader)
    assert it.loader_check == {"loader": "dali", "check": "passed", "batches_compared": CHECK_BATCHES}
    assert "self-check passed" in caplog.text
    got = _batches(it)
    ref = _torch_batches(bench, start=1, stop=4)
    assert len(got) == 3 and compare_batches(ref, got, [{"img": torch.tensor([True, True]),
                                                          "target_img": torch.tensor([False, False])}] * 3) == ""
    for a, b in zip(ref, got):  # bit-exact resize: every field equal
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_check_near_the_end_compares_what_is_left(bench):
    pytest.importorskip("nvidia.dali")
    it = _build(_data(bench), start=3, stop=4)
    assert it.loader_check == {"loader": "dali", "check": "passed", "batches_compared": 1}


def _assert_fallback(bench, caplog, reason: str, start=1):
    with caplog.at_level(logging.INFO, logger="daformer_fast.data"):
        it = _build(_data(bench), start=start)
    assert isinstance(it, torch.utils.data.DataLoader)
    assert it.loader_check["loader"] == "torch" and it.loader_check["batches_compared"] == CHECK_BATCHES
    assert reason in it.loader_check["check"], it.loader_check
    lines = [r for r in caplog.records if "self-check failed" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING and reason in lines[0].getMessage()
    got = _batches(it)
    ref = _torch_batches(bench, start=start)
    assert len(got) == len(ref) == 4 - start
    for a, b in zip(ref, got):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_flipped_dali_images_fall_back_to_torch(bench, caplog, monkeypatch):
    pytest.importorskip("nvidia.dali")
    graph = dali_loader._image_graph

    def flipped(fn, *args):  # a wrong flip inside the DALI graph (CHW: horizontal = the W axis)
        return fn.flip(graph(fn, *args), horizontal=1)

    monkeypatch.setattr(dali_loader, "_image_graph", flipped)
    _assert_fallback(bench, caplog, "batch 0, img:")


def test_wrong_dali_labels_fall_back_to_torch(bench, caplog, monkeypatch):
    pytest.importorskip("nvidia.dali")
    run = dali_loader.DaliTrainLoader.__iter__

    def shifted(self):  # the executor returns labels one class off in the second batch
        for t, b in enumerate(run(self)):
            yield dict(b, gt=b["gt"] + (t == 1))

    monkeypatch.setattr(dali_loader.DaliTrainLoader, "__iter__", shifted)
    _assert_fallback(bench, caplog, "batch 1, gt:")


def test_dali_construction_error_falls_back_to_torch(bench, caplog, monkeypatch):
    pytest.importorskip("nvidia.dali")

    def broken(*args, **kw):
        raise RuntimeError("no such operator\nsecond line")

    monkeypatch.setattr(dali_loader, "_build_pipeline", broken)
    _assert_fallback(bench, caplog, "DALI error: RuntimeError: no such operator", start=0)
    assert "second line" not in caplog.text  # one line


def test_dali_init_error_falls_back_to_torch(bench, caplog, monkeypatch):
    def broken(self, *args, **kw):
        raise ValueError("bad device")

    monkeypatch.setattr(loader, "dali_available", lambda: (True, ""))  # DALI "imports" even where it is absent
    monkeypatch.setattr(dali_loader.DaliTrainLoader, "__init__", broken)
    _assert_fallback(bench, caplog, "DALI error: ValueError: bad device")
