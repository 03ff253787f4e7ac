"""Convert raw dataset labels to train ids and write the rare-class-sampling statistics (docs/recipe.md §3.3).

    python -m daformer_fast.tools.convert_datasets gta ROOT [--nproc N]
    python -m daformer_fast.tools.convert_datasets synthia ROOT [--nproc N]
    python -m daformer_fast.tools.convert_datasets cityscapes ROOT [--nproc N]
    python -m daformer_fast.tools.convert_datasets mapillary ROOT [--nproc N]
    python -m daformer_fast.tools.convert_datasets folder ROOT --num-classes K [--split train] [--label-suffix .png]

gta:        labels/*.png are palette PNGs whose *indices* are Cityscapes label ids (never read the colours);
            writes labels/<stem>_labelTrainIds.png.
synthia:    GT/LABELS/*.png are 16-bit multi-channel PNGs; the class id is the file's first channel;
            writes GT/LABELS/<stem>_labelTrainIds.png.
cityscapes: gtFine/<split>/<city>/*_gtFine_labelIds.png → *_gtFine_labelTrainIds.png (all splits); statistics
            from the train split only.
mapillary:  Mapillary Vistas v1.2 (66 classes): <split>/labels/*.png (or the v2.0 package's <split>/v1.2/labels/)
            are palette PNGs whose indices are Vistas class ids; writes <split>/labels/<stem>_labelTrainIds.png
            with the 19 Cityscapes train ids (docs/architectures.md §4) for every split folder of ROOT
            (training, validation); statistics from `training` (or `train`) only. Prints a `data.rcs.min_pixels`
            for the dataset's label area, as for folder datasets.
folder:     custom datasets whose labels are already train ids (0..K-1, 255 = ignore); statistics only. Also
            prints a `data.rcs.min_pixels` scaled to the dataset's mean label area (`rcs.suggest_min_pixels`).

All write into ROOT: `sample_class_stats.json` (a list of {"<trainId>": pixels, ..., "file": label path}),
`sample_class_stats_dict.json` ({label path: {"<trainId>": pixels}}) and `samples_with_class.json`
({"<trainId>": [[label path, pixels], ...]}). Counts are at the label's original resolution; only classes present
are listed; 255 is never counted. Paths are relative to ROOT (sampling matches them by file name only).
Re-running is idempotent: existing train-id files are kept and only re-read for the statistics. Files are written
under a temporary hidden name and renamed; hidden files and `*.tmp.png` leftovers (older versions' temporary
name) are never taken for labels.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from functools import partial
from multiprocessing import Pool
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from daformer_fast.data.rcs import GTA_LABEL_AREA, PAPER_MIN_PIXELS, suggest_min_pixels

__all__ = [
    "CITYSCAPES_ID_TO_TRAINID",
    "MAPILLARY_ID_TO_TRAINID",
    "SYNTHIA_ID_TO_TRAINID",
    "class_stats",
    "convert",
    "main",
    "write_stats",
]

# Cityscapes label id → train id (cityscapesscripts' table); every other id is ignored (255).
CITYSCAPES_ID_TO_TRAINID = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13, 27: 14,
    28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip
# SYNTHIA-RAND-CITYSCAPES class id → train id (terrain, truck and train do not occur in Synthia).
SYNTHIA_ID_TO_TRAINID = {
    3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 16: 9, 1: 10, 10: 11, 17: 12, 8: 13, 18: 14, 19: 15,
    20: 16, 12: 17, 11: 18,
}  # fmt: skip
# Mapillary Vistas v1.2 class id → train id (docs/architectures.md §4: the original's table, checked against the
# v1.2 class names). Lane markings and manholes count as road, curbs as sidewalk; every other id is 255.
MAPILLARY_ID_TO_TRAINID = {
    13: 0, 24: 0, 41: 0,  # road, lane marking (general), manhole
    2: 1, 15: 1,  # curb, sidewalk
    17: 2, 6: 3, 3: 4,  # building, wall, fence
    45: 5, 47: 5,  # pole, utility pole
    48: 6, 50: 7,  # traffic light, traffic sign (front)
    30: 8, 29: 9, 27: 10,  # vegetation, terrain, sky
    19: 11, 20: 12, 21: 12, 22: 12,  # person; bicyclist, motorcyclist, other rider
    55: 13, 61: 14, 54: 15, 58: 16, 57: 17, 52: 18,  # car, truck, bus, on rails, motorcycle, bicycle
}  # fmt: skip
MAPILLARY_NUM_IDS = 66
"""Vistas v1.2 has class ids 0..65 (65 = unlabeled); a larger id means a v2.0 label (124 classes)."""


def _lut(mapping: dict[int, int], size: int = 65536) -> np.ndarray:
    lut = np.full(size, 255, dtype=np.uint8)
    for src, dst in mapping.items():
        lut[src] = dst
    return lut


def class_stats(label_trainids: np.ndarray, num_classes: int) -> dict[str, int]:
    """{"<trainId>": pixel count} of the classes present (255 and out-of-range values are not counted)."""
    counts = np.bincount(label_trainids.ravel(), minlength=256)[:num_classes]
    return {str(c): int(n) for c, n in enumerate(counts) if n > 0}


def _read_ids_gta(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        if img.mode not in ("P", "L", "I", "I;16"):
            raise ValueError(f"{path}: expected a palette or grayscale label PNG of label ids, got mode {img.mode}")
        return np.asarray(img, dtype=np.int64)  # palette PNGs give their indices, which are the label ids


def _read_ids_synthia(path: Path) -> np.ndarray:
    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise ValueError(f"{path}: unreadable label file")
    # OpenCV returns BGR(A) order: the file's first (R) channel is the last colour channel here.
    return (arr[..., 2] if arr.ndim == 3 else arr).astype(np.int64)


def _read_ids_vistas(path: Path) -> np.ndarray:
    ids = _read_ids_gta(path)  # palette indices, as GTA's
    if ids.size and int(ids.max()) >= MAPILLARY_NUM_IDS:
        # v2.0 labels number their 124 classes differently; the v1.2 table would silently mislabel them.
        raise ValueError(f"{path}: class id {int(ids.max())} > {MAPILLARY_NUM_IDS - 1}; expected Mapillary Vistas "
                         "v1.2 labels (the v2.0 package has them under <split>/v1.2/labels)")  # fmt: skip
    return ids


def _read_ids_plain(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img, dtype=np.int64)


def _is_leftover(path: Path, folder: Path) -> bool:
    """Temporary files of an interrupted run (this version's hidden `.<name>.tmp`, older versions' `<name>.tmp.png`)
    and anything hidden below `folder`, such as macOS `._<name>.png` resource forks: never labels. Same rules as
    the dataset scan (`datasets._scan`)."""
    return path.name.endswith(".tmp.png") or any(part.startswith(".") for part in path.relative_to(folder).parts)


def _check_trainids(label: np.ndarray, num_classes: int, path: Path) -> None:
    """Folder-dataset labels must already be train ids: values in [0, num_classes) or 255 (checked before the uint8
    cast, so 16-bit values such as 256 + 3 are reported instead of silently wrapping)."""
    bad = np.unique(label[(label < 0) | ((label >= num_classes) & (label != 255))])
    if bad.size:
        shown = ", ".join(str(int(v)) for v in bad[:8]) + (", ..." if bad.size > 8 else "")
        raise ValueError(
            f"{path}: label values {shown} outside 0..{num_classes - 1} and 255; folder datasets need train-id labels "
            f"(check --num-classes)"
        )


def _convert_one(
    src: Path, dst: Path, read_ids: Callable[[Path], np.ndarray] | None, lut: np.ndarray | None, num_classes: int
) -> tuple[str, dict[str, int], int]:
    """(label path, class counts, label area in pixels) of one label file, converting it first if needed."""
    if read_ids is None or dst.exists():
        # Idempotent: a finished file is only re-read for its statistics.
        with Image.open(dst) as im:
            trainids = np.asarray(im)
    else:
        ids = read_ids(src)
        trainids = lut[np.clip(ids, 0, len(lut) - 1)]
        # Hidden and without the .png suffix, so an interrupted run's leftover matches no glob of any layout.
        tmp = dst.with_name(f".{dst.name}.tmp")
        dst.parent.mkdir(parents=True, exist_ok=True)  # Vistas v2.0 packages: written beside, not into, v1.2/labels
        Image.fromarray(trainids, mode="L").save(tmp, format="PNG")
        tmp.replace(dst)  # never leave a half-written label behind
    if trainids.ndim != 2:
        raise ValueError(f"{dst}: expected a single-channel train-id label, got shape {trainids.shape}")
    if read_ids is None:
        _check_trainids(trainids, num_classes, dst)  # folder labels are user-made: validate before counting
    return str(dst), class_stats(trainids.astype(np.uint8), num_classes), int(trainids.size)


def write_stats(root: Path, records: list[tuple[str, dict[str, int]]]) -> None:
    """Write the three RCS JSON files into `root` from (label path, class counts) records."""
    root = Path(root)
    rel = [(os.path.relpath(p, root), s) for p, s in records]
    stats_list = [{**s, "file": p} for p, s in rel]
    stats_dict = {p: s for p, s in rel}
    with_class: dict[str, list] = {}
    for p, s in rel:
        for c, n in s.items():
            with_class.setdefault(c, []).append([p, n])
    with_class = {c: with_class[c] for c in sorted(with_class, key=int)}
    for name, obj in (
        ("sample_class_stats.json", stats_list),
        ("sample_class_stats_dict.json", stats_dict),
        ("samples_with_class.json", with_class),
    ):
        tmp = root / (name + ".tmp")
        tmp.write_text(json.dumps(obj, indent=2))
        tmp.replace(root / name)


def _jobs(
    kind: str, root: Path, split: str, label_suffix: str = ".png"
) -> tuple[list[tuple[Path, Path]], Callable | None, np.ndarray | None]:
    """(source label, train-id destination) pairs, the id reader and the lookup table of one dataset kind."""
    if kind == "gta":
        folder = root / "labels"
        srcs = sorted(p for p in folder.glob("*.png") if p.stem[-1:].isdigit() and not _is_leftover(p, folder))
        return [(p, p.with_name(p.stem + "_labelTrainIds.png")) for p in srcs], _read_ids_gta, _lut(
            CITYSCAPES_ID_TO_TRAINID)  # fmt: skip
    if kind == "synthia":
        folder = root / "GT" / "LABELS"
        srcs = sorted(p for p in folder.glob("*.png")
                      if not p.name.endswith("_labelTrainIds.png") and not _is_leftover(p, folder))  # fmt: skip
        return [(p, p.with_name(p.stem + "_labelTrainIds.png")) for p in srcs], _read_ids_synthia, _lut(
            SYNTHIA_ID_TO_TRAINID)  # fmt: skip
    if kind == "cityscapes":
        folder = root / "gtFine"
        srcs = sorted(p for p in folder.glob("*/*/*_gtFine_labelIds.png") if not _is_leftover(p, folder))
        pairs = [(p, p.with_name(p.name.replace("_labelIds.png", "_labelTrainIds.png"))) for p in srcs]
        return pairs, _read_ids_plain, _lut(CITYSCAPES_ID_TO_TRAINID)
    if kind == "mapillary":
        return _mapillary_pairs(root), _read_ids_vistas, _lut(MAPILLARY_ID_TO_TRAINID)
    if kind == "folder":
        folder = root / "labels" / split if (root / "labels" / split).is_dir() else root / "labels"
        srcs = sorted(p for p in folder.rglob("*" + label_suffix) if not _is_leftover(p, folder))
        return [(p, p) for p in srcs], None, None
    raise ValueError(f"unknown dataset kind {kind!r}")


def _mapillary_pairs(root: Path) -> list[tuple[Path, Path]]:
    """(Vistas label, train-id file) pairs of every split folder of `root`: the source labels from <split>/labels,
    else <split>/v1.2/labels; the train-id files always go to <split>/labels (the `mapillary` layout)."""
    pairs = []
    for split_dir in sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")):
        out = split_dir / "labels"
        for folder in (out, split_dir / "v1.2" / "labels"):
            srcs = sorted(p for p in folder.rglob("*.png") if not p.name.endswith("_labelTrainIds.png")
                          and not _is_leftover(p, folder)) if folder.is_dir() else []  # fmt: skip
            if srcs:
                pairs += [(p, out / p.relative_to(folder).with_name(p.stem + "_labelTrainIds.png")) for p in srcs]
                break
    return pairs


def convert(
    kind: str, root: str | Path, nproc: int = 1, num_classes: int = 19, split: str = "train", quiet: bool = False,
    label_suffix: str = ".png",
) -> int:
    """Convert one dataset in place and write its statistics; returns the number of label files processed."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root {root} does not exist")
    pairs, read_ids, lut = _jobs(kind, root, split, label_suffix)
    if not pairs:
        pattern = {"gta": "labels/*<digit>.png", "synthia": "GT/LABELS/*.png", "folder": f"labels/**/*{label_suffix}",
                   "cityscapes": "gtFine/*/*/*_gtFine_labelIds.png",
                   "mapillary": "<split>/labels/*.png or <split>/v1.2/labels/*.png"}[kind]  # fmt: skip
        raise FileNotFoundError(f"no label files in {root} matching {pattern}")
    work = partial(_convert_pair, read_ids=read_ids, lut=lut, num_classes=num_classes)
    if nproc > 1:
        with Pool(nproc) as pool:
            records = list(tqdm(pool.imap(work, pairs, chunksize=8), total=len(pairs), desc=f"convert {kind}",
                                disable=quiet))  # fmt: skip
    else:
        records = [work(p) for p in tqdm(pairs, desc=f"convert {kind}", disable=quiet)]
    if kind == "mapillary":
        # Statistics only from the training split, as for Cityscapes (decided on the first folder below ROOT).
        records = [r for r in records if Path(r[0]).relative_to(root).parts[0] in ("training", "train")]
    if kind in ("folder", "mapillary") and records and not quiet:
        _print_min_pixels_hint(float(np.mean([area for _, _, area in records])))
    records = [(path, stats) for path, stats, _ in records]
    if kind == "cityscapes":
        # Statistics only from the training split; val/test labels are converted but never sampled.
        # Decided on the path below gtFine/, so a root that itself contains a `train` folder does not count val.
        records = [r for r in records if Path(r[0]).relative_to(root / "gtFine").parts[0] == "train"]
        _write_split_lists(root)
    write_stats(root, records)
    return len(pairs)


