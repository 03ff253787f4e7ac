"""Depthwise convolution (groups = channels), with CPU bf16 autocast computed in fp32.

Why: under CPU bf16 autocast, torch's depthwise convolution backward produced sporadic garbage weight gradients
during demo training (|g| up to 5e31 in the DAFormer head's dilated depthwise convolutions, at different steps in two
runs of the same seed; none in fp32). Finite-but-large ones pass any NaN/inf guard and freeze the parameter in AdamW's
second moment for the rest of a short run. Running the depthwise convolutions in fp32 on CPU (they are a sliver of
the step's FLOPs and not slower there) removed every skipped step and brought the bf16 demo back to the fp32 result
(README, Results). Autocast on CUDA is left as it is: cuDNN's kernels are not affected by this.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["depthwise_conv2d"]


def depthwise_conv2d(
    x_BChw: torch.Tensor, weight_C1kk: torch.Tensor, bias_C: torch.Tensor | None = None, *,
    padding: int | tuple[int, int] = 1, dilation: int | tuple[int, int] = 1,
) -> torch.Tensor:  # fmt: skip
    """`F.conv2d(x, weight, bias, padding=padding, dilation=dilation, groups=C)`, stride 1; fp32 under CPU autocast."""
    C = x_BChw.shape[1]
    if x_BChw.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            bias = None if bias_C is None else bias_C.float()
            return F.conv2d(x_BChw.float(), weight_C1kk.float(), bias, padding=padding, dilation=dilation, groups=C)
    return F.conv2d(x_BChw, weight_C1kk, bias_C, padding=padding, dilation=dilation, groups=C)
