"""FLOPs of one DAFormer training iteration, counted from the model rather than hard-coded.

`count_step_flops` runs one eager fp32 step under `torch.utils.flop_counter.FlopCounterMode`, which counts every
aten matmul-like op the step dispatches, forward and backward (the autograd engine carries the mode into the
backward): convolution, mm/addmm/bmm/baddbmm and SDPA, at 2 FLOPs per multiply-add. Not counted: elementwise ops,
norms, softmax, interpolation, the losses, the EMA and AdamW updates — a few percent of the total, left out as
MFU conventionally does. The step is counted with `kernels.impl=reference` because FlopCounterMode has no formula
for the Triton custom ops nor for PyTorch's CPU flash-attention op; the explicit q·kᵀ / p·v matmuls of the reference
attention are the same arithmetic.

Correction: FlopCounterMode's formula for `aten.convolution_backward` (torch 2.11–2.14) computes the
weight-gradient term as one dense convolution, ignoring `groups`, so a depthwise 3×3 over C channels is counted C
times too high (the DAFormer head's separable ASPP and MiT's Mix-FFN are depthwise). Here each gradient of a
convolution costs exactly what its forward costs (grad_input is the transposed convolution of grad_output with the
same weight; grad_weight pairs every input element with every output element the forward did), and the forward
count already divides by groups through the weight shape.
"""

from __future__ import annotations

import copy
import math

import torch
from torch.utils.flop_counter import FlopCounterMode

from daformer_fast.config import Config
from daformer_fast.ops.dispatch import default_impl, set_default_impl
from daformer_fast.build import build_training

__all__ = ["conv_flops", "count_step_flops", "flop_counter"]

aten = torch.ops.aten


def conv_flops(x_shape, w_shape, out_shape, transposed: bool) -> int:
    """2·MACs of one convolution; the weight (C_out, C_in/groups, k...) already carries the grouping."""
    batch = x_shape[0]
    # A transposed convolution runs the kernel over every input position instead of every output position.
    positions = math.prod(x_shape[2:] if transposed else out_shape[2:])
    return 2 * batch * math.prod(w_shape) * positions


def _conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                         _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:  # fmt: skip
    # The forward's output has grad_output's shape; one forward-sized convolution per gradient asked for.
    return conv_flops(x_shape, w_shape, grad_out_shape, transposed) * (int(output_mask[0]) + int(output_mask[1]))


def flop_counter() -> FlopCounterMode:
    """A FlopCounterMode with the grouped-convolution backward fixed (module docstring)."""
    return FlopCounterMode(display=False, custom_mapping={aten.convolution_backward: _conv_backward_flops})


def count_step_flops(
    cfg: Config, state: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], t: int, device: torch.device
) -> tuple[int, dict[str, int]]:
    """FLOPs of one step of `cfg.train.path` from the student weights `state`, counted in eager fp32 with the
    plain-PyTorch (reference) ops.

    Returns (total, per-op totals). Precision does not change the arithmetic; compile fuses elementwise work the
    count leaves out anyway.
    """
    import dataclasses

    r = dataclasses.replace
    cfg = r(cfg, train=r(cfg.train, precision="fp32", compile=False), kernels=r(cfg.kernels, impl="reference"))
    previous = default_impl()
    try:
        _, step, _ = build_training(cfg, device, initial_state=state)
        with flop_counter() as counter:
            step(copy.copy(batch), t)
        by_op = {str(k): int(v) for k, v in counter.get_flop_counts()["Global"].items()}
        return int(counter.get_total_flops()), by_op
    finally:
        set_default_impl(previous)
