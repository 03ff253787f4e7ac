"""Flash-style attention (forward and backward) for MiT's efficient self-attention: softmax(q·kᵀ·scale)·v.

MiT attends N query tokens to L = N/R² key/value tokens of a spatially reduced map (L = 256 at every stage for
512² crops, any length at evaluation), head dim D = 32 (b0) or 64 (b1..b5). The reference materialises the
B·M·N·L probability tensor; this kernel never does:

- forward: one program per (query block, batch·head) streams the keys in blocks with the online softmax
  (running row max m and row sum l, rescaling the fp32 accumulator by exp2(m_old − m_new)), and stores the output
  and the row log-sum-exp (natural log, fp32) for the backward;
- backward (FlashAttention-2 recomputation): p = exp(s − lse) is recomputed from q, k and the saved lse;
  Δ = rowsum(dO·O) − dlse; dS = p·(dP − Δ). One kernel walks the keys per query block for dq; another walks the
  queries per key block for dk, dv. Because L ≪ N in MiT, the second kernel also splits the queries into chunks
  (grid axis 2) so that enough programs run, writing fp32 partial sums that are added in order (deterministic,
  no atomics).

Numerics: loads in the storage dtype, fp32 accumulation and softmax; exponentials in base 2 with log2(e) folded
into the scale. fp32 inputs use IEEE fp32 dots (no TF32) so fp32 results match the reference to ~1e-6. Under the
Triton interpreter, bf16 operands of `tl.dot` give wrong results, so there every dot runs on fp32 operands.

Cost per (batch, head), counting a multiply-add as 2 FLOPs:
- forward: 4·N·L·D FLOPs (q·kᵀ and p·v); bytes (N·D·2 + L·D·2)·s + 4·N (q, o, k, v, lse) with s the element size;
- backward: 14·N·L·D FLOPs: the dq kernel recomputes s and computes dP and dq (6·N·L·D), the dk/dv kernel
  recomputes s and dP and computes dv and dk (8·N·L·D); bytes ≈ (4·N·D + 4·L·D)·s + 8·N plus 8·L·D per query
  chunk for the fp32 partial sums.
For MiT-B5 stage 1 at 512² (N = 16384, L = 256, D = 64, M = 1) the forward is 1.07 GFLOP per image against
4.3 MB of traffic in bf16: about 250 FLOP/B. With N ≫ L the intensity is ≈ 2·L/s whatever N, so stages 1-3 sit
near the H100 bf16 ridge point (≈ 295 FLOP/B) and stage 4 (N = L = 256) at half of it; the later stages are small
enough to be launch-bound.

Block sizes are fixed (64×64, four warps) and untuned: no GPU was available when this was written.

Legend: B batch, M heads, N query tokens, L key/value tokens, D head dim.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["attention_fwd", "attention_bwd", "attention_triton", "INTERPRETED"]

LOG2E = 1.4426950408889634


@triton.jit
def _tile(base, offs_r, offs_d, stride_r, stride_d, mask_r, FP32_DOT: tl.constexpr):
    """(rows, D) tile of a row-major-indexed matrix, zero past its end, fp32 when the dots need fp32 operands."""
    t = tl.load(base + offs_r[:, None] * stride_r + offs_d[None, :] * stride_d, mask=mask_r[:, None], other=0.0)
    if FP32_DOT:
        t = t.to(tl.float32)
    return t


@triton.jit
def _tile_t(base, offs_r, offs_d, stride_r, stride_d, mask_r, FP32_DOT: tl.constexpr):
    """The same tile loaded transposed, (D, rows), so that it is a dot's right operand without `tl.trans`."""
    t = tl.load(base + offs_r[None, :] * stride_r + offs_d[:, None] * stride_d, mask=mask_r[None, :], other=0.0)
    if FP32_DOT:
        t = t.to(tl.float32)
    return t


