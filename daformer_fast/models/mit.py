"""Mix Transformer (MiT-B0..B5), the SegFormer encoder used by DAFormer.

Architecture of Xie et al., "SegFormer" (NeurIPS 2021), as used by DAFormer (Hoyer et al., CVPR 2022), written from
the specification. State-dict keys equal those of SegFormer's released `mit_b*.pth` files (minus the ImageNet
`head.*`), so those files load with `strict=True` after dropping `head.*`. The released weights carry NVIDIA's
non-commercial licence; this code does not.

Two details matter when loading the original weights: LayerNorm eps is 1e-6 in the blocks and stage norms but the
torch default 1e-5 in the patch embeddings and the spatial-reduction norm; GELU is the exact (erf) form.

Legend: B batch, C channels, h/w feature map size, N = h·w tokens, L key/value tokens, M heads, D head dim.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn as nn

from daformer_fast.ops import attention
from daformer_fast.ops.mixffn import dwconv_gelu

__all__ = ["MIT_SIZES", "MixVisionTransformer", "MitSpec", "from_hf_mit", "from_segformer_mit", "mit"]


@dataclass(frozen=True)
class MitSpec:
    embed_dims: tuple[int, int, int, int]
    depths: tuple[int, int, int, int]
    num_heads: tuple[int, int, int, int] = (1, 2, 5, 8)
    sr_ratios: tuple[int, int, int, int] = (8, 4, 2, 1)
    mlp_ratio: int = 4


_WIDE = (64, 128, 320, 512)
MIT_SIZES: dict[str, MitSpec] = {
    "b0": MitSpec((32, 64, 160, 256), (2, 2, 2, 2)),
    "b1": MitSpec(_WIDE, (2, 2, 2, 2)),
    "b2": MitSpec(_WIDE, (3, 4, 6, 3)),
    "b3": MitSpec(_WIDE, (3, 4, 18, 3)),
    "b4": MitSpec(_WIDE, (3, 8, 27, 3)),
    "b5": MitSpec(_WIDE, (3, 6, 40, 3)),
}


class DropPath(nn.Module):
    """Stochastic depth of a block's two residual branches at rate `p` (timm semantics: a whole branch dropped per
    sample, survivors scaled by 1/keep). It holds the rate and, as `training`, whether dropping is on (the teachers
    switch it off); the encoder draws the factors of all its blocks at once (`MixVisionTransformer.drop_factors`)
    and the block multiplies them in."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def extra_repr(self) -> str:
        return f"p={self.p}"


class OverlapPatchEmbed(nn.Module):
    """Strided conv with overlapping windows, then tokens + LayerNorm (eps 1e-5)."""

    def __init__(self, in_chans: int, dim: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel, stride, padding=kernel // 2)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x_BCHW: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.proj(x_BCHW)
        h, w = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), h, w


class EfficientSelfAttention(nn.Module):
    """Multi-head attention whose keys/values come from a R×R strided-conv reduction of the tokens."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, sr_ratio)
            self.norm = nn.LayerNorm(dim)  # eps 1e-5, unlike the block norms

    def forward(self, x_BNC: torch.Tensor, h: int, w: int) -> torch.Tensor:
        B, N, C = x_BNC.shape
        M, D = self.num_heads, C // self.num_heads
        q_BMND = self.q(x_BNC).reshape(B, N, M, D).transpose(1, 2)
        if self.sr_ratio > 1:
            x_BChw = x_BNC.transpose(1, 2).reshape(B, C, h, w)
            kv_in_BLC = self.norm(self.sr(x_BChw).flatten(2).transpose(1, 2))
        else:
            kv_in_BLC = x_BNC
        # kv output is [k | v] along channels, each split into heads.
        kv = self.kv(kv_in_BLC).reshape(B, -1, 2, M, D).permute(2, 0, 3, 1, 4)
        out_BMND = attention(q_BMND, kv[0], kv[1], self.scale)
        return self.proj(out_BMND.transpose(1, 2).reshape(B, N, C))


class DWConv(nn.Module):
    """Holds the depthwise 3×3 conv under its original state-dict name (`mlp.dwconv.dwconv`); it has no forward of
    its own: MixFFN runs the conv together with the GELU through `ops.mixffn.dwconv_gelu`."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)


