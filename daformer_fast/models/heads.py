"""Decoders: the DAFormer head (Hoyer et al., CVPR 2022, Sec. 3.2), its fusion ablations, and the SegFormer MLP head.

DAFormer head: every stage map is embedded to 256 channels by one Linear layer, upsampled to stride 4, concatenated
(all four levels), and fused by a context-aware ASPP over the concatenation (depthwise-separable 3×3 branches with
dilations 6/12/18 plus a 1×1 branch, no image pooling), then a 3×3 bottleneck, Dropout2d and a 1×1 classifier.
Ablations (Table 7): `daformer_conv1` (a 1×1 ConvModule fusion), `daformer_aspp` (regular, non-separable dilated
convs), `daformer_isa` (ISA fusion) and `daformer_sepaspp_bottleneck` (separable ASPP on F4 only, 1×1 fusion).

Module and key names follow the official checkpoints (`embed_layers.{i}.proj`, `fuse_layer.aspp_modules...`,
`fuse_layer.bottleneck`, `conv_seg`, SegFormer's `linear_c.{i}.proj`; ConvModule = `conv` + `bn`). Every head
returns logits at stride 4; upsampling to the label size belongs to the consumers (loss, pseudo-labelling,
inference).

Legend: B batch, C channels, E embedding channels, K classes, h/w stride-4 size.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from daformer_fast.ops.depthwise import depthwise_conv2d

__all__ = ["ConvModule", "DAFormerHead", "DepthwiseSeparableConvModule", "SegFormerHead", "init_conv_modules",
           "init_decode_head", "resize"]


class ConvModule(nn.Module):
    """mmcv's ConvModule: Conv2d → BatchNorm (`bn`) → ReLU (`activate`), in that order, named as the official
    checkpoints name them (docs/architectures.md §0).

    norm=False is the original's `norm_cfg=None` (the `_nodbn` decoders): no `bn`, and the conv gets a bias (mmcv's
    bias='auto' rule: a bias exactly when there is no norm). act=False drops the ReLU. Padding defaults to
    dilation·(kernel//2), i.e. "same" for odd kernels.
    """

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int,
        *,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        norm: bool = True,
        act: bool = True,
        inplace: bool = True,
    ) -> None:
        super().__init__()
        pad = dilation * (kernel // 2)
        self.conv = nn.Conv2d(cin, cout, kernel, stride, pad, dilation=dilation, groups=groups, bias=not norm)
        if norm:
            self.bn = nn.BatchNorm2d(cout)
        self.activate = nn.ReLU(inplace=inplace) if act else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        if c.groups > 1 and c.groups == c.in_channels == c.out_channels and c.stride == (1, 1):
            y = depthwise_conv2d(x, c.weight, c.bias, padding=c.padding, dilation=c.dilation)  # fp32 under CPU autocast
        else:
            y = c(x)
        if hasattr(self, "bn"):
            y = self.bn(y)
        return self.activate(y) if self.activate is not None else y


class DepthwiseSeparableConvModule(nn.Module):
    """A depthwise ConvModule then a pointwise (1×1) one, each with its own norm and ReLU (mmcv's DW module)."""

    def __init__(self, cin: int, cout: int, kernel: int, dilation: int, *, norm: bool = True) -> None:
        super().__init__()
        self.depthwise_conv = ConvModule(cin, cin, kernel, dilation=dilation, groups=cin, norm=norm)
        self.pointwise_conv = ConvModule(cin, cout, 1, norm=norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise_conv(self.depthwise_conv(x))


class MLP(nn.Module):
    """One Linear layer on the flattened tokens of a feature map (no norm, no activation)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.proj = nn.Linear(cin, cout)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        B, _, h, w = x_BChw.shape
        x = self.proj(x_BChw.flatten(2).transpose(1, 2))
        return x.transpose(1, 2).reshape(B, -1, h, w)


class ASPPWrapper(nn.Module):
    """ASPP without image pooling: a 1×1 branch + dilated 3×3 branches, concatenated, then a 3×3 bottleneck."""

    def __init__(self, cin: int, cout: int, dilations: tuple[int, ...], separable: bool) -> None:
        super().__init__()
        branches: list[nn.Module] = []
        for d in dilations:
            if d == 1:
                branches.append(ConvModule(cin, cout, 1))
            elif separable:
                branches.append(DepthwiseSeparableConvModule(cin, cout, 3, d))
            else:
                branches.append(ConvModule(cin, cout, 3, dilation=d))
        self.aspp_modules = nn.ModuleList(branches)
        self.bottleneck = ConvModule(len(dilations) * cout, cout, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bottleneck(torch.cat([m(x) for m in self.aspp_modules], dim=1))


def init_conv_modules(module: nn.Module) -> None:
    """mmcv ConvModule init: Kaiming-normal (fan_out, ReLU; groups not divided out), conv bias 0, BN weight 1 /
    bias 0 (docs/architectures.md §0)."""
    for m in module.modules():
        if isinstance(m, ConvModule):
            nn.init.kaiming_normal_(m.conv.weight, mode="fan_out", nonlinearity="relu")
            if m.conv.bias is not None:
                nn.init.zeros_(m.conv.bias)
            if hasattr(m, "bn"):
                nn.init.ones_(m.bn.weight)
                nn.init.zeros_(m.bn.bias)


def resize(x: torch.Tensor, size: torch.Size | tuple[int, int]) -> torch.Tensor:
    """Bilinear resize with align_corners=False, the only resize these models use (docs/architectures.md §0)."""
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def init_decode_head(head: nn.Module) -> None:
    """The original's decode-head init: ConvModules Kaiming fan_out, bias 0, BN 1/0 (docs/architectures.md §0); the
    classifier `head.conv_seg` N(0, 0.01²), bias 0 (§2.2)."""
    init_conv_modules(head)
    nn.init.normal_(head.conv_seg.weight, 0.0, 0.01)
    nn.init.zeros_(head.conv_seg.bias)


class DAFormerHead(nn.Module):
    """The DAFormer head and its Table-7 fusion variants (docs/architectures.md §2.8): each level embedded to
    `channels` (a Linear `proj`), levels whose size differs from F1's upsampled to it, concatenated [e1..e4] and
    fused, then Dropout2d and `conv_seg`.

    fusion: "sepaspp" (final: separable ASPP over the concatenation), "aspp" (regular dilated convs), "conv1" (a
    1×1 ConvModule), "isa" (an interlaced sparse self-attention layer: 1×1 `in_conv`, one-conv key/query projections,
    no residual concat), "sepaspp_bottleneck" (context only at F4: `embed_layers.3` = a plain 1×1 conv then a
    separable ASPP on `channels`, fused by a 1×1 ConvModule; the segmentor's neck hands F4 in already upsampled to
    stride 4, so it is not resized here).
    """

    def __init__(
        self,
        in_channels: tuple[int, ...],
        num_classes: int,
        channels: int = 256,
        fusion: str = "sepaspp",
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        embeds: list[nn.Module] = [MLP(c, channels) for c in in_channels]
        if fusion == "sepaspp_bottleneck":
            # The original's "rawconv_and_aspp" embedding: a bare Conv2d (bias, PyTorch's default init), then ASPP.
            context = ASPPWrapper(channels, channels, (1, 6, 12, 18), separable=True)
            embeds[-1] = nn.Sequential(nn.Conv2d(in_channels[-1], channels, 1), context)
        self.embed_layers = nn.ModuleList(embeds)
        cat = channels * len(in_channels)
        if fusion == "sepaspp":
            self.fuse_layer: nn.Module = ASPPWrapper(cat, channels, (1, 6, 12, 18), separable=True)
        elif fusion == "aspp":
            self.fuse_layer = ASPPWrapper(cat, channels, (1, 6, 12, 18), separable=False)
        elif fusion in ("conv1", "sepaspp_bottleneck"):
            self.fuse_layer = ConvModule(cat, channels, 1)
        elif fusion == "isa":
            # Imported here: attention_heads builds on this module's ConvModule.
            from daformer_fast.models.attention_heads import ISALayer

            # isa_channels 256 and down factor (8, 8) are the original config's constants.
            self.fuse_layer = ISALayer(cat, channels, 256, (8, 8), key_query_convs=1, in_kernel=1)
        else:
            raise ValueError(
                f"unknown DAFormer fusion {fusion!r}; expected sepaspp, aspp, conv1, isa or sepaspp_bottleneck"
            )
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        self.init_weights()

    def init_weights(self) -> None:
        # Embedding Linear layers (and the context-at-F4 bare conv) keep PyTorch's default init, as the original;
        # the classifier is N(0, 0.01).
        init_decode_head(self)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        size = feats[0].shape[-2:]
        embeds = []
        for i, (x, embed) in enumerate(zip(feats, self.embed_layers)):
            e = embed(x)
            if i > 0 and e.shape[-2:] != size:
                e = resize(e, size)
            embeds.append(e)
        x = self.fuse_layer(torch.cat(embeds, dim=1))
        return self.conv_seg(self.dropout(x))


class SegFormerHead(nn.Module):
    """SegFormer's all-MLP decoder as DAFormer's code defines it (docs/architectures.md §2.5): each level embedded
    to E = `channels` by `linear_c["i"]` (a Linear `proj`), levels 1..3 upsampled to F1's size, concatenated in
    ascending order [c1, c2, c3, c4], a 1×1 ConvModule `linear_fuse`, Dropout2d, and `linear_pred`.

    Two quirks of the original kept: `linear_pred` keeps PyTorch's default Conv2d init (the head's N(0, 0.01)
    override names `conv_seg`), and that `conv_seg` (128→K, the config's `channels=128`) exists but is never used.
    """

    def __init__(self, in_channels: tuple[int, ...], num_classes: int, channels: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.conv_seg = nn.Conv2d(128, num_classes, 1)
        # Frozen, so that DDP without find_unused_parameters (the original needs find_unused_parameters=True for
        # this layer) and the optimizer meet no parameter that never gets a gradient. The update is the original's:
        # torch's AdamW skips parameters whose grad is None, weight decay included, so the dead layer never moved.
        self.conv_seg.requires_grad_(False)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.linear_c = nn.ModuleDict({str(i): MLP(c, channels) for i, c in enumerate(in_channels)})
        self.linear_fuse = ConvModule(channels * len(in_channels), channels, 1)
        self.linear_pred = nn.Conv2d(channels, num_classes, 1)
        self.init_weights()

    def init_weights(self) -> None:
        # The dead conv_seg gets the N(0, 0.01) override; the live linear_pred keeps PyTorch's default.
        init_decode_head(self)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        size = feats[0].shape[-2:]
        embeds = []
        for i, x in enumerate(feats):  # ascending: [c1, c2, c3, c4]
            e = self.linear_c[str(i)](x)
            if e.shape[-2:] != size:  # the original resizes every level but the first; same-size resize is exact
                e = resize(e, size)
            embeds.append(e)
        return self.linear_pred(self.dropout(self.linear_fuse(torch.cat(embeds, dim=1))))
