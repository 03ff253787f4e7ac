"""Training samples with randomness derived from (seed, rank, iteration, sample index), and the torch DataLoader.

Item `k` of `TrainDataset` is sample `j = k mod B` of iteration `t = k div B` on this rank. Every random choice of
that item (RCS class and image, crop offsets, flip, target image) comes from a numpy Generator seeded with
(seed, rank, t, j), so a resumed run draws exactly the batches an uninterrupted run would, whatever the number of
workers, and ranks draw different batches. The loader's state is just the iteration to start from.

Batch contract (both loaders): `img` uint8 (B,3,h,w) RGB, `gt` int64 (B,h,w) with 255 = ignore, `target_img`
uint8 (B,3,h,w) in `dacs` mode, `rcs_class` int64 (B,) (−1 without RCS), `failed` int64 (B,) the number of
unreadable files skipped while drawing each sample, `valid_hw` int64 (B,2) the (h, w) of real pixels in each `img`
(less than the crop only for images smaller than the crop, padded at the bottom/right), and `target_valid_hw`
likewise for `target_img`. Normalisation happens on the device: `pipeline.normalize(batch["img"],
batch["valid_hw"])`, which also zeroes the padding as the reference does.

Without RCS, the reference draws (source, target) pairs from a shuffled |S|·|T| product; here each is drawn
uniformly and independently per item, which has the same distribution for a run of 40k iterations.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from daformer_fast.config import DataConfig, DatasetConfig
from daformer_fast.data.datasets import DatasetError, Sample, list_samples, read_image, read_label
from daformer_fast.data.pipeline import resize_pair, sample_crop, valid_size
from daformer_fast.data.rcs import RareClassSampler, load_class_stats

__all__ = ["FailureMonitor", "TrainDataset", "build_torch_loader", "check_label_values", "item_rng"]

log = logging.getLogger("daformer_fast.data")
Mode = Literal["dacs", "source_only", "target_only"]
_MAX_REDRAWS = 10


def item_rng(seed: int, rank: int, iteration: int, index: int, stream: int) -> np.random.Generator:
    """The Generator of one sample's draws; stream 0 = labelled (source) side, 1 = unlabelled (target) side."""
    return np.random.default_rng(np.random.SeedSequence([seed, rank, iteration, index, stream]))


def check_label_values(lbl: np.ndarray, num_classes: int, path) -> None:
    """Labels must hold train ids in [0, num_classes) or 255."""
    counts = np.bincount(lbl.ravel(), minlength=256)
    bad = [v for v in np.flatnonzero(counts) if num_classes <= v < 255]
    if bad:
        shown = ", ".join(str(v) for v in bad[:8]) + (", ..." if len(bad) > 8 else "")
        raise DatasetError(f"{path}: label values {shown} outside 0..{num_classes - 1} and 255 (not train ids?)")


@dataclass
class _Side:
    cfg: DatasetConfig
    samples: list[Sample]
    labelled: bool


