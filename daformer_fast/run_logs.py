"""What a training run reports while it runs: `metrics.jsonl`, TensorBoard scalars and the progress bar.

Step outputs are summed on the device and read once per log interval (the interval's one host sync); a row holds
the interval's mean losses, the learning rates, ms per step, images per second, the share of time spent waiting for
data, peak memory and the number of unreadable files skipped so far. Only rank 0 writes (`enabled`); the others
keep the bar hidden and write nothing, but still sum, so every rank reads its device at the same iterations.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from daformer_fast.utils import json_safe

__all__ = ["MetricsLog", "peak_memory_gib"]


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated CUDA memory on a GPU; the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # peak RSS (KiB on Linux)


class MetricsLog(contextlib.ExitStack):
    """The run's metrics sinks; a context manager that closes them."""

    def __init__(self, work_dir: Path, start: int, max_iters: int, imgs_per_step: int, device: torch.device,
                 *, enabled: bool, first_row: dict | None = None) -> None:  # fmt: skip
        """first_row: fields written once, into the run's first training row (e.g. the loader's self-check)."""
        super().__init__()
        self.imgs_per_step, self.device, self.enabled = imgs_per_step, device, enabled
        self.first_row = dict(first_row or {})
        self.sums: dict[str, torch.Tensor] = {}
        self.count, self.wait, self.start = 0, 0.0, time.perf_counter()
        self.bar = self.enter_context(tqdm(total=max_iters, initial=start, disable=not enabled, dynamic_ncols=True,
                                           desc="train"))  # fmt: skip
        self.file = self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only where it writes

            self.writer = SummaryWriter(str(work_dir / "tb"), purge_step=start + 1)
            self.callback(self.writer.close)
            self.file = self.enter_context(open(work_dir / "metrics.jsonl", "a", encoding="utf-8"))

    def add(self, out: dict[str, torch.Tensor], wait: float) -> None:
        """One step's outputs (0-dim device tensors) and the seconds it waited for its batch."""
        for k, v in out.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
        self.count += 1
        self.wait += wait
        self.bar.update(1)

    def _read(self) -> tuple[dict[str, float], float, float]:
        """(means of the interval, seconds per step, data-wait fraction); resets the interval."""
        elapsed = time.perf_counter() - self.start
        means = {k: float(v) / self.count for k, v in self.sums.items()}  # the interval's one sync
        per_step, wait = elapsed / max(self.count, 1), self.wait / max(elapsed, 1e-9)
        self.sums, self.count, self.wait, self.start = {}, 0, 0.0, time.perf_counter()
        return means, per_step, wait

    def _write(self, row: dict, prefix: str) -> None:
        self.file.write(json.dumps(json_safe(row)) + "\n")
        self.file.flush()
        for k, v in row.items():
            if k != "step" and isinstance(v, int | float) and not isinstance(v, bool):
                self.writer.add_scalar(f"{prefix}/{k}", v, row["step"])

    def write_train(self, t_done: int, optimizer: torch.optim.Optimizer, **extra) -> dict[str, float]:
        """Read the interval (every rank) and write its row (rank 0); returns the interval's mean outputs."""
        means, per_step, wait_frac = self._read()
        if self.enabled:
            lrs = {g["name"]: float(g["lr"]) for g in optimizer.param_groups}  # fused: a device tensor
            row = {"step": t_done, "lr": lrs.get("backbone"), "lr_head": lrs.get("head"), **means,
                   "step_ms": per_step * 1e3, "img_s": self.imgs_per_step / per_step,
                   "data_wait_pct": 100 * wait_frac, "mem_gib": peak_memory_gib(self.device), **extra,
                   **self.first_row}  # fmt: skip
            self.first_row = {}
            self._write(row, "train")
            losses = {k: f"{means[k]:.3f}" for k in ("loss_src", "loss_mic") if k in means}
            self.bar.set_postfix(**losses, img_s=f"{row['img_s']:.1f}")
        return means

    def write_eval(self, t_done: int, metrics: dict) -> None:
        """An evaluation's row (all metrics, per-class ones as nested dicts); mIoU, mAcc and aAcc to TensorBoard."""
        if self.enabled:
            self.file.write(json.dumps(json_safe({"step": t_done, **metrics})) + "\n")
            self.file.flush()
            for k in ("mIoU", "mAcc", "aAcc"):
                self.writer.add_scalar(f"val/{k}", metrics[k], t_done)
