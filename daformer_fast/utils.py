"""Small helpers every layer shares: one-time log lines, sync-free host→device copies, strict-JSON values.

This module imports only torch and the standard library, so that `ops/`, `uda/`, `data/` and the trainer can all use
it without import cycles.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

__all__ = ["json_safe", "log_once", "to_device"]

_logged: set[tuple[str, str]] = set()


def log_once(logger: logging.Logger, msg: str, level: int = logging.INFO) -> None:
    """Log `msg` on `logger` the first time this process sees the pair, never again (decisions made per call, such
    as which implementation an op runs, would otherwise repeat every iteration)."""
    key = (logger.name, msg)
    if key not in _logged:
        _logged.add(key)
        logger.log(level, msg)


# Under torch.compile a logging call inside traced code is a graph break (an error with fullgraph=True). Marked as a
# constant result (what `torch.compiler.assume_constant_result` does), the function instead runs in Python while
# Dynamo traces, so the line is logged then and the graph holds nothing of it. The marker is set directly because
# that function imports torch._dynamo, and with it triton, which importing the ops must not do; tests/test_ops.py
# checks that torch still uses this marker.
log_once._dynamo_marked_constant = True  # type: ignore[attr-defined]


def to_device(x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Copy a (small) CPU tensor to `device` without blocking the host: pinned memory + non_blocking on CUDA, where
    a plain `.to()` from pageable memory waits for the copy; a plain copy (or nothing) elsewhere."""
    device = torch.device(device)
    if device.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def json_safe(obj: Any) -> Any:
    """`obj` with every non-finite float (NaN: a class absent from labels and predictions; inf) replaced by None,
    through dicts, lists and tuples: strict JSON has no NaN."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
