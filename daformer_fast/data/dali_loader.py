"""NVIDIA DALI training loader: the torch loader's batches, with image decode, resize, crop and flip in DALI.

Same batch contract as `torch_loader`, and the same `plan.ItemPlan` per item, so the two loaders are
interchangeable mid-run.

Division of work:

- Host (torch DataLoader workers, `PlanDataset`): the sample plans of `plan.ItemPlanner`, the same decisions
  the torch loader executes. The planner decodes and resizes labels (Pillow + nearest resize: cheap) for the
  crop rules; of each image it reads only the size from the header (`read_image_header`), never the pixels.
- DALI: image file read and decode (PNG is decoded by CPU threads inside DALI even on a GPU; only JPEG has a
  GPU decoder), resize of the crop window only, flip, pad, HWC → CHW; on the GPU when the loader's device is
  CUDA (`mixed` decoder, `gpu` operators), on the CPU otherwise. One graph: operators take the device as a
  parameter, so the CPU graph the tests run is the graph the GPU runs.

Resize, bit-exact with OpenCV. `fn.resize` (linear, antialias off) interpolates in float and rounds to
nearest; OpenCV's `INTER_LINEAR` on uint8 (what the original and the torch loader use) is a fixed-point
algorithm: 11-bit weights rounded from float32 positions, an exact integer horizontal pass
T = a0·S[x0] + a1·S[x1], then a vertical pass ((T0>>4)·b0>>16 + (T1>>4)·b1>>16 + 2)>>2 that truncates twice.
It is about 1/8 of a grey level darker on average, and `fn.resize` differs from it by ±1 on ~12 % of pixels.
`resize="exact"` (default) therefore reproduces OpenCV's arithmetic: the host computes the two source
columns/rows and integer weights of every output pixel exactly as OpenCV does, DALI gathers them with
`fn.multi_paste` (integer anchors, one region per run of consecutive source columns/rows) and evaluates the
integer formula with arithmetic operators. That equals `cv2.resize` bit for bit (checked on OpenCV 5.0 for
down- and up-scaling, odd sizes, and the exact 2× case where OpenCV switches to INTER_AREA, which gives the same
values). It reproduces OpenCV's SIMD code path (every x86/ARM build); an OpenCV built without SIMD rounds
differently and the torch loader itself would then differ from the original. `resize="fast"` uses one
`fn.resize` over the crop's source window instead: fewer operators, ±1 grey level from OpenCV.

An npy cache (`npy_cache`: `.npy` images already at the training scale) is neither decoded nor resized:
`fn.readers.numpy` reads only the rows and columns of the planned crop (its ROI arguments; on the GPU when the
loader's device is CUDA, through GPUDirect Storage), then flip, pad and CHW as above, bit-identical to the torch
loader. A DALI reader takes its file list when the pipeline is built and cannot be given a file per sample
afterwards, so with an npy side the loader plans `NPY_CHUNK_ITERS` iterations ahead, builds a pipeline whose reader
lists their files in plan order, runs it, and builds the next one.

PhotoMetricDistortion (`data.photometric`) is not in the graph: the loader refuses a config with it on, and
`loader.build_train_loader` picks the torch loader for it.

Differences from the torch loader, by design: an image whose header reads but whose data is corrupt is not
skipped (the host never decodes images) and stops the run with the DALI error; `rcs_class`, `failed`,
`valid_hw` and `target_valid_hw` stay on the host (the failure monitor reads `failed` every step and `normalize`
checks `valid_hw` there; a device copy would cost a sync).
"""

from __future__ import annotations

import importlib
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from daformer_fast.config import ConfigError, DataConfig
from daformer_fast.data.datasets import NPY_SUFFIX, DatasetError
from daformer_fast.data.plan import ItemPlanner, Mode, Side, SidePlan

__all__ = [
    "NPY_CHUNK_ITERS",
    "PHOTOMETRIC_NOT_IN_DALI",
    "DaliTrainLoader",
    "PlanDataset",
    "dali_available",
    "read_image_header",
    "resize_taps",
]

NPY_CHUNK_ITERS = 64
"""Iterations one DALI pipeline runs when a side reads an npy cache (module docstring): its plans are made before
the pipeline is built (a pause of that many plans every that many iterations) and a new pipeline is built after."""

