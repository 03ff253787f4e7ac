"""Training loader choice: `data.loader` = torch | dali | auto (DALI on a CUDA device when it imports).

Both loaders yield the batches of `torch_loader`'s contract for iterations start_iter .. max_iters−1, drawn
identically, so a run may switch loaders at a resume. `import daformer_fast.data.loader` never imports DALI.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch

from daformer_fast.config import DataConfig
from daformer_fast.data.dali_loader import DaliTrainLoader, dali_available
from daformer_fast.data.plan import Mode
from daformer_fast.data.torch_loader import TrainDataset, build_torch_loader
from daformer_fast.utils import log_once

__all__ = ["build_train_loader"]

log = logging.getLogger("daformer_fast.data")


def build_train_loader(
    data_cfg: DataConfig, *, mode: Mode, num_classes: int, seed: int, rank: int = 0, start_iter: int = 0,
    max_iters: int, device: torch.device | str = "cpu",
) -> Iterable[dict[str, torch.Tensor]]:  # fmt: skip
    """The loader `data_cfg.loader` asks for; "auto" = DALI on CUDA when importable, the torch loader otherwise.

    Raises:
        RuntimeError: `loader="dali"` but `nvidia.dali` cannot be imported.
    """
    device = torch.device(device)
    choice = data_cfg.loader
    if choice == "auto":
        ok, why = dali_available()
        if device.type != "cuda":
            choice = "torch"
            log_once(log, f"data.loader=auto: torch DataLoader (device is {device}, DALI is used on CUDA devices only)")
        elif not ok:
            choice = "torch"
            log_once(log, f"data.loader=auto: torch DataLoader (NVIDIA DALI does not import: {why})")
        else:
            choice = "dali"
    if choice == "dali":
        ok, why = dali_available()
        if not ok:
            raise RuntimeError(
                f"data.loader=dali but NVIDIA DALI cannot be imported ({why}); install it with "
                f"`pip install nvidia-dali-cuda130` (or -cuda120) or set data.loader=torch or auto"
            )
        return DaliTrainLoader(
            data_cfg, mode=mode, num_classes=num_classes, seed=seed, rank=rank, start_iter=start_iter,
            max_iters=max_iters, device=device,
        )  # fmt: skip
    if choice == "torch":
        dataset = TrainDataset(data_cfg, mode=mode, num_classes=num_classes, seed=seed, rank=rank)
        return build_torch_loader(
            dataset, start_iter=start_iter, max_iters=max_iters, workers=data_cfg.workers,
            pin_memory=device.type == "cuda",
        )  # fmt: skip
    raise ValueError(f"data.loader must be auto, dali or torch, got {choice!r}")
