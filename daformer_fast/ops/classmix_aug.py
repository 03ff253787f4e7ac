"""DACS's mixed batch (recipe §2.4, §2.5): ClassMix with colour jitter in one op, and the per-sample Gaussian blur.

- `mix_and_jitter_ref`: the fast step's composition — mask = chosen_BV[i, gt], mix the normalised images, labels
  and weights (`uda.classmix.mix`), colour jitter through [0, 1] (`uda.augment.jitter_normalised`) — the
  definition of correctness; the Triton kernel `daformer_fast.kernels.classmix_aug` does it in one pass.
- `gaussian_blur_ref`: `uda.augment.gaussian_blur` (pad, two grouped convolutions); the Triton kernel
  `daformer_fast.kernels.blur` does the two passes with the reflect padding as index arithmetic.

Both are data transforms: nothing needs a gradient. The random draws (`uda.classmix.chosen_classes`,
`uda.augment.draw_strong_params`) stay with the caller, so the choice of implementation never changes the stream.

`auto` keeps the references, on CUDA as elsewhere, until a GPU benchmark at the training shapes (B = 2, 3×512²)
shows the kernels beating them (and torch.compile of them); none has been run yet. Flip `_AUTO_USES_TRITON` with
that measurement. CPU tensors reach the kernels (in Triton's interpreter) only with impl="triton".

Legend: B batch, H/W image size, V = 256 label values.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from daformer_fast.ops._dispatch import Impl, choose_impl, default_impl, device_reasons

if TYPE_CHECKING:
    from daformer_fast.uda.augment import JitterParams

__all__ = ["TOLERANCES", "gaussian_blur_op", "gaussian_blur_ref", "mix_and_jitter", "mix_and_jitter_ref"]

# Kernel against the fp32 reference on the same inputs, (atol, rtol) per image dtype, in normalised units
# (|x| ≲ 2.7). Labels, weights and the mask are selections: always exact. In fp32 the interpreter matches to about
# 1e-6; the headroom is for the GPU's fused multiply-adds, which round once where the reference rounds twice.
# Low-precision images are rounded once on store (half an ulp, ≈ 8e-3 below 4 in bf16).
TOLERANCES = {
    torch.float32: {"image": (2e-5, 1e-5), "blur": (1e-5, 1e-5)},
    torch.bfloat16: {"image": (2e-2, 1e-2), "blur": (2e-2, 1e-2)},
    torch.float16: {"image": (3e-3, 1e-3), "blur": (3e-3, 1e-3)},
}
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Set to True only with a GPU measurement showing the kernels faster than (compiled) references at B = 2, 512².
_AUTO_USES_TRITON = False
_AUTO_REASON = "auto keeps the reference until the kernel is measured faster on a GPU"


def _host_to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    from daformer_fast.uda import augment  # lazily: uda imports ops, not the other way round at import time

    return augment._host_to_device(x, device)


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
    """ClassMix then (if `jitter`) colour jitter, with the uda/ stage functions: what the fast step computed before
    the fused kernel existed, bit for bit."""
    from daformer_fast.uda.augment import jitter_normalised
    from daformer_fast.uda.classmix import masks_from_chosen, mix

    mask_B1HW = masks_from_chosen(gt_BHW, chosen_BV)
    mixed_img = mix(mask_B1HW, img_B3HW, tgt_B3HW)
    if jitter is not None:
        mixed_img = jitter_normalised(mixed_img, mean, std, jitter)
    mixed_lbl = mix(mask_B1HW, gt_BHW, pl_BHW)
    mixed_w = mix(mask_B1HW, torch.ones_like(pw_BHW), pw_BHW)
    return mixed_img, mixed_lbl, mixed_w, mask_B1HW


def gaussian_blur_ref(img_B3HW: torch.Tensor, sigma_B: torch.Tensor) -> torch.Tensor:
    """`uda.augment.gaussian_blur` with σ copied to the image's device without a host sync."""
    from daformer_fast.uda.augment import gaussian_blur

    return gaussian_blur(img_B3HW, _host_to_device(sigma_B, img_B3HW.device))


def _image_reasons(img: torch.Tensor, *others: torch.Tensor) -> list[str]:
    reasons = []
    if img.dtype not in _KERNEL_DTYPES or any(t.dtype != img.dtype for t in others):
        reasons.append(f"image dtypes {', '.join(str(t.dtype) for t in (img, *others))} (need one of fp32/bf16/fp16)")
    if img.ndim != 4 or any(t.shape != img.shape for t in others):
        reasons.append(f"image shapes {', '.join(str(tuple(t.shape)) for t in (img, *others))} (need (B, C, H, W))")
    return reasons