Resize = Literal["exact", "fast"]
_OUTPUTS = ("img", "gt", "target_img", "rcs_class", "failed", "valid_hw", "target_valid_hw")
_TARGET_OUTPUTS = ("target_img", "target_valid_hw")
_COEF_SCALE = 2048  # OpenCV INTER_RESIZE_COEF_SCALE (11 fractional bits)
PHOTOMETRIC_NOT_IN_DALI = ("data.loader=dali cannot apply data.photometric (PhotoMetricDistortion runs in the torch "
                           "loader only); set data.loader to torch or auto")
"""The error of a DALI loader asked for with `data.photometric` on (module docstring)."""


def dali_available() -> tuple[bool, str]:
    """(True, "") when `nvidia.dali` and its PyTorch plugin import, else (False, the reason)."""
    try:
        importlib.import_module("nvidia.dali")
        importlib.import_module("nvidia.dali.plugin.pytorch")
    except (ImportError, OSError, RuntimeError) as e:  # OSError, RuntimeError: a broken CUDA library install
        return False, f"{type(e).__name__}: {e}"
    return True, ""


# ---------------------------------------------------------------------------------------------------------------
# Host side: OpenCV's resize taps and the DALI inputs of a plan
# ---------------------------------------------------------------------------------------------------------------


def resize_taps(src: int, dst: int, lo: int, hi: int, *, clamp_weights: bool):
    """OpenCV INTER_LINEAR taps of output indices lo..hi−1 along one axis of length src → dst.

    Returns (i0, i1, w0, w1): the two source indices (clipped to the image) and their int32 fixed-point weights
    (sum 2048). Positions are computed as OpenCV does, in double then rounded to float32. `clamp_weights`: the
    horizontal rule (outside the image the weight goes entirely to the edge pixel); vertically OpenCV only clips
    the row indices.
    """
    d = np.arange(lo, hi, dtype=np.float64)
    f = ((d + 0.5) * (1.0 / (dst / src)) - 0.5).astype(np.float32)
    i0 = np.floor(f).astype(np.int64)
    f = f - i0.astype(np.float32)
    if clamp_weights:
        below, above = i0 < 0, i0 >= src - 1
        f[below | above] = 0
        i0[below], i0[above] = 0, src - 1
    w0 = np.rint((np.float32(1) - f) * np.float32(_COEF_SCALE)).astype(np.int32)
    w1 = np.rint(f * np.float32(_COEF_SCALE)).astype(np.int32)
    return np.clip(i0, 0, src - 1), np.clip(i0 + 1, 0, src - 1), w0, w1


def _runs(idx: np.ndarray) -> np.ndarray:
    """(source start, output start, length) of the maximal runs of `idx` that step by exactly +1."""
    cut = np.flatnonzero(np.diff(idx) != 1) + 1
    starts = np.concatenate([[0], cut])
    lengths = np.diff(np.concatenate([starts, [len(idx)]]))
    return np.stack([idx[starts], starts, lengths], 1)


def _paste_args(idx: np.ndarray, axis: int, other: tuple[int, int], j: int) -> list[np.ndarray]:
    """`fn.multi_paste` arguments (in_ids, in_anchors, shapes, out_anchors) gathering `idx` along `axis` (0 rows,
    1 columns) of sample j; `other` = (anchor, extent) of the untouched axis."""
    r = _runs(idx)
    n = len(r)
    a = np.empty((n, 2), np.int32)
    s = np.empty((n, 2), np.int32)
    o = np.zeros((n, 2), np.int32)
    a[:, axis], s[:, axis], o[:, axis] = r[:, 0], r[:, 2], r[:, 1]
    a[:, 1 - axis], s[:, 1 - axis] = other
    return [np.full(n, j, np.int32), a, s, o]


def _exact_args(side: SidePlan, j: int) -> list[np.ndarray]:
    """Arguments of the bit-exact resize of the crop window of sample j (module docstring), 22 arrays."""
    (h, w), (H, W), (y0, y1, x0, x1) = side.src_hw, side.size_hw, side.box
    c0, c1, a0, a1 = resize_taps(w, W, x0, x1, clamp_weights=True)
    r0, r1, b0, b1 = resize_taps(h, H, y0, y1, clamp_weights=False)
    top = int(r0[0])  # rows the horizontal pass needs: top .. r1[-1] (indices are non-decreasing)
    rows = int(r1[-1]) - top + 1
    return [
        *_paste_args(c0, 1, (top, rows), j), *_paste_args(c1, 1, (top, rows), j),
        *_paste_args(r0 - top, 0, (0, x1 - x0), j), *_paste_args(r1 - top, 0, (0, x1 - x0), j),
        np.array([rows, x1 - x0], np.int32), np.array([y1 - y0, x1 - x0], np.int32),
        a0.reshape(1, -1, 1), a1.reshape(1, -1, 1), b0.reshape(-1, 1, 1), b1.reshape(-1, 1, 1),
    ]  # fmt: skip


