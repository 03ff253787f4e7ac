"""The `--format npy` writer of `tools.cache_dataset`: one uncompressed uint8 `.npy` per image and label.

Layout, index and checks: `daformer_fast.data.npy_cache`. Each image (and label, where one exists) is read as the
training loaders read it, resized with `pipeline.resize_pair` to the dataset's `scale` (the keep-ratio fixed point
of `tools.cache_dataset`'s docstring, verified per file), and written as a `.npy` (format 1.0, uint8, C order:
H×W×3 RGB, H×W labels) to a temporary name and renamed. Before writing, the sizes from the image headers give the
disk use of the whole cache; the tool refuses to start when the free space is smaller than what is still missing.
A disk that fills up anyway (another writer) stops the build with one line naming the file and the space the whole
cache needs; no temporary file is left behind and the finished files are kept for the re-run.

Resumable and idempotent: a file of the right size under its final name is complete (renames are atomic) and is
kept; a re-run writes only what is missing, and rewrites no file when nothing is. A folder holding a cache of
another source (file list, image sizes, statistics, scale, layout) is refused with one line naming the difference.
The index says `complete: false` until the last file is written, and the loaders refuse an incomplete cache.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable
from functools import partial
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from daformer_fast.config import DatasetConfig
from daformer_fast.data.datasets import DatasetError, Sample, list_samples, read_image, read_label, rescale_size
from daformer_fast.data.npy_cache import (
    NPY_INDEX,
    describe_difference,
    file_digests,
    index_identity,
    load_index,
    npy_file_size,
    source_files,
)
from daformer_fast.data.pipeline import resize_pair

__all__ = ["build_npy_cache", "header_hw", "load_resized"]


def header_hw(path: Path) -> tuple[int, int] | None:
    """(h, w) of an image as OpenCV decodes it (EXIF orientation applied), from its header; None if unreadable."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            # A PNG's eXIf chunk is seen without decoding only before the pixels; JPEGs carry it in the header.
            exif = im.getexif() if (im.format != "PNG" or "exif" in im.info) else {}
    except (OSError, ValueError, SyntaxError):
        return None
    return (w, h) if exif.get(0x0112, 1) in (5, 6, 7, 8) else (h, w)


def _npy_path(path: Path) -> Path:
    return path.with_suffix(".npy")


_BUILD_ID: int | None = None
"""The id of the process that runs the build, set in its pool's workers (`_tmp_name`)."""


def _set_build_id(pid: int) -> None:
    global _BUILD_ID
    _BUILD_ID = pid


def _tmp_name(path: Path) -> Path:
    """The temporary name `path` is written under: the building process's id first (the parent's, in a pool), so
    a failed build can find the temporary files of all its workers (`_remove_tmp`)."""
    return path.with_name(f".{path.name}.{_BUILD_ID or os.getpid()}-{os.getpid()}.tmp")


