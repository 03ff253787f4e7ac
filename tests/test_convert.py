"""Dataset converters (docs/recipe.md §3.3): train-id files and the three RCS JSON files against hand-computed
values."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from daformer_fast.tools.convert_datasets import convert, main

JSON_FILES = ("sample_class_stats.json", "sample_class_stats_dict.json", "samples_with_class.json")


def _palette_png(path: Path, ids: np.ndarray) -> None:
    """A GTA-style palette PNG whose indices are `ids`, with colours chosen to mislead a colour-based reader."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(ids.astype(np.uint8)).convert("P")
    colours = np.zeros((256, 3), np.uint8)
    colours[7] = (0, 0, 142)  # label id 7 (road) painted in the Cityscapes *car* colour
    colours[26] = (128, 64, 128)  # label id 26 (car) painted in the *road* colour
    colours[33] = (70, 130, 180)  # bicycle painted as sky
    colours[0] = (119, 11, 32)  # unlabelled painted as bicycle
    colours[4] = (107, 142, 35)  # static painted as vegetation
    im.putpalette(colours.ravel().tolist())
    im.save(path)
    assert Image.open(path).mode == "P"


def _read(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode == "L", f"{path} should be an 8-bit grayscale train-id PNG, is {im.mode}"
        return np.array(im)


def _load_json(root: Path) -> dict[str, object]:
    return {name: json.loads((root / name).read_text()) for name in JSON_FILES}


def _make_gta(root: Path) -> None:
    _palette_png(root / "labels" / "00001.png", np.array([[7, 7, 7, 26], [7, 26, 33, 0], [4, 0, 7, 33]]))
    _palette_png(root / "labels" / "00002.png", np.array([[26, 26], [26, 7]]))
    _palette_png(root / "labels" / "notes.png", np.array([[7, 7]]))  # stem not ending in a digit: ignored


GTA_TRAINIDS_1 = np.array([[0, 0, 0, 13], [0, 13, 18, 255], [255, 255, 0, 18]], np.uint8)
GTA_TRAINIDS_2 = np.array([[13, 13], [13, 0]], np.uint8)
L1, L2 = "labels/00001_labelTrainIds.png", "labels/00002_labelTrainIds.png"
GTA_JSON = {
    "sample_class_stats.json": [{"0": 5, "13": 2, "18": 2, "file": L1}, {"0": 1, "13": 3, "file": L2}],
    "sample_class_stats_dict.json": {L1: {"0": 5, "13": 2, "18": 2}, L2: {"0": 1, "13": 3}},
    "samples_with_class.json": {"0": [[L1, 5], [L2, 1]], "13": [[L1, 2], [L2, 3]], "18": [[L1, 2]]},
}


def test_gta_palette_indices_to_trainids_and_stats(tmp_path):
    _make_gta(tmp_path)
    assert convert("gta", tmp_path, quiet=True) == 2
    np.testing.assert_array_equal(_read(tmp_path / L1), GTA_TRAINIDS_1)
    np.testing.assert_array_equal(_read(tmp_path / L2), GTA_TRAINIDS_2)
    assert not (tmp_path / "labels" / "notes_labelTrainIds.png").exists()
    assert _load_json(tmp_path) == GTA_JSON
    # Class keys of samples_with_class are in numeric order; stats objects list classes before "file".
    assert list(json.loads((tmp_path / "samples_with_class.json").read_text())) == ["0", "13", "18"]
    assert list(json.loads((tmp_path / "sample_class_stats.json").read_text())[0]) == ["0", "13", "18", "file"]
    assert sorted(p.name for p in tmp_path.glob("*.tmp*")) == []


def test_gta_idempotent_rerun_keeps_files(tmp_path):
    _make_gta(tmp_path)
    convert("gta", tmp_path, quiet=True)
    old = 1_000_000_000  # push the outputs far into the past so any rewrite is visible in mtime
    for p in (tmp_path / L1, tmp_path / L2):
        os.utime(p, ns=(old, old))
    before = {p: p.read_bytes() for p in (tmp_path / L1, tmp_path / L2)}
    # Even a changed source is not re-converted: finished train-id files are only re-read for statistics.
    assert convert("gta", tmp_path, quiet=True) == 2
    for p, data in before.items():
        assert p.stat().st_mtime_ns == old
        assert p.read_bytes() == data
    assert _load_json(tmp_path) == GTA_JSON
    # The generated files are not picked up as new sources on the second run.
    assert sorted(p.name for p in (tmp_path / "labels").iterdir()) == [
        "00001.png", "00001_labelTrainIds.png", "00002.png", "00002_labelTrainIds.png", "notes.png"]  # fmt: skip


def test_parallel_conversion_gives_identical_outputs(tmp_path):
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    for root in (serial, parallel):
        _make_gta(root)
        for i in range(3, 20):  # enough files for more than one chunk per worker
            ids = np.random.default_rng(i).choice([0, 4, 7, 8, 11, 21, 23, 24, 26, 33], size=(5, 7))
            _palette_png(root / "labels" / f"{i:05d}.png", ids)
    assert convert("gta", serial, nproc=1, quiet=True) == convert("gta", parallel, nproc=2, quiet=True) == 19
    for name in JSON_FILES:
        assert (serial / name).read_bytes() == (parallel / name).read_bytes()
    outs = sorted(p.name for p in (serial / "labels").glob("*_labelTrainIds.png"))
    assert len(outs) == 19
    for name in outs:
        assert (serial / "labels" / name).read_bytes() == (parallel / "labels" / name).read_bytes()


def test_synthia_first_file_channel_is_the_class(tmp_path):
    # cv2 arrays are BGR: the last cv2 channel is the file's first (R) channel, which holds the Synthia class id.
    cls = np.array([[3, 3, 1, 8], [12, 0, 22, 1000]], np.uint16)  # 0, 22, 1000 are not mapped -> 255
    bgr = np.stack([np.full_like(cls, 10), np.full_like(cls, 4000), cls], axis=-1)  # decoys in the other channels
    path = tmp_path / "GT" / "LABELS" / "0000007.png"
    path.parent.mkdir(parents=True)
    assert cv2.imwrite(str(path), bgr)
    back = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert back.dtype == np.uint16 and back.shape == (2, 4, 3)
    assert convert("synthia", tmp_path, quiet=True) == 1
    out = tmp_path / "GT" / "LABELS" / "0000007_labelTrainIds.png"
    np.testing.assert_array_equal(_read(out), [[0, 0, 10, 13], [17, 255, 255, 255]])
    f = "GT/LABELS/0000007_labelTrainIds.png"
    assert _load_json(tmp_path) == {
        "sample_class_stats.json": [{"0": 2, "10": 1, "13": 1, "17": 1, "file": f}],
        "sample_class_stats_dict.json": {f: {"0": 2, "10": 1, "13": 1, "17": 1}},
        "samples_with_class.json": {"0": [[f, 2]], "10": [[f, 1]], "13": [[f, 1]], "17": [[f, 1]]},
    }
    # A second run does not treat the train-id file as a new Synthia label.
    assert convert("synthia", tmp_path, quiet=True) == 1


def _cityscapes(root: Path) -> None:
    for split, name, ids in (
        ("train", "aachen_000000_000019", [[7, 8, 8], [24, 0, 26]]),
        ("train", "bremen_000001_000019", [[7, 7], [33, 33]]),
        ("val", "lindau_000000_000019", [[26, 26], [26, 26]]),
    ):
        city = name.split("_")[0]
        lbl = root / "gtFine" / split / city / f"{name}_gtFine_labelIds.png"
        img = root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png"
        for p in (lbl, img):
            p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.array(ids, np.uint8)).save(lbl)
        Image.fromarray(np.zeros((2, 3, 3), np.uint8)).save(img)