def _convert_pair(pair: tuple[Path, Path], read_ids, lut, num_classes: int) -> tuple[str, dict[str, int], int]:
    return _convert_one(pair[0], pair[1], read_ids, lut, num_classes)


def _print_min_pixels_hint(mean_area: float) -> None:
    """The RCS threshold for this dataset: the original's 3000 pixels are for GTA's 1914x1052 labels; on smaller
    images no image might pass it, and RCS would sample only the few classes that still do."""
    n = suggest_min_pixels(mean_area)
    print(
        f"mean label area {mean_area:.0f} px ({mean_area / GTA_LABEL_AREA:.3g} x GTA's 1914x1052): "
        f"set data.rcs.min_pixels: {n} (the original's {PAPER_MIN_PIXELS} scaled by area)"
    )


def _write_split_lists(root: Path) -> None:
    """train.txt / val.txt / test.txt with `<city>/<name>` per image, as the original writes (unused by training)."""
    for split in ("train", "val", "test"):
        folder = root / "leftImg8bit" / split
        if folder.is_dir():
            names = sorted(p.relative_to(folder).as_posix().removesuffix("_leftImg8bit.png")
                           for p in folder.glob("*/*_leftImg8bit.png"))  # fmt: skip
            (root / f"{split}.txt").write_text("".join(n + "\n" for n in names))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m daformer_fast.tools.convert_datasets", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("kind", choices=["gta", "synthia", "cityscapes", "mapillary", "folder"])
    parser.add_argument("root")
    parser.add_argument("--nproc", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--num-classes", type=int, default=19, help="number of train ids (folder datasets)")
    parser.add_argument("--split", default="train", help="label sub-folder of a folder dataset, if it has splits")
    parser.add_argument("--label-suffix", default=".png", help="label file suffix of a folder dataset "
                        "(its data.*.label_suffix)")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        n = convert(args.kind, args.root, args.nproc, args.num_classes, args.split, label_suffix=args.label_suffix)
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.kind}: {n} label files converted; statistics written to {args.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
