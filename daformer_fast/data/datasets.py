"""Dataset file lists for the folder layouts of the original DAFormer code, image/label reading, keep-ratio resize.

Layouts (docs/recipe.md §1.7; `root` = `DatasetConfig.root`, `split` = `DatasetConfig.split`, all scans recursive):

    gta         images/**/*.png                          labels/**/<stem>_labelTrainIds.png
    synthia     RGB/**/*.png                             GT/LABELS/**/<stem>_labelTrainIds.png
    cityscapes  leftImg8bit/<split>/**/*_leftImg8bit.png gtFine/<split>/**/<stem>_gtFine_labelTrainIds.png
    acdc        rgb_anon/<split>/**/*_rgb_anon.png       gt/<split>/**/<stem>_gt_labelTrainIds.png
    darkzurich  rgb_anon/<split>/**/*_rgb_anon.png       gt/<split>/**/<stem>_gt_labelTrainIds.png
    bdd100k     images/10k/<split>/**/*.jpg              labels/sem_seg/masks/<split>/**/<stem>.png
    mapillary   <split>/images/**/*.jpg                  <split>/labels/**/<stem>_labelTrainIds.png
                (split `train`/`val`/`test` is Vistas' `training`/`validation`/`testing` folder when
                <split> itself does not exist; labels written by `tools.convert_datasets mapillary`)
    folder      images/<split>/**/*.{png,jpg,jpeg}       labels/<split>/**/<stem>.png
                (images/ and labels/ directly when images/<split> does not exist)

BDD100K's semantic-segmentation masks already hold the 19 train ids (255 = ignore); Mapillary Vistas v1.2's class
ids are mapped to them by the converter (docs/architectures.md §4).

`<stem>` is the image file name without the image suffix; the label sits in the same relative sub-folder.
Hidden files and `*.tmp.png` leftovers of an interrupted conversion are never samples.
`img_suffix` / `label_suffix` in the config replace the layout's defaults. Unlike the original (mmcv `scandir`,
OS order) the lists are sorted, so runs do not depend on the file system.

Reading follows docs/recipe.md §1.3: images through OpenCV (BGR → RGB, uint8), labels through Pillow in their stored
mode (a palette PNG gives its indices, not colours), cast to uint8. Resizing follows §1.6 (mmcv `imrescale`).

A root holding `npy_cache.NPY_INDEX` is a decode-free cache (`python -m daformer_fast.tools.cache_dataset CONFIG
--format npy`): `list_samples` takes its samples from the index after checking it against the config and the source
dataset (`npy_cache.list_cached_samples`), and `read_image` / `read_label` read `.npy` files (uint8 H×W×3 RGB /
H×W, already at the training scale) without decoding; `read_npy_header` gives a file's shape without its data.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from daformer_fast.config import DatasetConfig

__all__ = [
    "LAYOUT_NAMES",
    "NPY_SUFFIX",
    "VISTAS_SPLITS",
    "DatasetError",
    "NpyHeader",
    "Sample",
    "list_samples",
    "read_image",
    "read_label",
    "read_npy_header",
    "rescale_size",
    "resize_image",
    "resize_label",
]


class DatasetError(ValueError):
    """A dataset that cannot be listed or a file that cannot be read. The message is meant for the user as is."""


@dataclass(frozen=True)
class Sample:
    img: Path
    label: Path | None
    """None when the label file does not exist (only possible with `need_labels=False`)."""
    name: str
    """Image path relative to the image folder, without the image suffix, '/'-separated (unique per dataset)."""
    hw: tuple[int, int] | None = None
    """(h, w) of the image as an npy cache's index records it (the planner checks the file against it); else None."""


@dataclass(frozen=True)
class _Layout:
    img_dir: str
    label_dir: str
    img_suffixes: tuple[str, ...]
    label_suffix: str


