"""Mix-FFN middle of MiT, fused: depthwise 3×3 conv (padding 1) + bias + exact GELU on the token layout.

The reference turns the fc1 output (B, N, C) into (B, C, h, w), runs the grouped conv, flattens back and applies
GELU: two transposes, a conv output and a GELU output in memory. Here one pass reads the tokens where they are
(channels contiguous, so every tap of a tile is a coalesced load of BLOCK_C channels for BLOCK_P positions) and
writes y = gelu(z), z = Σ_taps x[p + tap]·w[c, tap] + b[c]. Zero padding is a mask on the neighbour's row and
column.

Backward, two kernels, nothing saved but the inputs (z is recomputed rather than stored):
1. dz = dy·gelu'(z) with gelu'(z) = Φ(z) + z·φ(z); the same program reloads the nine neighbour tiles (cache hits)
   to form per-channel partial sums of dw[c, tap] = Σ_p dz·x[p + tap] and db[c] = Σ_p dz over its token chunk.
   The partials (one row of 10·C per chunk) are added in order afterwards: deterministic, no atomics.
2. dx = Σ_taps dz[p − tap]·w[c, tap], the transposed conv, from the fp32 dz of kernel 1.
dz is kept in fp32 so that the weight and input gradients do not round it twice; this costs 4 bytes per element.

Cost per element of (B, N, C), with s the element size in bytes:
- forward: 9 multiply-adds + bias + GELU ≈ 25 FLOPs + one erf; bytes 2·s (read x once if the neighbours hit in
  cache, write y), plus 10·C weights: ≈ 3-6 FLOP/B, memory-bound everywhere.
- backward: ≈ 40 FLOPs + erf and exp; bytes 3·s + 8 (x, dy, dx; dz written and read) plus 40·C per token chunk.
MiT-B5 stage 1 at 512², batch 2: N = 16384, C = 256 → 8.4 M elements, 34 MB forward in bf16 (10 µs at 3.35 TB/s).

Block sizes are fixed (64 tokens × 64 channels, four warps) and untuned: no GPU was available when this was written.

Legend: B batch, N = h·w tokens (row-major), C channels, P token positions of a tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["dwconv_gelu_fwd", "dwconv_gelu_bwd", "dwconv_gelu_triton"]


@triton.jit
def _tap(base, row, col, dy: tl.constexpr, dx: tl.constexpr, offs_c, mask_p, mask_c, sn, sc, h, w):
    """fp32 tile of the neighbours (row + dy, col + dx) of the positions, zero outside the image (the padding)."""
    r = row + dy
    c = col + dx
    ok = mask_p & (r >= 0) & (r < h) & (c >= 0) & (c < w)
    ptrs = base + (r * w + c).to(tl.int64)[:, None] * sn + offs_c[None, :] * sc
    return tl.load(ptrs, mask=ok[:, None] & mask_c[None, :], other=0.0).to(tl.float32)


@triton.jit
def _conv3x3(base, W, row, col, offs_c, mask_p, mask_c, sn, sc, h, w, FLIP: tl.constexpr, BLOCK_P: tl.constexpr,
             BLOCK_C: tl.constexpr):
    """Σ_taps x[p + tap]·w[c, tap] in fp32; FLIP visits p − tap instead, the transposed conv of the backward."""
    acc = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
    for t in tl.static_range(9):
        wt = tl.load(W + offs_c * 9 + t, mask=mask_c, other=0.0).to(tl.float32)
        if FLIP:
            x = _tap(base, row, col, 1 - t // 3, 1 - t % 3, offs_c, mask_p, mask_c, sn, sc, h, w)
        else:
            x = _tap(base, row, col, t // 3 - 1, t % 3 - 1, offs_c, mask_p, mask_c, sn, sc, h, w)
        acc += x * wt[None, :]
    return acc


@triton.jit
def _dwconv_gelu_fwd_kernel(
    X,  # (B, N, C), any strides
    W, BIAS,  # (C, 9) contiguous, (C,)
    Y,  # (B, N, C) contiguous
    sxb, sxn, sxc, N, C, h, w,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    b = tl.program_id(2).to(tl.int64)
    mask_p, mask_c = offs_p < N, offs_c < C
    z = _conv3x3(X + b * sxb, W, offs_p // w, offs_p % w, offs_c, mask_p, mask_c, sxn, sxc, h, w, False, BLOCK_P,
                 BLOCK_C)
    z += tl.load(BIAS + offs_c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    y = 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))  # exact GELU, as nn.GELU()
    ptrs = Y + (b * N + offs_p)[:, None] * C + offs_c[None, :]
    tl.store(ptrs, y.to(Y.dtype.element_ty), mask=mask_p[:, None] & mask_c[None, :])


@triton.jit
def _dwconv_gelu_bwd_dz_kernel(
    X, DY,  # (B, N, C), any strides
    W, BIAS,  # (C, 9) contiguous, (C,)
    DZ,  # (B, N, C) fp32 contiguous
    DWB,  # (B·chunks, 10, C) fp32: per-chunk partial sums of dw (rows 0..8) and db (row 9)
    sxb, sxn, sxc, sdb, sdn, sdc, N, C, h, w, n_per_chunk,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    chunk = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    b = tl.program_id(2).to(tl.int64)
    mask_c = offs_c < C
    x_base = X + b * sxb
    bias = tl.load(BIAS + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    # Rows 0..8 accumulate dw per tap, row 9 db. Adding each tap's column sum through a one-hot row keeps the ten
    # accumulators in one block; that is 16·BLOCK_C adds per tap against BLOCK_P·BLOCK_C for the tap itself.
    rows = tl.arange(0, 16)
    dwb = tl.zeros([16, BLOCK_C], tl.float32)
    begin = chunk * n_per_chunk
    for start in range(begin, tl.minimum(begin + n_per_chunk, N), BLOCK_P):
        offs_p = start + tl.arange(0, BLOCK_P)
        mask_p = offs_p < N
        mask = mask_p[:, None] & mask_c[None, :]
        row, col = offs_p // w, offs_p % w
        z = _conv3x3(x_base, W, row, col, offs_c, mask_p, mask_c, sxn, sxc, h, w, False, BLOCK_P, BLOCK_C)
        z += bias[None, :]
        dy = tl.load(DY + b * sdb + offs_p[:, None] * sdn + offs_c[None, :] * sdc, mask=mask, other=0.0)
        cdf = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
        pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
        dz = tl.where(mask, dy.to(tl.float32) * (cdf + z * pdf), 0.0)
        tl.store(DZ + (b * N + offs_p)[:, None] * C + offs_c[None, :], dz, mask=mask)
        dwb += tl.where(rows[:, None] == 9, tl.sum(dz, 0)[None, :], 0.0)
        for t in tl.static_range(9):
            # The nine neighbour tiles were just loaded for z: these reloads hit in cache.
            x = _tap(x_base, row, col, t // 3 - 1, t % 3 - 1, offs_c, mask_p, mask_c, sxn, sxc, h, w)
            dwb += tl.where(rows[:, None] == t, tl.sum(dz * x, 0)[None, :], 0.0)
    out = DWB + ((b * tl.num_programs(0) + chunk) * 10 + rows)[:, None] * C + offs_c[None, :]
    tl.store(out, dwb, mask=(rows < 10)[:, None] & mask_c[None, :])


@triton.jit
def _dwconv_gelu_bwd_dx_kernel(
    DZ,  # (B, N, C) fp32 contiguous
    W,  # (C, 9) contiguous
    DX,  # (B, N, C) contiguous
    N, C, h, w,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    b = tl.program_id(2).to(tl.int64)
    mask_p, mask_c = offs_p < N, offs_c < C
    row, col = offs_p // w, offs_p % w
    # x[p] fed z[p − tap] through weight w[tap]: the transposed conv visits the mirrored neighbours.
    dx = _conv3x3(DZ + b * N * C, W, row, col, offs_c, mask_p, mask_c, C, 1, h, w, True, BLOCK_P, BLOCK_C)
    tl.store(DX + (b * N + offs_p)[:, None] * C + offs_c[None, :], dx.to(DX.dtype.element_ty),
             mask=mask_p[:, None] & mask_c[None, :])


_BLOCK_P, _BLOCK_C, _NUM_WARPS = 64, 64, 4
_INTERPRETED = not isinstance(_dwconv_gelu_fwd_kernel, triton.runtime.JITFunction)
# Programs wanted for the dz/dw kernel: about four waves on a 132-SM H100; each chunk adds one row of partials.
_TARGET_DZ_PROGRAMS = 1 if _INTERPRETED else 528


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, h: int, w: int) -> None:
    if x.ndim != 3 or x.shape[1] != h * w:
        raise ValueError(f"x must be (B, N = h·w = {h * w}, C); got {tuple(x.shape)}")
    C = x.shape[2]
    if weight.shape != (C, 1, 3, 3) or bias.shape != (C,):
        raise ValueError(
            f"weight must be ({C}, 1, 3, 3) and bias ({C},); got {tuple(weight.shape)}, {tuple(bias.shape)}"
        )


@torch.library.custom_op("daformer_fast::dwconv_gelu_fwd", mutates_args=())
def dwconv_gelu_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """gelu(depthwise_conv3x3(x) + bias) on (B, N, C) tokens; output contiguous, dtype of x."""
    _check(x, weight, bias, h, w)
    B, N, C = x.shape
    y = torch.empty(B, N, C, device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(N, _BLOCK_P), triton.cdiv(C, _BLOCK_C), B)
    _dwconv_gelu_fwd_kernel[grid](
        x, weight.reshape(C, 9).contiguous(), bias.contiguous(), y, *x.stride(), N, C, h, w,
        BLOCK_P=_BLOCK_P, BLOCK_C=_BLOCK_C, num_warps=_NUM_WARPS,
    )
    return y


@dwconv_gelu_fwd.register_fake
def _(x, weight, bias, h, w):
    return torch.empty(x.shape, device=x.device, dtype=x.dtype)


@torch.library.custom_op("daformer_fast::dwconv_gelu_bwd", mutates_args=())
def dwconv_gelu_bwd(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, h: int, w: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias) of `dwconv_gelu_fwd` for the output gradient dy (any strides)."""
    B, N, C = x.shape
    w9 = weight.reshape(C, 9).contiguous()
    p_blocks, c_blocks = triton.cdiv(N, _BLOCK_P), triton.cdiv(C, _BLOCK_C)
    chunks = min(p_blocks, max(1, triton.cdiv(_TARGET_DZ_PROGRAMS, c_blocks * B)))
    n_per_chunk = triton.cdiv(p_blocks, chunks) * _BLOCK_P
    chunks = triton.cdiv(N, n_per_chunk)
    dz = torch.empty(B, N, C, device=x.device, dtype=torch.float32)
    dwb = torch.empty(B * chunks, 10, C, device=x.device, dtype=torch.float32)
    _dwconv_gelu_bwd_dz_kernel[(chunks, c_blocks, B)](
        x, dy, w9, bias.contiguous(), dz, dwb, *x.stride(), *dy.stride(), N, C, h, w, n_per_chunk,
        BLOCK_P=_BLOCK_P, BLOCK_C=_BLOCK_C, num_warps=_NUM_WARPS,
    )
    dx = torch.empty(B, N, C, device=x.device, dtype=x.dtype)
    _dwconv_gelu_bwd_dx_kernel[(p_blocks, c_blocks, B)](
        dz, w9, dx, N, C, h, w, BLOCK_P=_BLOCK_P, BLOCK_C=_BLOCK_C, num_warps=_NUM_WARPS,
    )
    dwb = dwb.sum(0)
    # Copies, not views of dwb: a custom op's outputs may not alias each other.
    dweight = dwb[:9].t().contiguous().view(C, 1, 3, 3).to(weight.dtype)
    return dx, dweight, dwb[9].to(bias.dtype, copy=True)


@dwconv_gelu_bwd.register_fake
def _(dy, x, weight, bias, h, w):
    dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    return dx, torch.empty(weight.shape, device=x.device, dtype=weight.dtype), torch.empty_like(bias)


def _setup_context(ctx, inputs, output):
    x, weight, bias, h, w = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.hw = (h, w)


def _backward(ctx, dy):
    x, weight, bias = ctx.saved_tensors
    dx, dweight, dbias = dwconv_gelu_bwd(dy, x, weight, bias, *ctx.hw)
    return dx, dweight, dbias, None, None


torch.library.register_autograd("daformer_fast::dwconv_gelu_fwd", _backward, setup_context=_setup_context)


def dwconv_gelu_triton(
    x_BNC: torch.Tensor, weight_C133: torch.Tensor, bias_C: torch.Tensor, h: int, w: int
) -> torch.Tensor:
    """gelu(depthwise 3×3 conv(x) + bias) on the token layout; differentiable in x, weight and bias."""
    return dwconv_gelu_fwd(x_BNC, weight_C133, bias_C, h, w)
