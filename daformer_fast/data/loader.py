"""Training loader choice: `data.loader` = torch | dali | auto (DALI on a CUDA device when it imports and its
self-check passes).

Both loaders yield the batches of `torch_loader`'s contract for iterations start_iter .. max_iters−1, drawn
identically, so a run may switch loaders at a resume. `import daformer_fast.data.loader` never imports DALI.

PhotoMetricDistortion (`data.photometric`, the supervised baselines' augmentation) exists in the torch loader only:
`auto` then picks the torch loader (logged once), and `dali` with it is a configuration error. Reproducing the
distortion in the DALI graph with the original's OpenCV arithmetic (fixed-point HSV, truncation) would take per-sample
operators the baselines do not need to be fast (docs/architectures.md §3).

The self-check: DALI's GPU graph cannot be tested where there is no GPU, so before a run trusts DALI it executes
the first `CHECK_BATCHES` batches of the run (iterations start_iter ..) with both loaders and compares them
(`compare_batches`). Batches are a function of (seed, rank, iteration) only (`plan`), so the check draws nothing
from the run's stream: the run then trains on the batches of start_iter .. exactly as without the check.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterable
from typing import Literal, TypedDict

import torch

from daformer_fast.config import ConfigError, DataConfig
from daformer_fast.data.dali_loader import PHOTOMETRIC_NOT_IN_DALI, DaliTrainLoader, dali_available
from daformer_fast.data.plan import Mode
from daformer_fast.data.torch_loader import TrainDataset, build_torch_loader
from daformer_fast.utils import log_once

__all__ = ["CHECK_BATCHES", "LoaderCheck", "build_train_loader", "check_dali", "compare_batches"]

log = logging.getLogger("daformer_fast.data")

CHECK_BATCHES = 2
"""Batches (iterations start_iter .. start_iter + 2 − 1) the DALI loader must reproduce before a run uses it.
Each costs one torch-loader batch decoded in the main process plus one DALI batch, once per run."""

_IMAGE_VALID = {"img": "valid_hw", "target_img": "target_valid_hw"}


class LoaderCheck(TypedDict):
    """The `loader_check` attribute of every loader `build_train_loader` returns (for train.log / metrics.jsonl).

    loader: the loader the run uses. check: "passed", the reason the DALI loader was not used, or "not run: ..."
    when DALI was not asked for. batches_compared: batches compared before the decision (0 when not run).
    """

    loader: Literal["dali", "torch"]
    check: str
    batches_compared: int


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def compare_batches(ref: list[dict], got: list[dict], resized: list[dict[str, torch.Tensor]] | None = None) -> str:
    """"" when `got` equals `ref` batch for batch, else the first difference in words.

    Images may differ by 1 grey level inside the real pixels (`valid_hw`) of samples whose image was resized
    (`resized[t][key]`: bool (B,); None = every sample resized), since two resize implementations may round
    differently; the padding, images that were not resized, labels and every other field must be equal.
    """
    if len(ref) != len(got):
        return f"{len(got)} batches instead of {len(ref)}"
    for t, (a, b) in enumerate(zip(ref, got)):
        if a.keys() != b.keys():
            return f"batch {t}: fields {sorted(b)} instead of {sorted(a)}"
        for k in a:
            x, y = a[k].cpu(), b[k].cpu()
            if x.dtype != y.dtype or x.shape != y.shape:
                return f"batch {t}, {k}: {y.dtype} {tuple(y.shape)} instead of {x.dtype} {tuple(x.shape)}"
            if k in _IMAGE_VALID:
                h, w = x.shape[-2:]
                valid = a[_IMAGE_VALID[k]].cpu()
                inside = (torch.arange(h)[None, :, None] < valid[:, 0, None, None]) & (
                    torch.arange(w)[None, None, :] < valid[:, 1, None, None])  # fmt: skip
                res = torch.ones(len(x), dtype=torch.bool) if resized is None else resized[t][k].cpu()
                tol = (inside & res[:, None, None]).to(torch.int16)[:, None]  # (B, 1, h, w), over channels
                diff = (x.to(torch.int16) - y.to(torch.int16)).abs()
                if (diff > tol).any():
                    return (f"batch {t}, {k}: {int((diff > tol).sum())} pixel values differ (max |diff| "
                            f"{int(diff.max())}; 1 is allowed in resized images, 0 in padding and unresized ones)")
            elif not torch.equal(x, y):
                return f"batch {t}, {k}: {int((x != y).sum())} values differ"
    return ""


def _resized(dali: DaliTrainLoader, n: int) -> list[dict[str, torch.Tensor]]:
    """Per batch and image field, which samples' plans resize the image (their src and planned size differ)."""
    B, planner = dali.data.batch_size, dali.dataset.planner
    out = []
    for t in range(dali.start_iter, dali.start_iter + n):
        plans = [planner.plan(t * B + j) for j in range(B)]
        flags = {"img": [p.labelled.src_hw != p.labelled.size_hw for p in plans]}
        if plans[0].unlabelled is not None:
            flags["target_img"] = [p.unlabelled.src_hw != p.unlabelled.size_hw for p in plans]
        out.append({k: torch.tensor(v) for k, v in flags.items()})
    return out


