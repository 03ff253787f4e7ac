"""Multi-head attention of MiT's efficient self-attention: softmax(q·kᵀ·scale)·v.

The one switch point for attention:
- `attention_ref`: explicit q·kᵀ → softmax → ·v in the input dtype, as the original (materialises the
  B·M·N·N' probability tensor);
- `F.scaled_dot_product_attention` (flash / memory-efficient / math backend chosen by PyTorch), used by `auto`
  until a Triton kernel is measured to beat it.

Legend: B batch, M heads, N query tokens, L key/value tokens (N/R² with spatial reduction R), D head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from daformer_fast.ops._dispatch import Impl, choose_impl, default_impl

__all__ = ["attention", "attention_ref", "TOLERANCES"]

# Forward/backward tolerances of fast paths against the fp32 reference, per dtype (atol, rtol).
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (2e-3, 2e-3)}


def attention_ref(q_BMND: torch.Tensor, k_BMLD: torch.Tensor, v_BMLD: torch.Tensor, scale: float) -> torch.Tensor:
    """Reference attention exactly as the original MiT computes it."""
    attn_BMNL = (q_BMND @ k_BMLD.transpose(-2, -1)) * scale
    attn_BMNL = attn_BMNL.softmax(dim=-1)
    return attn_BMNL @ v_BMLD


def attention(
    q_BMND: torch.Tensor, k_BMLD: torch.Tensor, v_BMLD: torch.Tensor, scale: float, impl: Impl | None = None
) -> torch.Tensor:
    """Scaled dot-product attention without mask or dropout. Equivalent PyTorch: `attention_ref`."""
    impl = impl or default_impl()
    if impl == "reference":
        return attention_ref(q_BMND, k_BMLD, v_BMLD, scale)
    # No Triton attention kernel is registered yet, so "auto" and "triton" resolve through the dispatcher with a
    # rejection reason and run SDPA, PyTorch's fused path.
    choose_impl("attention", "auto" if impl == "triton" else impl, ["no triton attention kernel yet; using SDPA"])
    return F.scaled_dot_product_attention(q_BMND, k_BMLD, v_BMLD, scale=scale)
