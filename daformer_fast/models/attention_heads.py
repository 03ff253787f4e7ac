"""The CNN-era attention decoders of the paper's Table 1: DANet (`DAHead`) and ISANet (`ISAHead`), and the interlaced
sparse self-attention layer (`ISALayer`) that the DAFormer head's ISA fusion reuses (docs/architectures.md §2.3,
§2.4, §2.8).

    logits_BKhw = DAHead(dims, K)(feats)          # feats[3] (the stride-8 map); a tuple while training with grad
    logits_BKhw = ISAHead(dims, K)(feats)         # feats[3]
    y_BChw = ISALayer(cin, C, 256)(x_BChw)        # the DAFormer head's `fuse_layer` for fusion="isa"

Module and key names are the original's (`pam.gamma.scale`, `global_relation.key_project.0.conv`, ...), so its
checkpoints load as they are. Every ConvModule is Kaiming-initialised, `conv_seg` N(0, 0.01); every plain Conv2d
(PAM projections, ISA value projections, DANet's auxiliary classifiers) keeps PyTorch's default init
(docs/architectures.md §0, §2.3, §2.4).

Legend: B batch, C channels, N/L query/key tokens, K classes, h/w map size, G groups per axis, S group size (the
down factor).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from daformer_fast.models.heads import ConvModule, init_decode_head
from daformer_fast.ops.attention import attention_ref, attention_sdpa
from daformer_fast.ops.dispatch import default_impl

__all__ = ["ChannelAttention", "DAHead", "ISAHead", "ISALayer", "ISARelation", "PositionAttention", "Scale",
           "interlaced_relations"]  # fmt: skip


class Scale(nn.Module):
    """A learnable 0-dim factor (mmcv's `Scale`): its parameter is the state-dict key `<name>.scale`, shape []."""

    def __init__(self, init: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def _attend(q_BNd: torch.Tensor, k_BLd: torch.Tensor, v_BLe: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(scale·q·kᵀ over the keys)·v for one head. The explicit product when the process runs the reference
    ops (the original-order mode), PyTorch's fused SDPA otherwise: the decoders' value width (512 or 256) differs
    from their key width and is beyond the Triton kernel's head dims, so the kernel never applies here."""
    q, k, v = q_BNd.unsqueeze(1), k_BLd.unsqueeze(1), v_BLe.unsqueeze(1)  # one head: SDPA's fused paths want 4-D
    out = attention_ref(q, k, v, scale) if default_impl() == "reference" else attention_sdpa(q, k, v, scale)
    return out.squeeze(1)


def _tokens(x_BChw: torch.Tensor) -> torch.Tensor:
    return x_BChw.flatten(2).transpose(1, 2)  # (B, hw, C)


def _to_map(t_BNC: torch.Tensor, like_BChw: torch.Tensor) -> torch.Tensor:
    B, _, h, w = like_BChw.shape
    return t_BNC.transpose(1, 2).reshape(B, -1, h, w)


class PositionAttention(nn.Module):
    """DANet's position attention (PAM): x + γ·softmax(q·kᵀ)·v over all pixels, with no 1/√d factor and no output
    projection; q, k, v are plain 1×1 convs with bias (no norm, no activation); γ starts at 0."""

    def __init__(self, channels: int, key_channels: int) -> None:
        super().__init__()
        self.key_project = nn.Conv2d(channels, key_channels, 1)
        self.query_project = nn.Conv2d(channels, key_channels, 1)
        self.value_project = nn.Conv2d(channels, channels, 1)
        self.gamma = Scale(0.0)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        q, k, v = (_tokens(p(x_BChw)) for p in (self.query_project, self.key_project, self.value_project))
        return self.gamma(_to_map(_attend(q, k, v, 1.0), x_BChw)) + x_BChw


class ChannelAttention(nn.Module):
    """DANet's channel attention (CAM): x + γ·softmax(rowmax(E) − E)·X with E = X·Xᵀ over channels; no convs.

    Computed in fp32 even under autocast: E sums hw products of activations, and a bf16 E (8-bit mantissa) would
    shift the differences rowmax − E that the softmax sees by far more than their spread."""

    def __init__(self) -> None:
        super().__init__()
        self.gamma = Scale(0.0)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x_BChw.device.type, enabled=False):
            X_BCN = x_BChw.flatten(2).to(torch.promote_types(x_BChw.dtype, torch.float32))
            E_BCC = X_BCN @ X_BCN.transpose(1, 2)
            A_BCC = torch.softmax(E_BCC.amax(dim=-1, keepdim=True) - E_BCC, dim=-1)
            out = (A_BCC @ X_BCN).reshape(x_BChw.shape).to(x_BChw.dtype)
        return self.gamma(out) + x_BChw


class DAHead(nn.Module):
    """DANet (Fu et al., CVPR 2019) on the last encoder map: a PAM branch and a CAM branch (each 3×3 ConvModule in,
    attention, 3×3 ConvModule out), summed and classified; each branch also has its own auxiliary classifier.

    Output rule: the original's training forward returns (pam_cam, pam, cam) and all three feed the loss, while its
    test forward (evaluation and pseudo-labels) keeps pam_cam only. Here `forward` returns the tuple exactly when
    `self.training and torch.is_grad_enabled()` (the student's training step) and the pam_cam logits alone
    otherwise, so the EMA teacher, which runs in train mode under no_grad, gets pam_cam only. All three outputs
    share one Dropout2d (each call draws its own mask), in the original's order pam, cam, pam_cam.

    norm=False is the paper's `_nodbn` (no BatchNorm in the decoder, conv biases instead).
    """

    def __init__(
        self,
        in_channels: tuple[int, ...],
        num_classes: int,
        *,
        norm: bool = True,
        channels: int = 512,
        pam_channels: int = 64,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        cin = in_channels[3]
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.pam_in_conv = ConvModule(cin, channels, 3, norm=norm)
        self.pam = PositionAttention(channels, pam_channels)
        self.pam_out_conv = ConvModule(channels, channels, 3, norm=norm)
        self.pam_conv_seg = nn.Conv2d(channels, num_classes, 1)
        self.cam_in_conv = ConvModule(cin, channels, 3, norm=norm)
        self.cam = ChannelAttention()
        self.cam_out_conv = ConvModule(channels, channels, 3, norm=norm)
        self.cam_conv_seg = nn.Conv2d(channels, num_classes, 1)
        self.init_weights()

    def init_weights(self) -> None:
        init_decode_head(self)  # the auxiliary classifiers keep PyTorch's default init, as in the original
        nn.init.zeros_(self.pam.gamma.scale)
        nn.init.zeros_(self.cam.gamma.scale)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = feats[3]
        pam_feat = self.pam_out_conv(self.pam(self.pam_in_conv(x)))
        cam_feat = self.cam_out_conv(self.cam(self.cam_in_conv(x)))
        if not (self.training and torch.is_grad_enabled()):
            return self.conv_seg(self.dropout(pam_feat + cam_feat))
        pam_out = self.pam_conv_seg(self.dropout(pam_feat))
        cam_out = self.cam_conv_seg(self.dropout(cam_feat))
        return self.conv_seg(self.dropout(pam_feat + cam_feat)), pam_out, cam_out


def _projection(cin: int, cout: int, num_convs: int, norm: bool) -> nn.Module:
    """`num_convs` 1×1 ConvModules cin→cout→cout; a bare ConvModule for one (keys without the `.0` level)."""
    convs = [ConvModule(cin if i == 0 else cout, cout, 1, norm=norm) for i in range(num_convs)]
    return convs[0] if num_convs == 1 else nn.Sequential(*convs)


class ISARelation(nn.Module):
    """ISA's self-attention block: q and k from `key_query_convs` 1×1 ConvModules (C→d→d), v a plain 1×1 conv,
    softmax(d^-½·q·kᵀ)·v, then a 1×1 ConvModule `output_project`. No shortcut inside the block."""

    def __init__(self, channels: int, isa_channels: int, *, key_query_convs: int = 2, norm: bool = True) -> None:
        super().__init__()
        self.key_project = _projection(channels, isa_channels, key_query_convs, norm)
        self.query_project = _projection(channels, isa_channels, key_query_convs, norm)
        self.value_project = nn.Conv2d(channels, channels, 1)
        self.output_project = ConvModule(channels, channels, 1, norm=norm)
        self.scale = isa_channels**-0.5

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        q, k, v = (_tokens(p(x_BChw)) for p in (self.query_project, self.key_project, self.value_project))
        return self.output_project(_to_map(_attend(q, k, v, self.scale), x_BChw))


def interlaced_relations(
    x_BChw: torch.Tensor, global_relation: nn.Module, local_relation: nn.Module, down_factor: tuple[int, int]
) -> torch.Tensor:
    """ISA's interlaced partition (docs/architectures.md §2.4): with S = down_factor and G = ⌈size/S⌉ per axis, pad
    the map with zeros to G·S (split as the original: ⌊p/2⌋ before, the rest after; the zeros join the attention
    unmasked), write row = g_y·S_h + l_y (columns alike), attend within each of the S_h·S_w "global" groups (the G_h×G_w
    pixels S apart; batch index (b·S_h + l_y)·S_w + l_x), then within each of the G_h·G_w "local" S_h×S_w blocks
    (batch index (b·G_h + g_y)·G_w + g_x), put every pixel back and crop the padding."""
    B, C, h, w = x_BChw.shape
    Sh, Sw = down_factor
    Gh, Gw = math.ceil(h / Sh), math.ceil(w / Sw)
    ph, pw = Gh * Sh - h, Gw * Sw - w
    if ph or pw:
        x_BChw = F.pad(x_BChw, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
    # Axes of the padded map viewed as (B, C, Gh, Sh, Gw, Sw).
    x6 = x_BChw.reshape(B, C, Gh, Sh, Gw, Sw)
    glob = x6.permute(0, 3, 5, 1, 2, 4).reshape(B * Sh * Sw, C, Gh, Gw)
    glob = global_relation(glob).reshape(B, Sh, Sw, C, Gh, Gw)
    loc = glob.permute(0, 4, 5, 3, 1, 2).reshape(B * Gh * Gw, C, Sh, Sw)
    loc = local_relation(loc).reshape(B, Gh, Gw, C, Sh, Sw)
    y = loc.permute(0, 3, 1, 4, 2, 5).reshape(B, C, Gh * Sh, Gw * Sw)
    return y[:, :, ph // 2 : ph // 2 + h, pw // 2 : pw // 2 + w] if ph or pw else y


class ISALayer(nn.Module):
    """A ConvModule `in_conv`, then `interlaced_relations` with a `global_relation` and a `local_relation` block;
    with `cat_residual`, a 1×1 ConvModule `out_conv` on [attended, in_conv output] (ISAHead's arrangement).

    The DAFormer head's ISA fusion is ISALayer(1024, 256, 256, key_query_convs=1, in_kernel=1) without the residual
    concat (docs/architectures.md §2.8)."""

    def __init__(
        self,
        cin: int,
        channels: int,
        isa_channels: int,
        down_factor: tuple[int, int] = (8, 8),
        *,
        key_query_convs: int = 2,
        in_kernel: int = 1,
        cat_residual: bool = False,
        norm: bool = True,
    ) -> None:
        super().__init__()
        self.down_factor = tuple(down_factor)
        self.in_conv = ConvModule(cin, channels, in_kernel, norm=norm)
        self.global_relation = ISARelation(channels, isa_channels, key_query_convs=key_query_convs, norm=norm)
        self.local_relation = ISARelation(channels, isa_channels, key_query_convs=key_query_convs, norm=norm)
        self.out_conv = ConvModule(2 * channels, channels, 1, norm=norm) if cat_residual else None

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        x = self.in_conv(x_BChw)
        y = interlaced_relations(x, self.global_relation, self.local_relation, self.down_factor)
        return self.out_conv(torch.cat([y, x], dim=1)) if self.out_conv is not None else y


class ISAHead(nn.Module):
    """ISANet (Huang et al., 2019) on the last encoder map: a 3×3 ConvModule in, global then local interlaced
    relation (two-conv key/query projections), a 1×1 ConvModule on [attended, residual], Dropout2d, `conv_seg`.

    The layers sit directly on the head (`in_conv`, `global_relation`, `local_relation`, `out_conv`, as the
    original names them), with the partition shared with `ISALayer`. norm=False is the paper's `_nodbn`.
    """

    def __init__(
        self,
        in_channels: tuple[int, ...],
        num_classes: int,
        *,
        norm: bool = True,
        channels: int = 512,
        isa_channels: int = 256,
        down_factor: tuple[int, int] = (8, 8),
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.down_factor = tuple(down_factor)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.in_conv = ConvModule(in_channels[3], channels, 3, norm=norm)
        self.global_relation = ISARelation(channels, isa_channels, key_query_convs=2, norm=norm)
        self.local_relation = ISARelation(channels, isa_channels, key_query_convs=2, norm=norm)
        self.out_conv = ConvModule(2 * channels, channels, 1, norm=norm)
        self.init_weights()

    def init_weights(self) -> None:
        init_decode_head(self)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        x = self.in_conv(feats[3])
        y = interlaced_relations(x, self.global_relation, self.local_relation, self.down_factor)
        return self.conv_seg(self.dropout(self.out_conv(torch.cat([y, x], dim=1))))
