"""Per-sample separable Gaussian blur with reflect borders (docs/recipe.md §2.5 step 3), two passes.

Every image of the batch has its own σ (same in y and x); the taps are `ops.augment.gaussian_kernel1d` rows, one
per sample, ky = kx = 51 at 512² (largest odd ≤ ceil(0.1·size)). The reference (`ops.classmix_aug.gaussian_blur_ref`)
materialises a reflect-padded copy and runs two grouped convolutions over it. Here the padding is an index
mapping (i < 0 → −i, i > n−1 → 2(n−1) − i, valid while the half-width is below the size, as F.pad requires):
- pass 1 (vertical): tmp[b, c, y, x] = Σ_j wy[b, j]·img[b, c, reflect(y + j − ky//2), x], fp32, in y-then-x order
  like the reference, so the fp32 rounding matches it up to summation order;
- pass 2 (horizontal): out = Σ_j wx[b, j]·tmp[b, c, y, reflect(x + j − kx//2)], cast once to the image dtype.
Each program computes a 2-D tile; consecutive taps load overlapping tiles, so the re-reads hit L1/L2.

Cost per element of (B, C, H, W), s the element size:
- FLOPs: 2·(ky + kx), a multiply-add per tap: 204 at 512².
- bytes: the floor is 2·s (read the image once, write the result once); this design adds the fp32 intermediate,
  written and read once: 2·s + 8 (16 B fp32, so at best half the floor's speed; a tiled single pass keeping the
  vertical sums on chip would reach the floor at the cost of recomputing the ky//2-row halo of each tile).
  204 FLOP per 16 B ≈ 13 FLOP/B in fp32: under the H100's ≈ 20 FLOP/B fp32 ridge, so still memory-bound.
At 512², B = 2, C = 3: 1.57 M elements, 0.32 GFLOP, 25 MB (fp32): ≈ 8 µs at 3.35 TB/s.

Tiles are fixed (16 rows × 64 columns, four warps) and untuned: no GPU was available when this was written.

Legend: B batch, C channels, H/W image size, K taps.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["gaussian_blur_triton"]


@triton.jit
def _reflect(idx, n):
    """Reflect padding without repeating the edge (F.pad "reflect"): valid for −n < idx < 2n − 1."""
    idx = tl.where(idx < 0, -idx, idx)
    return tl.where(idx > n - 1, 2 * (n - 1) - idx, idx)


# fmt: off
@triton.jit
def _blur_pass_kernel(
    X,  # (B·C, H, W) contiguous
    TAPS,  # (B, K) fp32, one row of Gaussian weights per sample
    Y,  # (B·C, H, W) contiguous
    C, H, W,
    K: tl.constexpr, VERTICAL: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    offs_w = tl.program_id(0) * BLOCK_W + tl.arange(0, BLOCK_W)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    bc = tl.program_id(2).to(tl.int64)
    mask = (offs_h < H)[:, None] & (offs_w < W)[None, :]
    x_base = X + bc * H * W
    taps = TAPS + (bc // C) * K
    acc = tl.zeros([BLOCK_H, BLOCK_W], tl.float32)
    for j in tl.static_range(K):
        if VERTICAL:
            rows = _reflect(offs_h + (j - K // 2), H)
            ptrs = x_base + rows[:, None] * W + offs_w[None, :]
        else:
            cols = _reflect(offs_w + (j - K // 2), W)
            ptrs = x_base + offs_h[:, None] * W + cols[None, :]
        acc += tl.load(ptrs, mask=mask, other=0.0).to(tl.float32) * tl.load(taps + j)
    tl.store(Y + bc * H * W + offs_h[:, None] * W + offs_w[None, :], acc.to(Y.dtype.element_ty), mask=mask)

# fmt: on

_BLOCK_H, _BLOCK_W, _NUM_WARPS = 16, 64, 4


def _blur_pass(x_BCHW: torch.Tensor, taps_BK: torch.Tensor, vertical: bool, out_dtype: torch.dtype):
    """One direction of the blur: Σ_j taps[b, j]·x shifted by j − K//2 along y (vertical) or x, reflect borders."""
    B, C, H, W = x_BCHW.shape
    K = taps_BK.shape[1]
    y = torch.empty(B, C, H, W, device=x_BCHW.device, dtype=out_dtype)
    grid = (triton.cdiv(W, _BLOCK_W), triton.cdiv(H, _BLOCK_H), B * C)
    _blur_pass_kernel[grid](
        x_BCHW.contiguous(), taps_BK.to(torch.float32).contiguous(), y, C, H, W,
        K=K, VERTICAL=vertical, BLOCK_H=_BLOCK_H, BLOCK_W=_BLOCK_W, num_warps=_NUM_WARPS,
    )  # fmt: skip
    return y


# No autograd wrapper: no gradient flows through data.
@torch.library.custom_op("daformer_fast::gaussian_blur", mutates_args=())
def gaussian_blur_triton(img: torch.Tensor, taps_y: torch.Tensor, taps_x: torch.Tensor) -> torch.Tensor:
    """Separable blur of (B, C, H, W) with per-sample taps (B, ky) along y and (B, kx) along x; odd ky, kx."""
    if img.ndim != 4:
        raise ValueError(f"img must be (B, C, H, W); got {tuple(img.shape)}")
    B, _, H, W = img.shape
    for name, taps, n in (("taps_y", taps_y, H), ("taps_x", taps_x, W)):
        if taps.ndim != 2 or taps.shape[0] != B or taps.shape[1] % 2 == 0 or taps.shape[1] // 2 >= n:
            raise ValueError(
                f"{name} must be ({B}, odd K) with K // 2 < {n} (reflect padding); got {tuple(taps.shape)}"
            )
    tmp = _blur_pass(img, taps_y, vertical=True, out_dtype=torch.float32)  # fp32 between the passes
    return _blur_pass(tmp, taps_x, vertical=False, out_dtype=img.dtype)


@gaussian_blur_triton.register_fake
def _(img, taps_y, taps_x):
    return torch.empty_like(img, memory_format=torch.contiguous_format)
