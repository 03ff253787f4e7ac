"""Multi-head attention of MiT's efficient self-attention: softmax(q·kᵀ·scale)·v.

The one switch point for attention:
- `attention_ref`: explicit q·kᵀ → softmax → ·v in the input dtype, as the original (materialises the
  B·M·N·N' probability tensor);
- `F.scaled_dot_product_attention` (flash / memory-efficient / math backend chosen by PyTorch), used by `auto`;
- the flash-style Triton kernel `daformer_fast.kernels.attention` (forward and backward), used when forced with
  `impl="triton"`.

`auto` stays on SDPA, on CUDA as elsewhere, until a GPU benchmark at MiT shapes shows the Triton kernel at least
matching SDPA's flash path (the bar issue 5 sets); none has been run yet. Flip `_AUTO_USES_TRITON` with that
measurement.

Legend: B batch, M heads, N query tokens, L key/value tokens (N/R² with spatial reduction R), D head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from daformer_fast.ops._dispatch import Impl, choose_impl, default_impl, device_reasons

__all__ = ["attention", "attention_ref", "TOLERANCES"]

# Forward/backward tolerances of fast paths against the fp32 reference, per dtype (atol, rtol).
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (2e-3, 2e-3)}


def attention_ref(q_BMND: torch.Tensor, k_BMLD: torch.Tensor, v_BMLD: torch.Tensor, scale: float) -> torch.Tensor:
    """Reference attention exactly as the original MiT computes it."""
    attn_BMNL = (q_BMND @ k_BMLD.transpose(-2, -1)) * scale
    attn_BMNL = attn_BMNL.softmax(dim=-1)
    return attn_BMNL @ v_BMLD


# Set to True only with a GPU measurement showing the kernel at least as fast as SDPA at MiT shapes.
_AUTO_USES_TRITON = False
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _triton_unsupported(
    q_BMND: torch.Tensor, k_BMLD: torch.Tensor, v_BMLD: torch.Tensor, impl: Impl | None = "triton"
) -> list[str]:
    """Reasons the Triton kernel cannot take these inputs (for this `impl`), from static properties only."""
    reasons = device_reasons((q_BMND, k_BMLD, v_BMLD), impl)
    if not (q_BMND.dtype == k_BMLD.dtype == v_BMLD.dtype) or q_BMND.dtype not in _KERNEL_DTYPES:
        reasons.append(f"dtypes {q_BMND.dtype}, {k_BMLD.dtype}, {v_BMLD.dtype} (need one of fp32/bf16/fp16)")
    if q_BMND.ndim != 4 or k_BMLD.ndim != 4 or k_BMLD.shape != v_BMLD.shape:
        reasons.append(f"shapes {tuple(q_BMND.shape)}, {tuple(k_BMLD.shape)}, {tuple(v_BMLD.shape)}")
    elif q_BMND.shape[-1] not in (32, 64, 128):
        reasons.append(f"head dim {q_BMND.shape[-1]} (need 32, 64 or 128)")
    return reasons


def attention(
    q_BMND: torch.Tensor, k_BMLD: torch.Tensor, v_BMLD: torch.Tensor, scale: float, impl: Impl | None = None
) -> torch.Tensor:
    """Scaled dot-product attention without mask or dropout. Equivalent PyTorch: `attention_ref`.

    impl: "reference" runs `attention_ref`; "triton" forces the Triton kernel (ValueError listing the reasons when it
    cannot take the inputs); "auto" runs SDPA (see the module docstring); None takes the process default.
    """
    impl = impl or default_impl()
    if impl == "reference":
        return attention_ref(q_BMND, k_BMLD, v_BMLD, scale)
    reasons = _triton_unsupported(q_BMND, k_BMLD, v_BMLD, impl)
    if impl == "auto" and not _AUTO_USES_TRITON:
        reasons.append("auto uses SDPA until the kernel is measured faster on GPU")
    # For attention the non-Triton path of the dispatcher is SDPA, not the materialising reference.
    if choose_impl("attention", impl, reasons) == "triton":
        from daformer_fast.kernels.attention import attention_triton

        return attention_triton(q_BMND, k_BMLD, v_BMLD, scale)
    return F.scaled_dot_product_attention(q_BMND, k_BMLD, v_BMLD, scale=scale)