def check_dali(
    data_cfg: DataConfig, *, mode: Mode, num_classes: int, seed: int, rank: int = 0, start_iter: int = 0,
    max_iters: int, device: torch.device | str = "cpu", batches: int = CHECK_BATCHES,
) -> LoaderCheck:  # fmt: skip
    """Runs the first `batches` batches of iterations start_iter .. with the torch and the DALI loader and
    compares them (`compare_batches`); nothing of the run's draws is consumed (module docstring).

    Returns a `LoaderCheck`: loader "dali" and check "passed" when they agree, else loader "torch" and the reason
    (the first difference, or the DALI error of construction or execution, in one line). A dataset error of the
    torch loader is not a DALI failure: it is raised.
    """
    n = max(min(batches, max_iters - start_iter), 0)
    kw = dict(mode=mode, num_classes=num_classes, seed=seed, rank=rank)
    # In-process (workers=0): a handful of batches is not worth forking workers for, before the run forks its own.
    ref = list(build_torch_loader(TrainDataset(data_cfg, **kw), start_iter=start_iter, max_iters=start_iter + n,
                                  workers=0))  # fmt: skip
    try:
        dali = DaliTrainLoader(data_cfg, **kw, start_iter=start_iter, max_iters=start_iter + n, device=device,
                               plan_workers=0)  # fmt: skip
        got = [{k: v.cpu() for k, v in b.items()} for b in dali]
        reason = compare_batches(ref, got, _resized(dali, n))
    except Exception as e:  # any DALI failure means the torch loader, whatever its type
        reason = f"DALI error: {_one_line(e)}"
    finally:
        gc.collect()  # the check's DALI pipeline and its threads go before the run's loader forks its workers
    if reason:
        return {"loader": "torch", "check": reason, "batches_compared": n}
    return {"loader": "dali", "check": "passed", "batches_compared": n}


def build_train_loader(
    data_cfg: DataConfig, *, mode: Mode, num_classes: int, seed: int, rank: int = 0, start_iter: int = 0,
    max_iters: int, device: torch.device | str = "cpu",
) -> Iterable[dict[str, torch.Tensor]]:  # fmt: skip
    """The loader `data_cfg.loader` asks for, as far as the DALI self-check allows.

    "torch": the torch DataLoader. "dali": DALI after `check_dali` passes; when it fails (a difference from the
    torch loader, or any DALI error) the reason is logged once and the run continues with the torch loader.
    "auto": like "dali" on a CUDA device when NVIDIA DALI imports, else the torch loader without a check.

    The returned loader carries `loader_check` (a `LoaderCheck`: the loader used, "passed" or the reason, and the
    number of batches compared) for the run's logs.

    With `data.photometric` (module docstring) "auto" is the torch loader and "dali" an error.

    Raises:
        RuntimeError: `loader="dali"` but `nvidia.dali` cannot be imported.
        ConfigError: `loader="dali"` with `data.photometric`.
    """
    device = torch.device(device)
    choice, not_run = data_cfg.loader, f"not run: data.loader={data_cfg.loader}"
    if data_cfg.photometric and choice == "dali":
        raise ConfigError(PHOTOMETRIC_NOT_IN_DALI)
    if data_cfg.photometric and choice == "auto":
        choice, not_run = "torch", "not run: data.photometric is applied by the torch loader only"
        log_once(log, "data.loader=auto: torch DataLoader (data.photometric is applied by the torch loader only)")
    if choice == "auto":
        ok, why = dali_available()
        if device.type != "cuda":
            choice, not_run = "torch", f"not run: device is {device}"
            log_once(log, f"data.loader=auto: torch DataLoader (device is {device}, DALI is used on CUDA devices only)")
        elif not ok:
            choice, not_run = "torch", "not run: NVIDIA DALI does not import"
            log_once(log, f"data.loader=auto: torch DataLoader (NVIDIA DALI does not import: {why})")
        else:
            choice = "dali"
    if choice not in ("dali", "torch"):
        raise ValueError(f"data.loader must be auto, dali or torch, got {choice!r}")
    kw = dict(mode=mode, num_classes=num_classes, seed=seed, rank=rank, start_iter=start_iter, max_iters=max_iters)
    check: LoaderCheck = {"loader": "torch", "check": not_run, "batches_compared": 0}
    if choice == "dali":
        ok, why = dali_available()
        if not ok:
            raise RuntimeError(
                f"data.loader=dali but NVIDIA DALI cannot be imported ({why}); install it with "
                f"`pip install nvidia-dali-cuda130` (or -cuda120) or set data.loader=torch or auto"
            )
        check = check_dali(data_cfg, **kw, device=device)
        if check["loader"] == "dali":
            log_once(log, f"data.loader={data_cfg.loader}: DALI (self-check passed on {check['batches_compared']} "
                          f"batches)")  # fmt: skip
            loader = DaliTrainLoader(data_cfg, **kw, device=device)
            loader.loader_check = check
            return loader
        log_once(log, f"data.loader={data_cfg.loader}: torch DataLoader (DALI self-check failed: {check['check']})",
                 logging.WARNING)  # fmt: skip
    loader = build_torch_loader(TrainDataset(data_cfg, mode=mode, num_classes=num_classes, seed=seed, rank=rank),
                                start_iter=start_iter, max_iters=max_iters, workers=data_cfg.workers,
                                pin_memory=device.type == "cuda")  # fmt: skip
    loader.loader_check = check
    return loader