def test_cityscapes_all_splits_converted_stats_from_train_only(tmp_path):
    # The root itself lies under a folder named `train`: only the split folder below gtFine/ may decide.
    root = tmp_path / "train" / "cityscapes"
    _cityscapes(root)
    assert convert("cityscapes", root, quiet=True) == 3
    gt = root / "gtFine"
    np.testing.assert_array_equal(
        _read(gt / "train/aachen/aachen_000000_000019_gtFine_labelTrainIds.png"), [[0, 1, 1], [11, 255, 13]])
    np.testing.assert_array_equal(
        _read(gt / "train/bremen/bremen_000001_000019_gtFine_labelTrainIds.png"), [[0, 0], [18, 18]])
    val = gt / "val/lindau/lindau_000000_000019_gtFine_labelTrainIds.png"
    np.testing.assert_array_equal(_read(val), [[13, 13], [13, 13]])
    a = "gtFine/train/aachen/aachen_000000_000019_gtFine_labelTrainIds.png"
    b = "gtFine/train/bremen/bremen_000001_000019_gtFine_labelTrainIds.png"
    assert _load_json(root) == {
        "sample_class_stats.json": [{"0": 1, "1": 2, "11": 1, "13": 1, "file": a}, {"0": 2, "18": 2, "file": b}],
        "sample_class_stats_dict.json": {a: {"0": 1, "1": 2, "11": 1, "13": 1}, b: {"0": 2, "18": 2}},
        "samples_with_class.json": {"0": [[a, 1], [b, 2]], "1": [[a, 2]], "11": [[a, 1]], "13": [[a, 1]],
                                    "18": [[b, 2]]},
    }  # fmt: skip
    assert (root / "train.txt").read_text() == "aachen/aachen_000000_000019\nbremen/bremen_000001_000019\n"
    assert (root / "val.txt").read_text() == "lindau/lindau_000000_000019\n"
    assert not (root / "test.txt").exists()


