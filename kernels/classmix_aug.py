"""ClassMix and colour jitter of DACS's mixed batch in one pointwise pass (docs/recipe.md §2.4, §2.5 steps 1-2).

Per pixel p of sample i the kernel looks up the ClassMix mask in the (B, 256) table of classes chosen for sample i,
m = chosen[i, gt[i, p]], and writes
- the mixed image: source where m else target (both normalised); when jitter is on, de-normalised to [0, 1], the
  four kornia-0.5.8 ops applied in sample i's order with its factors, re-normalised;
- the mixed label gt where m else the pseudo-label, the mixed weight 1 where m else the pseudo weight, and m.
The reference (`ops.classmix_aug.mix_and_jitter_ref`) writes the mask, the mixed image, a [0, 1] copy,
dozens of temporaries in every jitter step (each of the four evaluates both the affine branch and an HSV round trip
for the whole batch and selects per sample) and the re-normalised image: kilobytes of traffic per pixel against
the few dozen bytes the result needs. Here every pixel is read once and written once, and each step runs
only its own op: one runtime branch per (program, step) on the per-sample op index.

The kornia ops, as `ops/augment.py` defines them: brightness adds b − 1, contrast multiplies by c (no mean), both
clamp to [0, 1]; saturation (S·s clamped) and hue (fmod(H + 2π·h, 2π)) go through RGB→HSV (S = Δ/(V + 1e-6), H in
[0, 2π) from the first channel holding the max) and back with the sector formula, which wraps any H with floor-mod.
Triton's float `%` is C's fmod (truncation) while torch's is a floor-mod, so both mods are written out: exact,
with the sign fix-ups torch applies. Divisions are IEEE-rounded (`div_rn`) as in PyTorch; on a GPU the compiler may
still fuse a multiply and an add into one rounding, so fp32 results agree to a few ulps, not bit for bit.

Cost per pixel, with s the image element size (4 fp32, 2 bf16), int64 labels, fp32 weights, a bool mask and m the
fraction of pasted pixels:
- FLOPs: none without jitter; with it ≈ 200 scalar operations (de/re-normalise 18, two affine steps 18, two HSV
  round trips ≈ 80 each, counting compares and selects): ≈ 4 per byte, memory-bound on any GPU.
- bytes: read 3·s of the image that shows (the other's load is masked off), gt 8, pseudo-label and weight
  12·(1 − m) where the target shows; write 3·s + 8 + 4 + 1. At 512², B = 2, fp32, m = ½: 51 B/px, 27 MB in all
  (8 µs at 3.35 TB/s). The (B, 256) table and the per-sample factors are cache hits.

Blocks are fixed (1024 pixels, four warps) and untuned: no GPU was available when this was written.

Legend: B batch, H/W image size, P pixels of a block, V = 256 label values.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["classmix_jitter_triton"]

_TWO_PI = tl.constexpr(6.283185307179586)  # rounded to fp32 where used, like torch's Python-float scalars


@triton.jit
def _floor_mod(a, b: tl.constexpr):
    """torch's `a % b` for fp32 a and a positive whole-number b: C's fmod, plus b where that is negative."""
    k = (a / b).to(tl.int32).to(tl.float32)  # trunc(a / b), possibly one off where a / b rounds to an integer
    # Exact: k·b is a whole number and |a − k·b| ≤ |a| + b is a multiple of ulp(a) (|a| < 2^22 here).
    r = a - k * b
    r = tl.where((a >= 0) & (r < 0), r + b, r)
    r = tl.where((a >= 0) & (r >= b), r - b, r)
    r = tl.where((a < 0) & (r > 0), r - b, r)
    r = tl.where((a < 0) & (r <= -b), r + b, r)  # now r = fmod(a, b), the sign of a
    return tl.where(r < 0, r + b, r)  # the floor-mod's correction, rounded like torch's `mod += b`


@triton.jit
def _rgb_to_hsv(r, g, b):
    v = tl.maximum(tl.maximum(r, g), b)
    delta = v - tl.minimum(tl.minimum(r, g), b)
    s = tl.math.div_rn(delta, v + 1e-6)
    safe = tl.where(delta == 0, 1.0, delta)  # grey pixels: every numerator below is 0
    h_r = tl.math.div_rn(g - b, safe)
    h_g = 2.0 + tl.math.div_rn(b - r, safe)
    h_b = 4.0 + tl.math.div_rn(r - g, safe)
    h = tl.where(r == v, h_r, tl.where(g == v, h_g, h_b))  # first channel holding the max, as kornia
    h = _floor_mod(tl.math.div_rn(h, 6.0), 1.0) * _TWO_PI
    return h, s, v


@triton.jit
def _hsv_to_rgb(h, s, v):
    h6 = tl.math.div_rn(h, _TWO_PI) * 6.0
    sector = _floor_mod(tl.floor(h6), 6.0)
    f = _floor_mod(h6, 6.0) - sector
    p = v * (1.0 - s)
    q = v * (1.0 - f * s)
    t = v * (1.0 - (1.0 - f) * s)
    # Sector table (R, G, B): 0 v t p, 1 q v p, 2 p v t, 3 p q v, 4 t p v, 5 v p q.
    r = tl.where((sector == 0) | (sector == 5), v, tl.where(sector == 1, q, tl.where(sector == 4, t, p)))
    g = tl.where((sector == 1) | (sector == 2), v, tl.where(sector == 0, t, tl.where(sector == 3, q, p)))
    b = tl.where((sector == 3) | (sector == 4), v, tl.where(sector == 2, t, tl.where(sector == 5, q, p)))
    return r, g, b


@triton.jit
def _jitter(r, g, b, FACTORS, ORDER, i):
    """Sample i's four kornia-0.5.8 ops in its order on [0, 1] RGB."""
    shift = tl.load(FACTORS + i * 4 + 0) - 1.0  # kornia passes brightness − 1 and adds it
    contrast = tl.load(FACTORS + i * 4 + 1)
    saturation = tl.load(FACTORS + i * 4 + 2)
    hue_rad = tl.load(FACTORS + i * 4 + 3) * _TWO_PI
    for step in tl.static_range(4):
        op = tl.load(ORDER + i * 4 + step)  # 0 brightness, 1 contrast, 2 saturation, 3 hue
        if op < 2:
            r = tl.minimum(tl.maximum(tl.where(op == 0, r + shift, r * contrast), 0.0), 1.0)
            g = tl.minimum(tl.maximum(tl.where(op == 0, g + shift, g * contrast), 0.0), 1.0)
            b = tl.minimum(tl.maximum(tl.where(op == 0, b + shift, b * contrast), 0.0), 1.0)
        else:
            h, s, v = _rgb_to_hsv(r, g, b)
            s = tl.where(op == 2, tl.minimum(tl.maximum(s * saturation, 0.0), 1.0), s)
            # fmod(h + 2π·hue, 2π): h ∈ [0, 2π] and |hue| ≤ 1 turn keep the sum in (−2π, 4π), where one
            # subtraction of 2π (exact, Sterbenz) is the whole fmod; negative sums stay negative, as with fmod.
            h2 = h + hue_rad
            h2 = tl.where(h2 >= _TWO_PI, h2 - _TWO_PI, h2)
            h = tl.where(op == 3, h2, h)
            r, g, b = _hsv_to_rgb(h, s, v)
    return r, g, b


