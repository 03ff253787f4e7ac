"""Argmax pseudo-labels and the confident-pixel count from low-resolution teacher logits (docs/recipe.md §2.2 step 5-6).

- `pseudo_label_argmax_ref`: the original's computation, bilinear upsample (align_corners=False) to the crop size,
  fp32 softmax, max/argmax over classes and the inclusive threshold count; the definition of correctness;
- the fused Triton kernel `daformer_fast.kernels.pseudo_label`, which never stores the full-resolution logits or
  probabilities.

The weight map built from the count (q everywhere, zero rows at the top and bottom) stays in
`daformer_fast.uda.pseudo_label`, the same for both paths.

`auto` keeps the reference until a GPU benchmark at the model's shapes shows the kernel beating `torch.compile` of
the reference (ops/table.py).

Legend: B batch, K classes, H/W crop resolution, h/w logit resolution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from daformer_fast.ops.dispatch import Impl, dispatch, dtype_reasons

__all__ = ["TOLERANCES", "pseudo_label_argmax", "pseudo_label_argmax_ref", "pseudo_label_unsupported"]

# Integer outputs compare exactly except where the fp32 rounding of a different but equally valid evaluation order
# may decide: "tie_gap", the reference's gap between its two top probabilities below which the argmax may differ;
# "threshold_ulps", fp32 ulps of the threshold within which a pixel's top probability may fall on either side. bf16
# and fp16 logits are interpolated in fp32 and rounded to their dtype; a one-ulp difference in that rounding moves a
# logit by 2^-8 (bf16) relative, hence the wider gaps.
TOLERANCES = {
    torch.float32: {"tie_gap": 1e-5, "threshold_ulps": 8},
    torch.bfloat16: {"tie_gap": 2e-2, "threshold_ulps": 2**15},
    torch.float16: {"tie_gap": 3e-3, "threshold_ulps": 2**12},
}
_MAX_CLASSES = 128  # kernels.pseudo_label.MAX_CLASSES, not imported: importing ops must not import triton


@torch.no_grad()
def pseudo_label_argmax_ref(
    logits_BKhw: torch.Tensor, size: tuple[int, int], threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(label_BHW int64, number of pixels whose top softmax probability is ≥ threshold, a 0-dim int64 tensor)."""
    H, W = size
    logits_BKHW = logits_BKhw
    if tuple(logits_BKHW.shape[-2:]) != (H, W):
        logits_BKHW = F.interpolate(logits_BKHW, size=(H, W), mode="bilinear", align_corners=False)
    # fp32 softmax even under bf16 autocast: the 0.968 threshold sits where bf16 (8-bit mantissa) steps by ~0.004.
    prob_BKHW = torch.softmax(logits_BKHW.float(), dim=1)
    prob_BHW, label_BHW = prob_BKHW.max(dim=1)
    return label_BHW, (prob_BHW >= threshold).sum()


def pseudo_label_unsupported(
    dtypes: tuple[torch.dtype, ...], logits_BKhw: torch.Tensor, size: tuple[int, int], threshold: float
) -> list[str]:
    """Reasons the Triton kernel cannot take these inputs, from static properties only."""
    reasons = dtype_reasons("dtype", (logits_BKhw,), dtypes)
    if logits_BKhw.ndim != 4 or not 0 < logits_BKhw.shape[1] <= _MAX_CLASSES:
        reasons.append(f"logits shape {tuple(logits_BKhw.shape)} (need (B, K ≤ {_MAX_CLASSES}, h, w))")
    return reasons


def pseudo_label_argmax(
    logits_BKhw: torch.Tensor, size: tuple[int, int], threshold: float, impl: Impl | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels and confident count of the upsampled teacher logits. Equivalent PyTorch: `pseudo_label_argmax_ref`.

    impl: "reference", "triton" (ValueError listing the reasons when the kernel cannot take the inputs), "auto"
    (the reference until measured, see the module docstring) or None for the process default.
    """
    return dispatch("pseudo_label", impl, logits_BKhw, size, threshold)
