"""DeepLab decoders of the CNN baselines, and the SegFormer-adapter neck that puts DeepLabV3+ behind MiT.

DLV2Head (`dlv2red`): the DeepLabV2 classifier, a sum of dilated 3×3 convolutions straight to class logits on the
last encoder map (dilations 6 and 12, the reduced form earlier UDA work trained).
DepthwiseSeparableASPPHead (`dlv3p`): DeepLabV3+, an ASPP with image pooling and depthwise-separable dilated
branches on the last map, a 3×3 bottleneck, then a decoder that joins a 1×1-reduced stride-4 map.
SegFormerAdapter (`sfa_`): a parameter-free neck that replaces the last level by upsampled (and concatenated) levels,
so a head that reads feats[3] sees MiT's stride-32 map at stride 8.

Module and key names follow the original's checkpoints (docs/architectures.md §2.1, §2.2, §2.6). Every head returns
logits at its native stride; resizing to the label or input size belongs to the loss and the inference code.

Legend: B batch, C channels, K classes, h/w size of the map the head reads (feats[3]), H1/W1 size of feats[0].
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from daformer_fast.models.heads import ConvModule, DepthwiseSeparableConvModule, init_decode_head, resize

__all__ = ["DLV2Head", "DepthwiseSeparableASPPHead", "SegFormerAdapter"]


class DLV2Head(nn.Module):
    """DeepLabV2's classifier on feats[3]: Σ_d conv3×3_dilation-d(x) → K channels, at the stride of feats[3].

    Each branch is a bare conv with a bias (no norm, no activation), wrapped in a ConvModule only so the keys read
    `aspp_modules.{i}.conv.{weight,bias}` as the original's do. There is no dropout and no `conv_seg` (the original
    deletes it). All branch weights are N(0, 0.01²), biases 0 (docs/architectures.md §2.1).
    """

    def __init__(self, in_channels: tuple[int, ...], num_classes: int, dilations: tuple[int, ...] = (6, 12)) -> None:
        super().__init__()
        cin = in_channels[3]
        self.aspp_modules = nn.ModuleList(
            [ConvModule(cin, num_classes, 3, dilation=d, norm=False, act=False) for d in dilations]
        )
        self.init_weights()

    def init_weights(self) -> None:
        """N(0, 0.01²) weights, zero biases: the original's config overrides the ConvModules' Kaiming init."""
        for m in self.aspp_modules:
            nn.init.normal_(m.conv.weight, 0.0, 0.01)
            nn.init.zeros_(m.conv.bias)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        x_BChw = feats[3]
        out_BKhw = self.aspp_modules[0](x_BChw)
        for branch in self.aspp_modules[1:]:  # summed in branch order, as the original accumulates them
            out_BKhw = out_BKhw + branch(x_BChw)
        return out_BKhw


class DepthwiseSeparableASPPHead(nn.Module):
    """DeepLabV3+ (docs/architectures.md §2.2): x = feats[3], c1 = feats[0].

    1. [image_pool(x) resized to h×w, aspp_modules[0](x) (1×1), aspp_modules[1..](x) (separable 3×3, dilation d)]
       concatenated → `bottleneck` 3×3 → C.
    2. Resized to H1×W1 and concatenated with `c1_bottleneck`(c1) (1×1 → c1_channels): [aspp, c1].
    3. `sep_bottleneck` (two separable 3×3) → Dropout2d → `conv_seg`. Logits at the stride of feats[0].

    norm=False is the `_nodbn` decoder the paper trains: no BN anywhere in the head and a bias on every conv.
    in_channels[3] / in_channels[0] are the widths of x / c1: 2048 / 256 on ResNet, 512 / 64 on MiT behind the neck.
    """

    def __init__(
        self,
        in_channels: tuple[int, ...],
        num_classes: int,
        *,
        norm: bool = True,
        channels: int = 512,
        c1_channels: int = 48,
        dilations: tuple[int, ...] = (1, 12, 24, 36),
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        cin, c1_in = in_channels[3], in_channels[0]
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), ConvModule(cin, channels, 1, norm=norm))
        self.aspp_modules = nn.ModuleList(
            [
                ConvModule(cin, channels, 1, norm=norm)  # the original makes the dilation-1 branch a plain 1×1
                if d == 1
                else DepthwiseSeparableConvModule(cin, channels, 3, d, norm=norm)
                for d in dilations
            ]
        )
        self.bottleneck = ConvModule((len(dilations) + 1) * channels, channels, 3, norm=norm)
        self.c1_bottleneck = ConvModule(c1_in, c1_channels, 1, norm=norm)
        self.sep_bottleneck = nn.Sequential(
            DepthwiseSeparableConvModule(channels + c1_channels, channels, 3, 1, norm=norm),
            DepthwiseSeparableConvModule(channels, channels, 3, 1, norm=norm),
        )
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        self.init_weights()

    def init_weights(self) -> None:
        """(Re-)draw the original's decode-head init (`init_decode_head`)."""
        init_decode_head(self)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        x_BChw = feats[3]
        size = x_BChw.shape[-2:]
        # The pooled branch is 1×1; the bilinear resize (not a broadcast) keeps the original's rounding.
        branches = [resize(self.image_pool(x_BChw), size)] + [m(x_BChw) for m in self.aspp_modules]
        aspp_BChw = self.bottleneck(torch.cat(branches, dim=1))
        c1_BcHW = self.c1_bottleneck(feats[0])
        y = torch.cat([resize(aspp_BChw, c1_BcHW.shape[-2:]), c1_BcHW], dim=1)
        return self.conv_seg(self.dropout(self.sep_bottleneck(y)))


class SegFormerAdapter(nn.Module):
    """The `sfa_` neck (docs/architectures.md §2.6): the listed levels, each upsampled by its scale factor (bilinear,
    align_corners=False; scale 1 leaves a level as it is), concatenated along channels in `out_layers` order,
    replace the last level. The defaults turn MiT's stride-32 F4 into a stride-8 map.

    Returns a new list: the other levels are the caller's tensor objects, the caller's list is left untouched. (The
    original writes into the caller's list in place; the outputs are equal, without the aliasing.) No parameters.
    """

    def __init__(self, out_layers: tuple[int, ...] = (3,), scales: tuple[int | float, ...] = (4,)) -> None:
        super().__init__()
        if len(out_layers) != len(scales) or len(set(out_layers)) != len(out_layers):
            # The original keys the resized levels by layer index, so a repeated layer would silently collapse.
            raise ValueError(f"need distinct out_layers, one scale each; got {out_layers} and {scales}")
        self.out_layers = tuple(out_layers)
        self.scales = tuple(scales)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        parts = [
            feats[i] if s == 1 else F.interpolate(feats[i], scale_factor=s, mode="bilinear", align_corners=False)
            for i, s in zip(self.out_layers, self.scales)
        ]
        out = list(feats)
        out[-1] = torch.cat(parts, dim=1)
        return out
