"""Debug image grids of one UDA training step (docs/recipe.md §2.9), with PIL and numpy only.

The original saves, every 1000 iterations, one 2×5 matplotlib figure per batch element to
`<work_dir>/class_mix_debug/{iter+1:06d}_{j}.png`: source image, target image, source GT, target pseudo-label,
mixed image, mix mask, mixed label, pseudo weight (grey, 0..1), FD mask and the downscaled GT used for FD.
`save_debug_grids` writes the same grid from whatever panels the caller passes, in the caller's order:

    save_debug_grids(work_dir / "class_mix_debug", step, {
        "source image": img_B3HW, "target image": target_img_B3HW, "source GT": gt_BHW,
        "pseudo-label": pseudo_BHW, "mixed image": mixed_B3HW, "mix mask": mix_mask_BHW,
        "mixed label": mixed_gt_BHW, "pseudo weight": pseudo_weight_BHW, "FD mask": fd_mask_Bhw,
    }, palette=cfg.data.palette)

Panel kinds follow from the tensor: (B,3,H,W) floating = a normalised image (de-normalised with `mean`/`std`);
an integer (B,H,W) = a label map (coloured with `palette`; 255 and any value without a colour are black); bool
or floating (B,H,W) = a mask or weight, drawn grey from 0 (black) to 1 (white). `kinds` overrides the guess
(e.g. a mix mask stored as int64). Panels at a lower resolution (the FD mask is 1/32 of the crop) are
upsampled by nearest neighbour to the largest panel size; None panels are skipped. Everything is copied to the
CPU here, which synchronises with the device: call it outside the training step (the original plots inside it).

Legend: B batch, H/W crop size, h/w a panel's own size.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from daformer_fast.data.pipeline import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["PanelKind", "debug_grid", "denormalize", "colorize", "save_debug_grids"]

PanelKind = Literal["image", "label", "grey"]
_GAP = 4  # pixels between panels
_TITLE_H = 14  # title bar height; PIL's built-in bitmap font is about 11 pixels tall
_BACKGROUND = (32, 32, 32)


def denormalize(
    img_B3HW: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> np.ndarray:
    """Normalised RGB images → uint8 (B,H,W,3): x · std + mean, rounded and clipped to 0..255."""
    x = img_B3HW.detach().to("cpu", torch.float32).numpy()
    x = x * np.asarray(std, np.float32).reshape(1, 3, 1, 1) + np.asarray(mean, np.float32).reshape(1, 3, 1, 1)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def colorize(labels_BHW: torch.Tensor, palette: Sequence[Sequence[int]]) -> np.ndarray:
    """Label maps → uint8 (B,H,W,3) in the palette's colours; 255 (ignore) and values without a colour are black."""
    lut = np.zeros((256, 3), np.uint8)
    colours = np.asarray(palette, np.uint8).reshape(-1, 3)[:255]  # id 255 stays black
    lut[: len(colours)] = colours
    lbl = labels_BHW.detach().to("cpu", torch.int64).numpy()
    return lut[np.where((lbl >= 0) & (lbl < 256), lbl, 255)]


def _grey(mask_BHW: torch.Tensor) -> np.ndarray:
    """Masks or weights in 0..1 → uint8 (B,H,W,3) grey."""
    x = mask_BHW.detach().to("cpu", torch.float32).numpy()
    g = np.clip(np.rint(x * 255), 0, 255).astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=-1)


def _kind(t: torch.Tensor) -> PanelKind:
    if t.dim() == 4 and t.shape[1] == 3 and t.is_floating_point():
        return "image"
    if t.dtype == torch.bool or t.is_floating_point():
        return "grey"
    return "label"


def _to_rgb(name: str, t: torch.Tensor, kind: PanelKind, palette, mean, std) -> np.ndarray:
    if kind != "image" and t.dim() == 4 and t.shape[1] == 1:
        t = t[:, 0]  # B1HW masks (e.g. a mix mask kept broadcastable against images)
    if (kind == "image") != (t.dim() == 4) or t.dim() not in (3, 4):
        raise ValueError(f"debug panel {name!r}: shape {tuple(t.shape)} does not fit kind {kind!r}")
    if kind == "image":
        return denormalize(t, mean, std)
    return colorize(t, palette) if kind == "label" else _grey(t)


def _upsample_nearest(rgb_hw3: np.ndarray, H: int, W: int) -> np.ndarray:
    """Nearest-neighbour resize by index (src = floor(dst · h / H)), as torch's `nearest` mode for these sizes."""
    h, w = rgb_hw3.shape[:2]
    if (h, w) == (H, W):
        return rgb_hw3
    return rgb_hw3[(np.arange(H) * h // H)[:, None], (np.arange(W) * w // W)[None, :]]


def debug_grid(panels: Mapping[str, np.ndarray], *, ncols: int = 5, titles: bool = True) -> np.ndarray:
    """One sample's panels (name → uint8 (h,w,3)) tiled row by row into one uint8 image, upsampled to the largest."""
    H = max(p.shape[0] for p in panels.values())
    W = max(p.shape[1] for p in panels.values())
    ncols = max(1, min(ncols, len(panels)))
    nrows = math.ceil(len(panels) / ncols)
    top = _TITLE_H if titles else 0
    cell_h, cell_w = H + top + _GAP, W + _GAP
    canvas = Image.new("RGB", (ncols * cell_w + _GAP, nrows * cell_h + _GAP), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for k, (name, rgb) in enumerate(panels.items()):
        x, y = _GAP + (k % ncols) * cell_w, _GAP + (k // ncols) * cell_h
        canvas.paste(Image.fromarray(_upsample_nearest(rgb, H, W)), (x, y + top))
        if titles:
            draw.text((x, y + 1), name, fill=(255, 255, 255), font=font)
    return np.asarray(canvas)


def save_debug_grids(
    out_dir: str | Path,
    step: int,
    panels: Mapping[str, torch.Tensor | None],
    palette: Sequence[Sequence[int]],
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    *,
    kinds: Mapping[str, PanelKind] | None = None,
    ncols: int = 5,
    titles: bool = True,
) -> list[Path]:
    """Write one grid PNG per batch element, `<out_dir>/{step+1:06d}_{j}.png` (the original's names).

    Args:
        out_dir: created if missing.
        step: the 0-based iteration; files are numbered step + 1 as in the original.
        panels: panel title → tensor (module docstring for the kinds); None entries are skipped. All panels
            have the same batch size.
        palette: RGB colour per class (`cfg.data.palette`).
        mean, std: the normalisation the images went through (RGB, 0..255 scale).
        kinds: per-panel kind overrides.
        ncols: panels per row (the original: 5).
        titles: draw each panel's name above it.

    Returns:
        The written paths, in batch order.
    """
    kinds = dict(kinds or {})
    rgb = {}
    for name, t in panels.items():
        if t is not None:
            rgb[name] = _to_rgb(name, t, kinds.get(name) or _kind(t), palette, mean, std)
    if not rgb:
        raise ValueError("save_debug_grids: no panels to draw")
    sizes = {name: len(x) for name, x in rgb.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"debug panels differ in batch size: {sizes}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for j in range(next(iter(sizes.values()))):
        grid = debug_grid({name: x[j] for name, x in rgb.items()}, ncols=ncols, titles=titles)
        path = out_dir / f"{step + 1:06d}_{j}.png"
        Image.fromarray(grid).save(path)
        paths.append(path)
    return paths
