"""Debug image grids (docs/recipe.md §2.9): file names, grid geometry, label colours, de-normalisation, mask
upsampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from daformer_fast.config import CITYSCAPES_PALETTE
from daformer_fast.data.pipeline import normalize
from daformer_fast.visualize import _GAP, _TITLE_H, colorize, debug_grid, denormalize, save_debug_grids

B, H, W = 2, 16, 24


def _panels(gen: torch.Generator) -> dict[str, torch.Tensor]:
    img = torch.randint(0, 256, (B, 3, H, W), dtype=torch.uint8, generator=gen)
    gt = torch.randint(0, 19, (B, H, W), generator=gen)
    gt[:, 0, 0] = 255
    return {
        "source image": normalize(img),
        "source GT": gt,
        "mix mask": torch.rand(B, H, W, generator=gen) > 0.5,
        "pseudo weight": torch.rand(B, H, W, generator=gen),
        "FD mask": torch.tensor([[[True, False]], [[False, True]]]),  # (B, 1, 2): a coarse grid
        "skipped": None,
    }


def _cell(grid: np.ndarray, k: int, ncols: int = 5, titles: bool = False) -> np.ndarray:
    """Panel k of a grid (H×W crop), undoing `debug_grid`'s layout."""
    top = _TITLE_H if titles else 0
    x = _GAP + (k % ncols) * (W + _GAP)
    y = _GAP + (k // ncols) * (H + top + _GAP) + top
    return grid[y : y + H, x : x + W]


def test_file_names_and_grid_shape(tmp_path):
    panels = _panels(torch.Generator().manual_seed(0))
    paths = save_debug_grids(tmp_path / "debug", 999, panels, CITYSCAPES_PALETTE, ncols=3)
    assert [p.name for p in paths] == ["001000_0.png", "001000_1.png"]
    with Image.open(paths[1]) as im:
        assert im.mode == "RGB"
        # 5 panels (None skipped) in rows of 3: 3 columns, 2 rows, title bars on.
        assert im.size == (3 * (W + _GAP) + _GAP, 2 * (H + _TITLE_H + _GAP) + _GAP)
    grid = debug_grid({"a": np.zeros((H, W, 3), np.uint8)}, titles=False)
    assert grid.shape == (H + 2 * _GAP, W + 2 * _GAP, 3)


def test_panels_land_in_order_with_known_colours(tmp_path):
    panels = _panels(torch.Generator().manual_seed(1))
    paths = save_debug_grids(tmp_path, 0, panels, CITYSCAPES_PALETTE, titles=False)
    for j, path in enumerate(paths):
        with Image.open(path) as im:
            grid = np.asarray(im)
        np.testing.assert_array_equal(_cell(grid, 0), denormalize(panels["source image"])[j])
        gt = panels["source GT"][j]
        label = _cell(grid, 1)
        assert (label[0, 0] == 0).all()  # ignore → black
        y, x = 3, 5
        assert tuple(label[y, x]) == CITYSCAPES_PALETTE[int(gt[y, x])]
        np.testing.assert_array_equal(label, colorize(gt[None], CITYSCAPES_PALETTE)[0])
        mask = _cell(grid, 2)
        np.testing.assert_array_equal(mask[..., 0], panels["mix mask"][j].numpy() * 255)
        weight = _cell(grid, 3)[..., 0].astype(np.float32) / 255
        np.testing.assert_allclose(weight, panels["pseudo weight"][j].numpy(), atol=0.5 / 255 + 1e-6)
        # The 1×2 FD mask covers the crop: left half one value, right half the other.
        fd = _cell(grid, 4)[..., 0]
        left, right = panels["FD mask"][j, 0].tolist()
        assert (fd[:, : W // 2] == 255 * left).all() and (fd[:, W // 2 :] == 255 * right).all()


def test_denormalize_round_trip():
    img = torch.randint(0, 256, (B, 3, H, W), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    np.testing.assert_array_equal(denormalize(normalize(img)), img.permute(0, 2, 3, 1).numpy())
    # Padding normalised to 0 comes back as the mean colour.
    pad = denormalize(torch.zeros(1, 3, 1, 1))[0, 0, 0]
    assert pad.tolist() == [124, 116, 104]


def test_label_colours_for_custom_palette_and_out_of_range_values():
    palette = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    lbl = torch.tensor([[[0, 1, 2, 3, 255, -1]]])
    rgb = colorize(lbl, palette)[0, 0]
    assert rgb.tolist() == [[255, 0, 0], [0, 255, 0], [0, 0, 255], [0, 0, 0], [0, 0, 0], [0, 0, 0]]


def test_kind_override_and_errors(tmp_path):
    mask_int = torch.tensor([[[0, 1], [1, 0]]])
    (path,) = save_debug_grids(tmp_path, 0, {"m": mask_int}, CITYSCAPES_PALETTE, kinds={"m": "grey"}, titles=False)
    with Image.open(path) as im:
        cell = np.asarray(im)[_GAP : _GAP + 2, _GAP : _GAP + 2, 0]
    assert cell.tolist() == [[0, 255], [255, 0]]
    with pytest.raises(ValueError, match="batch size"):
        save_debug_grids(tmp_path, 0, {"a": torch.zeros(1, 4, 4), "b": torch.zeros(2, 4, 4)}, CITYSCAPES_PALETTE)
    with pytest.raises(ValueError, match="no panels"):
        save_debug_grids(tmp_path, 0, {"a": None}, CITYSCAPES_PALETTE)
