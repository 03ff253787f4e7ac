"""Learning-rate schedule: mmcv 1.3.7 `PolyLrUpdaterHook` with linear warmup (docs/recipe.md §1.5).

    regular(t) = (lr0 − min_lr) · (1 − t / max_iters)^power + min_lr
    lr(t)      = regular(t) · (1 − (1 − t / warmup_iters) · (1 − warmup_ratio))   if warmup and t < warmup_iters
               = regular(t)                                                       otherwise

Two quirks of the original are kept on purpose: the warmup factor multiplies the already-decayed poly value (not lr0),
and min_lr is not clipped to lr0, so the `poly10` ablation (min_lr 1e-4 > backbone lr 6e-5) gives a *rising*
backbone lr. The lr is evaluated on the host per param group from its `initial_lr` (see
`models.segmentor.param_groups`); a fused optimizer reads it from a device tensor that `set_lrs` fills in place.
"""

from __future__ import annotations

import torch

from daformer_fast.config import ScheduleConfig

__all__ = ["lr_at", "set_lrs"]


def lr_at(t: int, lr0: float, cfg: ScheduleConfig, max_iters: int) -> float:
    """Learning rate at 0-based iteration t for a group whose initial lr is lr0."""
    if cfg.warmup not in ("linear", "none"):
        raise ValueError(f"unknown warmup {cfg.warmup!r}; expected 'linear' or 'none'")
    if max_iters < 1:
        raise ValueError(f"max_iters must be >= 1, got {max_iters}")
    coeff = (1.0 - t / max_iters) ** cfg.power
    lr = (lr0 - cfg.min_lr) * coeff + cfg.min_lr
    if cfg.warmup == "linear" and t < cfg.warmup_iters:
        # mmcv: k = (1 − t/warmup_iters)(1 − ratio); warmup_lr = regular_lr · (1 − k).
        k = (1.0 - t / cfg.warmup_iters) * (1.0 - cfg.warmup_ratio)
        lr = lr * (1.0 - k)
    return lr


def set_lrs(optimizer: torch.optim.Optimizer, t: int, cfg: ScheduleConfig, max_iters: int) -> None:
    """Set every param group's lr for iteration t from its `initial_lr` (call before the step, as mmcv's
    `before_train_iter` does).

    A fused optimizer keeps each lr in a float32 tensor on its parameters' device, written in place (a fill kernel,
    no synchronisation): the update kernels then read it from memory, so the same kernels serve every iteration and
    a captured CUDA graph replays with the current lr. A float lr is rebuilt as such a tensor (the first step, or
    after `load_state_dict` brought a CPU copy back)."""
    fused = bool(optimizer.defaults.get("fused"))
    for group in optimizer.param_groups:
        if "initial_lr" not in group:
            raise ValueError("param group has no 'initial_lr'; build groups with models.segmentor.param_groups")
        lr = lr_at(t, group["initial_lr"], cfg, max_iters)
        if not fused:
            group["lr"] = lr
            continue
        device = group["params"][0].device
        current = group["lr"]
        if isinstance(current, torch.Tensor) and current.device == device and current.dtype == torch.float32:
            current.fill_(lr)
        else:
            group["lr"] = torch.full((), lr, dtype=torch.float32, device=device)