def test_folder_kind_statistics_only(tmp_path):
    lbl = tmp_path / "labels" / "train" / "seq" / "a.png"
    lbl.parent.mkdir(parents=True)
    Image.fromarray(np.array([[0, 1, 1], [2, 255, 2]], np.uint8)).save(lbl)
    (tmp_path / "labels" / "val").mkdir()
    Image.fromarray(np.array([[0, 0]], np.uint8)).save(tmp_path / "labels" / "val" / "b.png")
    before = lbl.read_bytes()
    assert convert("folder", tmp_path, num_classes=3, split="train", quiet=True) == 1
    assert lbl.read_bytes() == before
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.png")) == [
        "labels/train/seq/a.png", "labels/val/b.png"]  # fmt: skip
    f = "labels/train/seq/a.png"
    assert _load_json(tmp_path) == {
        "sample_class_stats.json": [{"0": 1, "1": 2, "2": 2, "file": f}],
        "sample_class_stats_dict.json": {f: {"0": 1, "1": 2, "2": 2}},
        "samples_with_class.json": {"0": [[f, 1]], "1": [[f, 2]], "2": [[f, 2]]},
    }


def test_folder_kind_rejects_values_that_are_not_train_ids(tmp_path, capsys):
    good = tmp_path / "labels" / "a.png"
    bad = tmp_path / "labels" / "b.png"
    good.parent.mkdir(parents=True)
    Image.fromarray(np.array([[0, 1, 255]], np.uint8)).save(good)
    Image.fromarray(np.array([[0, 5, 200, 5, 2]], np.uint8)).save(bad)
    with pytest.raises(ValueError, match=r"b\.png: label values 5, 200 outside 0\.\.2 and 255"):
        convert("folder", tmp_path, num_classes=3, quiet=True)
    assert not (tmp_path / "sample_class_stats.json").exists()
    assert main(["folder", str(tmp_path), "--num-classes", "3", "--nproc", "1"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and str(bad) in err and "5, 200" in err
    # 16-bit labels are checked before the uint8 cast (259 would otherwise wrap to the valid id 3).
    Image.fromarray(np.array([[0, 259]], np.uint16)).save(bad)
    with pytest.raises(ValueError, match=r"label values 259 outside 0\.\.5"):
        convert("folder", tmp_path, num_classes=6, quiet=True)
    # With enough classes both files are fine.
    Image.fromarray(np.array([[0, 5, 200, 5, 2]], np.uint8)).save(bad)
    assert main(["folder", str(tmp_path), "--num-classes", "201", "--nproc", "1"]) == 0


@pytest.mark.parametrize(
    "kind, pattern",
    [("gta", "labels/*<digit>.png"), ("synthia", "GT/LABELS/*.png"),
     ("cityscapes", "gtFine/*/*/*_gtFine_labelIds.png"), ("folder", "labels/**/*.png")],
)  # fmt: skip
def test_cli_empty_root_returns_2_naming_the_pattern(tmp_path, capsys, kind, pattern):
    assert main([kind, str(tmp_path), "--nproc", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no label files in") and pattern in err and str(tmp_path) in err
    assert not (tmp_path / "sample_class_stats.json").exists()


def test_cli_missing_root_and_success_message(tmp_path, capsys):
    assert main(["gta", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    _make_gta(tmp_path)
    assert main(["gta", str(tmp_path), "--nproc", "1"]) == 0
    assert "gta: 2 label files converted" in capsys.readouterr().out
    assert _load_json(tmp_path) == GTA_JSON


def test_converter_output_is_independent_of_root_location(tmp_path):
    """Paths in the JSON files are relative to the root: a moved dataset keeps valid statistics."""
    _make_gta(tmp_path / "a")
    convert("gta", tmp_path / "a", quiet=True)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    for name in JSON_FILES:
        (tmp_path / "b" / name).unlink()
    convert("gta", tmp_path / "b", quiet=True)
    for name in JSON_FILES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_interrupted_run_leftovers_are_never_labels(tmp_path):
    """Temporary files of a killed run (this version's hidden `.x.tmp`, older versions' `x.tmp.png`) and macOS
    `._x.png` resource forks: not converted, not counted; a re-run finishes the interrupted file."""
    _make_gta(tmp_path)
    labels = tmp_path / "labels"
    _palette_png(labels / "00003.png", np.array([[7, 26]]))
    (labels / "00003_labelTrainIds.png.tmp.png").write_bytes(b"half a png")
    (labels / ".00003_labelTrainIds.png.tmp").write_bytes(b"half a png")
    (labels / "._00004.png").write_bytes(b"\x00\x05\x16\x07")
    assert convert("gta", tmp_path, quiet=True) == 3
    np.testing.assert_array_equal(_read(labels / "00003_labelTrainIds.png"), [[0, 13]])
    files = [s["file"] for s in json.loads((tmp_path / "sample_class_stats.json").read_text())]
    assert files == [L1, L2, "labels/00003_labelTrainIds.png"]
    # Synthia takes every PNG that is not a train-id file: the old leftover name used to pass that test.
    syn = tmp_path / "synthia" / "GT" / "LABELS"
    syn.mkdir(parents=True)
    assert cv2.imwrite(str(syn / "0000001.png"), np.full((2, 2, 3), 3, np.uint16))
    (syn / "0000001_labelTrainIds.png.tmp.png").write_bytes(b"half a png")
    (syn / "._0000001.png").write_bytes(b"\x00\x05\x16\x07")
    assert convert("synthia", tmp_path / "synthia", quiet=True) == 1
    assert sorted(p.name for p in syn.iterdir() if p.name.endswith("_labelTrainIds.png")) == [
        "0000001_labelTrainIds.png"]  # fmt: skip
    # Folder datasets: hidden folders (e.g. .ipynb_checkpoints copies) are skipped as the dataset scan does.
    folder = tmp_path / "folder" / "labels"
    folder.mkdir(parents=True)
    Image.fromarray(np.array([[0, 1]], np.uint8)).save(folder / "a.png")
    Image.fromarray(np.array([[0, 1]], np.uint8)).save(folder / "a.tmp.png")
    (folder / ".ipynb_checkpoints").mkdir()
    Image.fromarray(np.array([[0, 1]], np.uint8)).save(folder / ".ipynb_checkpoints" / "a.png")
    assert convert("folder", tmp_path / "folder", num_classes=2, quiet=True) == 1


def test_label_files_are_closed(tmp_path, monkeypatch):
    """Every label file the converter opens is closed again, also when it is rejected."""
    import daformer_fast.tools.convert_datasets as mod

    opened, real_open = [], Image.open

    def recording_open(*args, **kwargs):
        im = real_open(*args, **kwargs)
        opened.append(im)
        return im

    _make_gta(tmp_path / "gta")
    monkeypatch.setattr(mod.Image, "open", recording_open)
    convert("gta", tmp_path / "gta", quiet=True)  # converts, then the idempotent re-read
    convert("gta", tmp_path / "gta", quiet=True)
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(tmp_path / "gta" / "labels" / "00009.png")  # RGB: rejected
    with pytest.raises(ValueError, match="expected a palette or grayscale"):
        convert("gta", tmp_path / "gta", quiet=True)
    assert len(opened) >= 5 and all(im.fp is None for im in opened)
