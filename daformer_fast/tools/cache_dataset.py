"""Pre-resize the training datasets of a config once to their training scale, for faster loading.

    python -m daformer_fast.tools.cache_dataset CONFIG [--set k=v ...] [--out DIR] [--nproc N] [--png-level L]
                                                [--format png|npy]

`--format png` (the default) is described here; `--format npy` writes the decode-free cache of
`daformer_fast.data.npy_cache` (one uncompressed uint8 `.npy` per image and label, because DALI's numpy reader reads
one file per sample, with ROI arguments for the crop; the torch loader memory-maps each file and reads only the crop)
to `DIR/<dataset folder>[_<split>]_<long>x<short>_npy/`, by the same resize rule and with the same fixed-point
guarantee, atomic, idempotent and resumable too (`tools.cache_npy`). It prints the disk use first and refuses to
start without the free space it needs. Both formats end by printing the `--set` overrides that train from the cache.

For `data.source` and `data.target` of the config, every image (and label, where one exists) is read exactly as the
training loaders read it, resized with `pipeline.resize_pair` (mmcv keep-ratio rule, bilinear image, nearest label)
to the dataset's `scale`, and written losslessly as PNG (OpenCV, compression level `--png-level`, default 1) to
`DIR/<dataset folder>_<long>x<short>/` in the same relative layout and under the same file names as the original,
so the copy is itself a dataset of the same kind. The three RCS JSON files (and Cityscapes' split lists) are
copied with their pixel counts unchanged: `data.rcs.min_pixels` is defined at the original label resolution. At
the end the tool prints the `--set data.source.root=... data.source.scale=...` overrides that train from the copy.

Why this gives identical training batches: the mmcv rule maps a size to a fixed point. If resizing (w, h) to
(long L, short S) gives (w', h'), the binding side becomes exactly L (or S) and the other side is at most its bound
after rounding, so the factor for (w', h') is min(L / max, S / min) = 1.0 exactly and `resize_pair` is a no-op on
the cached copy; the random crop/flip/RCS draws are the same, so the batches are byte-identical. Checked for every
(w, h) with 16 <= w, h <= 2100 at the scales (1280, 720), (1024, 512), (1280, 760), (960, 540): no exception; GTA
1914x1052 -> 1280x704 -> 1280x704 and Cityscapes 2048x1024 -> 1024x512 -> 1024x512. The tool verifies the fixed
point for every file it writes. Using the cache with another `scale` than it was built for resizes the resized
images again, which is not the same as resizing the originals.

Decode time of one 1280x704 RGB image (OpenCV, one CPU core of the 2-core development machine, median, warm page
cache; three contents: flat synthetic source render, noisy synthetic target render, a photo): PNG level 0
7.6 / 10.0 / 17.6 ms (2.71 MB), level 1 20.6 / 29.0 / 30.6 ms (1.20 / 1.37 / 1.47 MB), level 3-6 about the same
as level 1 but slower to write; `.npy` 0.4 ms (2.70 MB); the original path (a 1914x1052 GTA-size PNG decoded and
resized) 57 ms. PNG level 1 (the default) roughly halves the decode time of the original path at half the disk space
of level 0; `.npy` (`--format npy`) needs no decode at all at the disk space of level 0 (raw size: ~67 GB for GTA),
and the loaders read only the crop of it. A PNG copy is a dataset of the same kind as the original (same layout
and names); an npy copy is recognised by its index (`npy_cache.NPY_INDEX`).

Files keep their names: a `.jpg` of a folder dataset then holds PNG data (OpenCV and Pillow detect the format
from the file content, not the name). Files are written atomically; a re-run keeps every existing file (idempotent)
and only fills in what is missing. Unreadable source files are skipped with a warning (training skips them too, but
the cached copy then lists fewer samples, so its batches are no longer those of the original); with
`data.strict: true` they stop the tool, as they would stop training.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from dataclasses import dataclass
from functools import partial
from multiprocessing import Pool
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from daformer_fast.config import ConfigError, DatasetConfig, load_config
from daformer_fast.data.datasets import DatasetError, Sample, list_samples
from daformer_fast.data.npy_cache import METADATA_FILES
from daformer_fast.tools.cache_npy import build_npy_cache, load_resized

__all__ = ["CacheResult", "cache_dataset", "cache_dir", "main"]

log = logging.getLogger("daformer_fast.data")
MANIFEST = "cache_info.json"


@dataclass(frozen=True)
class CacheResult:
    root: Path
    """The cached dataset's root: use it as `data.<side>.root` with the same `scale`."""
    written: int
    """Image and label files written by this run."""
    kept: int
    """Files that already existed (an earlier, possibly interrupted run)."""
    skipped: list[str]
    """Messages of unreadable source files, which are not in the cache."""


