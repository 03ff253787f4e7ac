"""Multi-head attention of MiT's efficient self-attention: softmax(q·kᵀ·scale)·v.

Three implementations, chosen by `ops.dispatch`:
- `attention_ref`: explicit q·kᵀ → softmax → ·v in the input dtype, as the original (materialises the
  B·M·N·N' probability tensor);
- `attention_sdpa`: `F.scaled_dot_product_attention` (flash / memory-efficient / math backend chosen by PyTorch),
  used by `auto`;
- the flash-style Triton kernel `daformer_fast.kernels.attention` (forward and backward), used when forced with
  `impl="triton"`.

`auto` runs SDPA until a GPU benchmark at MiT shapes shows the Triton kernel at least matching SDPA's flash path
(ops/table.py).

Legend: B batch, M heads, N query tokens, L key/value tokens (N/R² with spatial reduction R), D head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from daformer_fast.ops.dispatch import Impl, dispatch, dtype_reasons

__all__ = ["TOLERANCES", "attention", "attention_ref", "attention_sdpa", "attention_unsupported"]

# Forward/backward tolerances of fast paths against the fp32 reference, per dtype (atol, rtol).
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (2e-3, 2e-3)}


def attention_ref(q_BMND: torch.Tensor, k_BMLD: torch.Tensor, v_BMLD: torch.Tensor, scale: float) -> torch.Tensor:
    """Reference attention exactly as the original MiT computes it."""
    attn_BMNL = (q_BMND @ k_BMLD.transpose(-2, -1)) * scale
    attn_BMNL = attn_BMNL.softmax(dim=-1)
    return attn_BMNL @ v_BMLD


def attention_sdpa(q_BMND: torch.Tensor, k_BMLD: torch.Tensor, v_BMLD: torch.Tensor, scale: float) -> torch.Tensor:
    """`F.scaled_dot_product_attention` (flash, memory-efficient or math backend, chosen by PyTorch): what `auto`
    runs until the kernel is measured faster."""
    return F.scaled_dot_product_attention(q_BMND, k_BMLD, v_BMLD, scale=scale)


def attention_unsupported(
    dtypes: tuple[torch.dtype, ...], q_BMND: torch.Tensor, k_BMLD: torch.Tensor, v_BMLD: torch.Tensor, scale: float
) -> list[str]:
    """Reasons the Triton kernel cannot take these inputs, from static properties only."""
    reasons = dtype_reasons("dtypes", (q_BMND, k_BMLD, v_BMLD), dtypes, same=True)
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
    return dispatch("attention", impl, q_BMND, k_BMLD, v_BMLD, scale)
