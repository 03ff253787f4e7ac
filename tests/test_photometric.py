"""PhotoMetricDistortion of the supervised baselines' loaders (docs/architectures.md §3) and the loaders' behaviour
with it off."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from daformer_fast.config import parse_config
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


# Batches of iterations 0..3 (seed 0, rank 0) as the loaders drew them before PhotoMetricDistortion existed.
_DIGESTS = {
    "dacs": "93d35d55552d3254",
    "source_only": "8ba0013d0d8c97f9",
    "target_only": "0f085fd42e2fccd9",
}


@pytest.mark.parametrize("mode", sorted(_DIGESTS))
def test_batches_with_the_option_off_are_unchanged(tiny, mode):
    assert _digest(_batches(_dataset(tiny, mode), 0, 4)) == _DIGESTS[mode]