_LAYOUTS: dict[str, _Layout] = {
    "gta": _Layout("images", "labels", (".png",), "_labelTrainIds.png"),
    "synthia": _Layout("RGB", "GT/LABELS", (".png",), "_labelTrainIds.png"),
    "cityscapes": _Layout("leftImg8bit/{split}", "gtFine/{split}", ("_leftImg8bit.png",), "_gtFine_labelTrainIds.png"),
    "acdc": _Layout("rgb_anon/{split}", "gt/{split}", ("_rgb_anon.png",), "_gt_labelTrainIds.png"),
    "darkzurich": _Layout("rgb_anon/{split}", "gt/{split}", ("_rgb_anon.png",), "_gt_labelTrainIds.png"),
    "bdd100k": _Layout("images/10k/{split}", "labels/sem_seg/masks/{split}", (".jpg",), ".png"),
    "mapillary": _Layout("{split}/images", "{split}/labels", (".jpg",), "_labelTrainIds.png"),
    "folder": _Layout("images/{split}", "labels/{split}", (".png", ".jpg", ".jpeg"), ".png"),
}

LAYOUT_NAMES = tuple(_LAYOUTS)
"""The layout names `list_samples` knows (`DatasetConfig.name`)."""

VISTAS_SPLITS = {"train": "training", "val": "validation", "test": "testing"}
"""The split names of the other layouts → Mapillary Vistas' own split folders (docs/architectures.md §4)."""


def _resolve_dirs(ds: DatasetConfig) -> tuple[Path, Path, tuple[str, ...], str]:
    """Image folder, label folder, image suffixes and label suffix of `ds`, overrides applied."""
    try:
        layout = _LAYOUTS[ds.name]
    except KeyError:
        raise DatasetError(f"unknown dataset layout {ds.name!r}; expected one of {', '.join(_LAYOUTS)}") from None
    root = Path(ds.root)
    split = ds.split
    if ds.name == "mapillary" and not (root / split).is_dir():
        split = VISTAS_SPLITS.get(split, split)  # `val` finds Vistas' `validation` folder, as for the other layouts
    img_dir = root / layout.img_dir.format(split=split)
    label_dir = root / layout.label_dir.format(split=split)
    if ds.name == "folder" and not img_dir.is_dir():
        # Custom datasets without split sub-folders keep everything directly under images/ and labels/.
        img_dir, label_dir = root / "images", root / "labels"
    img_suffixes = (ds.img_suffix,) if ds.img_suffix else layout.img_suffixes
    label_suffix = ds.label_suffix if ds.label_suffix is not None else layout.label_suffix
    return img_dir, label_dir, img_suffixes, label_suffix


def _scan(folder: Path, suffixes: tuple[str, ...]) -> list[tuple[Path, str]]:
    """(path, name without suffix relative to `folder`) of every file ending in one of `suffixes`, sorted."""
    lowered = tuple(s.lower() for s in suffixes)
    found = []
    # followlinks: datasets are often assembled from symlinked city/condition folders.
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # e.g. .ipynb_checkpoints copies
        rel = Path(dirpath).relative_to(folder)
        for fname in filenames:
            low = fname.lower()
            if low.startswith(".") or low.endswith(".tmp.png"):
                continue  # a converter's or copy tool's temporary file, or a macOS `._*` resource fork
            for suffix in lowered:
                if low.endswith(suffix) and len(fname) > len(suffix):
                    found.append((Path(dirpath) / fname, (rel / fname[: -len(suffix)]).as_posix()))
                    break
    found.sort(key=lambda item: item[1])
    return found


def list_samples(ds: DatasetConfig, need_labels: bool = True) -> list[Sample]:
    """Sorted (image, label) pairs of `ds` for its layout (module docstring).

    Raises:
        DatasetError: no image matches the layout's pattern, or (with `need_labels`) some labels are missing.
    """
    if (Path(ds.root) / "npy_index.json").is_file():  # npy_cache.NPY_INDEX (that module imports this one)
        from daformer_fast.data.npy_cache import list_cached_samples  # imports this module

        return list_cached_samples(ds, need_labels)
    img_dir, label_dir, img_suffixes, label_suffix = _resolve_dirs(ds)
    images = _scan(img_dir, img_suffixes) if img_dir.is_dir() else []
    if not images:
        pattern = "*" + (img_suffixes[0] if len(img_suffixes) == 1 else "{" + ",".join(img_suffixes) + "}")
        where = "" if img_dir.is_dir() else " (folder does not exist)"
        raise DatasetError(f"no images found for {ds.name} dataset at root {ds.root}: {img_dir}/**/{pattern}{where}")
    samples, missing = [], []
    for path, name in images:
        label = label_dir / (name + label_suffix)
        if not label.is_file():
            missing.append(label)
            label = None
        samples.append(Sample(img=path, label=label, name=name))
    if need_labels and missing:
        raise DatasetError(
            f"{len(missing)} of {len(samples)} images in {img_dir} have no label file; first missing: {missing[0]}"
        )
    return samples


