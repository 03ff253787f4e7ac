"""UPerNet's decoder (Xiao et al., ECCV 2018), the `upernet` / `upernet_ch256` heads of the decoder study on MiT-B5.

A pyramid pooling module on the last level gives the top of a feature pyramid; 1×1 laterals of the other levels get
the upper levels added top-down, a 3×3 conv each, and all levels are upsampled to stride 4, concatenated and fused by
a 3×3 conv before the classifier. Module and key names follow the original's checkpoints (docs/architectures.md §2.7);
logits come out at the stride of feats[0].

Legend: B batch, C head channels, K classes, L number of levels, h_i/w_i size of level i.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from daformer_fast.models.heads import ConvModule, init_decode_head, resize

__all__ = ["UPerHead"]


class UPerHead(nn.Module):
    """UPerNet head on all L levels (docs/architectures.md §2.7).

    1. PPM on feats[L-1]: for each pool scale s, `psp_modules.{j}` = AdaptiveAvgPool2d(s) → 1×1 ConvModule → C,
       resized back; [feats[L-1], ppm_1, ..., ppm_S] → `bottleneck` 3×3 → the top lateral.
    2. `lateral_convs.{i}` (1×1) on feats[i], i < L-1; top-down, lat[i-1] += up(lat[i]) with the already-summed lat[i].
    3. `fpn_convs.{i}` (3×3) on lat[i], i < L-1 (the top keeps the PPM output); all resized to level 0's size,
       concatenated [P_0, ..., P_{L-1}] → `fpn_bottleneck` 3×3 → Dropout2d → `conv_seg`.
    """

    def __init__(
        self,
        in_channels: tuple[int, ...],
        num_classes: int,
        *,
        channels: int = 512,
        pool_scales: tuple[int, ...] = (1, 2, 3, 6),
        dropout: float = 0.1,
        norm: bool = True,
    ) -> None:
        super().__init__()
        top = in_channels[-1]
        self.psp_modules = nn.ModuleList(
            [nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvModule(top, channels, 1, norm=norm)) for s in pool_scales]
        )
        self.bottleneck = ConvModule(top + len(pool_scales) * channels, channels, 3, norm=norm)
        # The original makes the lateral and FPN ReLUs non-in-place because their outputs receive the top-down sums.
        self.lateral_convs = nn.ModuleList(
            [ConvModule(c, channels, 1, norm=norm, inplace=False) for c in in_channels[:-1]]
        )
        self.fpn_convs = nn.ModuleList(
            [ConvModule(channels, channels, 3, norm=norm, inplace=False) for _ in in_channels[:-1]]
        )
        self.fpn_bottleneck = ConvModule(len(in_channels) * channels, channels, 3, norm=norm)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        self.init_weights()

    def init_weights(self) -> None:
        """(Re-)draw the original's decode-head init (`init_decode_head`)."""
        init_decode_head(self)

    def _ppm(self, x_BChw: torch.Tensor) -> torch.Tensor:
        size = x_BChw.shape[-2:]
        pooled = [resize(m(x_BChw), size) for m in self.psp_modules]
        return self.bottleneck(torch.cat([x_BChw, *pooled], dim=1))

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        n_low = len(self.lateral_convs)
        lats = [conv(feats[i]) for i, conv in enumerate(self.lateral_convs)]
        lats.append(self._ppm(feats[n_low]))
        for i in range(n_low, 0, -1):
            # Out of place: the same sum as the original's `+=`, which current torch's autograd rejects because a
            # ReLU keeps its output for the backward pass.
            lats[i - 1] = lats[i - 1] + resize(lats[i], lats[i - 1].shape[-2:])
        outs = [conv(lats[i]) for i, conv in enumerate(self.fpn_convs)] + [lats[-1]]
        size = outs[0].shape[-2:]
        outs = [outs[0]] + [resize(o, size) for o in outs[1:]]
        return self.conv_seg(self.dropout(self.fpn_bottleneck(torch.cat(outs, dim=1))))
