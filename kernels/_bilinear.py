"""Bilinear upsampling (align_corners=False) of class logits, evaluated per output pixel inside a kernel.

Shared by the pseudo-label and the cross-entropy kernels, which both consume `F.interpolate(logits, size=(H, W),
mode="bilinear", align_corners=False)` without ever storing it. The helpers reproduce PyTorch's rule exactly:

    scale = in / out  (fp32, what F.interpolate uses when given `size=`)
    src   = max(scale·(dst + 0.5) − 0.5, 0)
    i0 = ⌊src⌋,  i1 = min(i0 + 1, in − 1),  λ1 = src − i0,  λ0 = 1 − λ1
    value = λy0·(λx0·v[y0, x0] + λx1·v[y0, x1]) + λy1·(λx0·v[y1, x0] + λx1·v[y1, x1])

in fp32 (PyTorch's accumulation type for fp32, bf16 and fp16), then rounded to the logits' dtype and back: that is
what the reference's F.interpolate output holds before its fp32 softmax or cross-entropy under autocast.

`first_contributor` inverts the rule for the backward's gather: the first output index whose corners can include
input index i (the window over which a low-resolution logit receives gradient).

Legend: B batch, K classes, H/W output resolution, h/w logit resolution, P output pixels of a block.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def source_index(dst, scale, in_size):
    """Corners i0, i1 and weights λ0, λ1 of output indices `dst` (int32) along one axis."""
    src = tl.maximum(scale * (dst.to(tl.float32) + 0.5) - 0.5, 0.0)
    # src ≥ 0, so truncation is the floor; src < in − 0.5 always, so i0 never needs clamping.
    i0 = src.to(tl.int32)
    lam1 = src - i0.to(tl.float32)
    return i0, tl.minimum(i0 + 1, in_size - 1), 1.0 - lam1, lam1


@triton.jit
def first_contributor(i, inv_scale, scale, in_size):
    """Smallest output index whose top (or left) corner is ≥ i − 1: no earlier output index interpolates from i.

    The estimate ⌊(i − 0.5)/scale − 0.5⌋ is the answer or one below it; one exact check with `source_index` settles
    which. Output indices before 0 clamp to corner 0, so the window of i = 0 starts at 0.
    """
    y = tl.floor((i.to(tl.float32) - 0.5) * inv_scale - 0.5).to(tl.int32)
    y0, _, _, _ = source_index(y, scale, in_size)
    y = tl.where(y0 < i - 1, y + 1, y)
    return tl.maximum(y, 0)


@triton.jit
def upsampled_logits(base, offs_k, mask_k, sk, y0, y1, ly0, ly1, x0, x1, lx0, lx1, sh, sw, mask_p):
    """(BLOCK_K, P) fp32 tile of upsampled logits, rounded through the logits' dtype; −inf past the last class.

    `base` points at one image of (B, K, h, w) logits; corners and weights come from `source_index` per axis.
    """
    kk = offs_k[:, None] * sk
    m = mask_k[:, None] & mask_p[None, :]
    row0, row1 = y0 * sh, y1 * sh
    col0, col1 = x0 * sw, x1 * sw
    # Each corner is loaded in the storage dtype and widened at once (bf16 arithmetic is not reliable everywhere).
    v00 = tl.load(base + kk + (row0 + col0)[None, :], mask=m, other=0.0).to(tl.float32)
    v01 = tl.load(base + kk + (row0 + col1)[None, :], mask=m, other=0.0).to(tl.float32)
    v10 = tl.load(base + kk + (row1 + col0)[None, :], mask=m, other=0.0).to(tl.float32)
    v11 = tl.load(base + kk + (row1 + col1)[None, :], mask=m, other=0.0).to(tl.float32)
    lx0, lx1 = lx0[None, :], lx1[None, :]
    v = ly0[None, :] * (lx0 * v00 + lx1 * v01) + ly1[None, :] * (lx0 * v10 + lx1 * v11)
    # The reference's interpolation output is stored in the input dtype: round as it does (a no-op for fp32).
    if base.dtype.element_ty == tl.bfloat16:
        v = round_to_bf16(v)
    else:
        v = v.to(base.dtype.element_ty).to(tl.float32)
    return tl.where(mask_k[:, None], v, float("-inf"))


@triton.jit
def upsampled_pixels(base, offs_p, mask_p, offs_k, K, sk, sh, sw, h, w, W, scale_h, scale_w):
    """(BLOCK_K, P) upsampled logits of the flat label-pixel indices `offs_p` of one image (row-major, width W)."""
    y0, y1, ly0, ly1 = source_index(offs_p // W, scale_h, h)
    x0, x1, lx0, lx1 = source_index(offs_p % W, scale_w, w)
    return upsampled_logits(base, offs_k, offs_k < K, sk, y0, y1, ly0, ly1, x0, x1, lx0, lx1, sh, sw, mask_p)


@triton.jit
def round_to_bf16(x):
    """fp32 → nearest bf16, ties to even (what PyTorch's cast does), returned as fp32; finite inputs.

    Done on the bits rather than with `.to(tl.bfloat16)`: Triton's CPU interpreter truncates in that cast, so the
    tests would check a different rounding from the GPU's. The integer form is the same on both.
    """
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


def fp32_scale(in_size: int, out_size: int) -> float:
    """in/out rounded once to fp32, as PyTorch computes the scale (a Python float division would round twice)."""
    return (torch.tensor(in_size, dtype=torch.float32) / out_size).item()  # a CPU tensor: no device sync


def block_k(num_classes: int) -> int:
    return triton.next_power_of_2(num_classes)
