"""A custom `folder` dataset with 5 classes, end to end: converter → RCS statistics → sampler → torch loader batch.

Images are 160×96, resized to 80×48 and cropped at 64×64, so every crop is padded (rows 48..63): the padding must
be label 255 and, after `normalize`, image 0, as in the reference (Pad after Normalize, docs/recipe.md §1.3).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from daformer_fast.config import ConfigError, parse_config
from daformer_fast.data.datasets import DatasetError, list_samples
from daformer_fast.data.pipeline import normalize
from daformer_fast.data.rcs import RareClassSampler, load_class_stats, suggest_min_pixels
from daformer_fast.data.torch_loader import TrainDataset, build_torch_loader
from daformer_fast.tools.convert_datasets import convert
from daformer_fast.tools.convert_datasets import main as convert_main

K, W, H, B = 5, 160, 96, 2
CLASSES = ["ground", "wall", "plant", "sky", "thing"]
PALETTE = [[128, 64, 128], [70, 70, 70], [107, 142, 35], [70, 130, 180], [220, 20, 60]]
MIN_PIXELS = suggest_min_pixels(W * H)  # round(3000 · 15360 / (1914 · 1052)) = 23


def _scene(rng: np.random.Generator, with_thing: bool) -> np.ndarray:
    lbl = np.zeros((H, W), np.uint8)  # ground
    horizon = int(rng.integers(30, 50))
    lbl[:horizon] = 3  # sky
    x = int(rng.integers(0, W - 40))
    lbl[horizon - 20 : horizon, x : x + 40] = 1  # wall
    lbl[horizon : horizon + 10, : int(rng.integers(20, 60))] = 2  # plant
    if with_thing:  # the rare class: 2 of 6 images
        lbl[horizon + 15 : horizon + 25, 70:80] = 4
    lbl[-2:] = 255
    return lbl


def _write_dataset(root: Path, n: int, labels: bool, seed: int) -> None:
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir(parents=True)
    for i in range(n):
        lbl = _scene(rng, with_thing=i in (1, 4))
        img = np.asarray(PALETTE, np.uint8)[np.minimum(lbl, K - 1)] + rng.integers(0, 20, (H, W, 3), dtype=np.uint8)
        Image.fromarray(img).save(root / "images" / f"frame{i:02d}.jpg", quality=95)
        if labels:
            Image.fromarray(lbl).save(root / "labels" / f"frame{i:02d}_mask.png")


@pytest.fixture(scope="module")
def custom(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("custom")
    _write_dataset(root / "src", 6, labels=True, seed=0)
    _write_dataset(root / "tgt", 4, labels=False, seed=1)
    # An interrupted run's leftover and a macOS resource fork: neither may become a label or a sample.
    (root / "src" / "labels" / "frame00_mask.png.tmp.png").write_bytes(b"partial")
    (root / "src" / "labels" / "._frame01_mask.png").write_bytes(b"\x00\x05\x16\x07")
    (root / "src" / "images" / "._frame01.jpg").write_bytes(b"\x00\x05\x16\x07")
    convert("folder", root / "src", num_classes=K, label_suffix="_mask.png", quiet=True)
    return root


def _cfg(root: Path, **rcs):
    return parse_config({
        "model": {"num_classes": K},
        "data": {
            "classes": CLASSES, "palette": PALETTE,
            "source": {"name": "folder", "root": str(root / "src"), "scale": [80, 48], "img_suffix": ".jpg",
                       "label_suffix": "_mask.png"},
            "target": {"name": "folder", "root": str(root / "tgt"), "scale": [80, 48], "img_suffix": ".jpg"},
            "crop": [64, 64], "batch_size": B, "workers": 0, "rcs": rcs,
        },
        "uda": {"fd_classes": [4]},
    })  # fmt: skip


def test_converter_statistics_and_min_pixels_hint(custom, capsys):
    # The fixture converted once; the CLI re-run is idempotent and prints the RCS threshold for this image size.
    assert convert_main(["folder", str(custom / "src"), "--num-classes", str(K), "--label-suffix", "_mask.png",
                         "--nproc", "1"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert MIN_PIXELS == 23 and f"data.rcs.min_pixels: {MIN_PIXELS}" in out
    stats = load_class_stats(custom / "src")
    assert [s["file"] for s in stats] == [f"labels/frame{i:02d}_mask.png" for i in range(6)]
    for s in stats:
        with Image.open(custom / "src" / s["file"]) as im:
            lbl = np.asarray(im)
        assert s == {str(c): int((lbl == c).sum()) for c in range(K) if (lbl == c).any()} | {"file": s["file"]}
    with_class = json.loads((custom / "src" / "samples_with_class.json").read_text())
    assert sorted(with_class, key=int) == ["0", "1", "2", "3", "4"]
    assert [p for p, _ in with_class["4"]] == ["labels/frame01_mask.png", "labels/frame04_mask.png"]


def test_rcs_on_the_custom_classes(custom, caplog):
    samples = list_samples(_cfg(custom).data.source)
    assert [s.name for s in samples] == [f"frame{i:02d}" for i in range(6)]
    stats = load_class_stats(custom / "src")
    # The GTA default on small images: only ground and sky qualify, and the log says what to set.
    with caplog.at_level(logging.WARNING, logger="daformer_fast.data"):
        rcs = RareClassSampler.from_stats(stats, samples, 0.01, 3000, 0.5)
    assert sorted(rcs.classes.tolist()) == [0, 3]
    assert "classes 4, 2, 1 never cover more than data.rcs.min_pixels=3000" in caplog.text
    assert f"--set data.rcs.min_pixels={MIN_PIXELS} " in caplog.text
    with pytest.raises(DatasetError, match=rf"no image has .* --set data\.rcs\.min_pixels={MIN_PIXELS} "):
        RareClassSampler.from_stats(stats, samples, 0.01, W * H, 0.5)
    rcs = RareClassSampler.from_stats(stats, samples, 0.01, MIN_PIXELS, 0.5)
    assert sorted(rcs.classes.tolist()) == list(range(K))
    assert int(rcs.classes[np.argmax(rcs.probs)]) == 4  # the rarest class is the most likely
    assert rcs.images_with_class[4].tolist() == [1, 4]


def test_torch_loader_batch_with_padding(custom):
    cfg = _cfg(custom, min_pixels=MIN_PIXELS)
    ds = TrainDataset(cfg.data, mode="dacs", num_classes=cfg.model.num_classes, seed=0)
    batches = list(build_torch_loader(ds, start_iter=0, max_iters=3, workers=0))
    assert len(batches) == 3
    for batch in batches:
        assert batch["img"].shape == batch["target_img"].shape == (B, 3, 64, 64)
        assert set(batch["gt"].unique().tolist()) <= set(range(K)) | {255}
        assert set(batch["rcs_class"].tolist()) <= set(range(K))
        assert batch["valid_hw"].tolist() == batch["target_valid_hw"].tolist() == [[48, 64]] * B
        assert (batch["gt"][:, 48:] == 255).all()
        for img, hw in ((batch["img"], batch["valid_hw"]), (batch["target_img"], batch["target_valid_hw"])):
            x = normalize(img, hw)
            assert torch.equal(x[:, :, 48:], torch.zeros_like(x[:, :, 48:]))  # the reference's pad value
            assert torch.equal(x[:, :, :48], normalize(img)[:, :, :48])


def test_config_checks_classes_palette_and_fd_classes(custom):
    with pytest.raises(ConfigError, match="palette has 4 colours for 5 classes"):
        parse_config({"model": {"num_classes": K}, "data": {"classes": CLASSES, "palette": PALETTE[:4]}})
    with pytest.raises(ConfigError, match=r"uda\.fd_classes \[6, 7, 11"):  # the Cityscapes default
        parse_config({"model": {"num_classes": K}, "data": {"classes": CLASSES, "palette": PALETTE}})