NPY_SUFFIX = ".npy"
"""File suffix of the npy cache's arrays; `read_image` and `read_label` read such files with numpy."""


@dataclass(frozen=True)
class NpyHeader:
    """What the header of a `.npy` file says about its array."""

    shape: tuple[int, ...]
    offset: int
    """Byte offset of the array data in the file (the header's length)."""

    @property
    def hw(self) -> tuple[int, int]:
        return self.shape[0], self.shape[1]


def read_npy_header(path: str | Path, ndim: int | None = None) -> NpyHeader:
    """Shape and data offset of a uint8 C-order `.npy` file, read from its header only (no data read).

    Raises:
        DatasetError: the file does not open or has no valid header, is not uint8 C-order (or not `ndim`-D, images
            must be H×W×3), or is shorter than its header promises (a truncated copy).
    """
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
            offset, size = f.tell(), os.fstat(f.fileno()).st_size
    except (OSError, ValueError) as e:
        raise DatasetError(f"cannot read {path}: {e}") from None
    if dtype != np.uint8 or fortran or (ndim is not None and len(shape) != ndim) or (ndim == 3 and shape[2] != 3):
        raise DatasetError(f"{path}: a {dtype} {'Fortran-order ' if fortran else ''}array of shape {shape}; "
                           f"expected uint8 C-order {'H×W×3' if ndim == 3 else 'H×W'}")  # fmt: skip
    if size < offset + int(np.prod(shape)):
        raise DatasetError(f"truncated {path}: {size} bytes, its header promises {offset + int(np.prod(shape))}")
    return NpyHeader(tuple(int(n) for n in shape), offset)


def _read_npy(path: str | Path, ndim: int) -> np.ndarray:
    read_npy_header(path, ndim)  # a clear message for a truncated or foreign file
    try:
        return np.load(path)
    except (OSError, ValueError) as e:
        raise DatasetError(f"cannot read {path}: {e}") from None


def read_image(path: str | Path) -> np.ndarray:
    """uint8 H×W×3 RGB image, decoded with OpenCV as the original does (a `.npy` of the cache: read as stored)."""
    if str(path).endswith(NPY_SUFFIX):
        return _read_npy(path, 3)
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise DatasetError(f"cannot read image {path}")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def read_label(path: str | Path) -> np.ndarray:
    """uint8 H×W label map, read with Pillow in the file's own mode (palette PNGs give indices); a `.npy` of the
    cache is read as stored."""
    if str(path).endswith(NPY_SUFFIX):
        return _read_npy(path, 2)
    try:
        with Image.open(path) as im:
            lbl = np.array(im)  # a writable copy (asarray of a PIL image is read-only)
    except (OSError, ValueError) as e:
        raise DatasetError(f"cannot read label {path}: {e}") from None
    lbl = np.squeeze(lbl) if lbl.ndim == 3 and lbl.shape[2] == 1 else lbl
    if lbl.ndim != 2:
        # An RGB colour label would otherwise be silently cast to garbage ids; the original expects trainId files.
        raise DatasetError(f"label {path} has shape {lbl.shape}; expected a single-channel trainId image")
    return lbl.astype(np.uint8, copy=False)


def rescale_size(w: int, h: int, scale: tuple[int, int] | list[int]) -> tuple[int, int]:
    """Keep-ratio size (new_w, new_h) for a (long, short) `scale`, mmcv `imrescale` rule (docs/recipe.md §1.6)."""
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(w * factor + 0.5), int(h * factor + 0.5)


def resize_image(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a uint8 image to `size` = (w, h) (cv2 INTER_LINEAR, as the original)."""
    if (img.shape[1], img.shape[0]) == tuple(size):
        return img
    return cv2.resize(img, tuple(size), interpolation=cv2.INTER_LINEAR)


def resize_label(lbl: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a label map to `size` = (w, h)."""
    if (lbl.shape[1], lbl.shape[0]) == tuple(size):
        return lbl
    return cv2.resize(lbl, tuple(size), interpolation=cv2.INTER_NEAREST)
