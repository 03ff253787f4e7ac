"""File-list readers for the six layouts (tiny PNGs in tmp_path), image/label reading, and the keep-ratio rule."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from daformer_fast.config import DatasetConfig
from daformer_fast.data.datasets import (
    DatasetError,
    list_samples,
    read_image,
    read_label,
    read_npy_header,
    rescale_size,
    resize_image,
    resize_label,
)


def _png(path: Path, value: int = 0, channels: int = 3) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (4, 6, 3) if channels == 3 else (4, 6)
    Image.fromarray(np.full(shape, value, dtype=np.uint8)).save(path)


# layout -> (split, [(image, label)] pairs that must be found, decoy files that must not be listed as images)
LAYOUTS = {
    "gta": (
        "train",
        [("images/00001.png", "labels/00001_labelTrainIds.png"),
         ("images/00002.png", "labels/00002_labelTrainIds.png")],
        ["labels/00001.png"],
    ),
    "synthia": (
        "train",
        [("RGB/0000001.png", "GT/LABELS/0000001_labelTrainIds.png")],
        ["GT/LABELS/0000001.png"],
    ),
    "cityscapes": (
        "val",
        [
            ("leftImg8bit/val/frankfurt/frankfurt_000000_000294_leftImg8bit.png",
             "gtFine/val/frankfurt/frankfurt_000000_000294_gtFine_labelTrainIds.png"),
            ("leftImg8bit/val/lindau/lindau_000000_000019_leftImg8bit.png",
             "gtFine/val/lindau/lindau_000000_000019_gtFine_labelTrainIds.png"),
        ],
        ["leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png",
         "gtFine/val/lindau/lindau_000000_000019_gtFine_color.png"],
    ),
    "acdc": (
        "val",
        [
            ("rgb_anon/val/GOPR0001_rgb_anon.png", "gt/val/GOPR0001_gt_labelTrainIds.png"),
            ("rgb_anon/val/fog/GOPR0475/GOPR0475_frame_000247_rgb_anon.png",
             "gt/val/fog/GOPR0475/GOPR0475_frame_000247_gt_labelTrainIds.png"),
        ],
        ["gt/val/GOPR0001_gt_labelColor.png"],
    ),
    "darkzurich": (
        "val",
        [("rgb_anon/val/night/GOPR0356/GOPR0356_frame_000321_rgb_anon.png",
          "gt/val/night/GOPR0356/GOPR0356_frame_000321_gt_labelTrainIds.png")],
        ["rgb_anon/train/night/GOPR0001/GOPR0001_frame_000001_rgb_anon.png"],
    ),
    "folder": (
        "train",
        [("images/train/a.jpg", "labels/train/a.png"), ("images/train/sub/b.png", "labels/train/sub/b.png")],
        ["images/val/c.png"],
    ),
}  # fmt: skip


def _build(root: Path, name: str) -> tuple[str, list[tuple[str, str]]]:
    split, pairs, decoys = LAYOUTS[name]
    for img, lbl in pairs:
        _png(root / img, 100)
        _png(root / lbl, 1, channels=1)
    for decoy in decoys:
        _png(root / decoy, 7)
    return split, pairs


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_pairs_images_with_labels(tmp_path, name):
    split, pairs = _build(tmp_path, name)
    samples = list_samples(DatasetConfig(name=name, root=str(tmp_path), split=split))
    got = [(s.img.relative_to(tmp_path).as_posix(), s.label.relative_to(tmp_path).as_posix()) for s in samples]
    assert got == sorted(pairs, key=lambda p: p[0])
    assert len({s.name for s in samples}) == len(samples)


def test_sample_names_are_relative_and_suffix_free(tmp_path):
    _build(tmp_path, "cityscapes")
    samples = list_samples(DatasetConfig(name="cityscapes", root=str(tmp_path), split="val"))
    assert [s.name for s in samples] == ["frankfurt/frankfurt_000000_000294", "lindau/lindau_000000_000019"]


def test_lists_are_sorted(tmp_path):
    for stem in ("00010", "00002", "00100", "00001"):
        _png(tmp_path / f"images/{stem}.png")
        _png(tmp_path / f"labels/{stem}_labelTrainIds.png", channels=1)
    names = [s.name for s in list_samples(DatasetConfig(name="gta", root=str(tmp_path)))]
    assert names == sorted(names)


def test_folder_layout_without_split_folders(tmp_path):
    _png(tmp_path / "images/x.png")
    _png(tmp_path / "images/y.jpeg")
    _png(tmp_path / "labels/x.png", channels=1)
    _png(tmp_path / "labels/y.png", channels=1)
    samples = list_samples(DatasetConfig(name="folder", root=str(tmp_path), split="train"))
    assert [s.label.name for s in samples] == ["x.png", "y.png"]


def test_suffix_overrides(tmp_path):
    _png(tmp_path / "images/val/a_img.png")
    _png(tmp_path / "images/val/a_other.png")  # does not end in img_suffix: not listed
    _png(tmp_path / "labels/val/a_lbl.png", channels=1)
    ds = DatasetConfig(name="folder", root=str(tmp_path), split="val", img_suffix="_img.png", label_suffix="_lbl.png")
    (sample,) = list_samples(ds)
    assert sample.name == "a" and sample.label == tmp_path / "labels/val/a_lbl.png"


def test_darkzurich_train_night_has_no_labels(tmp_path):
    _png(tmp_path / "rgb_anon/train/night/GOPR0001/GOPR0001_frame_000001_rgb_anon.png")
    ds = DatasetConfig(name="darkzurich", root=str(tmp_path), split="train/night")
    (sample,) = list_samples(ds, need_labels=False)
    assert sample.label is None
    with pytest.raises(DatasetError, match="GOPR0001_frame_000001_gt_labelTrainIds.png"):
        list_samples(ds)


def test_missing_label_error_counts_and_names_first(tmp_path):
    _build(tmp_path, "cityscapes")
    missing = tmp_path / "gtFine/val/frankfurt/frankfurt_000000_000294_gtFine_labelTrainIds.png"
    missing.unlink()
    with pytest.raises(DatasetError) as e:
        list_samples(DatasetConfig(name="cityscapes", root=str(tmp_path), split="val"))
    assert "1 of 2" in str(e.value) and str(missing) in str(e.value)


def test_empty_dataset_error_names_root_and_pattern(tmp_path):
    (tmp_path / "leftImg8bit/val").mkdir(parents=True)
    with pytest.raises(DatasetError) as e:
        list_samples(DatasetConfig(name="cityscapes", root=str(tmp_path), split="val"))
    assert str(tmp_path) in str(e.value) and "leftImg8bit/val/**/*_leftImg8bit.png" in str(e.value)
    with pytest.raises(DatasetError, match=r"images/\*\*/\*\{\.png,\.jpg,\.jpeg\}.*does not exist"):
        list_samples(DatasetConfig(name="folder", root=str(tmp_path / "nothing")))


@pytest.mark.parametrize(
    "w, h, scale, expected",
    [
        (1914, 1052, (1280, 720), (1280, 704)),  # GTA: f = min(1280/1914, 720/1052) = 0.6688
        (2048, 1024, (1024, 512), (1024, 512)),  # Cityscapes
        (1920, 1080, (960, 540), (960, 540)),  # ACDC / Dark Zurich
        (1280, 760, (1280, 760), (1280, 760)),  # Synthia: unchanged
        (1052, 1914, (1280, 720), (704, 1280)),  # portrait: the long side is capped by the long scale
        (96, 48, (64, 32), (64, 32)),
    ],
)
def test_rescale_size(w, h, scale, expected):
    assert rescale_size(w, h, scale) == expected


def test_read_image_is_rgb(tmp_path):
    img = np.zeros((3, 5, 3), dtype=np.uint8)
    img[..., 0] = 200  # red in RGB
    Image.fromarray(img).save(tmp_path / "red.png")
    out = read_image(tmp_path / "red.png")
    assert out.dtype == np.uint8 and out.shape == (3, 5, 3)
    np.testing.assert_array_equal(out[0, 0], [200, 0, 0])


def test_palette_label_reads_indices_not_colours(tmp_path):
    idx = np.array([[0, 3, 255], [18, 3, 0]], dtype=np.uint8)
    im = Image.fromarray(idx)
    im.putpalette([(i * 7) % 256 for i in range(768)])
    im.save(tmp_path / "pal.png")
    assert Image.open(tmp_path / "pal.png").mode == "P"
    lbl = read_label(tmp_path / "pal.png")
    assert lbl.dtype == np.uint8
    np.testing.assert_array_equal(lbl, idx)


def test_unreadable_files_name_the_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="broken.png"):
        read_image(bad)
    with pytest.raises(DatasetError, match="broken.png"):
        read_label(bad)
    Image.fromarray(np.zeros((2, 2, 3), dtype=np.uint8)).save(tmp_path / "rgb_label.png")
    with pytest.raises(DatasetError, match="single-channel"):
        read_label(tmp_path / "rgb_label.png")


def test_resize_image_and_label():
    img = np.random.default_rng(0).integers(0, 256, (48, 96, 3), dtype=np.uint8)
    expected = cv2.resize(img, (64, 32), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(resize_image(img, (64, 32)), expected)
    lbl = np.random.default_rng(1).choice(np.array([0, 5, 255], dtype=np.uint8), size=(48, 96))
    small = resize_label(lbl, (64, 32))
    assert small.shape == (32, 64) and set(np.unique(small)) <= {0, 5, 255}  # nearest: no blended ids


def test_hidden_files_and_conversion_leftovers_are_not_samples(tmp_path):
    _png(tmp_path / "images" / "00001.png")
    _png(tmp_path / "labels" / "00001_labelTrainIds.png", channels=1)
    _png(tmp_path / "images" / "00002.tmp.png")  # a copy tool's or an old converter's temporary file
    _png(tmp_path / "images" / "._00001.png")  # macOS resource fork
    _png(tmp_path / "images" / ".ipynb_checkpoints" / "00003.png")
    samples = list_samples(DatasetConfig(name="gta", root=str(tmp_path)))
    assert [s.name for s in samples] == ["00001"]


def test_npy_header_read_without_data_and_refusals(tmp_path):
    path = tmp_path / "a.npy"
    img = np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3)
    np.save(path, img)
    head = read_npy_header(path, 3)
    # A format 1.0 header is padded to 128 bytes here: 10 bytes of magic/length, the dict, spaces, a newline.
    assert (head.shape, head.hw, head.offset) == ((5, 7, 3), (5, 7), 128) and path.stat().st_size == 128 + 105
    np.testing.assert_array_equal(read_image(path), img)
    np.save(tmp_path / "l.npy", img[..., 0])
    np.testing.assert_array_equal(read_label(tmp_path / "l.npy"), img[..., 0])
    with pytest.raises(DatasetError, match=r"expected uint8 C-order H×W$"):
        read_label(path)  # an image is not a label
    np.save(tmp_path / "f.npy", img.astype(np.float32))
    with pytest.raises(DatasetError, match=r"f\.npy: a float32 array of shape \(5, 7, 3\); expected uint8"):
        read_image(tmp_path / "f.npy")
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DatasetError, match=r"truncated .*a\.npy: 200 bytes, its header promises 233"):
        read_image(path)
    (tmp_path / "g.npy").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match=r"cannot read .*g\.npy"):
        read_npy_header(tmp_path / "g.npy")