def _fast_args(side: SidePlan) -> list[np.ndarray]:
    """`fn.resize` ROI (source coordinates, (y, x)) and output size of the crop window, 3 arrays."""
    (h, w), (H, W), (y0, y1, x0, x1) = side.src_hw, side.size_hw, side.box
    sy, sx = h / H, w / W
    return [
        np.array([y0 * sy, x0 * sx], np.float32), np.array([y1 * sy, x1 * sx], np.float32),
        np.array([y1 - y0, x1 - x0], np.float32),
    ]  # fmt: skip


_N_GEOM = {"exact": 22, "fast": 3}


def _is_npy(side: Side | None) -> bool:
    """Whether a side's images are `.npy` files of a cache (a root is a cache or not: one sample tells)."""
    return side is not None and bool(side.samples) and str(side.samples[0].img).endswith(NPY_SUFFIX)


def _n_inputs(npy: bool, resize: Resize) -> int:
    """Pipeline inputs of one image side: ROI start, end, flip (npy) or path, resize geometry, flip."""
    return 3 if npy else 2 + _N_GEOM[resize]


def read_image_header(path: Path) -> tuple[tuple[int, int], None]:
    """The DALI loader's `plan.ImageReader`: (h, w) from the image header, after EXIF orientation (OpenCV and
    DALI both apply it); the pixels are left to DALI."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            # PNG: only an eXIf chunk before the pixel data is seen without decoding (Pillow's getexif would
            # decode the whole image to look for one after it).
            has_exif = im.format != "PNG" or "exif" in im.info
            orientation = im.getexif().get(0x0112, 1) if has_exif else 1
    except (OSError, ValueError, SyntaxError) as e:
        raise DatasetError(f"cannot read image {path}: {e}") from None
    return ((w, h) if orientation in (5, 6, 7, 8) else (h, w)), None


class PlanDataset(Dataset):
    """Item k → the DALI pipeline's inputs of `ItemPlanner.plan(k)` (the torch loader's plan), images undecoded."""

    def __init__(self, data: DataConfig, *, mode: Mode, num_classes: int, seed: int, rank: int = 0,
                 resize: Resize = "exact") -> None:  # fmt: skip
        self.data, self.resize = data, resize
        self.planner = ItemPlanner(data, mode=mode, num_classes=num_classes, seed=seed, rank=rank,
                                   read_image=read_image_header)  # fmt: skip

    def __len__(self) -> int:
        return 2**62  # indices come from the DataLoader's sampler

    def _image_inputs(self, side: SidePlan, j: int) -> list[np.ndarray]:
        """(image path as utf-8 bytes for `fn.io.file.read`, resize geometry of the crop window, flip); for an npy
        cache image ((y0, x0), (y1, x1) of the crop box for `fn.readers.numpy`, flip)."""
        if str(side.img_path).endswith(NPY_SUFFIX):
            y0, y1, x0, x1 = side.box
            return [np.array([y0, x0], np.int32), np.array([y1, x1], np.int32), np.array(side.flip, np.int32)]
        geom = _exact_args(side, j) if self.resize == "exact" else _fast_args(side)
        return [np.frombuffer(str(side.img_path).encode(), np.uint8), *geom, np.array(side.flip, np.int32)]

    def __getitem__(self, k: int) -> dict:
        plan = self.planner.plan(k)
        main = plan.labelled
        out = {"img": self._image_inputs(main, plan.index), "gt": main.label, "rcs_class": main.rcs_class,
               "valid_hw": np.array(main.valid_hw, np.int64), "img_path": str(main.img_path)}  # fmt: skip
        if plan.unlabelled is not None:
            out["target_img"] = self._image_inputs(plan.unlabelled, plan.index)
            out["target_img_path"] = str(plan.unlabelled.img_path)
            out["target_valid_hw"] = np.array(plan.unlabelled.valid_hw, np.int64)
        out["failed"] = plan.failed
        return out


def _as_list(items: list) -> list:
    return items


# ---------------------------------------------------------------------------------------------------------------
# DALI side: one graph, device as a parameter
# ---------------------------------------------------------------------------------------------------------------


def _resize_window(fn, types, img, inputs: Iterator, device: str, resize: Resize):
    """The crop window of decoded `img`, resized by the next inputs of `inputs` (module docstring)."""
    if resize == "exact":
        gathers = [[next(inputs) for _ in range(4)] for _ in range(4)]  # columns x0, x1; rows y0, y1
        rows_size, out_size = next(inputs), next(inputs)
        a0, a1, b0, b1 = ((x.gpu() if device == "gpu" else x) for x in (next(inputs) for _ in range(4)))

        def gather(x, args, size):
            ids, anchors, shapes, out_anchors = args
            return fn.multi_paste(x, in_ids=ids, in_anchors=anchors, shapes=shapes, out_anchors=out_anchors,
                                  output_size=size, dtype=types.INT32, device=device)  # fmt: skip

        # OpenCV's fixed-point passes (module docstring); // is >> on these non-negative int32 values.
        t = (gather(img, gathers[0], rows_size) * a0 + gather(img, gathers[1], rows_size) * a1) // 16
        t0, t1 = gather(t, gathers[2], out_size), gather(t, gathers[3], out_size)
        return fn.cast((t0 * b0 // 65536 + t1 * b1 // 65536 + 2) // 4, dtype=types.UINT8)
    roi_start, roi_end, size = next(inputs), next(inputs), next(inputs)
    return fn.resize(img, size=size, roi_start=roi_start, roi_end=roi_end, antialias=False,
                     interp_type=types.INTERP_LINEAR, device=device)  # fmt: skip


def _image_graph(fn, types, inputs: Iterator, device: str, resize: Resize, crop: tuple[int, int],
                 files: list[str] | None = None):  # fmt: skip
    """Decode → resize of the crop window → flip → pad → CHW, from the next inputs of `inputs` (plan order).
    With `files` (an npy cache side: its files in plan order) the crop is read from them, at the cache's scale."""
    if files is not None:
        start, end = next(inputs), next(inputs)
        img = fn.readers.numpy(files=files, roi_start=start, roi_end=end, roi_axes=[0, 1], device=device)
    else:
        enc = fn.io.file.read(next(inputs))  # in DALI's threads: no image bytes through Python
        img = fn.decoders.image(enc, device="mixed" if device == "gpu" else "cpu", output_type=types.RGB)
        img = _resize_window(fn, types, img, inputs, device, resize)
    img = fn.flip(img, horizontal=next(inputs), device=device)
    img = fn.pad(img, axis_names="HW", shape=list(crop), fill_value=0, device=device)  # bottom/right, as np.pad
    return fn.transpose(img, perm=[2, 0, 1], device=device)


