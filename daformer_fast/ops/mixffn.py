"""The middle of MiT's Mix-FFN: depthwise 3×3 conv (padding 1, bias) then exact GELU, on the token layout.

- `dwconv_gelu_ref`: the original's computation, tokens → (B, C, h, w) → grouped conv → tokens → GELU; the
  definition of correctness;
- the fused Triton kernel `daformer_fast.kernels.mixffn` (forward and backward), which reads and writes the
  (B, N, C) tokens directly.

`auto` keeps the reference until a GPU benchmark at MiT's shapes shows the kernel beating `torch.compile` of the
reference (ops/table.py). CPU tensors reach the kernel (in Triton's interpreter) only with `impl="triton"`.

Legend: B batch, N = h·w tokens, C channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from daformer_fast.ops.depthwise import depthwise_conv2d
from daformer_fast.ops.dispatch import Impl, dispatch, dtype_reasons

__all__ = ["TOLERANCES", "dwconv_gelu", "dwconv_gelu_ref", "dwconv_gelu_unsupported"]

# Kernel against the fp32 reference, (atol, rtol) per dtype. dweight and dbias sum over all B·N tokens in a different
# order than PyTorch's conv backward, so their fp32 rtol is looser.
TOLERANCES = {
    torch.float32: {"forward": (1e-5, 1e-5), "dx": (1e-5, 1e-5), "dweight": (1e-5, 1e-4)},
    torch.bfloat16: {"forward": (2e-2, 2e-2), "dx": (2e-2, 2e-2), "dweight": (2e-2, 2e-2)},
    torch.float16: {"forward": (2e-3, 2e-3), "dx": (2e-3, 2e-3), "dweight": (2e-3, 2e-3)},
}


def dwconv_gelu_ref(
    x_BNC: torch.Tensor, weight_C133: torch.Tensor, bias_C: torch.Tensor, h: int, w: int
) -> torch.Tensor:
    """GELU(depthwise conv3x3(x) + bias) exactly as the original MiT DWConv + nn.GELU compute it."""
    B, N, C = x_BNC.shape
    x_BChw = x_BNC.transpose(1, 2).reshape(B, C, h, w)
    y_BChw = depthwise_conv2d(x_BChw, weight_C133, bias_C, padding=1)  # fp32 under CPU autocast (see there)
    return F.gelu(y_BChw.flatten(2).transpose(1, 2))


def dwconv_gelu_unsupported(
    dtypes: tuple[torch.dtype, ...],
    x_BNC: torch.Tensor,
    weight_C133: torch.Tensor,
    bias_C: torch.Tensor,
    h: int,
    w: int,
) -> list[str]:
    """Reasons the Triton kernel cannot take these inputs, from static properties only."""
    reasons = dtype_reasons("dtypes", (x_BNC, weight_C133, bias_C), dtypes)
    C = x_BNC.shape[-1]
    if x_BNC.ndim != 3 or x_BNC.shape[1] != h * w or weight_C133.shape != (C, 1, 3, 3) or bias_C.shape != (C,):
        reasons.append(
            f"shapes x {tuple(x_BNC.shape)}, weight {tuple(weight_C133.shape)}, bias {tuple(bias_C.shape)}, h·w {h * w}"
        )
    return reasons


def dwconv_gelu(
    x_BNC: torch.Tensor,
    weight_C133: torch.Tensor,
    bias_C: torch.Tensor,
    h: int,
    w: int,
    impl: Impl | None = None,
) -> torch.Tensor:
    """Depthwise 3×3 conv + bias + exact GELU on (B, N, C) tokens of an h×w map. Equivalent PyTorch: `dwconv_gelu_ref`.

    impl: "reference", "triton" (ValueError listing the reasons when the kernel cannot take the inputs), "auto"
    (see the module docstring) or None for the process default.
    """
    return dispatch("dwconv_gelu", impl, x_BNC, weight_C133, bias_C, h, w)