class TrainDataset(Dataset):
    """Map-style dataset over the global sample counter k = iteration · batch_size + j (module docstring)."""

    def __init__(
        self, data: DataConfig, *, mode: Mode, num_classes: int, seed: int, rank: int = 0, length: int | None = None
    ) -> None:
        self.data, self.mode, self.num_classes, self.seed, self.rank = data, mode, num_classes, seed, rank
        main_cfg = data.target if mode == "target_only" else data.source
        self.main = _Side(main_cfg, list_samples(main_cfg, need_labels=True), labelled=True)
        self.other = None
        if mode == "dacs":
            self.other = _Side(data.target, list_samples(data.target, need_labels=False), labelled=False)
        self.rcs = None
        if mode == "dacs" and data.rcs.enabled:
            stats = load_class_stats(main_cfg.root)
            self.rcs = RareClassSampler.from_stats(
                stats, self.main.samples, data.rcs.class_temp, data.rcs.min_pixels, data.rcs.min_crop_ratio
            )
        self.length = length if length is not None else 2**62

    def __len__(self) -> int:
        return self.length

    def _read(self, side: _Side, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        s = side.samples[i]
        img = read_image(s.img)
        lbl = None
        if side.labelled:
            lbl = read_label(s.label)
            if lbl.shape != img.shape[:2]:
                raise _Fatal(
                    f"image/label size mismatch: {s.img} is {img.shape[1]}x{img.shape[0]}, "
                    f"{s.label} is {lbl.shape[1]}x{lbl.shape[0]}"
                )
            try:
                check_label_values(lbl, self.num_classes, s.label)
            except DatasetError as e:
                raise _Fatal(str(e)) from None  # wrong ids (e.g. unconverted labels) are not an unreadable file
        return img, lbl

    def _draw_readable(self, side: _Side, rng: np.random.Generator, use_rcs: bool, read: Callable):
        """Draw sample indices (RCS or uniform) until `read(side, i)` succeeds: (rcs class or −1, what `read`
        returned, files skipped). Unreadable files are skipped with a warning unless `data.strict`; bad data that
        skipping would hide (`_Fatal`) stops the run."""
        failed = 0
        for _ in range(_MAX_REDRAWS):
            if use_rcs:
                c, i = self.rcs.sample(rng)
            else:
                c, i = -1, int(rng.integers(len(side.samples)))
            try:
                return c, read(side, i), failed
            except _Fatal as e:
                raise DatasetError(str(e)) from None
            except DatasetError as e:
                if self.data.strict:
                    raise
                log.warning("skipping unreadable sample: %s", e)
                failed += 1
        raise DatasetError(f"{_MAX_REDRAWS} unreadable samples in a row in {side.cfg.root}; is the dataset damaged?")

    def _draw(self, side: _Side, rng: np.random.Generator, use_rcs: bool):
        """One cropped sample of `side`: (img, lbl, rcs class or −1, files skipped, valid (h, w))."""
        c, (img, lbl), failed = self._draw_readable(side, rng, use_rcs, self._read)
        img, lbl = resize_pair(img, lbl, side.cfg.scale)
        hw = valid_size(img.shape, self.data.crop)
        img, lbl = sample_crop(
            rng, img, lbl, self.data.crop,
            cat_max_ratio=self.data.cat_max_ratio if side.labelled else 1.0,
            flip_prob=self.data.flip_prob,
            rcs_class=c if use_rcs and self.rcs.min_crop_ratio > 0 else None,
            rcs_min_pixels=self.rcs.min_crop_pixels if use_rcs else 0.0,
        )  # fmt: skip
        return img, lbl, c, failed, hw

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        t, j = divmod(int(k), self.data.batch_size)
        img, lbl, c, failed, hw = self._draw(self.main, item_rng(self.seed, self.rank, t, j, 0), self.rcs is not None)
        out = {
            "img": torch.from_numpy(img).permute(2, 0, 1).contiguous(),
            "gt": torch.from_numpy(lbl.astype(np.int64)),
            "rcs_class": torch.tensor(c, dtype=torch.int64),
            "valid_hw": torch.tensor(hw, dtype=torch.int64),
        }
        if self.other is not None:
            timg, _, _, tfailed, thw = self._draw(self.other, item_rng(self.seed, self.rank, t, j, 1), False)
            out["target_img"] = torch.from_numpy(timg).permute(2, 0, 1).contiguous()
            out["target_valid_hw"] = torch.tensor(thw, dtype=torch.int64)
            failed += tfailed
        out["failed"] = torch.tensor(failed, dtype=torch.int64)
        return out


class _Fatal(Exception):
    """Bad data that skipping would hide (size mismatch, label values that are not train ids); always stops the run."""


def build_torch_loader(
    dataset: TrainDataset, *, start_iter: int, max_iters: int, workers: int, pin_memory: bool = False
) -> DataLoader:
    """Batches of iterations start_iter .. max_iters−1, in order."""
    B = dataset.data.batch_size
    indices = range(start_iter * B, max_iters * B)
    return DataLoader(
        dataset, batch_size=B, sampler=indices, num_workers=workers, pin_memory=pin_memory, drop_last=True,
        persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=_exit_on_sigterm if workers > 0 else None,
    )  # fmt: skip


def _exit_on_sigterm(worker_id: int) -> None:
    """Schedulers send SIGTERM to the whole process group on preemption. A worker killed by it makes the main
    process raise (torch's SIGCHLD check) before it can checkpoint; a worker exiting with status 0 does not, and the
    main process, which got the same signal, stops after its current step (trainer._Preemption)."""
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(0))


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
