"""Pixel-weighted cross-entropy on bilinearly upsampled logits, forward and backward fused with the upsample.

The loss is mmseg 0.16's (docs/recipe.md §2.6), on logits upsampled with align_corners=False to the label size:

    L = Σ_px w_px · CE_px · [y_px ≠ ignore] / (B·H·W),   CE_px = logsumexp_k v_k,px − v_y,px

The reference stores the upsampled logits (B, K, H, W), their log-softmax and, in the backward, the gradient at
full resolution before the upsample's backward scatters it onto the (B, K, h, w) logits. Neither pass here stores
anything of size K·H·W:

- forward: one program per BLOCK_P label pixels of one image interpolates the K logits of each pixel (`_bilinear`,
  rounded through the logits' dtype as the reference's F.interpolate output is), takes the fp32 log-sum-exp and
  CE, stores the log-sum-exp (B, H, W) fp32 for the backward and the program's weighted CE sum; the sums are added
  in a fixed order afterwards (deterministic) and divided by B·H·W;
- backward, a gather: the upsample's adjoint sends the full-resolution gradient
  g_k,px = dL · w_px·[y_px ≠ ignore] / (B·H·W) · (softmax_k,px − [k = y_px]) to the four corners of each pixel.
  Instead of scattering (atomics, order-dependent), one program per BLOCK_Q low-resolution pixels walks, for each,
  the window of label rows and columns whose corners can include it (`first_contributor`: ⌊2·H/h⌋ + 2 rows by
  ⌊2·W/w⌋ + 2 columns, a superset of the exact footprint), recomputes each pixel's interpolated logits and
  softmax from the saved log-sum-exp, and adds g times the pixel's bilinear weight on this corner
  (λy·[corner row = i] summed over both corners, same along x, so the clamped edges and h = H are exact). Every
  gradient element is one program's fixed-order sum: deterministic and free of atomics.

The price of the gather is recomputation: each label pixel is interpolated and exponentiated once per low-res
corner it touches (4 times), and the rectangular window adds masked lanes (100 visits for 64 contributors at
H/h = 4). The alternative — storing the fp32 gradient at full resolution — is exactly the K·H·W tensor this
kernel exists to avoid.

Cost, K classes, s the logits' element size, per label pixel (counting exp and log as one FLOP):
- forward: about 12·K FLOPs (interpolation 7, max, exp, sum, the label's pick); bytes 8 (label, int64) + 4 (weight,
  fp32, when given) + 4 (log-sum-exp written) plus the logits once, K·s·h·w/(H·W);
- backward: the useful work is 4 corners × (interpolation 7 + exp, subtraction, one-hot, multiply-add 4) ≈ 48·K
  FLOPs per pixel (the window's masked lanes not counted); bytes 8 + 4 + 4 (label, weight, log-sum-exp read) plus
  the logits read and their gradient written once, 2·K·s·h·w/(H·W).
B = 2, K = 19, 128² → 512², bf16: forward 120 MFLOP / 9.6 MB (12 FLOP/B, below the H100's fp32 ridge of about 20:
memory-bound), backward 480 MFLOP / 10.9 MB (44 FLOP/B before the window's masked lanes: compute-bound, with the
recomputed exponentials the likely limit). If a GPU profile confirms that, the next step is one program per cell
between four logit centres computing each pixel once and writing per-corner partial sums, added afterwards.

Numerics: fp32 interpolation, softmax and sums; the logits' gradient is rounded once on store. Labels outside
[0, K) other than `ignore_index` fail the forward as they fail the reference: through `torch._assert_async`, which
raises at once on the CPU and is a device-side assert on CUDA (as the reference's `nll_loss` is there), so it adds
no host sync; the check reads the labels once more (8 bytes per pixel). Block sizes fixed and untuned: no GPU was
available when this was written.

Legend: B batch, K classes, H/W label resolution, h/w logit resolution, P label pixels, Q logit pixels of a block.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from daformer_fast.kernels._bilinear import (
    block_k,
    first_contributor,
    fp32_scale,
    source_index,
    upsampled_logits,
    upsampled_pixels,
)

__all__ = ["seg_ce_bwd", "seg_ce_fwd", "seg_ce_triton"]


@triton.jit
def _seg_ce_fwd_kernel(
    LOGITS,  # (B, K, h, w), any strides, fp32/bf16/fp16
    LABELS,  # (B, H, W) integer, contiguous
    WEIGHT,  # (B, H, W) float, contiguous (unused without HAS_WEIGHT)
    LSE,  # (B, H, W) fp32: log-sum-exp per pixel, for the backward
    PARTIAL,  # (B, programs per image) fp32: Σ w·CE over the program's pixels
    sb, sk, sh, sw, K, h, w, H, W, scale_h, scale_w, ignore_index,
    HAS_WEIGHT: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_p = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < H * W
    offs_k = tl.arange(0, BLOCK_K)
    v = upsampled_pixels(LOGITS + b * sb, offs_p, mask_p, offs_k, K, sk, sh, sw, h, w, W, scale_h, scale_w)
    m = tl.max(v, 0)
    log_s = tl.log(tl.sum(tl.exp(v - m[None, :]), 0))
    pix = b * H * W + offs_p
    y = tl.load(LABELS + pix, mask=mask_p, other=ignore_index)
    v_y = tl.sum(tl.where(offs_k[:, None] == y[None, :], v, 0.0), 0)
    # log s − (v_y − m), the order of log_softmax's terms: no cancellation of a large m against v_y.
    ce = log_s - (v_y - m)
    if HAS_WEIGHT:
        ce *= tl.load(WEIGHT + pix, mask=mask_p, other=0.0).to(tl.float32)
    tl.store(LSE + pix, m + log_s, mask=mask_p)
    tl.store(PARTIAL + b * tl.num_programs(0) + pid, tl.sum(tl.where(mask_p & (y != ignore_index), ce, 0.0), 0))


@triton.jit
def _seg_ce_bwd_kernel(
    LOGITS,  # (B, K, h, w), any strides
    LABELS, WEIGHT, LSE,  # (B, H, W) contiguous, as in the forward
    GRAD,  # () fp32: dL/dloss, read on the device (no host sync)
    DLOGITS,  # (B, K, h, w) contiguous, dtype of LOGITS
    sb, sk, sh, sw, K, h, w, H, W, scale_h, scale_w, inv_scale_h, inv_scale_w, ignore_index, inv_numel,
    SPAN_H, SPAN_W,
    HAS_WEIGHT: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_q = pid * BLOCK_Q + tl.arange(0, BLOCK_Q)
    mask_q = offs_q < h * w
    i, j = offs_q // w, offs_q % w
    row_lo = first_contributor(i, inv_scale_h, scale_h, h)
    col_lo = first_contributor(j, inv_scale_w, scale_w, w)
    offs_k = tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    base = LOGITS + b * sb
    g = tl.load(GRAD).to(tl.float32) * inv_numel
    acc = tl.zeros([BLOCK_K, BLOCK_Q], tl.float32)
    for ty in range(SPAN_H):
        Y = tl.minimum(row_lo + ty, H - 1)
        y0, y1, ly0, ly1 = source_index(Y, scale_h, h)
        # This pixel row's weight on logit row i: both corners can be i (clamped at the last row, or h = 1).
        cy = tl.where(y0 == i, ly0, 0.0) + tl.where(y1 == i, ly1, 0.0)
        cy = tl.where(mask_q & (row_lo + ty < H), cy, 0.0)
        for tx in range(SPAN_W):
            X = tl.minimum(col_lo + tx, W - 1)
            x0, x1, lx0, lx1 = source_index(X, scale_w, w)
            cx = tl.where(x0 == j, lx0, 0.0) + tl.where(x1 == j, lx1, 0.0)
            c = cy * tl.where(col_lo + tx < W, cx, 0.0)
            pix = b * H * W + Y * W + X
            y = tl.load(LABELS + pix, mask=c != 0.0, other=ignore_index)
            c = tl.where(y != ignore_index, c, 0.0)
            if HAS_WEIGHT:
                c *= tl.load(WEIGHT + pix, mask=c != 0.0, other=0.0).to(tl.float32)
            live = c != 0.0
            v = upsampled_logits(base, offs_k, mask_k, sk, y0, y1, ly0, ly1, x0, x1, lx0, lx1, sh, sw, live)
            lse = tl.load(LSE + pix, mask=live, other=0.0)
            p = tl.exp(v - lse[None, :])
            d = p - tl.where(offs_k[:, None] == y[None, :], 1.0, 0.0)
            acc += tl.where(live[None, :], d * c[None, :], 0.0)
    out = DLOGITS + b * K * h * w + offs_k[:, None] * (h * w) + offs_q[None, :]
    tl.store(out, (acc * g).to(DLOGITS.dtype.element_ty), mask=mask_k[:, None] & mask_q[None, :])


_BLOCK_P, _BLOCK_Q, _NUM_WARPS = 128, 64, 4
MAX_CLASSES = 128


def _check(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None) -> None:
    if logits.ndim != 4 or not 0 < logits.shape[1] <= MAX_CLASSES:
        raise ValueError(f"logits must be (B, K ≤ {MAX_CLASSES}, h, w); got {tuple(logits.shape)}")
    if labels.ndim != 3 or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"labels must be (B = {logits.shape[0]}, H, W); got {tuple(labels.shape)}")
    if weight is not None and weight.shape != labels.shape:
        raise ValueError(f"weight must have the labels' shape {tuple(labels.shape)}; got {tuple(weight.shape)}")


def _geometry(logits: torch.Tensor, labels: torch.Tensor) -> tuple:
    """Logit strides and sizes, then the fp32 scales of both axes (as F.interpolate computes them)."""
    _, K, h, w = logits.shape
    H, W = labels.shape[-2:]
    return (*logits.stride(), K, h, w, H, W, fp32_scale(h, H), fp32_scale(w, W))


@torch.library.custom_op("daformer_fast::seg_ce_fwd", mutates_args=())
def seg_ce_fwd(
    logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss: 0-dim fp32, log-sum-exp per label pixel: (B, H, W) fp32)."""
    _check(logits, labels, weight)
    B, K = logits.shape[:2]
    H, W = labels.shape[-2:]
    labels = labels.contiguous()
    valid = (labels == ignore_index) | ((labels >= 0) & (labels < K))
    torch._assert_async(valid.all(), f"seg_ce: a label is outside [0, {K}) and is not ignore_index {ignore_index}")
    lse = torch.empty(B, H, W, device=logits.device, dtype=torch.float32)
    programs = triton.cdiv(H * W, _BLOCK_P)
    partial = torch.empty(B, programs, device=logits.device, dtype=torch.float32)
    _seg_ce_fwd_kernel[(programs, B)](
        logits, labels, labels if weight is None else weight.contiguous(), lse, partial,
        *_geometry(logits, labels), ignore_index,
        HAS_WEIGHT=weight is not None, BLOCK_K=block_k(K), BLOCK_P=_BLOCK_P, num_warps=_NUM_WARPS,
    )
    # Mean over every label pixel, ignored ones included (mmseg 0.16), as Σ/(B·H·W) like the reference's mean.
    return partial.sum() / (B * H * W), lse