def _build_pipeline(feed, *, n_inputs: int, batch_size: int, device: str, device_id: int | None, num_threads: int,
                    resize: Resize, crop: tuple[int, int], with_target: bool, prefetch: int,
                    files: tuple[list[str] | None, list[str] | None] = (None, None)):  # fmt: skip
    """The DALI pipeline of `DaliTrainLoader`; `files`: the npy cache files of each side in plan order, or None."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                  prefetch_queue_depth=prefetch, exec_dynamic=True)  # fmt: skip
    def pipe():
        inputs = iter(fn.external_source(source=feed, num_outputs=n_inputs, batch=True))
        outs = [_image_graph(fn, types, inputs, device, resize, crop, files[0])]
        gt = next(inputs)
        outs.append(gt.gpu() if device == "gpu" else gt)
        if with_target:
            outs.append(_image_graph(fn, types, inputs, device, resize, crop, files[1]))
        # rcs_class, failed, valid_hw (, target_valid_hw): host metadata stays on the CPU.
        return (*outs, *(next(inputs) for _ in range(4 if with_target else 3)))

    return pipe()


class DaliTrainLoader:
    """Batches of iterations start_iter .. max_iters−1 in order, by DALI; `torch_loader`'s contract and draws.

    Args:
        device: where DALI runs and the image/label tensors live: a CUDA device (mixed decoder, GPU operators)
            or "cpu" (DALI's CPU-only mode, `device_id=None`).
        num_threads: DALI CPU threads (PNG decode); default max(1, data.workers).
        plan_workers: torch DataLoader workers computing the plans; default data.workers // 2.
        resize: "exact" (OpenCV bit-exact, default) or "fast" (`fn.resize`, ±1 grey level); module docstring.
        prefetch: DALI prefetch queue depth (iterations in flight).

    Attributes:
        loader_check: None, or set by `loader.build_train_loader` to its `LoaderCheck` (the self-check against
            the torch loader that this loader passed before the run trusted it).

    Raises:
        ConfigError: `data.photometric` is on (not in the graph, module docstring).
    """

    def __init__(
        self, data: DataConfig, *, mode: Mode, num_classes: int, seed: int, rank: int = 0, start_iter: int = 0,
        max_iters: int, device: torch.device | str = "cpu", num_threads: int | None = None,
        plan_workers: int | None = None, resize: Resize = "exact", prefetch: int = 2,
    ) -> None:  # fmt: skip
        if data.photometric:
            raise ConfigError(PHOTOMETRIC_NOT_IN_DALI)
        ok, why = dali_available()
        if not ok:
            raise RuntimeError(f"the DALI loader needs NVIDIA DALI (pip install nvidia-dali-cuda130): {why}")
        if resize not in _N_GEOM:
            raise ValueError(f"resize must be 'exact' or 'fast', got {resize!r}")
        self.device = torch.device(device)
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"the DALI loader runs on cpu or cuda, not {self.device}")
        self.dataset = PlanDataset(data, mode=mode, num_classes=num_classes, seed=seed, rank=rank, resize=resize)
        self.data, self.start_iter, self.max_iters = data, start_iter, max_iters
        self.resize, self.prefetch = resize, prefetch
        self.num_threads = num_threads if num_threads is not None else max(1, data.workers)
        self.plan_workers = plan_workers if plan_workers is not None else data.workers // 2
        self.loader_check: dict | None = None

    def __len__(self) -> int:
        return max(self.max_iters - self.start_iter, 0)

    def _chunks(self, plans: Iterator[list]) -> Iterator[tuple[Iterator[list], tuple]]:
        """(plan batches, npy files of each side in their order or None) of each pipeline the run needs: one for
        all iterations without an npy side, else one per `NPY_CHUNK_ITERS` (module docstring)."""
        planner = self.dataset.planner
        npy = _is_npy(planner.main), _is_npy(planner.other)
        if not any(npy):
            yield plans, (None, None)
            return
        while chunk := list(itertools.islice(plans, NPY_CHUNK_ITERS)):
            files = tuple([it[key] for items in chunk for it in items] if is_npy else None
                          for is_npy, key in zip(npy, ("img_path", "target_img_path")))  # fmt: skip
            yield iter(chunk), files

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if len(self) == 0:
            return
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        B, w = self.data.batch_size, self.plan_workers
        # Plan workers fork here, before DALI starts its threads.
        plans = iter(DataLoader(
            self.dataset, batch_size=B, sampler=range(self.start_iter * B, self.max_iters * B), num_workers=w,
            collate_fn=_as_list, prefetch_factor=4 if w > 0 else None,
        ))  # fmt: skip
        planner = self.dataset.planner
        with_target = planner.other is not None
        n_img = _n_inputs(_is_npy(planner.main), self.resize)
        n_target = _n_inputs(_is_npy(planner.other), self.resize) if with_target else 0

        def feeder(src: Iterator[list]):
            def feed():
                items = next(src)  # StopIteration ends the DALI epoch after the last iteration
                cols = [[it["img"][k] for it in items] for k in range(n_img)]
                cols.append([it["gt"] for it in items])
                cols += [[it["target_img"][k] for it in items] for k in range(n_target)]
                cols.append([np.array(it["rcs_class"], np.int64) for it in items])
                cols.append([np.array(it["failed"], np.int64) for it in items])
                cols.append([it["valid_hw"] for it in items])
                if with_target:
                    cols.append([it["target_valid_hw"] for it in items])
                return tuple(cols)

            return feed

        gpu = self.device.type == "cuda"
        device_id = None  # DALI's CPU-only mode
        if gpu:
            device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
        names = [n for n in _OUTPUTS if with_target or n not in _TARGET_OUTPUTS]
        for src, files in self._chunks(plans):
            pipe = _build_pipeline(
                feeder(src), n_inputs=n_img + n_target + (5 if with_target else 4), batch_size=B,
                device="gpu" if gpu else "cpu", device_id=device_id, num_threads=self.num_threads,
                resize=self.resize, crop=tuple(self.data.crop), with_target=with_target, prefetch=self.prefetch,
                files=files,
            )  # fmt: skip
            for (out,) in DALIGenericIterator([pipe], names, size=-1):
                out["gt"] = out["gt"].long()
                yield out
            del pipe  # its threads and buffers go before the next chunk's pipeline starts
