"""The decode-free dataset cache: its index, its checks, and reading a crop of a cached image without reading the rest.

`python -m daformer_fast.tools.cache_dataset CONFIG --format npy` writes, for one dataset at one training scale,
one uncompressed uint8 `.npy` file per image (H×W×3 RGB) and per label (H×W), already resized by the training
rule (`pipeline.resize_pair`), at the original's relative path with the suffix replaced by `.npy`
(`images/00003.png` → `images/00003.npy`, `labels/00003_labelTrainIds.png` → `labels/00003_labelTrainIds.npy`).
One file per sample because DALI's numpy reader reads one file per sample, with ROI arguments for the crop.

`NPY_INDEX` (JSON) at the cache root records what the cache was built from and what it holds:

    format, version          "npy", INDEX_VERSION
    name, split, img_suffix, label_suffix, scale, source_root
                             the DatasetConfig it was built for (scale as [long, short])
    source.files             [[image path, label path or null, h, w], ...] of the source dataset (paths relative
                             to source_root, sizes from the image headers), in list_samples order
    source.stats             {file name: sha256} of the source's RCS statistics and split lists
    stats                    {file name: sha256} of the cache's copies (paths renamed to `.npy`, counts unchanged)
    samples                  [[name, image path, label path or null, h, w], ...] cached, paths relative to the
                             cache root, in list_samples order (unreadable source images are missing)
    complete                 false while the tool is writing

`list_cached_samples` (what `datasets.list_samples` returns for such a root) refuses, with one line naming what
differs, a cache that is incomplete, built for another layout, split or scale than the config asks, whose
statistics were replaced, or whose source dataset (when `source_root` still exists) now lists other files or other
statistics. Image sizes of the source are compared by the tool when it resumes (they need every source header);
the planner compares each cached file's header with the index when it reads it.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from daformer_fast.config import DatasetConfig
from daformer_fast.data.datasets import DatasetError, Sample, list_samples

__all__ = [
    "INDEX_VERSION",
    "METADATA_FILES",
    "NPY_INDEX",
    "describe_difference",
    "file_digests",
    "index_identity",
    "list_cached_samples",
    "load_index",
    "npy_file_size",
    "read_npy_crop",
    "source_files",
]

NPY_INDEX = "npy_index.json"
"""The index file at the root of an npy cache (module docstring); its presence makes a root an npy cache."""
INDEX_VERSION = 1
METADATA_FILES = (
    "sample_class_stats.json", "sample_class_stats_dict.json", "samples_with_class.json",
    "train.txt", "val.txt", "test.txt",
)  # fmt: skip
"""The RCS statistics and split lists a cache copies from its source (where they exist)."""


def npy_file_size(shape: tuple[int, ...]) -> int:
    """Bytes of a uint8 C-order `.npy` file (format 1.0) of `shape`: header (padded to 64 bytes) plus the data."""
    header = {"descr": "|u1", "fortran_order": False, "shape": tuple(int(n) for n in shape)}
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.tell() + int(np.prod(shape))


def read_npy_crop(path: str | Path, box: tuple[int, int, int, int]) -> np.ndarray:
    """Rows y0:y1, columns x0:x1 of a cached `.npy` image or label, memory-mapped: only the pages of the box are
    read. A view of the map (copy it before the file may change)."""
    y0, y1, x0, x1 = box
    try:
        arr = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:  # a truncated file: numpy's "mmap length is greater than file size"
        raise DatasetError(f"cannot read {path}: {e}") from None
    return arr[y0:y1, x0:x1]


def file_digests(root: Path) -> dict[str, str]:
    """{name: sha256 hex} of the `METADATA_FILES` present in `root`."""
    out = {}
    for name in METADATA_FILES:
        path = root / name
        if path.is_file():
            out[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def source_files(samples: list[Sample], root: Path) -> list[list]:
    """[image path, label path or None] relative to `root`, posix, of `samples` (the index's file list without
    sizes)."""

    def rel(p: Path | None) -> str | None:
        return None if p is None else Path(p).relative_to(root).as_posix()

    return [[rel(s.img), rel(s.label)] for s in samples]


def index_identity(ds: DatasetConfig) -> dict:
    """The index fields that come from the config a cache is built for."""
    return {
        "format": "npy", "version": INDEX_VERSION, "name": ds.name, "split": ds.split, "img_suffix": ds.img_suffix,
        "label_suffix": ds.label_suffix, "scale": [int(max(ds.scale)), int(min(ds.scale))],
    }  # fmt: skip


def _first_difference(old: list, new: list) -> str:
    for i, (a, b) in enumerate(zip(old, new)):
        if a != b:
            return f"entry {i}: {a} then, {b} now"
    return f"{len(old)} entries then, {len(new)} now"


def describe_difference(old: dict, new: dict, *, sizes: bool = True) -> str | None:
    """One line naming the first way index `new` differs from index `old` (identity, scale, source root, source file
    list, source sizes when `sizes`, source statistics), or None. Compares only the keys `new` has."""
    for key in ("format", "version", "name", "split", "img_suffix", "label_suffix", "scale", "source_root"):
        if key in new and old.get(key) != new[key]:
            return f"{key} is {old.get(key)!r} in the cache, {new[key]!r} now"
    o_src, n_src = old.get("source", {}), new.get("source", {})
    if "files" in n_src:
        o_files, n_files = o_src.get("files", []), n_src["files"]
        o_list, n_list = [f[:2] for f in o_files], [f[:2] for f in n_files]
        if o_list != n_list:
            return f"the source file list differs ({len(o_list)} files then, {len(n_list)} now; first difference: " \
                   f"{_first_difference(o_list, n_list)})"  # fmt: skip
        if sizes:
            for a, b in zip(o_files, n_files):
                if a[2:] != b[2:]:
                    return f"the source image sizes differ: {b[0]} was {a[3]}x{a[2]}, is {b[3]}x{b[2]} now"
    if "stats" in n_src and o_src.get("stats") != n_src["stats"]:
        names = sorted(k for k in set(o_src.get("stats", {})) | set(n_src["stats"])
                       if o_src.get("stats", {}).get(k) != n_src["stats"].get(k))  # fmt: skip
        return f"the source statistics differ ({', '.join(names)})"
    return None


def load_index(root: str | Path) -> dict:
    """The parsed `NPY_INDEX` of cache `root` (DatasetError when it does not read)."""
    path = Path(root) / NPY_INDEX
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DatasetError(f"cannot read the npy cache index {path}: {e}") from None
    if not isinstance(index, dict) or index.get("format") != "npy" or "samples" not in index:
        raise DatasetError(f"{path} is not an npy cache index")
    return index


def _check(ds: DatasetConfig, index: dict) -> str | None:
    """Why cache `index` at `ds.root` may not be used for `ds` (module docstring), or None."""
    if not index.get("complete"):
        return "it is incomplete (the tool was interrupted); run it again to finish it"
    identity = index_identity(ds)
    if index.get("version") != INDEX_VERSION:
        return f"it has index version {index.get('version')}, this code reads {INDEX_VERSION}; rebuild it"
    for key in ("name", "split", "img_suffix", "label_suffix"):
        if key == "split" and ds.name in ("gta", "synthia"):
            continue  # layouts without splits ignore it
        if index.get(key) != identity[key]:
            return f"it was built for {key} {index.get(key)!r}, the config has {identity[key]!r}"
    if index.get("scale") != identity["scale"]:
        s = index.get("scale") or ["?", "?"]
        return f"it was built at scale {s[0]}x{s[1]}, the config asks for {identity['scale'][0]}x" \
               f"{identity['scale'][1]} (use the scale it was built for, or build another cache)"  # fmt: skip
    stats = file_digests(Path(ds.root))
    if stats != index.get("stats"):
        names = sorted(k for k in set(stats) | set(index.get("stats", {})) if stats.get(k) != index["stats"].get(k))
        return f"its statistics files changed since it was built ({', '.join(names)})"
    src = Path(index.get("source_root", ""))
    if index.get("source_root") and src.is_dir():
        try:
            files = source_files(list_samples(replace(ds, root=str(src)), need_labels=False), src)
        except DatasetError:
            files = []
        diff = describe_difference(index, {"source": {"files": files, "stats": file_digests(src)}}, sizes=False)
        if diff is not None:
            return f"its source dataset {src} changed since: {diff}; rebuild the cache"
    return None


def list_cached_samples(ds: DatasetConfig, need_labels: bool = True) -> list[Sample]:
    """The samples of the npy cache at `ds.root`, in the order `list_samples` gives the source's (module docstring).

    Raises:
        DatasetError: the cache may not be used for `ds` (one line naming why), or (with `need_labels`) it holds
            images without labels.
    """
    root = Path(ds.root)
    index = load_index(root)
    why = _check(ds, index)
    if why is not None:
        raise DatasetError(f"npy cache {root} refused: {why}")
    samples = [Sample(img=root / img, label=root / lbl if lbl else None, name=name, hw=(int(h), int(w)))
               for name, img, lbl, h, w in index["samples"]]  # fmt: skip
    if not samples:
        raise DatasetError(f"npy cache {root} holds no samples")
    missing = [s for s in samples if s.label is None]
    if need_labels and missing:
        raise DatasetError(f"{len(missing)} of {len(samples)} images in npy cache {root} have no label; first: "
                           f"{missing[0].img}")  # fmt: skip
    return samples