@seg_ce_fwd.register_fake
def _(logits, labels, weight, ignore_index):
    return logits.new_empty((), dtype=torch.float32), logits.new_empty(labels.shape, dtype=torch.float32)


@torch.library.custom_op("daformer_fast::seg_ce_bwd", mutates_args=())
def seg_ce_bwd(
    grad: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor | None,
    lse: torch.Tensor,
    ignore_index: int,
) -> torch.Tensor:
    """dL/dlogits (B, K, h, w) contiguous, dtype of the logits, for the loss gradient `grad` (0-dim)."""
    B, K, h, w = logits.shape
    H, W = labels.shape[-2:]
    labels = labels.contiguous()
    dlogits = torch.empty(B, K, h, w, device=logits.device, dtype=logits.dtype)
    _seg_ce_bwd_kernel[(triton.cdiv(h * w, _BLOCK_Q), B)](
        logits, labels, labels if weight is None else weight.contiguous(), lse.contiguous(),
        grad.to(torch.float32), dlogits, *_geometry(logits, labels), H / h, W / w, ignore_index, 1.0 / (B * H * W),
        2 * H // h + 2, 2 * W // w + 2,
        HAS_WEIGHT=weight is not None, BLOCK_K=block_k(K), BLOCK_Q=_BLOCK_Q, num_warps=_NUM_WARPS,
    )
    return dlogits


@seg_ce_bwd.register_fake
def _(grad, logits, labels, weight, lse, ignore_index):
    return torch.empty(logits.shape, device=logits.device, dtype=logits.dtype)


def _setup_context(ctx, inputs, output):
    logits, labels, weight, ignore_index = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(logits, labels, weight, output[1])
    ctx.ignore_index = ignore_index


def _backward(ctx, grad, _grad_lse):
    logits, labels, weight, lse = ctx.saved_tensors
    # Labels and weights are data (pseudo-labels, ClassMix weights): no gradient flows to them.
    return seg_ce_bwd(grad, logits, labels, weight, lse, ctx.ignore_index), None, None, None


torch.library.register_autograd("daformer_fast::seg_ce_fwd", _backward, setup_context=_setup_context)


def seg_ce_triton(
    logits_BKhw: torch.Tensor, labels_BHW: torch.Tensor, weight_BHW: torch.Tensor | None, ignore_index: int
) -> torch.Tensor:
    """The weighted, upsampled cross-entropy (0-dim fp32); differentiable in the logits."""
    return seg_ce_fwd(logits_BKhw, labels_BHW, weight_BHW, ignore_index)[0]