def _atomic_write(path: Path, write: Callable[[object], None]) -> None:
    """`write(file)` to a temporary name, renamed to `path` when complete; on any error the temporary file is
    removed (never a half-written file anywhere) and a full disk is re-raised naming `path`."""
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
        tmp.replace(path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            # A failed write names no file; the caller's message needs it (and it survives the pool's pickling).
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from None
        raise


def _write_npy(path: Path, arr: np.ndarray) -> None:
    """`arr` as a format 1.0 `.npy` at `path`, via a temporary name (never a half-written file under `path`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, lambda f: np.lib.format.write_array(f, np.ascontiguousarray(arr), version=(1, 0)))


def _remove_tmp(dst_root: Path, build_id: int) -> None:
    """Remove the temporary files of build `build_id` under `dst_root`: pool workers stopped mid-write by the
    pool's shutdown after another worker failed leave theirs behind."""
    for tmp in dst_root.rglob(f".*.{build_id}-*.tmp"):
        tmp.unlink(missing_ok=True)


def _done(path: Path, shape: tuple[int, ...]) -> bool:
    return path.is_file() and path.stat().st_size == npy_file_size(shape)


def load_resized(s: Sample, scale: tuple[int, int], strict: bool) -> tuple[np.ndarray, np.ndarray | None] | str:
    """Image and label (or None) of `s` read as training reads them and resized to `scale`, or the message of an
    unreadable file (raised with `strict`). Size mismatches raise: they are never skipped."""
    try:
        img = read_image(s.img)
        lbl = read_label(s.label) if s.label is not None else None
    except DatasetError as e:
        if strict:
            raise
        return str(e)
    if lbl is not None and lbl.shape != img.shape[:2]:
        raise DatasetError(f"image/label size mismatch: {s.img} is {img.shape[1]}x{img.shape[0]}, {s.label} is "
                           f"{lbl.shape[1]}x{lbl.shape[0]}")  # fmt: skip
    img, lbl = resize_pair(img, lbl, scale)
    size = (img.shape[1], img.shape[0])
    if rescale_size(size[0], size[1], scale) != size:  # tools.cache_dataset's fixed point; never expected to fail
        raise DatasetError(f"{s.img}: resized size {size} is not a fixed point of scale {tuple(scale)}; cannot cache")
    return img, lbl


def _cache_one(job: tuple[Sample, Path, Path | None, tuple[int, int]], scale, strict: bool):
    """(files written, files kept, skip message or None, cached (h, w) or None) of one sample."""
    s, img_out, lbl_out, (h, w) = job
    nw, nh = rescale_size(w, h, scale)
    todo_img = not _done(img_out, (nh, nw, 3))
    todo_lbl = lbl_out is not None and not _done(lbl_out, (nh, nw))
    kept = (not todo_img) + (lbl_out is not None and not todo_lbl)
    if not (todo_img or todo_lbl):
        return 0, kept, None, (nh, nw)
    got = load_resized(s, scale, strict)
    if isinstance(got, str):
        return 0, kept, got, None
    img, lbl = got
    if img.shape[:2] != (nh, nw):
        raise DatasetError(f"{s.img} decodes to another size than its header says ({w}x{h}); cannot cache it")
    if todo_img:
        _write_npy(img_out, img)
    if todo_lbl:
        _write_npy(lbl_out, lbl)
    return int(todo_img) + int(todo_lbl), kept, None, (nh, nw)


def _write_if_changed(path: Path, data: bytes) -> None:
    if not (path.is_file() and path.read_bytes() == data):
        _atomic_write(path, lambda f: f.write(data))


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def build_npy_cache(
    ds: DatasetConfig, dst_root: Path, *, copy_metadata: Callable[[], object], nproc: int = 1, strict: bool = False,
    quiet: bool = False, desc: str = "cache", say: Callable[[str], None] | None = print,
) -> tuple[int, int, list[str]]:  # fmt: skip
    """Write (or complete) the npy cache of `ds` at `dst_root` (module docstring): (written, kept, skip messages).

    `copy_metadata()`: copies the RCS statistics (label paths renamed to the `.npy` files; counts unchanged, RCS
    matches entries by the label's base name) and split lists to `dst_root`, rewriting no file already equal.
    `say`: where the disk-use line goes (None: nowhere).

    Raises:
        DatasetError: `dst_root` holds a cache of something else, too little free disk space, or bad data.
    """
    src_root = Path(ds.root)
    samples = list_samples(ds, need_labels=False)
    sizes = [header_hw(s.img) for s in samples]
    files = [f + (list(hw) if hw else [None, None]) for f, hw in zip(source_files(samples, src_root), sizes)]
    index = {**index_identity(ds), "source_root": str(src_root.resolve()),
             "source": {"files": files, "stats": file_digests(src_root)}}  # fmt: skip
    if (dst_root / NPY_INDEX).is_file():
        diff = describe_difference(load_index(dst_root), index)
        if diff is not None:
            raise DatasetError(f"{dst_root} holds an npy cache of another dataset version: {diff}; use another --out "
                               f"or delete that folder")  # fmt: skip
    jobs = []
    for s, hw in zip(samples, sizes):
        if hw is None:
            if strict:
                raise DatasetError(f"cannot read image {s.img}")
            continue  # skipped below, with the other unreadable files
        lbl = _npy_path(dst_root / s.label.relative_to(src_root)) if s.label is not None else None
        jobs.append((s, _npy_path(dst_root / s.img.relative_to(src_root)), lbl, hw))
    if len({j[1] for j in jobs}) != len(jobs):
        raise DatasetError(f"two images of {src_root} differ only in their suffix; they cannot share one .npy name")
    total = missing = 0
    for _, img_out, lbl_out, (h, w) in jobs:
        nw, nh = rescale_size(w, h, ds.scale)
        for path, shape in ((img_out, (nh, nw, 3)), (lbl_out, (nh, nw))):
            if path is not None:
                size = npy_file_size(shape)
                total += size
                missing += 0 if _done(path, shape) else size
    if say is not None:
        say(f"{ds.name} at {max(ds.scale)}x{min(ds.scale)}: {len(jobs)} images, {_gb(total)}"
            + (f" ({_gb(missing)} still to write)" if missing != total else ""))  # fmt: skip
    dst_root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(dst_root).free
    if missing > free:
        raise DatasetError(f"not enough disk space for the npy cache at {dst_root}: it needs {_gb(missing)}, "
                           f"{_gb(free)} are free")  # fmt: skip
    if missing or not (dst_root / NPY_INDEX).is_file():
        # An empty sample list keeps the index readable, so that a re-run of an interrupted build resumes it.
        _write_if_changed(dst_root / NPY_INDEX, json.dumps({**index, "samples": [], "complete": False}).encode())
    work = partial(_cache_one, scale=tuple(ds.scale), strict=strict)
    bar = partial(tqdm, total=len(jobs), desc=desc, unit="img", disable=quiet)
    try:
        if nproc > 1:
            with Pool(nproc, initializer=_set_build_id, initargs=(os.getpid(),)) as pool:
                results = list(bar(pool.imap(work, jobs, chunksize=4)))  # imap: the index keeps list_samples order
        else:
            results = [work(j) for j in bar(jobs)]
    except OSError as e:
        _remove_tmp(dst_root, os.getpid())
        if e.errno != errno.ENOSPC:
            raise
        # Finished files are complete and kept: a re-run after freeing space writes only the rest.
        raise DatasetError(f"disk full while writing {e.filename}: the npy cache of {ds.name} at {dst_root} needs "
                           f"{_gb(total)} in all ({_gb(missing)} were missing when this run started); free space "
                           f"and run again (finished files are kept) or use another --out") from None  # fmt: skip
    except BaseException:
        _remove_tmp(dst_root, os.getpid())
        raise
    skipped = [f"cannot read image {s.img}" for s, hw in zip(samples, sizes) if hw is None]
    skipped += [r[2] for r in results if r[2] is not None]
    copy_metadata()
    cached = [[j[0].name, j[1].relative_to(dst_root).as_posix(),
               j[2].relative_to(dst_root).as_posix() if j[2] is not None else None, *r[3]]
              for j, r in zip(jobs, results) if r[3] is not None]  # fmt: skip
    index.update(stats=file_digests(dst_root), samples=cached, complete=True)
    _write_if_changed(dst_root / NPY_INDEX, json.dumps(index).encode())
    return sum(r[0] for r in results), sum(r[1] for r in results), skipped
