"""Teacher pseudo-labels, fused: bilinear upsample + fp32 softmax + max/argmax + confidence count in one pass.

The reference (`daformer_fast.ops.pseudo_label.pseudo_label_argmax_ref`) writes the upsampled logits
(B, K, H, W), their fp32 softmax (B, K, H, W) and the max/argmax maps before counting confident pixels. Here one
program takes BLOCK_P output pixels of one image and all K classes as a (BLOCK_K, BLOCK_P) tile:

1. corners and weights of each pixel along both axes (PyTorch's align_corners=False rule, `_bilinear`), four
   gathered loads of the low-resolution logits (cache hits: each logit feeds about (H/h)·(W/w) pixels), the
   interpolation in fp32, rounded through the logits' dtype as the reference's F.interpolate output is;
2. the row max m and s = Σ_k exp(v_k − m); the top probability is exp(0)/s = 1/s, exactly the reference's max of
   the softmax, so the inclusive test 1/s ≥ threshold counts the same pixels up to the last bit of s;
3. the label is the first class reaching the maximum logit (torch's first-index rule on ties);
4. the label is stored as int64 (the reference's dtype) and the program's count of confident pixels as one int32;
   the per-program counts are added afterwards into an int64 0-dim tensor on the device (no host sync, and the
   same total whatever the launch order).

Cost per output pixel, K classes, s the logits' element size: about 11·K + 1 FLOPs (7 for the interpolation, the
max, a subtraction, an exponential and an addition per class; the reciprocal) and bytes 8 (the int64 label) plus
the logits once, K·s·h·w/(H·W) per pixel (K·s/16 at the model's 4× upsample). B = 2, K = 19, 128² → 512²:
110 MFLOP against 5.4 MB in bf16, about 20 FLOP/B: at the fp32 ridge of an H100 (≈ 1.6 µs either way), with the
K exponentials per pixel on the special-function units the likely limit. The reference moves about 200 MB in bf16
for the same result (the upsampled logits, their fp32 copy, the probabilities, max and argmax).

Limits: K ≤ 128 (one tile of classes in registers); labels must fit int32 before widening (they are < K).
Block size fixed (128 pixels, four warps) and untuned: no GPU was available when this was written.

Legend: B batch, K classes, H/W output (crop) resolution, h/w logit resolution, P output pixels of a block.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from daformer_fast.kernels._bilinear import block_k, fp32_scale, upsampled_pixels

__all__ = ["pseudo_label_fwd", "pseudo_label_triton"]


@triton.jit
def _pseudo_label_fwd_kernel(
    LOGITS,  # (B, K, h, w), any strides, fp32/bf16/fp16
    LABEL,  # (B, H, W) int64 contiguous
    COUNT,  # (B, programs per image) int32: confident pixels per program
    sb, sk, sh, sw, K, h, w, H, W, scale_h, scale_w, threshold,
    BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_p = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < H * W
    offs_k = tl.arange(0, BLOCK_K)
    v = upsampled_pixels(LOGITS + b * sb, offs_p, mask_p, offs_k, K, sk, sh, sw, h, w, W, scale_h, scale_w)
    m = tl.max(v, 0)
    top_prob = 1.0 / tl.sum(tl.exp(v - m[None, :]), 0)
    label = tl.argmax(v, 0, tie_break_left=True)
    tl.store(LABEL + b * H * W + offs_p, label.to(tl.int64), mask=mask_p)
    confident = (top_prob >= threshold) & mask_p
    tl.store(COUNT + b * tl.num_programs(0) + pid, tl.sum(confident.to(tl.int32), 0))


_BLOCK_P, _NUM_WARPS = 128, 4
MAX_CLASSES = 128


def _check(logits: torch.Tensor, H: int, W: int) -> None:
    if logits.ndim != 4 or not 0 < logits.shape[1] <= MAX_CLASSES:
        raise ValueError(f"logits must be (B, K ≤ {MAX_CLASSES}, h, w); got {tuple(logits.shape)}")
    if H <= 0 or W <= 0:
        raise ValueError(f"output size must be positive; got {(H, W)}")


@torch.library.custom_op("daformer_fast::pseudo_label_fwd", mutates_args=())
def pseudo_label_fwd(logits: torch.Tensor, H: int, W: int, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(argmax label (B, H, W) int64, number of pixels with top softmax probability ≥ threshold (0-dim int64))."""
    _check(logits, H, W)
    B, K, h, w = logits.shape
    label = torch.empty(B, H, W, device=logits.device, dtype=torch.int64)
    programs = triton.cdiv(H * W, _BLOCK_P)
    count = torch.empty(B, programs, device=logits.device, dtype=torch.int32)
    _pseudo_label_fwd_kernel[(programs, B)](
        logits, label, count, *logits.stride(), K, h, w, H, W, fp32_scale(h, H), fp32_scale(w, W), threshold,
        BLOCK_K=block_k(K), BLOCK_P=_BLOCK_P, num_warps=_NUM_WARPS,
    )
    return label, count.sum(dtype=torch.int64)


@pseudo_label_fwd.register_fake
def _(logits, H, W, threshold):
    B = logits.shape[0]
    return logits.new_empty(B, H, W, dtype=torch.int64), logits.new_empty((), dtype=torch.int64)


def pseudo_label_triton(
    logits_BKhw: torch.Tensor, size: tuple[int, int], threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Argmax labels at `size` and the confident-pixel count from low-resolution logits; no gradient."""
    return pseudo_label_fwd(logits_BKhw.detach(), int(size[0]), int(size[1]), float(threshold))