def cache_dir(ds: DatasetConfig, out: str | Path, fmt: str = "png") -> Path:
    """`out/<dataset folder>[_<split>]_<long>x<short>[_npy]`; the split is named only for layouts that have one,
    `_npy` only for the npy format."""
    parts = [Path(ds.root).resolve().name or ds.name]
    if ds.name not in ("gta", "synthia") and ds.split:
        parts.append(ds.split.replace("/", "-"))
    parts.append(f"{max(ds.scale)}x{min(ds.scale)}")
    if fmt == "npy":
        parts.append("npy")
    return Path(out) / "_".join(parts)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)  # never leave a half-written file under the final name


def _png(arr: np.ndarray, level: int) -> bytes:
    ok, buf = cv2.imencode(".png", arr, [cv2.IMWRITE_PNG_COMPRESSION, level])
    if not ok:
        raise DatasetError(f"cannot encode a {arr.shape} {arr.dtype} array as PNG")
    return buf.tobytes()


def _cache_one(
    job: tuple[Sample, Path, Path | None], scale: tuple[int, int], level: int, strict: bool
) -> tuple[int, int, str | None]:
    """(files written, files kept, skip message) for one sample."""
    s, img_out, lbl_out = job
    todo_img = not img_out.exists()
    todo_lbl = lbl_out is not None and not lbl_out.exists()
    kept = (not todo_img) + (lbl_out is not None and not todo_lbl)
    if not (todo_img or todo_lbl):
        return 0, kept, None
    got = load_resized(s, scale, strict)
    if isinstance(got, str):
        return 0, kept, got
    img, lbl = got
    written = 0
    if todo_img:
        _atomic_write_bytes(img_out, _png(np.ascontiguousarray(img[..., ::-1]), level))  # RGB -> BGR for OpenCV
        written += 1
    if todo_lbl:
        _atomic_write_bytes(lbl_out, _png(lbl, level))  # 8-bit grayscale: Pillow reads it back as mode L
        written += 1
    return written, kept, None


def _relative(path: Path, root: Path) -> Path:
    try:
        return path.relative_to(root)
    except ValueError:
        raise DatasetError(f"{path} is not below the dataset root {root}") from None


def _rewrite_path(p: str, src_root: Path, suffix: str | None = None) -> str:
    """Stats paths relative to the root stay as they are; absolute ones below the original root become relative;
    with `suffix` (the npy cache) the file suffix is replaced by it."""
    if suffix is not None:
        return Path(_rewrite_path(p, src_root)).with_suffix(suffix).as_posix()
    if not os.path.isabs(p):
        return p
    for root in (src_root, src_root.resolve()):
        try:
            return Path(p).relative_to(root).as_posix()
        except ValueError:
            pass
    return p  # elsewhere: kept; RCS matches entries by base name only


def _rewrite_stats(name: str, obj, src_root: Path, suffix: str | None = None):
    fix = partial(_rewrite_path, src_root=src_root, suffix=suffix)
    if name == "sample_class_stats.json" and isinstance(obj, list):
        return [{**s, "file": fix(s["file"])} if isinstance(s, dict) and "file" in s else s for s in obj]
    if name == "sample_class_stats_dict.json" and isinstance(obj, dict):
        return {fix(k): v for k, v in obj.items()}
    if name == "samples_with_class.json" and isinstance(obj, dict):
        return {c: [[fix(e[0]), *e[1:]] if isinstance(e, list) and e else e for e in v] for c, v in obj.items()}
    return obj


def _copy_metadata(src_root: Path, dst_root: Path, suffix: str | None = None) -> list[str]:
    """Copy the RCS statistics (paths made relative, file suffixes replaced by `suffix` if given) and split lists;
    unchanged files are not rewritten."""
    copied = []
    for name in METADATA_FILES:
        src = src_root / name
        if not src.is_file():
            continue
        if name.endswith(".json"):
            try:
                obj = json.loads(src.read_text())
            except (OSError, ValueError) as e:
                raise DatasetError(f"cannot read {src}: {e}") from None
            data = json.dumps(_rewrite_stats(name, obj, src_root, suffix), indent=2).encode()
        else:
            data = src.read_bytes()
        dst = dst_root / name
        if not (dst.is_file() and dst.read_bytes() == data):
            _atomic_write_bytes(dst, data)
        copied.append(name)
    return copied