class MixFFN(nn.Module):
    """fc1 → depthwise 3×3 conv on the token grid → exact GELU → fc2."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden)  # holds the conv parameters under the original state-dict names
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x_BNC: torch.Tensor, h: int, w: int) -> torch.Tensor:
        conv = self.dwconv.dwconv
        # One op through the dispatch point: its reference path is the original's conv followed by exact GELU.
        return self.fc2(dwconv_gelu(self.fc1(x_BNC), conv.weight, conv.bias, h, w))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: int, sr_ratio: int, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = EfficientSelfAttention(dim, num_heads, sr_ratio)
        # Rate 0 (the very first block) is an identity, as in the original.
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MixFFN(dim, dim * mlp_ratio)

    def forward(self, x_BNC: torch.Tensor, h: int, w: int, drop_2B11: torch.Tensor | None = None) -> torch.Tensor:
        """x + DropPath(attn(norm1 x)), then x + DropPath(mlp(norm2 x)). drop_2B11: the two branches' DropPath
        factors (0 or 1/keep per sample, `MixVisionTransformer.drop_factors`), None when nothing is dropped. As a
        tensor input rather than drawn here, the block's own drop rate is not a constant of its code: one compiled
        graph serves every block of a stage (`train.compile: regional`)."""
        attn = self.attn(self.norm1(x_BNC), h, w)
        x_BNC = x_BNC + (attn if drop_2B11 is None else attn * drop_2B11[0])
        mlp = self.mlp(self.norm2(x_BNC), h, w)
        return x_BNC + (mlp if drop_2B11 is None else mlp * drop_2B11[1])


class MixVisionTransformer(nn.Module):
    """Four stages of (overlapping patch embed → blocks → LayerNorm); `forward` returns the 4 NCHW stage maps."""

    def __init__(self, spec: MitSpec, in_chans: int = 3, drop_path_rate: float = 0.1):
        super().__init__()
        self.spec = spec
        self.embed_dims = spec.embed_dims
        self.out_channels = spec.embed_dims  # the encoder interface the decoders read (CNN encoders have it too)
        rates = torch.linspace(0, drop_path_rate, sum(spec.depths)).tolist()
        # Keep probabilities of every block, (blocks, 1, 1, 1, 1): derived from the config, so not saved.
        keep = torch.tensor([1.0 - r for r in rates]).view(-1, 1, 1, 1, 1)
        self.register_buffer("drop_keep", keep, persistent=False)
        cur = 0
        for i in range(4):
            dim = spec.embed_dims[i]
            kernel, stride = (7, 4) if i == 0 else (3, 2)
            prev = in_chans if i == 0 else spec.embed_dims[i - 1]
            setattr(self, f"patch_embed{i + 1}", OverlapPatchEmbed(prev, dim, kernel, stride))
            blocks = [
                Block(dim, spec.num_heads[i], spec.mlp_ratio, spec.sr_ratios[i], rates[cur + j])
                for j in range(spec.depths[i])
            ]
            setattr(self, f"block{i + 1}", nn.ModuleList(blocks))
            setattr(self, f"norm{i + 1}", nn.LayerNorm(dim, eps=1e-6))
            cur += spec.depths[i]
        self.init_weights()

    def init_weights(self) -> None:
        """From-scratch init of the original: trunc-normal(0.02) Linear, LN 1/0, conv N(0, sqrt(2/fan_out))."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def drop_factors(self, batch: int) -> list[torch.Tensor | None]:
        """Every block's DropPath factors for one forward, (2, B, 1, 1) per block (its attention and MLP branch):
        floor(keep + u) / keep with u uniform, i.e. 0 with probability 1 − keep and 1/keep otherwise, as timm's
        `drop_path` that the original uses. One draw from the global generator for the whole forward (a few ops
        instead of four per branch); None for a block that does not drop (rate 0, or DropPath off)."""
        on = [isinstance(b.drop_path, DropPath) and b.drop_path.training for b in self.blocks]
        if not any(on):
            return [None] * len(on)
        keep = self.drop_keep
        u = torch.rand((keep.shape[0], 2, batch, 1, 1), device=keep.device, dtype=keep.dtype)
        factors = u.add_(keep).floor_().div_(keep).unbind(0)
        return [f if o else None for f, o in zip(factors, on, strict=True)]

    @property
    def blocks(self) -> list[Block]:
        """All blocks of the four stages, in forward order (the order of `drop_keep`)."""
        return [blk for i in range(1, 5) for blk in getattr(self, f"block{i}")]

    def forward(self, x_B3HW: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        x = x_B3HW
        drops = iter(self.drop_factors(x_B3HW.shape[0]))
        for i in range(1, 5):
            x_BNC, h, w = getattr(self, f"patch_embed{i}")(x)
            for blk in getattr(self, f"block{i}"):
                x_BNC = blk(x_BNC, h, w, next(drops))
            x_BNC = getattr(self, f"norm{i}")(x_BNC)
            x = x_BNC.transpose(1, 2).reshape(x_BNC.shape[0], -1, h, w)
            outs.append(x)
        return outs


def mit(size: str, *, drop_path_rate: float = 0.1) -> MixVisionTransformer:
    """MiT encoder of the given size: "b0".."b5" (or "mit_b0".."mit_b5")."""
    key = size.removeprefix("mit_")
    if key not in MIT_SIZES:
        raise ValueError(f"unknown MiT size {size!r}; expected one of {', '.join('mit_' + k for k in MIT_SIZES)}")
    return MixVisionTransformer(MIT_SIZES[key], drop_path_rate=drop_path_rate)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint key mapping: a file's encoder state dict -> MiT keys, one function per format. Each returns
# (state, ignored keys); `checkpoint.load_weights` detects the format, validates and compares with the model.


def from_segformer_mit(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """SegFormer's ImageNet `mit_b*.pth`: the keys already match ours; the ImageNet classifier `head.*` is ignored."""
    return {k: v for k, v in state.items() if not k.startswith("head.")}, [k for k in state if k.startswith("head.")]


_HF_BLOCK = [  # HF SegformerLayer sub-module -> ours (modeling_segformer.py names)
    ("layer_norm_1.", "norm1."), ("layer_norm_2.", "norm2."), ("attention.self.query.", "attn.q."),
    ("attention.self.sr.", "attn.sr."), ("attention.self.layer_norm.", "attn.norm."),
    ("attention.output.dense.", "attn.proj."), ("mlp.dense1.", "mlp.fc1."),
    ("mlp.dwconv.dwconv.", "mlp.dwconv.dwconv."), ("mlp.dense2.", "mlp.fc2."),
]  # fmt: skip


def from_hf_mit(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """HF transformers `nvidia/mit-b*` (`segformer.encoder.*` or `encoder.*`): separate key/value projections are
    concatenated into our `attn.kv` = [key; value]; HF's heads (`classifier.*`, `decode_head.*`) are ignored.
    Unknown encoder keys, and a key without its value (or the reverse), keep their HF name so that a strict load
    names them as unexpected."""
    out, ignored, kv = {}, [], {}
    for name, t in state.items():
        k = name.removeprefix("segformer.")
        if not k.startswith("encoder."):
            ignored.append(name)
            continue
        k = k.removeprefix("encoder.")
        if m := re.fullmatch(r"patch_embeddings\.(\d+)\.(proj|layer_norm)\.(\w+)", k):
            sub = "proj" if m[2] == "proj" else "norm"
            out[f"patch_embed{int(m[1]) + 1}.{sub}.{m[3]}"] = t
        elif m := re.fullmatch(r"layer_norm\.(\d+)\.(\w+)", k):
            out[f"norm{int(m[1]) + 1}.{m[2]}"] = t
        elif (m := re.fullmatch(r"block\.(\d+)\.(\d+)\.(.+)", k)) is not None:
            pre, rest = f"block{int(m[1]) + 1}.{m[2]}.", m[3]
            if kvm := re.fullmatch(r"attention\.self\.(key|value)\.(\w+)", rest):
                kv.setdefault((pre, kvm[2]), {})[kvm[1]] = (name, t)
                continue
            new = next((dst + rest[len(src):] for src, dst in _HF_BLOCK if rest.startswith(src)), None)
            out[pre + new if new else name] = t
        else:
            out[name] = t
    for (pre, param), parts in kv.items():
        if set(parts) == {"key", "value"}:
            # Our kv Linear outputs [k | v] along dim 0 (EfficientSelfAttention reshapes to (..., 2, heads, dim)).
            out[f"{pre}attn.kv.{param}"] = torch.cat([parts["key"][1], parts["value"][1]], 0)
        else:
            out.update(parts.values())
    return out, ignored


def _feature_shapes(size: str, h: int, w: int) -> list[tuple[int, int, int]]:
    """(C, h, w) of the four stage outputs for an input of h×w (conv arithmetic of the patch embeddings)."""
    spec = MIT_SIZES[size.removeprefix("mit_")]
    shapes = []
    for i, c in enumerate(spec.embed_dims):
        k, s = (7, 4) if i == 0 else (3, 2)
        h, w = (h + 2 * (k // 2) - k) // s + 1, (w + 2 * (k // 2) - k) // s + 1
        shapes.append((c, h, w))
    return shapes
