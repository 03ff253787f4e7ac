"""The sample plan: every random decision of a training item, made once, for both training loaders.

Item k of a run is sample j = k mod B of iteration t = k div B on this rank (B = batch size). Each side of the
item draws from its own Generator, `item_rng(seed, rank, t, j, stream)` (stream 0: the labelled side; stream 1:
the unlabelled target of `dacs` mode), so a resumed run draws exactly the batches an uninterrupted run would,
whatever the number of workers, and ranks draw different batches. The draws of one side, in order:

1. The sample: with RCS a class and an image rich in it (`RareClassSampler.sample`), else a uniform index; the
   supervised baselines instead take the next index of an epoch permutation, drawing nothing (below). An
   unreadable file is skipped with a warning and the sample drawn again, `MAX_SAMPLE_DRAWS` draws at most
   (`data.strict`: the first unreadable file stops the run). Bad data that skipping would hide (image/label size
   mismatch, label values that are not train ids) always stops the run.
2. The crop box on the keep-ratio resized image (mmseg RandomCrop, docs/recipe.md §1.6): offsets uniform in
   [0, H−h] × [0, W−w], y first. With `cat_max_ratio` < 1 (labelled side only; target crops never look at
   labels) the crop is checked up to `CAT_MAX_CHECKS` times — accepted when, ignoring 255, it holds more than one
   class and the most frequent class covers less than `cat_max_ratio` of the rest — and each failed check draws
   a new box; the box after the last failed check is used unchecked.
3. The flip: `rng.random() < flip_prob`.
4. With RCS, steps 2–3 run again on the same resized image, up to `RCS_CHECKS` checks, until the crop holds more
   than `min_pixels · min_crop_ratio` pixels of the sampled class (docs/recipe.md §3.1–3.2). The original re-decodes
   and re-resizes the image for every retry; resizing is deterministic, so resizing once gives identical crops.
5. With `data.photometric`: the PhotoMetricDistortion draws (`photometric.draw_photometric`), from
   `photometric_rng`, a child of the side's SeedSequence, so steps 1–4 draw exactly what they draw without it.

`ItemPlanner.plan(k)` returns those decisions as an `ItemPlan`; a loader only executes it: `torch_loader` with
OpenCV (decode, resize, slice, flip, pad), `dali_loader` in a DALI graph. Both loaders therefore draw the same
batches by construction, and their images agree as far as their resize arithmetic does (`dali_loader`).

The planner reads every label itself (the crop rules need the resized label) and leaves images to the
executor's `ImageReader`: the torch loader decodes the image there, so an image that does not decode is skipped;
DALI reads only the header and decodes later. Images of an npy cache (`npy_cache`; `.npy` paths) never reach the
`ImageReader`: the planner reads their size from the `.npy` header (`datasets.read_npy_header`, no data read; a
truncated file is unreadable and skipped like an image that does not decode) and checks it against the cache's
index; `SidePlan.image` is then None and `size_hw == src_hw` (the cache holds the resized images), so the executor
only cuts the crop out of the file (`npy_cache.read_npy_crop`).

Without RCS, the original draws (source, target) pairs from a shuffled |S|·|T| product; here each is drawn
uniformly and independently per item, which has the same distribution for a run of 40k iterations. The supervised
baselines (`source_only`, `target_only`) load one labelled set with a loader that shuffles it at every epoch and
drops each epoch's incomplete last batch (docs/architectures.md §3); their step 1 is therefore a walk through one
permutation per epoch (`epoch_permutation`): an epoch is L = ⌊N/B⌋·B samples of this rank's counter k, and item k
takes image perm_e[k mod L] of epoch e = k div L (only a redraw after an unreadable file is uniform). That is still a
pure function of k, so resuming stays exact. Each rank walks its own permutations, where the original's distributed
sampler splits one permutation between the ranks; on one GPU, as the paper trains, the two agree.

Legend: H/W resized image size, h/w crop size; boxes are (y0, y1, x0, x1).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from daformer_fast.config import DataConfig, DatasetConfig
from daformer_fast.data.datasets import (
    NPY_SUFFIX,
    DatasetError,
    Sample,
    list_samples,
    read_label,
    read_npy_header,
    rescale_size,
    resize_label,
)
from daformer_fast.data.photometric import PhotometricDraw, draw_photometric
from daformer_fast.data.pipeline import IGNORE, apply_crop
from daformer_fast.data.rcs import RareClassSampler, load_class_stats

__all__ = [
    "CAT_MAX_CHECKS",
    "MAX_SAMPLE_DRAWS",
    "RCS_CHECKS",
    "ImageReader",
    "ItemPlan",
    "ItemPlanner",
    "Mode",
    "Side",
    "SidePlan",
    "check_label_values",
    "crop_box",
    "draw_crop",
    "epoch_permutation",
    "item_rng",
    "photometric_rng",
    "random_crop",
    "sample_crop",
]

log = logging.getLogger("daformer_fast.data")
Mode = Literal["dacs", "source_only", "target_only"]

MAX_SAMPLE_DRAWS = 10
"""Sample draws of one side before unreadable files stop the run: a damaged dataset fails with a clear error
instead of redrawing forever (the original has no such rule: it stops at the first unreadable file)."""
CAT_MAX_CHECKS = 10
"""`cat_max_ratio` checks of one crop (mmseg RandomCrop's 10, docs/recipe.md §1.6); at most 11 boxes are drawn."""
RCS_CHECKS = 10
"""Rare-class checks of one crop (the original's 10, docs/recipe.md §3.1–3.2); at most 11 crops and flips are drawn."""

ImageReader = Callable[[Path], tuple[tuple[int, int], "np.ndarray | None"]]
"""Reads an image far enough to know its (h, w) after EXIF orientation: returns (h, w) and the decoded uint8 RGB
image, or None when the reader does not decode. Raises `DatasetError` for an unreadable file (it is skipped)."""


def item_rng(seed: int, rank: int, iteration: int, index: int, stream: int) -> np.random.Generator:
    """The Generator of one sample's draws; stream 0 = labelled (source) side, 1 = unlabelled (target) side."""
    return np.random.default_rng(np.random.SeedSequence([seed, rank, iteration, index, stream]))


def photometric_rng(seed: int, rank: int, iteration: int, index: int, stream: int) -> np.random.Generator:
    """The Generator of one side's PhotoMetricDistortion draws: the first child (`SeedSequence.spawn`) of that side's
    `item_rng` sequence, so turning the distortion on leaves every other draw of the item as it was."""
    return np.random.default_rng(np.random.SeedSequence([seed, rank, iteration, index, stream], spawn_key=(0,)))


# The last word of `epoch_permutation`'s seed; no item side uses it (0 labelled, 1 unlabelled), so a permutation's
# sequence is never an item's.
_EPOCH_STREAM = 2


def epoch_permutation(seed: int, rank: int, epoch: int, n: int) -> np.ndarray:
    """The order in which a supervised baseline walks its n labelled samples in `epoch` on `rank` (module
    docstring): a uniform permutation of 0..n−1 (int64), a function of its arguments only."""
    return np.random.default_rng(np.random.SeedSequence([seed, rank, epoch, n, _EPOCH_STREAM])).permutation(n)


def check_label_values(lbl: np.ndarray, num_classes: int, path) -> None:
    """Labels must hold train ids in [0, num_classes) or 255."""
    counts = np.bincount(lbl.ravel(), minlength=256)
    bad = [v for v in np.flatnonzero(counts) if num_classes <= v < 255]
    if bad:
        shown = ", ".join(str(v) for v in bad[:8]) + (", ..." if len(bad) > 8 else "")
        raise DatasetError(f"{path}: label values {shown} outside 0..{num_classes - 1} and 255 (not train ids?)")


# ---------------------------------------------------------------------------------------------------------------
# Crop rules
# ---------------------------------------------------------------------------------------------------------------


def crop_box(rng: np.random.Generator, shape: tuple[int, int], crop: tuple[int, int]) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of a uniformly placed crop (not clipped: offset 0 and a too large box when the image is
    smaller than the crop)."""
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
    """Crop box by the mmseg rule (module docstring, step 2); `cat_max_ratio` >= 1 = a plain uniform crop."""
    if lbl is None:
        raise ValueError("random_crop needs the label map (use crop_box for unlabelled images)")
    box = crop_box(rng, lbl.shape, crop)
    if cat_max_ratio < 1.0:
        for _ in range(CAT_MAX_CHECKS):
            y0, y1, x0, x1 = box
            if not _dominated(lbl[y0:y1, x0:x1], cat_max_ratio):
                break
            box = crop_box(rng, lbl.shape, crop)
    return box


def draw_crop(
    rng: np.random.Generator,
    hw: tuple[int, int],
    lbl: np.ndarray | None,
    crop: tuple[int, int],
    *,
    cat_max_ratio: float = 1.0,
    flip_prob: float = 0.5,
    rcs_class: int | None = None,
    rcs_min_pixels: float = 0.0,
) -> tuple[tuple[int, int, int, int], bool, np.ndarray | None]:
    """Crop box and flip of a resized image of size `hw` (module docstring, steps 2–4).

    Returns:
        (box clipped to the image, flip, the label cropped, flipped and padded to `crop` with 255 — None without
        `lbl`). With `rcs_class` (and a label) the crop is re-drawn until it holds more than `rcs_min_pixels`
        pixels of that class, at most `RCS_CHECKS` times.
    """

    def once():
        box = random_crop(rng, lbl, crop, cat_max_ratio) if lbl is not None else crop_box(rng, hw, crop)
        flip = bool(rng.random() < flip_prob)
        return box, flip, (apply_crop(lbl, box, flip, crop, IGNORE) if lbl is not None else None)

    box, flip, out = once()
    if rcs_class is not None and lbl is not None:
        for _ in range(RCS_CHECKS):
            if np.count_nonzero(out == rcs_class) > rcs_min_pixels:
                break
            box, flip, out = once()
    y0, y1, x0, x1 = box
    return (y0, min(y1, hw[0]), x0, min(x1, hw[1])), flip, out


def sample_crop(
    rng: np.random.Generator, img: np.ndarray, lbl: np.ndarray | None, crop: tuple[int, int], **rules
) -> tuple[np.ndarray, np.ndarray | None]:
    """`draw_crop` executed on a resized image (and label): the crop, flipped, padded with 0 (label 255).

    `rules`: `draw_crop`'s keyword arguments (cat_max_ratio, flip_prob, rcs_class, rcs_min_pixels).
    """
    box, flip, out_lbl = draw_crop(rng, img.shape[:2], lbl, crop, **rules)
    return apply_crop(img, box, flip, crop, 0), out_lbl


# ---------------------------------------------------------------------------------------------------------------
# Item plans
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Side:
    """One dataset an item draws from."""

    cfg: DatasetConfig
    samples: list[Sample]
    labelled: bool


@dataclass(frozen=True)
class SidePlan:
    """What a loader does to one side of an item: read `img_path`, resize it to `size_hw`, cut `box`, flip, pad."""

    img_path: Path
    src_hw: tuple[int, int]
    """(h, w) of the image file (after EXIF orientation)."""
    size_hw: tuple[int, int]
    """(h, w) after the keep-ratio resize (docs/recipe.md §1.6)."""
    box: tuple[int, int, int, int]
    """(y0, y1, x0, x1) in the resized image, clipped to it; the rest of the crop is padding (bottom/right)."""
    flip: bool
    label: np.ndarray | None
    """Labelled side: the uint8 label of the crop, already cropped, flipped and padded with 255; else None."""
    rcs_class: int
    """The RCS class of the draw, −1 without RCS."""
    failed: int
    """Unreadable files skipped before this sample."""
    image: np.ndarray | None = None
    """The decoded image at file size when the executor's `ImageReader` decodes (torch loader), else None (also for
    npy cache images, which the planner never hands to the reader)."""
    photometric: PhotometricDraw | None = None
    """The PhotoMetricDistortion of the crop with `data.photometric` (module docstring, step 5), else None."""

    @property
    def valid_hw(self) -> tuple[int, int]:
        """(h, w) of the real pixels of the crop."""
        y0, y1, x0, x1 = self.box
        return y1 - y0, x1 - x0


@dataclass(frozen=True)
class ItemPlan:
    """The plan of item k = iteration · B + index: its labelled side and, in `dacs` mode, its unlabelled target."""

    iteration: int
    index: int
    labelled: SidePlan
    unlabelled: SidePlan | None

    @property
    def failed(self) -> int:
        """Unreadable files skipped while drawing both sides."""
        return self.labelled.failed + (self.unlabelled.failed if self.unlabelled is not None else 0)


class _Fatal(Exception):
    """Bad data that skipping would hide (size mismatch, label values that are not train ids); always stops the run."""


class ItemPlanner:
    """The plans of a run's items (module docstring) for one (seed, rank).

    Attributes:
        main: the labelled side (the source; the target in `target_only` mode).
        other: the unlabelled target in `dacs` mode, else None.
        rcs: the rare class sampler of `main` in `dacs` mode with `data.rcs.enabled`, else None.
    """

    def __init__(
        self, data: DataConfig, *, mode: Mode, num_classes: int, seed: int, rank: int = 0, read_image: ImageReader
    ) -> None:
        self.data, self.mode, self.num_classes, self.seed, self.rank = data, mode, num_classes, seed, rank
        self.read_image = read_image
        main_cfg = data.target if mode == "target_only" else data.source
        self.main = Side(main_cfg, list_samples(main_cfg, need_labels=True), labelled=True)
        self.other = None
        if mode == "dacs":
            self.other = Side(data.target, list_samples(data.target, need_labels=False), labelled=False)
        self.rcs = None
        if mode == "dacs" and data.rcs.enabled:
            stats = load_class_stats(main_cfg.root)
            self.rcs = RareClassSampler.from_stats(
                stats, self.main.samples, data.rcs.class_temp, data.rcs.min_pixels, data.rcs.min_crop_ratio
            )
        self._perm: tuple[int, np.ndarray] | None = None  # (epoch, its permutation): items come mostly in order

    def epoch_index(self, k: int) -> int | None:
        """The labelled sample that item `k` of a supervised baseline takes first (module docstring); None in
        `dacs` mode, which draws its samples instead."""
        if self.mode == "dacs":
            return None
        n, batch = len(self.main.samples), self.data.batch_size
        epoch, pos = divmod(int(k), (n // batch) * batch if n >= batch else n)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, epoch_permutation(self.seed, self.rank, epoch, n))
        return int(self._perm[1][pos])

    def plan(self, k: int) -> ItemPlan:
        """The plan of item `k` (raises `DatasetError` for data the run cannot go on with)."""
        t, j = divmod(int(k), self.data.batch_size)
        labelled = self._plan_side(self.main, (t, j, 0), self.rcs is not None, self.epoch_index(k))
        unlabelled = None
        if self.other is not None:
            unlabelled = self._plan_side(self.other, (t, j, 1), False, None)
        return ItemPlan(t, j, labelled, unlabelled)

    def _read(self, side: Side, i: int):
        """(sample, image (h, w), what the reader decoded, label or None) of sample i of `side`."""
        s = side.samples[i]
        if str(s.img).endswith(NPY_SUFFIX):
            hw, image = read_npy_header(s.img, 3).hw, None
            if s.hw is not None and hw != s.hw:
                raise _Fatal(f"{s.img} is {hw[1]}x{hw[0]}, its npy cache index says {s.hw[1]}x{s.hw[0]}: the cache "
                             f"was modified after it was built; rebuild it")  # fmt: skip
        else:
            hw, image = self.read_image(s.img)
        lbl = None
        if side.labelled:
            lbl = read_label(s.label)
            if lbl.shape != tuple(hw):
                raise _Fatal(
                    f"image/label size mismatch: {s.img} is {hw[1]}x{hw[0]}, "
                    f"{s.label} is {lbl.shape[1]}x{lbl.shape[0]}"
                )
            try:
                check_label_values(lbl, self.num_classes, s.label)
            except DatasetError as e:
                raise _Fatal(str(e)) from None  # wrong ids (e.g. unconverted labels) are not an unreadable file
        return s, hw, image, lbl

    def _draw_readable(self, side: Side, rng: np.random.Generator, use_rcs: bool, first: int | None):
        """Draw sample indices (RCS, or `first` then uniform, or uniform) until one reads: (rcs class or −1, what
        `_read` returned, files skipped)."""
        failed = 0
        for attempt in range(MAX_SAMPLE_DRAWS):
            if use_rcs:
                c, i = self.rcs.sample(rng)
            elif first is not None and attempt == 0:
                c, i = -1, first
            else:
                c, i = -1, int(rng.integers(len(side.samples)))
            try:
                return c, self._read(side, i), failed
            except _Fatal as e:
                raise DatasetError(str(e)) from None
            except DatasetError as e:
                if self.data.strict:
                    raise
                log.warning("skipping unreadable sample: %s", e)
                failed += 1
        raise DatasetError(
            f"{MAX_SAMPLE_DRAWS} unreadable samples in a row in {side.cfg.root}; is the dataset damaged?"
        )

    def _plan_side(self, side: Side, key: tuple[int, int, int], use_rcs: bool, first: int | None) -> SidePlan:
        """One side's plan; `key` = (iteration, index, stream) of its Generators, `first` = `epoch_index`."""
        rng = item_rng(self.seed, self.rank, *key)
        c, (s, hw, image, lbl), failed = self._draw_readable(side, rng, use_rcs, first)
        w, h = rescale_size(hw[1], hw[0], side.cfg.scale)
        if lbl is not None:
            lbl = resize_label(lbl, (w, h))
        box, flip, lbl_crop = draw_crop(
            rng, (h, w), lbl, self.data.crop,
            cat_max_ratio=self.data.cat_max_ratio if side.labelled else 1.0,
            flip_prob=self.data.flip_prob,
            rcs_class=c if use_rcs and self.rcs.min_crop_ratio > 0 else None,
            rcs_min_pixels=self.rcs.min_crop_pixels if use_rcs else 0.0,
        )  # fmt: skip
        photometric = None
        if self.data.photometric:
            photometric = draw_photometric(photometric_rng(self.seed, self.rank, *key))
        return SidePlan(s.img, tuple(hw), (h, w), box, flip, lbl_crop, c, failed, image, photometric)