def _check_manifest(dst_root: Path, ds: DatasetConfig) -> None:
    info = {
        "name": ds.name, "split": ds.split, "scale": list(ds.scale), "source_root": str(Path(ds.root).resolve()),
        "img_suffix": ds.img_suffix, "label_suffix": ds.label_suffix, "format": "png",
    }  # fmt: skip
    path = dst_root / MANIFEST
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            old = None
        if old != info:
            raise DatasetError(
                f"{dst_root} already holds a different cache ({path}: {old}); expected {info}. Use another --out or "
                f"delete that folder"
            )
    else:
        _atomic_write_bytes(path, (json.dumps(info, indent=2) + "\n").encode())


def cache_dataset(
    ds: DatasetConfig, out: str | Path, *, nproc: int = 1, png_level: int = 1, strict: bool = False,
    quiet: bool = False, desc: str = "cache", fmt: str = "png", say=print,
) -> CacheResult:  # fmt: skip
    """Write the resized copy of `ds` to `cache_dir(ds, out, fmt)` (module docstring) and return where it is.

    `fmt`: "png" or "npy" (`tools.cache_npy`, which prints its disk-use line through `say`; None: silent).
    """
    if not 0 <= png_level <= 9:
        raise ValueError(f"png_level must be in 0..9, got {png_level}")
    if fmt not in ("png", "npy"):
        raise ValueError(f"fmt must be png or npy, got {fmt!r}")
    src_root = Path(ds.root)
    dst_root = cache_dir(ds, out, fmt)
    if dst_root.resolve() == src_root.resolve():
        raise DatasetError(f"the cache folder {dst_root} is the dataset itself; choose another --out")
    if fmt == "npy":
        written, kept, skipped = build_npy_cache(
            ds, dst_root, copy_metadata=partial(_copy_metadata, src_root, dst_root, ".npy"), nproc=nproc,
            strict=strict, quiet=quiet, desc=desc, say=say,
        )  # fmt: skip
        for msg in skipped:
            log.warning("not cached (unreadable, skipped at training time too): %s", msg)
        return CacheResult(dst_root, written, kept, skipped)
    samples = list_samples(ds, need_labels=False)
    dst_root.mkdir(parents=True, exist_ok=True)
    _check_manifest(dst_root, ds)
    jobs = [
        (s, dst_root / _relative(s.img, src_root), dst_root / _relative(s.label, src_root) if s.label else None)
        for s in samples
    ]
    work = partial(_cache_one, scale=tuple(ds.scale), level=png_level, strict=strict)
    bar = partial(tqdm, total=len(jobs), desc=desc, unit="img", disable=quiet)
    if nproc > 1:
        with Pool(nproc) as pool:
            results = list(bar(pool.imap_unordered(work, jobs, chunksize=4)))
    else:
        results = [work(j) for j in bar(jobs)]
    skipped = [msg for _, _, msg in results if msg is not None]
    for msg in skipped:
        log.warning("not cached (unreadable, skipped at training time too): %s", msg)
    _copy_metadata(src_root, dst_root)
    return CacheResult(dst_root, sum(r[0] for r in results), sum(r[1] for r in results), skipped)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m daformer_fast.tools.cache_dataset", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("config", help="YAML config whose data.source and data.target are cached")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--out", default="data/cache", help="folder of the cached datasets (default: data/cache)")
    p.add_argument("--nproc", type=int, default=min(8, os.cpu_count() or 1), help="worker processes")
    p.add_argument("--png-level", type=int, default=1, choices=range(10), metavar="0..9",
                   help="PNG compression level: 0 = fastest decode, twice the disk space (default: 1)")  # fmt: skip
    p.add_argument("--format", choices=["png", "npy"], default="png",
                   help="png: a dataset of the same layout; npy: decode-free uint8 arrays (default: png)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        overrides = []
        for side in ("source", "target"):
            ds = getattr(cfg.data, side)
            res = cache_dataset(ds, args.out, nproc=args.nproc, png_level=args.png_level, strict=cfg.data.strict,
                                quiet=args.quiet, desc=f"cache {side} ({ds.name})", fmt=args.format)  # fmt: skip
            skipped = f", {len(res.skipped)} unreadable images skipped (see warnings)" if res.skipped else ""
            print(f"{side}: {ds.name} {ds.root} -> {res.root} at scale {max(ds.scale)}x{min(ds.scale)}: "
                  f"{res.written} files written, {res.kept} already cached{skipped}")  # fmt: skip
            overrides += [f"data.{side}.root={res.root}", f"data.{side}.scale=[{ds.scale[0]},{ds.scale[1]}]"]
    except (ConfigError, DatasetError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("train from the cache with:\n  --set " + " ".join(shlex.quote(o) for o in overrides))
    return 0


if __name__ == "__main__":
    logging.basicConfig(format="%(levelname)s: %(message)s")
    sys.exit(main())
