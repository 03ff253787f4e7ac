"""DACS's mixed batch (docs/recipe.md §2.4, §2.5): ClassMix with colour jitter in one op, and the per-sample Gaussian
blur.

- `mix_and_jitter_ref`: mask = chosen_BV[i, gt] (`masks_from_chosen`), mix the normalised images, labels and
  weights (`mix`), colour jitter through [0, 1] (`ops.augment.jitter_normalised`) — the definition of
  correctness; the Triton kernel `daformer_fast.kernels.classmix_aug` does it in one pass.
- `gaussian_blur_ref`: reflect padding and two grouped convolutions over B·C groups (one launch per direction for
  the whole batch); the Triton kernel `daformer_fast.kernels.blur` does the two passes with the reflect padding as
  index arithmetic.

Both are data transforms: nothing needs a gradient. The random draws (`uda.classmix.chosen_classes`,
`uda.augment.draw_strong_params`) stay with the caller, so the choice of implementation never changes the stream.

`auto` keeps the references until a GPU benchmark at the training shapes (B = 2, 3×512²) shows the kernels beating
them and torch.compile of them (ops/table.py). CPU tensors reach the kernels (in Triton's interpreter) only with
impl="triton".

Legend: B batch, H/W image size, V = 256 label values.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from daformer_fast.ops.augment import JitterParams, blur_kernel_size, gaussian_kernel1d, jitter_normalised
from daformer_fast.ops.dispatch import Impl, dispatch, dtype_reasons
from daformer_fast.utils import to_device

__all__ = ["TOLERANCES", "gaussian_blur", "gaussian_blur_ref", "gaussian_blur_unsupported", "masks_from_chosen",
           "mix", "mix_and_jitter", "mix_and_jitter_ref", "mix_and_jitter_unsupported"]  # fmt: skip

# Kernel against the fp32 reference on the same inputs, (atol, rtol) per image dtype, in normalised units
# (|x| ≲ 2.7). Labels, weights and the mask are selections: always exact. In fp32 the interpreter matches to about
# 1e-6; the headroom is for the GPU's fused multiply-adds, which round once where the reference rounds twice.
# Low-precision images are rounded once on store (half an ulp, ≈ 8e-3 below 4 in bf16).
TOLERANCES = {
    torch.float32: {"image": (2e-5, 1e-5), "blur": (1e-5, 1e-5)},
    torch.bfloat16: {"image": (2e-2, 1e-2), "blur": (2e-2, 1e-2)},
    torch.float16: {"image": (3e-3, 1e-3), "blur": (3e-3, 1e-3)},
}


def masks_from_chosen(labels_BHW: torch.Tensor, chosen_BV: torch.Tensor) -> torch.Tensor:
    """mask_B1HW = chosen_BV[i, labels[i, p]]: True where the pixel's class was chosen for its sample."""
    B = labels_BHW.shape[0]
    mask_BN = torch.gather(chosen_BV, 1, labels_BHW.reshape(B, -1).long())
    return mask_BN.view(B, 1, *labels_BHW.shape[1:])


