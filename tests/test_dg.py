"""Domain-generalisation sets: the BDD100K and Mapillary readers, the Vistas → train-id converter with its RCS
statistics, and `evaluate --dg` against an independent per-set mIoU (tiny generated folders, a random MiT-B0)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from daformer_fast.checkpoint import save_checkpoint
from daformer_fast.config import DatasetConfig, parse_config
from daformer_fast.data.datasets import list_samples
from daformer_fast.data.rcs import RareClassSampler, load_class_stats
from daformer_fast.evaluate import main as evaluate_main
from daformer_fast.models import build_segmentor
from daformer_fast.tools.convert_datasets import convert, main as convert_main

W, H, SCALE = 16, 8, (64, 32)  # 16x8 images, resized x4 for the network, scored at 16x8


def _image(path: Path, rng: np.random.Generator) -> None:
    """A smooth RGB image (a random network then predicts several classes, but not per-pixel noise)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    small = rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)
    cv2.imwrite(str(path), cv2.resize(small, (W, H), interpolation=cv2.INTER_CUBIC))


def _label(path: Path, ids: np.ndarray, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(ids.astype(np.uint8))
    if palette:  # Vistas labels: palette PNGs whose indices are the class ids; the colours must not matter
        im = im.convert("P")
        im.putpalette(np.random.default_rng(5).integers(0, 256, 768).tolist())
    im.save(path)


def _rel(samples, root: Path) -> list[tuple[str, str]]:
    return [(s.img.relative_to(root).as_posix(), s.label.relative_to(root).as_posix()) for s in samples]


def test_bdd100k_reader_pairs_jpgs_with_masks_by_stem(tmp_path):
    rng = np.random.default_rng(0)
    for stem in ("7d2f7975-e0c1c5a7", "7d128593-0ccfea4c"):
        _image(tmp_path / f"images/10k/val/{stem}.jpg", rng)
        _label(tmp_path / f"labels/sem_seg/masks/val/{stem}.png", np.zeros((H, W)))
    _image(tmp_path / "images/10k/train/0a0a0b1a-7c39d841.jpg", rng)  # another split: not listed
    _label(tmp_path / "labels/sem_seg/colormaps/val/7d2f7975-e0c1c5a7.png", np.zeros((H, W)))  # not a mask folder
    samples = list_samples(DatasetConfig(name="bdd100k", root=str(tmp_path), split="val"))
    assert _rel(samples, tmp_path) == [
        ("images/10k/val/7d128593-0ccfea4c.jpg", "labels/sem_seg/masks/val/7d128593-0ccfea4c.png"),
        ("images/10k/val/7d2f7975-e0c1c5a7.jpg", "labels/sem_seg/masks/val/7d2f7975-e0c1c5a7.png"),
    ]


def test_mapillary_reader_finds_vistas_split_folders(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("training", "validation"):
        _image(tmp_path / f"{split}/images/{split[0]}1.jpg", rng)
        _label(tmp_path / f"{split}/labels/{split[0]}1.png", np.zeros((H, W)))  # raw Vistas ids: never the label
        _label(tmp_path / f"{split}/labels/{split[0]}1_labelTrainIds.png", np.zeros((H, W)))
    for split, folder in (("val", "validation"), ("validation", "validation"), ("train", "training")):
        (sample,) = list_samples(DatasetConfig(name="mapillary", root=str(tmp_path), split=split))
        img, lbl = f"{folder}/images/{folder[0]}1.jpg", f"{folder}/labels/{folder[0]}1_labelTrainIds.png"
        assert _rel([sample], tmp_path) == [(img, lbl)]
    # A folder literally named like the split wins over the alias.
    _image(tmp_path / "val/images/own.jpg", rng)
    _label(tmp_path / "val/labels/own_labelTrainIds.png", np.zeros((H, W)))
    assert [s.name for s in list_samples(DatasetConfig(name="mapillary", root=str(tmp_path), split="val"))] == ["own"]


# Vistas v1.2 id → expected train id, picked by hand from the class list (docs/architectures.md §4). The last row
# has no Cityscapes class: traffic sign (back), zebra crosswalk, plain crosswalk, parking, bird, caravan, car mount,
# unlabeled.
VISTAS_CASES = {
    13: 0, 24: 0, 41: 0,  # road, lane marking, manhole → road
    2: 1, 15: 1,  # curb, sidewalk → sidewalk
    17: 2, 6: 3, 3: 4, 45: 5, 47: 5, 48: 6, 50: 7,  # building, wall, fence, pole, utility pole, light, sign front
    30: 8, 29: 9, 27: 10, 19: 11, 20: 12, 22: 12,  # vegetation, terrain, sky, person, bicyclist, other rider
    55: 13, 61: 14, 54: 15, 58: 16, 57: 17, 52: 18,  # car, truck, bus, on rails, motorcycle, bicycle
    49: 255, 23: 255, 8: 255, 10: 255, 0: 255, 56: 255, 63: 255, 65: 255,
}  # fmt: skip


def _vistas(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """training/labels/a.png with every hand-picked id once, training/labels/b.png, and a validation label in the
    v2.0 package's v1.2/labels folder; returns the train-id maps expected for a and b."""
    ids_a = np.array(list(VISTAS_CASES), dtype=np.uint8).reshape(4, 8)
    ids_b = np.array([[55, 55, 55], [13, 27, 65]], dtype=np.uint8)
    _label(root / "training/labels/a.png", ids_a, palette=True)
    _label(root / "training/labels/b.png", ids_b, palette=True)
    _label(root / "validation/v1.2/labels/v.png", np.full((2, 2), 19), palette=True)
    lut = np.vectorize(VISTAS_CASES.get)
    return lut(ids_a).astype(np.uint8), lut(ids_b).astype(np.uint8)


def test_mapillary_converter_maps_vistas_ids_and_writes_rcs_stats(tmp_path):
    want_a, want_b = _vistas(tmp_path)
    assert convert("mapillary", tmp_path, quiet=True) == 3
    for name, want in (("a", want_a), ("b", want_b)):
        with Image.open(tmp_path / f"training/labels/{name}_labelTrainIds.png") as im:
            assert im.mode == "L"
            np.testing.assert_array_equal(np.asarray(im), want)
    with Image.open(tmp_path / "validation/labels/v_labelTrainIds.png") as im:  # beside, not into, v1.2/labels
        np.testing.assert_array_equal(np.asarray(im), np.full((2, 2), 11))
    # Statistics of the training split only; road in a counts its three source ids together (3 pixels).
    la, lb = "training/labels/a_labelTrainIds.png", "training/labels/b_labelTrainIds.png"
    counts_a = {str(c): int((want_a == c).sum()) for c in range(19) if (want_a == c).any()}
    assert counts_a["0"] == 3 and counts_a["5"] == 2 and counts_a["12"] == 2
    stats = load_class_stats(tmp_path)
    assert stats == [{**counts_a, "file": la}, {"0": 1, "10": 1, "13": 3, "file": lb}]
    assert json.loads((tmp_path / "samples_with_class.json").read_text())["13"] == [[la, 1], [lb, 3]]
    # RCS finds the converted files among the layout's samples (images are only listed, never decoded here).
    rng = np.random.default_rng(0)
    for stem in ("a", "b"):
        _image(tmp_path / f"training/images/{stem}.jpg", rng)
    samples = list_samples(DatasetConfig(name="mapillary", root=str(tmp_path), split="train"))
    sampler = RareClassSampler.from_stats(stats, samples, temperature=0.01, min_pixels=2, min_crop_ratio=0.5)
    # More than 2 pixels: road in a (its three source ids together), car in b.
    assert {c: v.tolist() for c, v in sampler.images_with_class.items()} == {0: [0], 13: [1]}
    # Re-running keeps the written files and gives the same statistics.
    assert convert("mapillary", tmp_path, quiet=True) == 3
    assert load_class_stats(tmp_path) == stats


def test_mapillary_converter_refuses_v2_ids(tmp_path, capsys):
    _label(tmp_path / "training/labels/x.png", np.array([[13, 123]]), palette=True)  # 123: v2.0 has 124 classes
    assert convert_main(["mapillary", str(tmp_path), "--nproc", "1"]) == 2
    err = capsys.readouterr().err
    assert "error: " in err and "class id 123" in err and "v1.2" in err  # after the progress bar
    (tmp_path / "empty").mkdir()
    assert convert_main(["mapillary", str(tmp_path / "empty"), "--nproc", "1"]) == 2
    assert "<split>/labels/*.png or <split>/v1.2/labels/*.png" in capsys.readouterr().err


@pytest.fixture(scope="module")
def dg(tmp_path_factory):
    """Three tiny labelled sets (cityscapes, bdd100k, mapillary layouts) and a random MiT-B0 checkpoint."""
    tmp = tmp_path_factory.mktemp("dg")
    rng = np.random.default_rng(1)
    files = {
        "cityscapes": [(f"leftImg8bit/val/ulm/ulm_00000{i}_leftImg8bit.png", f"gtFine/val/ulm/ulm_00000{i}_gtFine_"
                        "labelTrainIds.png") for i in range(2)],
        "bdd100k": [(f"images/10k/val/b{i}.jpg", f"labels/sem_seg/masks/val/b{i}.png") for i in range(3)],
        "mapillary": [("validation/images/m0.jpg", "validation/labels/m0_labelTrainIds.png")],
    }  # fmt: skip
    for name, pairs in files.items():
        for img, lbl in pairs:
            _image(tmp / name / img, rng)
            ids = rng.integers(0, 19, (H, W))
            ids[0] = 255
            _label(tmp / name / lbl, ids)
    overrides = ["model.backbone=mit_b0", "model.pretrained=null", f"data.val.scale=[{SCALE[0]},{SCALE[1]}]",
                 "train.device=cpu", f"train.work_dir={tmp / 'work'}"]  # fmt: skip
    cfg = parse_config({}, overrides)
    torch.manual_seed(0)
    model = build_segmentor(cfg.model).eval()
    save_checkpoint(tmp / "ckpt.pth", student=model, teacher=model, iteration=1, config=cfg)
    (tmp / "cfg.yaml").write_text("data:\n  val: {name: cityscapes, split: val}\n", encoding="utf-8")
    args = [str(tmp / "cfg.yaml"), "--checkpoint", str(tmp / "ckpt.pth"), "--workers", "0"]
    return {"tmp": tmp, "files": files, "model": model, "args": args, "overrides": overrides}


def _independent_miou(model, root: Path, pairs: list[tuple[str, str]], k: int = 19) -> tuple[float, int]:
    """(mIoU in percent, number of distinct predicted classes) of one set, without daformer_fast's inference:
    cv2 decode and bilinear resize, ImageNet normalisation in numpy, forward, two bilinear upsamplings, argmax."""
    mean, std = np.array([123.675, 116.28, 103.53]), np.array([58.395, 57.12, 57.375])
    hist, seen = np.zeros((k, k), dtype=np.int64), set()
    for img, lbl in pairs:
        rgb = cv2.cvtColor(cv2.imread(str(root / img)), cv2.COLOR_BGR2RGB)
        x = (cv2.resize(rgb, SCALE, interpolation=cv2.INTER_LINEAR) - mean) / std
        with torch.no_grad():
            logits = model(torch.from_numpy(x.astype(np.float32)).permute(2, 0, 1)[None])
            for size in ((SCALE[1], SCALE[0]), (H, W)):
                logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        pred = logits.argmax(1)[0].numpy()
        label = np.asarray(Image.open(root / lbl)).astype(np.int64)
        keep = label != 255
        hist += np.bincount(label[keep] * k + pred[keep], minlength=k * k).reshape(k, k)
        seen |= set(np.unique(pred).tolist())
    union = hist.sum(0) + hist.sum(1) - np.diag(hist)
    return float(np.mean(np.diag(hist)[union > 0] / union[union > 0]) * 100), len(seen)


def test_dg_table_average_is_the_mean_of_independent_per_set_mious(dg, capsys):
    out = dg["tmp"] / "out"
    roots = [f"{name}={dg['tmp'] / name}" for name in dg["files"]]
    assert evaluate_main(dg["args"] + ["--out", str(out), "--dg", *roots, "--set", *dg["overrides"]]) == 0
    printed = capsys.readouterr().out
    expected = {}
    for name, pairs in dg["files"].items():
        expected[name], n_classes = _independent_miou(dg["model"], dg["tmp"] / name, pairs)
        assert n_classes > 1  # a constant prediction would make the comparison weak
    record = json.loads((out / "dg_metrics.json").read_text())
    assert list(record["datasets"]) == ["cityscapes", "bdd100k", "mapillary"]
    for name, value in expected.items():
        got = record["datasets"][name]
        assert got["mIoU"] == pytest.approx(value, abs=1e-9)
        assert got["num_images"] == len(dg["files"][name]) and got["split"] == "val" and len(got["IoU"]) == 19
    average = sum(expected.values()) / 3
    assert record["mIoU_avg"] == pytest.approx(average, abs=1e-9)
    rows = {line.split("|")[0].strip(): line for line in printed.splitlines() if "|" in line}
    assert float(rows["Average"].split("|")[2]) == pytest.approx(average, abs=0.005)
    for name, value in expected.items():
        assert float(rows[name].split("|")[2]) == pytest.approx(value, abs=0.005)
    assert "road" not in rows  # class rows only with --per-class


def test_dg_per_class_columns_and_limit(dg, capsys):
    roots = [f"bdd100k={dg['tmp'] / 'bdd100k'}", f"mapillary={dg['tmp'] / 'mapillary'}"]
    out = dg["tmp"] / "out_pc"
    args = dg["args"] + ["--out", str(out), "--limit", "1", "--per-class", "--dg", *roots, "--set", *dg["overrides"]]
    assert evaluate_main(args) == 0
    record = json.loads((out / "dg_metrics.json").read_text())
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("Class"))
    assert [c.strip() for c in header.split("|")] == ["Class", "bdd100k", "mapillary"]
    road = next(line for line in lines if line.startswith("road"))
    for cell, name in zip(road.split("|")[1:], ("bdd100k", "mapillary")):
        iou = record["datasets"][name]["IoU"]["road"]
        assert cell.strip() == ("nan" if iou is None else f"{iou:.2f}")
    assert [record["datasets"][n]["num_images"] for n in ("bdd100k", "mapillary")] == [1, 1]


def test_dg_bad_roots_and_names_exit_2_with_one_line(dg, capsys):
    missing = dg["tmp"] / "no_bdd_here"
    roots = [f"cityscapes={dg['tmp'] / 'cityscapes'}", f"bdd100k={missing}"]
    assert evaluate_main(dg["args"] + ["--dg", *roots, "--set", *dg["overrides"]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "bdd100k" in err and str(missing) in err and len(err.strip().splitlines()) == 1
    for bad, words in ((f"vistas={dg['tmp']}", ["vistas", "mapillary"]), ("bdd100k", ["NAME=ROOT"]),
                       (f"mapillary={dg['tmp'] / 'bdd100k'}", ["no images found", "mapillary"])):  # fmt: skip
        assert evaluate_main(dg["args"] + ["--dg", bad, "--set", *dg["overrides"]]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and all(w in err for w in words) and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit):
        evaluate_main(dg["args"] + ["--format-only", "--dg", f"bdd100k={dg['tmp'] / 'bdd100k'}"])