def _mix_unsupported(img, tgt, gt, pl, pw, chosen_BV, impl: Impl | None = "triton") -> list[str]:
    """Reasons the ClassMix + jitter kernel cannot take these inputs (for this `impl`), from static properties only."""
    reasons = device_reasons((img, tgt, gt, pl, pw, chosen_BV), impl) + _image_reasons(img, tgt)
    B, C, H, W = img.shape if img.ndim == 4 else (0, 0, 0, 0)
    if C != 3 or any(t.shape != (B, H, W) for t in (gt, pl, pw)) or chosen_BV.shape != (B, 256):
        reasons.append(f"shapes gt {tuple(gt.shape)}, pl {tuple(pl.shape)}, pw {tuple(pw.shape)}, chosen "
                       f"{tuple(chosen_BV.shape)} for images {tuple(img.shape)} (need (B, H, W) and (B, 256))")  # fmt: skip
    if gt.is_floating_point() or pl.is_floating_point() or not pw.is_floating_point() or chosen_BV.dtype != torch.bool:
        reasons.append(f"dtypes gt {gt.dtype}, pl {pl.dtype}, pw {pw.dtype}, chosen {chosen_BV.dtype} "
                       "(need integer labels, a floating weight, a bool table)")  # fmt: skip
    return reasons


def _blur_unsupported(img: torch.Tensor, impl: Impl | None = "triton") -> list[str]:
    """Reasons the blur kernel cannot take this image (for this `impl`), from static properties only."""
    return device_reasons((img,), impl) + _image_reasons(img)


def _choose(op: str, impl: Impl, reasons: list[str]) -> str:
    if impl == "auto" and not _AUTO_USES_TRITON:
        reasons.append(_AUTO_REASON)
    return choose_impl(op, impl, reasons)


def _stats(values: Sequence[float] | torch.Tensor, device: torch.device) -> torch.Tensor:
    """Normalisation statistics as a (3,) fp32 tensor on `device` (fp32 whatever the image dtype)."""
    if not isinstance(values, torch.Tensor):
        values = torch.tensor(values, dtype=torch.float32)
    return _host_to_device(values.reshape(3).float(), device)


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
    impl = impl or default_impl()
    args = (img_B3HW, tgt_B3HW, gt_BHW, pl_BHW, pw_BHW, chosen_BV)
    if impl == "reference" or _choose("mix_and_jitter", impl, _mix_unsupported(*args, impl)) == "reference":
        return mix_and_jitter_ref(*args, jitter, mean, std)
    from daformer_fast.kernels.classmix_aug import classmix_jitter_triton

    device = img_B3HW.device
    factors_B4 = order_B4 = None
    if jitter is not None:
        factors = torch.stack([jitter.brightness_B, jitter.contrast_B, jitter.saturation_B, jitter.hue_B], dim=1)
        factors_B4 = _host_to_device(factors.float(), device)
        order_B4 = _host_to_device(jitter.order_B4.to(torch.int32), device)
    return classmix_jitter_triton(*args, factors_B4, order_B4, _stats(mean, device), _stats(std, device))


def gaussian_blur_op(img_B3HW: torch.Tensor, sigma_B: torch.Tensor, impl: Impl | None = None) -> torch.Tensor:
    """Per-sample Gaussian blur (σ per sample, same in y and x; kernel size from `uda.augment.blur_kernel_size`;
    reflect borders). Equivalent PyTorch: `gaussian_blur_ref`. `impl` as for `mix_and_jitter`."""
    impl = impl or default_impl()
    if impl == "reference" or _choose("gaussian_blur", impl, _blur_unsupported(img_B3HW, impl)) == "reference":
        return gaussian_blur_ref(img_B3HW, sigma_B)
    from daformer_fast.kernels.blur import gaussian_blur_triton
    from daformer_fast.uda.augment import blur_kernel_size, gaussian_kernel1d

    _, _, H, W = img_B3HW.shape
    sigma_B = _host_to_device(sigma_B, img_B3HW.device)
    # The taps the reference uses (float64, normalised, rounded once to fp32), one row per sample.
    taps_y = gaussian_kernel1d(blur_kernel_size(H), sigma_B)
    taps_x = gaussian_kernel1d(blur_kernel_size(W), sigma_B)
    return gaussian_blur_triton(img_B3HW, taps_y, taps_x)
