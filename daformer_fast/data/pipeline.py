"""Training pipeline of one sample (recipe §1.6): keep-ratio resize → random crop → horizontal flip → pad.

Crop rule (mmseg RandomCrop): offsets uniform in [0, H−h] × [0, W−w]; with `cat_max_ratio` < 1 the crop is
checked up to 10 times — accepted when, ignoring 255, it holds more than one class and the most frequent class
covers less than `cat_max_ratio` of the rest — and each failed check draws a new crop; the 11th crop is used
unchecked. Only source (labelled) crops use the rule; target crops never look at labels.

Rare class sampling re-runs crop and flip on the same resized image (up to 10 checks) until the crop holds more
than `min_pixels · min_crop_ratio` pixels of the sampled class. The reference re-decodes and re-resizes the image
for every retry; resizing is deterministic, so resizing once gives identical crops at a fraction of the cost.

Normalisation with the ImageNet mean/std happens on the device (`normalize`), after batching, so loaders move
uint8 (4× less data) and both loaders share it. The reference pads *after* Normalize, with 0 (recipe §1.3, §1.6),
so a padded pixel is 0, not (0 − mean)/std; the uint8 crop is padded with 0 here and `normalize` sets the padding
to 0 from the loaders' `valid_hw` (padding is always at the bottom and right). Every random choice comes from the
`np.random.Generator` passed in.

Legend: H/W resized image size, h/w crop size.
"""

from __future__ import annotations

import functools

import numpy as np

import torch

from daformer_fast.data.datasets import rescale_size, resize_image, resize_label

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "crop_box",
    "normalize",
    "random_crop",
    "resize_pair",
    "sample_crop",
    "valid_size",
]

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
IGNORE = 255


def resize_pair(img: np.ndarray, lbl: np.ndarray | None, scale: tuple[int, int]):
    """Keep-ratio resize (mmcv rule): bilinear image, nearest label."""
    size = rescale_size(img.shape[1], img.shape[0], scale)
    return resize_image(img, size), (resize_label(lbl, size) if lbl is not None else None)


def valid_size(shape: tuple[int, ...], crop: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of the real pixels in a crop of an image of `shape` (H, W, ...): the rest of the crop is padding."""
    return min(crop[0], shape[0]), min(crop[1], shape[1])


def crop_box(rng: np.random.Generator, shape: tuple[int, int], crop: tuple[int, int]) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of a uniformly placed crop (clipped to the image when it is smaller)."""
    margin_h, margin_w = max(shape[0] - crop[0], 0), max(shape[1] - crop[1], 0)
    y0, x0 = int(rng.integers(0, margin_h + 1)), int(rng.integers(0, margin_w + 1))
    return y0, y0 + crop[0], x0, x0 + crop[1]


def _dominated(lbl_crop: np.ndarray, cat_max_ratio: float) -> bool:
    counts = np.bincount(lbl_crop.ravel(), minlength=256)
    counts[IGNORE] = 0
    counts = counts[counts > 0]
    return not (len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio)


def random_crop(
    rng: np.random.Generator, lbl: np.ndarray | None, crop: tuple[int, int], cat_max_ratio: float = 1.0
) -> tuple[int, int, int, int]:
    """Crop box by the mmseg rule; `cat_max_ratio` >= 1 or no label = a plain uniform crop."""
    if lbl is None:
        raise ValueError("random_crop needs the label map (use crop_box for unlabelled images)")
    box = crop_box(rng, lbl.shape, crop)
    if cat_max_ratio < 1.0:
        for _ in range(10):
            y0, y1, x0, x1 = box
            if not _dominated(lbl[y0:y1, x0:x1], cat_max_ratio):
                break
            box = crop_box(rng, lbl.shape, crop)
    return box


def _apply(img: np.ndarray, lbl: np.ndarray | None, box, flip: bool, crop: tuple[int, int]):
    y0, y1, x0, x1 = box
    img, lbl = img[y0:y1, x0:x1], (lbl[y0:y1, x0:x1] if lbl is not None else None)
    if flip:
        img, lbl = img[:, ::-1], (lbl[:, ::-1] if lbl is not None else None)
    # Pad smaller images: image 0 (zeroed again after normalisation, see `normalize`), label 255. A no-op at the
    # paper's scales.
    if img.shape[:2] != tuple(crop):
        pad = ((0, crop[0] - img.shape[0]), (0, crop[1] - img.shape[1]))
        img = np.pad(img, pad + ((0, 0),), constant_values=0)
        lbl = np.pad(lbl, pad, constant_values=IGNORE) if lbl is not None else None
    return np.ascontiguousarray(img), (np.ascontiguousarray(lbl) if lbl is not None else None)


def sample_crop(
    rng: np.random.Generator,
    img: np.ndarray,
    lbl: np.ndarray | None,
    crop: tuple[int, int],
    *,
    cat_max_ratio: float = 1.0,
    flip_prob: float = 0.5,
    rcs_class: int | None = None,
    rcs_min_pixels: float = 0.0,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Crop and flip an already resized sample; with `rcs_class`, re-crop up to 10 times for that class."""
    def once():
        box = random_crop(rng, lbl, crop, cat_max_ratio) if lbl is not None else crop_box(rng, img.shape[:2], crop)
        flip = bool(rng.random() < flip_prob)
        return _apply(img, lbl, box, flip, crop)

    out_img, out_lbl = once()
    if rcs_class is not None and lbl is not None:
        for _ in range(10):
            if np.count_nonzero(out_lbl == rcs_class) > rcs_min_pixels:
                break
            out_img, out_lbl = once()
    return out_img, out_lbl


@functools.cache
def _norm_stats(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean/std as (1, 3, 1, 1) tensors on `device`, made once: a per-step host→device copy of a Python list
    would block the host on CUDA."""
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    return mean, std


def normalize(img_B3HW: torch.Tensor, valid_hw_B2: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 RGB batch → float32 (x − mean) / std with the ImageNet statistics, on the tensor's device.

    Args:
        img_B3HW: a loader's `img` or `target_img`.
        valid_hw_B2: the matching `valid_hw` / `target_valid_hw`: per sample, the (h, w) of real pixels. Pixels
            below or right of it are padding and come out exactly 0, as in the reference, which pads the
            normalised image with 0. None: no padding.
    """
    mean, std = _norm_stats(img_B3HW.device)
    out = (img_B3HW.float() - mean) / std
    if valid_hw_B2 is None:
        return out
    H, W = out.shape[-2:]
    # Host-side check on a CPU tensor (no device sync): at the paper's scales nothing is ever padded.
    if valid_hw_B2.device.type == "cpu" and bool((valid_hw_B2 >= torch.tensor([H, W])).all()):
        return out
    valid_hw = valid_hw_B2.to(out.device, non_blocking=True)
    rows_BHW = torch.arange(H, device=out.device).view(1, H, 1) < valid_hw[:, 0].view(-1, 1, 1)
    cols_BHW = torch.arange(W, device=out.device).view(1, 1, W) < valid_hw[:, 1].view(-1, 1, 1)
    return out.masked_fill_(~(rows_BHW & cols_BHW).unsqueeze(1), 0.0)
