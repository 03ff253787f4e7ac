"""The torch training loader: executes the sample plans (`plan`) with OpenCV in DataLoader workers.

Item `k` of `TrainDataset` is sample `j = k mod B` of iteration `t = k div B` on this rank; `plan.ItemPlanner`
makes all of its random decisions from (seed, rank, t, j), so a resumed run draws exactly the batches an
uninterrupted run would, whatever the number of workers. The loader's state is just the iteration to start from.
This module decodes the images (an image that does not decode is skipped by the planner), resizes them, and cuts,
flips and pads the planned crop. From an npy cache (`npy_cache`) nothing is decoded or resized: each `.npy` is
memory-mapped and only the rows and columns of the crop box are read.

Batch contract (both loaders): `img` uint8 (B,3,h,w) RGB, `gt` int64 (B,h,w) with 255 = ignore, `target_img`
uint8 (B,3,h,w) in `dacs` mode, `rcs_class` int64 (B,) (−1 without RCS), `failed` int64 (B,) the number of
unreadable files skipped while drawing each sample, `valid_hw` int64 (B,2) the (h, w) of real pixels in each `img`
(less than the crop only for images smaller than the crop, padded at the bottom/right), and `target_valid_hw`
likewise for `target_img`. Normalisation happens on the device: `pipeline.normalize(batch["img"],
batch["valid_hw"])`, which also zeroes the padding as the original does.

With `data.photometric` each crop gets its planned PhotoMetricDistortion (`photometric.apply_photometric`) after the
crop and flip, on its real pixels only: the original distorts the crop before Pad (docs/architectures.md §3), and
every step of the distortion is per pixel, so the padding stays 0.
"""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from daformer_fast.config import DataConfig
from daformer_fast.data.datasets import DatasetError, read_image, resize_image
from daformer_fast.data.npy_cache import read_npy_crop
from daformer_fast.data.photometric import apply_photometric
from daformer_fast.data.pipeline import apply_crop
from daformer_fast.data.plan import ItemPlanner, Mode, SidePlan

__all__ = ["FailureMonitor", "TrainDataset", "build_torch_loader", "decode_image"]


def decode_image(path: Path) -> tuple[tuple[int, int], np.ndarray]:
    """The torch loader's `plan.ImageReader`: decode with OpenCV (`datasets.read_image`)."""
    img = read_image(path)
    return img.shape[:2], img


def _crop_image(side: SidePlan, crop: tuple[int, int]) -> torch.Tensor:
    """The planned crop of the decoded image: resize, cut, flip, pad, then the planned photometric distortion of the
    real pixels; (3, h, w) uint8. An npy cache image (no decoded image in the plan, already at `size_hw`) is cut from
    its memory map instead."""
    if side.image is None:
        y0, y1, x0, x1 = side.box
        part = read_npy_crop(side.img_path, side.box)  # apply_crop copies it out of the map
        out = apply_crop(part, (0, y1 - y0, 0, x1 - x0), side.flip, crop, 0)
        if not out.flags.writeable:  # a full-width unflipped crop is still the read-only map itself
            out = out.copy()
    else:
        img = resize_image(side.image, (side.size_hw[1], side.size_hw[0]))
        out = apply_crop(img, side.box, side.flip, crop, 0)
    if side.photometric is not None:
        h, w = side.valid_hw
        if (h, w) == out.shape[:2]:  # out may be the decoded image itself: replace it, do not write into it
            out = apply_photometric(out, side.photometric)
        else:  # padded, so a fresh array
            out[:h, :w] = apply_photometric(out[:h, :w], side.photometric)
    return torch.from_numpy(out).permute(2, 0, 1).contiguous()


class TrainDataset(Dataset):
    """Map-style dataset over the global sample counter k = iteration · batch_size + j (module docstring).

    `planner` (a `plan.ItemPlanner`) holds the sample lists (`planner.main`, `planner.other`) and the rare class
    sampler (`planner.rcs`).
    """

    def __init__(
        self, data: DataConfig, *, mode: Mode, num_classes: int, seed: int, rank: int = 0, length: int | None = None
    ) -> None:
        self.data = data
        self.planner = ItemPlanner(data, mode=mode, num_classes=num_classes, seed=seed, rank=rank,
                                   read_image=decode_image)  # fmt: skip
        self.length = length if length is not None else 2**62

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        plan = self.planner.plan(k)
        main, crop = plan.labelled, self.data.crop
        out = {
            "img": _crop_image(main, crop),
            "gt": torch.from_numpy(main.label.astype(np.int64)),
            "rcs_class": torch.tensor(main.rcs_class, dtype=torch.int64),
            "valid_hw": torch.tensor(main.valid_hw, dtype=torch.int64),
        }
        if plan.unlabelled is not None:
            out["target_img"] = _crop_image(plan.unlabelled, crop)
            out["target_valid_hw"] = torch.tensor(plan.unlabelled.valid_hw, dtype=torch.int64)
        out["failed"] = torch.tensor(plan.failed, dtype=torch.int64)
        return out


def build_torch_loader(
    dataset: TrainDataset, *, start_iter: int, max_iters: int, workers: int, pin_memory: bool = False
) -> DataLoader:
    """Batches of iterations start_iter .. max_iters−1, in order."""
    B = dataset.data.batch_size
    indices = range(start_iter * B, max_iters * B)
    return DataLoader(
        dataset, batch_size=B, sampler=indices, num_workers=workers, pin_memory=pin_memory, drop_last=True,
        persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=_ignore_sigterm if workers > 0 else None,
    )  # fmt: skip


def _ignore_sigterm(worker_id: int) -> None:
    """Schedulers send SIGTERM to the whole process group on preemption. A worker that dies of it (or exits on it)
    makes the main process raise before it can checkpoint: torch's SIGCHLD check, or a batch the worker queued just
    before exiting that can no longer be received (its shared-memory handle goes through the dead worker). The worker
    ignores the signal instead and keeps serving; the main process, which got the same signal, stops after its
    current step (`trainer.StopAgreement`), and its exit ends the workers (they watch their parent)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class FailureMonitor:
    """Counts skipped samples; more than `max_ratio` of all draws failing stops the run with a clear error."""

    def __init__(self, max_ratio: float = 0.01, min_draws: int = 100) -> None:
        self.max_ratio, self.min_draws = max_ratio, min_draws
        self.failed = self.draws = 0

    def update(self, batch: dict[str, torch.Tensor]) -> None:
        failed = int(batch["failed"].sum())  # host value: the loader produced it on the CPU
        self.failed += failed
        self.draws += int(batch["failed"].numel()) * (2 if "target_img" in batch else 1) + failed
        if self.draws >= self.min_draws and self.failed > self.max_ratio * self.draws:
            raise DatasetError(
                f"{self.failed} of {self.draws} sample draws failed (> {self.max_ratio:.0%}); see the warnings "
                f"above for the files, or fix the dataset"
            )
