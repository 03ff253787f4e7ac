"""Pixel-weighted cross-entropy of bilinearly upsampled logits, mean over every label pixel (docs/recipe.md §2.6).

- `seg_ce_ref`: the original's computation (mmseg 0.16 `CrossEntropyLoss` + `BaseDecodeHead.losses`): upsample
  (align_corners=False) to the label size, per-pixel CE with ignored pixels 0, times the optional weight, mean over
  all B·H·W pixels; the definition of correctness;
- the fused Triton kernel `daformer_fast.kernels.seg_ce` (forward and backward), which never stores logits or
  gradients at label resolution.

`auto` keeps the reference until a GPU benchmark at the model's shapes shows the kernel beating `torch.compile` of
the reference (ops/table.py).

dtype: the kernel computes in fp32 and returns an fp32 loss, what the reference returns under autocast (its
cross-entropy runs in fp32 there), which is how the trainer runs bf16. Called on bf16 logits outside autocast,
the reference would compute the cross-entropy in bf16 instead.

Legend: B batch, K classes, H/W label resolution, h/w logit resolution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from daformer_fast.ops.dispatch import Impl, dispatch, dtype_reasons

__all__ = ["TOLERANCES", "seg_ce", "seg_ce_ref", "seg_ce_unsupported", "upsample_logits"]

# Kernel against the fp32 reference on the same inputs, (atol, rtol) for the loss and the logits' gradient. For
# bf16/fp16 the tests compare three ways instead: the kernel's error may be at most twice that of the reference
# run in the same dtype, plus the floor given here in units of the largest value.
TOLERANCES = {
    torch.float32: {"loss": (1e-6, 1e-5), "dlogits": (1e-7, 1e-4)},
    torch.bfloat16: {"loss": (0.0, 2**-8), "dlogits": (0.0, 2**-7)},
    torch.float16: {"loss": (0.0, 2**-10), "dlogits": (0.0, 2**-9)},
}
_MAX_CLASSES = 128  # kernels.seg_ce.MAX_CLASSES, not imported: importing ops must not import triton


def upsample_logits(logits_BKhw: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize (align_corners=False) of logits to `size`; a no-op when the size already matches."""
    if tuple(logits_BKhw.shape[-2:]) == tuple(size):
        return logits_BKhw
    return F.interpolate(logits_BKhw, size=size, mode="bilinear", align_corners=False)


def seg_ce_ref(
    logits_BKhw: torch.Tensor, labels_BHW: torch.Tensor, weight_BHW: torch.Tensor | None = None, ignore_index: int = 255
) -> torch.Tensor:
    """L = Σ_px w_px · CE_px · [y_px ≠ ignore] / (B·H·W) on the logits upsampled to the labels' size."""
    logits_BKHW = upsample_logits(logits_BKhw, labels_BHW.shape[-2:])
    # reduction="none" already gives 0 at ignored pixels; the mean below then divides by B·H·W as mmseg 0.16 does.
    ce_BHW = F.cross_entropy(logits_BKHW, labels_BHW.long(), reduction="none", ignore_index=ignore_index)
    if weight_BHW is not None:
        ce_BHW = ce_BHW * weight_BHW.to(ce_BHW.dtype)
    return ce_BHW.mean()


def seg_ce_unsupported(
    dtypes: tuple[torch.dtype, ...],
    logits_BKhw: torch.Tensor,
    labels_BHW: torch.Tensor,
    weight_BHW: torch.Tensor | None,
    ignore_index: int,
) -> list[str]:
    """Reasons the Triton kernel cannot take these inputs, from static properties only."""
    reasons = dtype_reasons("logits dtype", (logits_BKhw,), dtypes)
    if labels_BHW.dtype.is_floating_point or labels_BHW.dtype.is_complex or labels_BHW.dtype == torch.bool:
        reasons.append(f"labels dtype {labels_BHW.dtype} (need an integer dtype)")
    if logits_BKhw.ndim != 4 or not 0 < logits_BKhw.shape[1] <= _MAX_CLASSES:
        reasons.append(f"logits shape {tuple(logits_BKhw.shape)} (need (B, K ≤ {_MAX_CLASSES}, h, w))")
    elif labels_BHW.ndim != 3 or labels_BHW.shape[0] != logits_BKhw.shape[0]:
        reasons.append(f"labels shape {tuple(labels_BHW.shape)} for logits {tuple(logits_BKhw.shape)}")
    if weight_BHW is not None:
        if weight_BHW.shape != labels_BHW.shape or not weight_BHW.dtype.is_floating_point:
            reasons.append(f"weight {weight_BHW.dtype} {tuple(weight_BHW.shape)} (need float, the labels' shape)")
        if weight_BHW.requires_grad:
            reasons.append("weight requires grad (the kernel treats weights as data)")
    return reasons


def seg_ce(
    logits_BKhw: torch.Tensor,
    labels_BHW: torch.Tensor,
    weight_BHW: torch.Tensor | None = None,
    ignore_index: int = 255,
    impl: Impl | None = None,
) -> torch.Tensor:
    """Upsample, weighted cross-entropy, mean over all label pixels. Equivalent PyTorch: `seg_ce_ref`.

    impl: "reference", "triton" (ValueError listing the reasons when the kernel cannot take the inputs), "auto"
    (the reference until measured, see the module docstring) or None for the process default.
    """
    return dispatch("seg_ce", impl, logits_BKhw, labels_BHW, weight_BHW, ignore_index)
