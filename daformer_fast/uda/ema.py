"""Mean-teacher EMA update (docs/recipe.md §2.2 step 1; DACS `_update_ema`).

The teacher follows the student by θ_T ← a·θ_T + (1 − a)·θ_S with a = min(1 − 1/(t + 1), α), where t is the
0-based iteration; at t = 0 the teacher is a copy of the student. Only parameters take part: the original never
averages buffers, so the teacher's BatchNorm running statistics come from its own forward passes (§2.3), and
changing that would be a method change, not a speed-up.

The update runs as multi-tensor `torch._foreach_*` ops (one launch per op for all parameters) instead of the
original's per-parameter Python loop, with the original's three roundings (a·θ_T, (1 − a)·θ_S, their sum; DACS
`_update_ema` writes `alpha * ema + (1 - alpha) * param`). The weights a and 1 − a are computed on the host in float64
(`ema_weights`) and read by the device ops from a tensor, so the update of every iteration is the same kernels on
different data: nothing synchronises with the device, and a captured CUDA graph replays it (`daformer_fast.graphs`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

__all__ = ["ema_weight", "ema_weights", "update_ema"]


def ema_weight(t: int, alpha: float) -> float:
    """Teacher weight a at iteration t: min(1 − 1/(t + 1), alpha); 0 at t = 0 (a plain copy).

    The ramp lets the early teacher track the quickly changing student (a = 0.5 at t = 1, 0.9 at t = 9) before the
    momentum saturates at alpha (from t = 999 on for alpha = 0.999).
    """
    if t < 0:
        raise ValueError(f"iteration t must be >= 0, got {t}")
    return min(1.0 - 1.0 / (t + 1), alpha)


def ema_weights(t: int, alpha: float) -> torch.Tensor | None:
    """[a, 1 − a] of iteration t as a float32 CPU tensor (each rounded once from float64, as the original's Python
    floats are when they scale a float32 tensor), or None at t = 0, where the teacher becomes a copy."""
    if t == 0:
        return None
    a = ema_weight(t, alpha)
    return torch.tensor([a, 1.0 - a], dtype=torch.float64).float()


@torch.no_grad()
def update_ema(
    teacher_params: Iterable[torch.Tensor],
    student_params: Iterable[torch.Tensor],
    weights: torch.Tensor | None,
) -> None:
    """In-place EMA of the teacher parameters toward the student's, in matching enumeration order.

    Args:
        teacher_params: teacher parameters (e.g. `teacher.parameters()`), updated in place.
        student_params: student parameters in the same order and with the same shapes.
        weights: `ema_weights(t, alpha)` on the parameters' device; None copies the student (t = 0).
    """
    teacher: Sequence[torch.Tensor] = list(teacher_params)
    student: Sequence[torch.Tensor] = list(student_params)
    if len(teacher) != len(student):
        raise ValueError(f"teacher has {len(teacher)} parameters but student has {len(student)}")
    if not teacher:
        return
    # No .detach() per tensor (2 ops per parameter, ~2,200 at MiT-B5): under no_grad neither the in-place writes
    # nor the reads of the student are recorded by autograd.
    if weights is None:
        # An exact copy (not 0·θ_T + 1·θ_S), so an uninitialised or non-finite teacher cannot leak through.
        torch._foreach_copy_(teacher, student)
        return
    torch._foreach_mul_(teacher, weights[0])
    torch._foreach_add_(teacher, torch._foreach_mul(student, weights[1]))