@triton.jit
def _attention_fwd_kernel(
    Q, K, V,  # (B, M, N, D), (B, M, L, D), (B, M, L, D), any strides
    OUT,  # (B, N, M, D) contiguous: the layout the following head merge wants
    LSE,  # (B, M, N) fp32, natural log
    sqb, sqm, sqn, sqd, skb, skm, skl, skd, svb, svm, svl, svd, sob, son, som,
    M, N, L, qk_scale_log2,
    D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, FP32_DOT: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bm = tl.program_id(1)
    b = (pid_bm // M).to(tl.int64)
    m = (pid_bm % M).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    mask_n = offs_n < N
    q = _tile(Q + b * sqb + m * sqm, offs_n, offs_d, sqn, sqd, mask_n, FP32_DOT)
    k_base = K + b * skb + m * skm
    v_base = V + b * svb + m * svm

    m_i = tl.full([BLOCK_N], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_N], tl.float32)
    acc = tl.zeros([BLOCK_N, D], tl.float32)
    for start in range(0, L, BLOCK_L):
        offs_l = start + tl.arange(0, BLOCK_L)
        mask_l = offs_l < L
        kT = _tile_t(k_base, offs_l, offs_d, skl, skd, mask_l, FP32_DOT)
        v = _tile(v_base, offs_l, offs_d, svl, svd, mask_l, FP32_DOT)
        s = tl.dot(q, kT, input_precision="ieee") * qk_scale_log2
        # Padded keys get -inf so they add exp2(-inf) = 0; every row has a real key (L >= 1) in the first block,
        # so m_new is finite from the first iteration on and alpha = exp2(-inf) = 0 then.
        s = tl.where(mask_l[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(OUT + b * sob + m * som + offs_n[:, None] * son + offs_d[None, :], acc.to(OUT.dtype.element_ty),
             mask=mask_n[:, None])
    tl.store(LSE + pid_bm.to(tl.int64) * N + offs_n, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=mask_n)


@triton.jit
def _attention_bwd_dq_kernel(
    Q, K, V, DO,  # (B, M, N, D), (B, M, L, D), (B, M, L, D), (B, M, N, D), any strides
    LSE, DELTA,  # (B, M, N) fp32 contiguous
    DQ,  # (B, M, N, D) contiguous
    sqb, sqm, sqn, sqd, skb, skm, skl, skd, svb, svm, svl, svd, sdb, sdm, sdn, sdd,
    M, N, L, qk_scale_log2, scale,
    D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, FP32_DOT: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bm = tl.program_id(1)
    b = (pid_bm // M).to(tl.int64)
    m = (pid_bm % M).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    mask_n = offs_n < N
    q = _tile(Q + b * sqb + m * sqm, offs_n, offs_d, sqn, sqd, mask_n, FP32_DOT)
    do = _tile(DO + b * sdb + m * sdm, offs_n, offs_d, sdn, sdd, mask_n, FP32_DOT)
    row = pid_bm.to(tl.int64) * N + offs_n
    lse2 = tl.load(LSE + row, mask=mask_n, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + row, mask=mask_n, other=0.0)
    k_base = K + b * skb + m * skm
    v_base = V + b * svb + m * svm

    dq = tl.zeros([BLOCK_N, D], tl.float32)
    for start in range(0, L, BLOCK_L):
        offs_l = start + tl.arange(0, BLOCK_L)
        mask_l = offs_l < L
        kT = _tile_t(k_base, offs_l, offs_d, skl, skd, mask_l, FP32_DOT)
        vT = _tile_t(v_base, offs_l, offs_d, svl, svd, mask_l, FP32_DOT)
        s = tl.dot(q, kT, input_precision="ieee") * qk_scale_log2
        p = tl.where(mask_l[None, :], tl.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, vT, input_precision="ieee")
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kT.dtype), tl.trans(kT), input_precision="ieee")
    dq = dq * scale
    tl.store(DQ + pid_bm.to(tl.int64) * N * D + offs_n[:, None] * D + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=mask_n[:, None])


@triton.jit
def _attention_bwd_dkdv_kernel(
    Q, K, V, DO,  # as in the dq kernel
    LSE, DELTA,  # (B, M, N) fp32 contiguous
    DK, DV,  # (S, B·M, L, D) fp32 contiguous partial sums, one slice per query chunk
    sqb, sqm, sqn, sqd, skb, skm, skl, skd, svb, svm, svl, svd, sdb, sdm, sdn, sdd,
    M, N, L, BM, n_per_chunk, qk_scale_log2, scale,
    D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, FP32_DOT: tl.constexpr,
):
    pid_l = tl.program_id(0)
    pid_bm = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = (pid_bm // M).to(tl.int64)
    m = (pid_bm % M).to(tl.int64)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, D)
    mask_l = offs_l < L
    k = _tile(K + b * skb + m * skm, offs_l, offs_d, skl, skd, mask_l, FP32_DOT)
    v = _tile(V + b * svb + m * svm, offs_l, offs_d, svl, svd, mask_l, FP32_DOT)
    q_base = Q + b * sqb + m * sqm
    do_base = DO + b * sdb + m * sdm

    dk = tl.zeros([BLOCK_L, D], tl.float32)
    dv = tl.zeros([BLOCK_L, D], tl.float32)
    n_begin = pid_s * n_per_chunk
    for start in range(n_begin, tl.minimum(n_begin + n_per_chunk, N), BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        qT = _tile_t(q_base, offs_n, offs_d, sqn, sqd, mask_n, FP32_DOT)
        do = _tile(do_base, offs_n, offs_d, sdn, sdd, mask_n, FP32_DOT)
        row = pid_bm.to(tl.int64) * N + offs_n
        lse2 = tl.load(LSE + row, mask=mask_n, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + row, mask=mask_n, other=0.0)
        # Transposed scores pᵀ (keys × queries), so that dv and dk come out of plain dots without a transpose of p.
        sT = tl.dot(k, qT, input_precision="ieee") * qk_scale_log2
        pT = tl.where(mask_n[None, :], tl.exp2(sT - lse2[None, :]), 0.0)
        dv += tl.dot(pT.to(do.dtype), do, input_precision="ieee")
        dpT = tl.dot(v, tl.trans(do), input_precision="ieee")
        dsT = pT * (dpT - delta[None, :])
        dk += tl.dot(dsT.to(qT.dtype), tl.trans(qT), input_precision="ieee")
    out = (pid_s.to(tl.int64) * BM + pid_bm) * L * D + offs_l[:, None] * D + offs_d[None, :]
    tl.store(DK + out, dk * scale, mask=mask_l[:, None])
    tl.store(DV + out, dv, mask=mask_l[:, None])


INTERPRETED = not isinstance(_attention_fwd_kernel, triton.runtime.JITFunction)
_BLOCK_N, _BLOCK_L, _NUM_WARPS = 64, 64, 4
# dk/dv programs wanted in flight: about two waves on a 132-SM H100; under the interpreter one chunk per key block.
_TARGET_DKDV_PROGRAMS = 1 if INTERPRETED else 264


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be (B, M, N|L, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, M, _, D = q.shape
    if k.shape != v.shape or k.shape[:2] != (B, M) or k.shape[3] != D or k.shape[2] < 1:
        raise ValueError(f"k and v must be (B={B}, M={M}, L>=1, D={D}); got {tuple(k.shape)}, {tuple(v.shape)}")
    if D not in (32, 64, 128):
        raise ValueError(f"head dim D must be 32, 64 or 128; got {D}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"q, k, v must share one of float32/bfloat16/float16; got {q.dtype}, {k.dtype}, {v.dtype}")


def _fp32_dot(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 or INTERPRETED


@torch.library.custom_op("daformer_fast::attention_fwd", mutates_args=())
def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns o_BNMD (contiguous; `.transpose(1, 2)` is the (B, M, N, D) result) and lse_BMN (fp32)."""
    _check(q, k, v)
    B, M, N, D = q.shape
    L = k.shape[2]
    o = q.new_empty(B, N, M, D)
    lse = q.new_empty(B, M, N, dtype=torch.float32)
    grid = (triton.cdiv(N, _BLOCK_N), B * M)
    _attention_fwd_kernel[grid](
        q, k, v, o, lse, *q.stride(), *k.stride(), *v.stride(), o.stride(0), o.stride(1), o.stride(2),
        M, N, L, scale * LOG2E,
        D=D, BLOCK_N=_BLOCK_N, BLOCK_L=_BLOCK_L, FP32_DOT=_fp32_dot(q.dtype), num_warps=_NUM_WARPS,
    )
    return o, lse


@attention_fwd.register_fake
def _(q, k, v, scale):
    B, M, N, D = q.shape
    return q.new_empty(B, N, M, D), q.new_empty(B, M, N, dtype=torch.float32)


@torch.library.custom_op("daformer_fast::attention_bwd", mutates_args=())
def attention_bwd(
    do: torch.Tensor, dlse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    o: torch.Tensor, lse: torch.Tensor, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) given do_BMND (any strides), the optional lse gradient and the forward's outputs."""
    B, M, N, D = q.shape
    L = k.shape[2]
    # Δ = rowsum(dO·O): one cheap memory-bound pass, left to PyTorch. An lse gradient enters the same way
    # (∂lse/∂s = p), so dS = p·(dP − Δ + dlse).
    delta = (do.float() * o.float()).sum(-1)
    if dlse is not None:
        delta = delta - dlse.float()
    delta = delta.contiguous()
    strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride())
    fp32_dot = _fp32_dot(q.dtype)
    dq = q.new_empty(B, M, N, D)
    _attention_bwd_dq_kernel[(triton.cdiv(N, _BLOCK_N), B * M)](
        q, k, v, do, lse, delta, dq, *strides, M, N, L, scale * LOG2E, scale,
        D=D, BLOCK_N=_BLOCK_N, BLOCK_L=_BLOCK_L, FP32_DOT=fp32_dot, num_warps=_NUM_WARPS,
    )
    n_blocks, l_blocks = triton.cdiv(N, _BLOCK_N), triton.cdiv(L, _BLOCK_L)
    chunks = min(n_blocks, max(1, triton.cdiv(_TARGET_DKDV_PROGRAMS, l_blocks * B * M)))
    n_per_chunk = triton.cdiv(n_blocks, chunks) * _BLOCK_N
    chunks = triton.cdiv(N, n_per_chunk)
    dk_part = q.new_empty(chunks, B * M, L, D, dtype=torch.float32)
    dv_part = torch.empty_like(dk_part)
    _attention_bwd_dkdv_kernel[(l_blocks, B * M, chunks)](
        q, k, v, do, lse, delta, dk_part, dv_part, *strides, M, N, L, B * M, n_per_chunk, scale * LOG2E, scale,
        D=D, BLOCK_N=_BLOCK_N, BLOCK_L=_BLOCK_L, FP32_DOT=fp32_dot, num_warps=_NUM_WARPS,
    )
    dk = dk_part.sum(0).view(B, M, L, D).to(k.dtype)
    dv = dv_part.sum(0).view(B, M, L, D).to(v.dtype)
    return dq, dk, dv


@attention_bwd.register_fake
def _(do, dlse, q, k, v, o, lse, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.scale = scale


def _backward(ctx, do, dlse):
    q, k, v, o, lse = ctx.saved_tensors
    if do is None:  # only lse was used downstream
        do = torch.zeros_like(o)
    # do arrives for the (B, N, M, D) output; the kernels want it indexed as (B, M, N, D).
    dq, dk, dv = attention_bwd(do.transpose(1, 2), dlse, q, k, v, o.transpose(1, 2), lse, ctx.scale)
    return dq, dk, dv, None


torch.library.register_autograd("daformer_fast::attention_fwd", _backward, setup_context=_setup_context)


def attention_triton(q_BMND: torch.Tensor, k_BMLD: torch.Tensor, v_BMLD: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q·kᵀ·scale)·v as a (B, M, N, D) view of a (B, N, M, D) buffer; differentiable in q, k, v."""
    o_BNMD, _ = attention_fwd(q_BMND, k_BMLD, v_BMLD, scale)
    return o_BNMD.transpose(1, 2)