def mix(mask_B1HW: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pixelwise select: `a` where the mask is set (pasted source), `b` elsewhere (target).

    Works for images (B, C, H, W) and for labels or weights (B, H, W). torch.where is exact, like the
    original's M·a + (1 − M)·b for a binary M and finite inputs.
    """
    mask = mask_B1HW.bool()
    if a.dim() == 3:
        mask = mask.squeeze(1)  # (B, 1, H, W) would otherwise broadcast against (B, H, W) to (B, B, H, W)
    return torch.where(mask, a, b)


def mix_and_jitter_ref(
    img_B3HW: torch.Tensor,
    tgt_B3HW: torch.Tensor,
    gt_BHW: torch.Tensor,
    pl_BHW: torch.Tensor,
    pw_BHW: torch.Tensor,
    chosen_BV: torch.Tensor,
    jitter: JitterParams | None,
    mean: Sequence[float] | torch.Tensor,
    std: Sequence[float] | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """ClassMix then (if `jitter`) colour jitter, in plain PyTorch: the definition of `mix_and_jitter`."""
    mask_B1HW = masks_from_chosen(gt_BHW, chosen_BV)
    mixed_img = mix(mask_B1HW, img_B3HW, tgt_B3HW)
    if jitter is not None:
        mixed_img = jitter_normalised(mixed_img, mean, std, jitter)
    mixed_lbl = mix(mask_B1HW, gt_BHW, pl_BHW)
    mixed_w = mix(mask_B1HW, torch.ones_like(pw_BHW), pw_BHW)
    return mixed_img, mixed_lbl, mixed_w, mask_B1HW


def gaussian_blur_ref(img_B3HW: torch.Tensor, sigma_B: torch.Tensor) -> torch.Tensor:
    """Per-sample Gaussian blur, same σ in y and x, reflect border: separable depthwise convolutions over B·C groups;
    σ (B,) may be on the host (copied without a sync). Equivalent per-sample 2-D loop, as kornia does it:
    `uda.augment.gaussian_blur_original`."""
    B, C, H, W = img_B3HW.shape
    ky, kx = blur_kernel_size(H), blur_kernel_size(W)
    sigma_B = to_device(sigma_B, img_B3HW.device)
    wy_BCk = gaussian_kernel1d(ky, sigma_B).to(img_B3HW.dtype).repeat_interleave(C, dim=0)
    wx_BCk = gaussian_kernel1d(kx, sigma_B).to(img_B3HW.dtype).repeat_interleave(C, dim=0)
    x = F.pad(img_B3HW, (kx // 2, kx // 2, ky // 2, ky // 2), mode="reflect").reshape(1, B * C, H + ky - 1, -1)
    x = F.conv2d(x, wy_BCk.view(B * C, 1, ky, 1), groups=B * C)
    x = F.conv2d(x, wx_BCk.view(B * C, 1, 1, kx), groups=B * C)
    return x.view(B, C, H, W)


def _image_reasons(dtypes: tuple[torch.dtype, ...], img: torch.Tensor, *others: torch.Tensor) -> list[str]:
    reasons = dtype_reasons("image dtypes", (img, *others), dtypes, same=True)
    if img.ndim != 4 or any(t.shape != img.shape for t in others):
        reasons.append(f"image shapes {', '.join(str(tuple(t.shape)) for t in (img, *others))} (need (B, C, H, W))")
    return reasons


def mix_and_jitter_unsupported(dtypes, img, tgt, gt, pl, pw, chosen_BV, jitter, mean, std) -> list[str]:
    """Reasons the ClassMix + jitter kernel cannot take these inputs, from static properties only."""
    reasons = _image_reasons(dtypes, img, tgt)
    B, C, H, W = img.shape if img.ndim == 4 else (0, 0, 0, 0)
    if C != 3 or any(t.shape != (B, H, W) for t in (gt, pl, pw)) or chosen_BV.shape != (B, 256):
        reasons.append(f"shapes gt {tuple(gt.shape)}, pl {tuple(pl.shape)}, pw {tuple(pw.shape)}, chosen "
                       f"{tuple(chosen_BV.shape)} for images {tuple(img.shape)} "
                       "(need (B, H, W) and (B, 256))")  # fmt: skip
    if gt.is_floating_point() or pl.is_floating_point() or not pw.is_floating_point() or chosen_BV.dtype != torch.bool:
        reasons.append(f"dtypes gt {gt.dtype}, pl {pl.dtype}, pw {pw.dtype}, chosen {chosen_BV.dtype} "
                       "(need integer labels, a floating weight, a bool table)")  # fmt: skip
    return reasons


def gaussian_blur_unsupported(dtypes: tuple[torch.dtype, ...], img: torch.Tensor, sigma_B: torch.Tensor) -> list[str]:
    """Reasons the blur kernel cannot take this image, from static properties only."""
    return _image_reasons(dtypes, img)


def _stats(values: Sequence[float] | torch.Tensor, device: torch.device) -> torch.Tensor:
    """Normalisation statistics as a (3,) fp32 tensor on `device` (fp32 whatever the image dtype)."""
    if not isinstance(values, torch.Tensor):
        values = torch.tensor(values, dtype=torch.float32)
    return to_device(values.reshape(3).float(), device)


def mix_and_jitter_kernel_args(img, tgt, gt, pl, pw, chosen_BV, jitter: JitterParams | None, mean, std) -> tuple:
    """The kernel's arguments: jitter as (B, 4) fp32 factors and (B, 4) int32 op order, statistics as fp32 (3,)."""
    device = img.device
    factors_B4 = order_B4 = None
    if jitter is not None:
        factors = torch.stack([jitter.brightness_B, jitter.contrast_B, jitter.saturation_B, jitter.hue_B], dim=1)
        factors_B4 = to_device(factors.float(), device)
        order_B4 = to_device(jitter.order_B4.to(torch.int32), device)
    return img, tgt, gt, pl, pw, chosen_BV, factors_B4, order_B4, _stats(mean, device), _stats(std, device)


def gaussian_blur_kernel_args(img_B3HW: torch.Tensor, sigma_B: torch.Tensor) -> tuple:
    """The kernel's arguments: the taps the reference uses (float64, normalised, rounded once to fp32), one row per
    sample along y and along x."""
    _, _, H, W = img_B3HW.shape
    sigma_B = to_device(sigma_B, img_B3HW.device)
    return img_B3HW, gaussian_kernel1d(blur_kernel_size(H), sigma_B), gaussian_kernel1d(blur_kernel_size(W), sigma_B)


def mix_and_jitter(
    img_B3HW: torch.Tensor,
    tgt_B3HW: torch.Tensor,
    gt_BHW: torch.Tensor,
    pl_BHW: torch.Tensor,
    pw_BHW: torch.Tensor,
    chosen_BV: torch.Tensor,
    jitter: JitterParams | None,
    mean: Sequence[float] | torch.Tensor,
    std: Sequence[float] | torch.Tensor,
    impl: Impl | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """ClassMix of source into target (image, label, weight) with kornia-0.5.8 colour jitter of the mixed image.

    Equivalent PyTorch: `mix_and_jitter_ref`.

    Args:
        img_B3HW, tgt_B3HW: normalised source and target images.
        gt_BHW, pl_BHW, pw_BHW: source labels (values < 256), pseudo-labels, pseudo weights.
        chosen_BV: bool table of the classes pasted for each sample (`uda.classmix.chosen_classes`).
        jitter: per-sample factors and op order (host or device tensors), or None for no jitter.
        mean, std: the 0-255 RGB normalisation statistics.
        impl: "reference", "triton" (ValueError listing the reasons when the kernel cannot take the inputs),
            "auto" (see the module docstring) or None for the process default.

    Returns:
        mixed image (B, 3, H, W), mixed label (B, H, W), mixed weight (B, H, W), mask (B, 1, H, W) bool.
    """
    return dispatch("mix_and_jitter", impl, img_B3HW, tgt_B3HW, gt_BHW, pl_BHW, pw_BHW, chosen_BV, jitter, mean, std)


def gaussian_blur(img_B3HW: torch.Tensor, sigma_B: torch.Tensor, impl: Impl | None = None) -> torch.Tensor:
    """Per-sample Gaussian blur (σ per sample, same in y and x; kernel size from `ops.augment.blur_kernel_size`;
    reflect borders). Equivalent PyTorch: `gaussian_blur_ref`. `impl` as for `mix_and_jitter`."""
    return dispatch("gaussian_blur", impl, img_B3HW, sigma_B)