# fmt: off
@triton.jit
def _classmix_jitter_kernel(
    IMG, TGT,  # (B, 3, H, W) normalised, contiguous
    GT, PL, PW,  # (B, H, W) source label, pseudo-label, pseudo weight, contiguous
    CHOSEN,  # (B, 256) bool
    FACTORS, ORDER,  # (B, 4) fp32 brightness, contrast, saturation, hue (turns); (B, 4) int32 op order
    MEAN, STD,  # (3,) fp32, 0-255 RGB statistics
    OUT_IMG, OUT_LBL, OUT_W, OUT_MASK,  # (B, 3, H, W), (B, H, W), (B, H, W), (B, 1, H, W) bool
    HW,
    JITTER: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    i = tl.program_id(1).to(tl.int64)
    valid = offs < HW
    px = i * HW + offs
    label = tl.load(GT + px, mask=valid, other=0).to(tl.int32)
    # Out-of-range labels (the reference's gather would raise) count as not chosen.
    known = valid & (label >= 0) & (label < 256)
    pasted = tl.load(CHOSEN + i * 256 + label, mask=known, other=0) != 0
    src, tgt = valid & pasted, valid & ~pasted

    # Only the image that shows is read: the other load is masked off.
    base = i * 3 * HW + offs
    r = tl.where(pasted, tl.load(IMG + base, mask=src, other=0.0).to(tl.float32),
                 tl.load(TGT + base, mask=tgt, other=0.0).to(tl.float32))  # fmt: skip
    g = tl.where(pasted, tl.load(IMG + base + HW, mask=src, other=0.0).to(tl.float32),
                 tl.load(TGT + base + HW, mask=tgt, other=0.0).to(tl.float32))  # fmt: skip
    b = tl.where(pasted, tl.load(IMG + base + 2 * HW, mask=src, other=0.0).to(tl.float32),
                 tl.load(TGT + base + 2 * HW, mask=tgt, other=0.0).to(tl.float32))  # fmt: skip
    if JITTER:
        m0, m1, m2 = tl.load(MEAN), tl.load(MEAN + 1), tl.load(MEAN + 2)
        s0, s1, s2 = tl.load(STD), tl.load(STD + 1), tl.load(STD + 2)
        # De-normalise to [0, 1] with the reference's rounding order: (x·std + mean) / 255.
        r, g, b = _jitter(tl.math.div_rn(r * s0 + m0, 255.0), tl.math.div_rn(g * s1 + m1, 255.0),
                          tl.math.div_rn(b * s2 + m2, 255.0), FACTORS, ORDER, i)  # fmt: skip
        r = tl.math.div_rn(r * 255.0 - m0, s0)
        g = tl.math.div_rn(g * 255.0 - m1, s1)
        b = tl.math.div_rn(b * 255.0 - m2, s2)
    out_ty = OUT_IMG.dtype.element_ty
    tl.store(OUT_IMG + base, r.to(out_ty), mask=valid)
    tl.store(OUT_IMG + base + HW, g.to(out_ty), mask=valid)
    tl.store(OUT_IMG + base + 2 * HW, b.to(out_ty), mask=valid)

    lbl_ty = OUT_LBL.dtype.element_ty
    pseudo = tl.load(PL + px, mask=tgt, other=0).to(lbl_ty)
    tl.store(OUT_LBL + px, tl.where(pasted, label.to(lbl_ty), pseudo), mask=valid)
    weight = tl.load(PW + px, mask=tgt, other=0.0).to(tl.float32)
    tl.store(OUT_W + px, tl.where(pasted, 1.0, weight).to(OUT_W.dtype.element_ty), mask=valid)
    tl.store(OUT_MASK + px, pasted, mask=valid)
# fmt: on

_BLOCK, _NUM_WARPS = 1024, 4


def _check(img, tgt, gt, pl, pw, chosen, factors, order, mean, std) -> None:
    if img.ndim != 4 or img.shape[1] != 3 or tgt.shape != img.shape or tgt.dtype != img.dtype:
        raise ValueError(f"img and tgt must be (B, 3, H, W) of one dtype; got {tuple(img.shape)}, {tuple(tgt.shape)}")
    B, _, H, W = img.shape
    for name, t in (("gt", gt), ("pl", pl), ("pw", pw)):
        if t.shape != (B, H, W):
            raise ValueError(f"{name} must be ({B}, {H}, {W}); got {tuple(t.shape)}")
    if chosen.shape != (B, 256) or chosen.dtype != torch.bool:
        raise ValueError(f"chosen must be bool ({B}, 256); got {chosen.dtype} {tuple(chosen.shape)}")
    if (factors is None) != (order is None):
        raise ValueError("factors and order go together: both for jitter, neither without")
    if factors is not None and (factors.shape != (B, 4) or order.shape != (B, 4)):
        raise ValueError(f"factors and order must be ({B}, 4); got {tuple(factors.shape)}, {tuple(order.shape)}")
    if mean.numel() != 3 or std.numel() != 3:
        raise ValueError(f"mean and std need 3 values; got {mean.numel()}, {std.numel()}")


# No autograd wrapper: no gradient flows through data.
@torch.library.custom_op("daformer_fast::classmix_jitter", mutates_args=())
def classmix_jitter_triton(
    img: torch.Tensor,
    tgt: torch.Tensor,
    gt: torch.Tensor,
    pl: torch.Tensor,
    pw: torch.Tensor,
    chosen: torch.Tensor,
    factors: torch.Tensor | None,
    order: torch.Tensor | None,
    mean: torch.Tensor,
    std: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mixed image, mixed label, mixed weight, mask); jitter when `factors` (B, 4) and `order` (B, 4) are given."""
    _check(img, tgt, gt, pl, pw, chosen, factors, order, mean, std)
    B, _, H, W = img.shape
    out_img = torch.empty(B, 3, H, W, device=img.device, dtype=img.dtype)
    out_lbl = torch.empty(B, H, W, device=img.device, dtype=torch.result_type(gt, pl))
    out_w = torch.empty(B, H, W, device=img.device, dtype=pw.dtype)
    out_mask = torch.empty(B, 1, H, W, device=img.device, dtype=torch.bool)
    jitter = factors is not None
    if jitter:
        factors, order = factors.to(img.device, torch.float32).contiguous(), order.to(img.device, torch.int32)
    else:
        factors = order = img  # never read: the kernel is specialised with JITTER off
    mean, std = (t.reshape(3).to(img.device, torch.float32) for t in (mean, std))
    _classmix_jitter_kernel[(triton.cdiv(H * W, _BLOCK), B)](
        img.contiguous(), tgt.contiguous(), gt.contiguous(), pl.contiguous(), pw.contiguous(), chosen.contiguous(),
        factors, order.contiguous(), mean, std, out_img, out_lbl, out_w, out_mask, H * W,
        JITTER=jitter, BLOCK=_BLOCK, num_warps=_NUM_WARPS,
    )  # fmt: skip
    return out_img, out_lbl, out_w, out_mask


@classmix_jitter_triton.register_fake
def _(img, tgt, gt, pl, pw, chosen, factors, order, mean, std):
    B, _, H, W = img.shape
    return (img.new_empty(B, 3, H, W), gt.new_empty(B, H, W, dtype=torch.result_type(gt, pl)),
            pw.new_empty(B, H, W), img.new_empty(B, 1, H, W, dtype=torch.bool))  # fmt: skip
