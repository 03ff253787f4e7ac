"""The middle of MiT's Mix-FFN: depthwise 3×3 conv (padding 1, bias) then exact GELU, on the token layout.

- `dwconv_gelu_ref`: the original's computation, tokens → (B, C, h, w) → grouped conv → tokens → GELU; the
  definition of correctness;
- the fused Triton kernel `daformer_fast.kernels.mixffn` (forward and backward), which reads and writes the
  (B, N, C) tokens directly.

`auto` keeps the reference, on CUDA as elsewhere, until a GPU benchmark at MiT's shapes shows the kernel beating
`torch.compile` of the reference (the issue's bar); none has been run yet. Flip `_AUTO_USES_TRITON` with that
measurement. CPU tensors reach the kernel (in Triton's interpreter) only with `impl="triton"`.

Legend: B batch, N = h·w tokens, C channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from daformer_fast.ops._dispatch import Impl, choose_impl, default_impl, device_reasons
from daformer_fast.ops.depthwise import depthwise_conv2d

__all__ = ["dwconv_gelu", "dwconv_gelu_ref", "TOLERANCES"]

# Kernel against the fp32 reference, (atol, rtol) per dtype. dweight and dbias sum over all B·N tokens in a different
# order than PyTorch's conv backward, so their fp32 rtol is looser.
TOLERANCES = {
    torch.float32: {"forward": (1e-5, 1e-5), "dx": (1e-5, 1e-5), "dweight": (1e-5, 1e-4)},
    torch.bfloat16: {"forward": (2e-2, 2e-2), "dx": (2e-2, 2e-2), "dweight": (2e-2, 2e-2)},
    torch.float16: {"forward": (2e-3, 2e-3), "dx": (2e-3, 2e-3), "dweight": (2e-3, 2e-3)},
}
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Set to True only with a GPU measurement showing the kernel faster than torch.compile of the reference.
_AUTO_USES_TRITON = False


def dwconv_gelu_ref(
    x_BNC: torch.Tensor, weight_C133: torch.Tensor, bias_C: torch.Tensor, h: int, w: int
) -> torch.Tensor:
    """GELU(depthwise conv3x3(x) + bias) exactly as the original MiT DWConv + nn.GELU compute it."""
    B, N, C = x_BNC.shape
    x_BChw = x_BNC.transpose(1, 2).reshape(B, C, h, w)
    y_BChw = depthwise_conv2d(x_BChw, weight_C133, bias_C, padding=1)  # fp32 under CPU autocast (see there)
    return F.gelu(y_BChw.flatten(2).transpose(1, 2))


def _triton_unsupported(
    x_BNC: torch.Tensor, weight_C133: torch.Tensor, bias_C: torch.Tensor, h: int, w: int, impl: Impl | None = "triton"
) -> list[str]:
    """Reasons the Triton kernel cannot take these inputs (for this `impl`), from static properties only."""
    reasons = device_reasons((x_BNC, weight_C133, bias_C), impl)
    dtypes = (x_BNC.dtype, weight_C133.dtype, bias_C.dtype)
    if any(d not in _KERNEL_DTYPES for d in dtypes):
        reasons.append(f"dtypes {', '.join(map(str, dtypes))} (need fp32/bf16/fp16)")
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
    impl = impl or default_impl()
    if impl == "reference":
        return dwconv_gelu_ref(x_BNC, weight_C133, bias_C, h, w)
    reasons = _triton_unsupported(x_BNC, weight_C133, bias_C, h, w, impl)
    if impl == "auto" and not _AUTO_USES_TRITON:
        reasons.append("auto keeps the reference until the kernel is measured faster on GPU")
    if choose_impl("dwconv_gelu", impl, reasons) == "triton":
        from daformer_fast.kernels.mixffn import dwconv_gelu_triton

        return dwconv_gelu_triton(x_BNC, weight_C133, bias_C, h, w)
    return dwconv_gelu_ref(x_BNC, weight_C133, bias_C, h, w)
