"""The CNN encoders of the paper's baselines at output stride 8: ResNetV1c-50/101, ResNeSt-50/101/200 and
ResNeXt-50/101 32x4d, as timm models (docs/architectures.md §1).

    enc = cnn_encoder("resnet101_v1c")          # .conv1, .bn1, .layer1..4 (timm's names, no classifier)
    feats = enc(x_B3HW)                          # [256 @ /4, 512 @ /8, 1024 @ /8, 2048 @ /8]

timm's `resnet50c` / `resnet101c` / `resnest*` / `resnext*_32x4d` with `output_stride=8` compute what the original's
mmseg backbones compute with strides (1, 2, 1, 1), dilations (1, 1, 2, 4) and `contract_dilation=True`, except one
detail of ResNeSt (the stride-1 shortcut pools of layer3/layer4, replaced here; §1.4). The OpenMMLab ImageNet files
name the deep stem `stem.*`; `from_mmseg_resnet` maps them onto these keys.

Legend: B batch, C channels, H/W input size.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn as nn

__all__ = ["CNN_ENCODERS", "CNNEncoder", "CnnSpec", "cnn_encoder", "from_mmseg_resnet", "guess_cnn"]


@dataclass(frozen=True)
class CnnSpec:
    """One encoder: the timm model that computes it and the original's (mmseg) facts about it."""

    timm_name: str
    kind: str  # "v1c" (deep stem), "resnest" (deep stem, split attention, avg-down), "resnext" (7x7 stem, 32 groups)
    depth: int
    stem_channels: int  # mmseg's stem_channels: the stem's output width (a deep stem runs C/2, C/2, C)
    blocks: tuple[int, int, int, int]
    pretrained: str  # the OpenMMLab ImageNet file the original loads (`open-mmlab://<name>`, mmcv's model zoo)


CNN_ENCODERS: dict[str, CnnSpec] = {
    "resnet50_v1c": CnnSpec("resnet50c", "v1c", 50, 64, (3, 4, 6, 3), "resnet50_v1c-2cccc1ad.pth"),
    "resnet101_v1c": CnnSpec("resnet101c", "v1c", 101, 64, (3, 4, 23, 3), "resnet101_v1c-e67eebb6.pth"),
    "resnest50": CnnSpec("resnest50d", "resnest", 50, 64, (3, 4, 6, 3), "resnest50_d2-7497a55b.pth"),
    "resnest101": CnnSpec("resnest101e", "resnest", 101, 128, (3, 4, 23, 3), "resnest101_d2-f3b931b2.pth"),
    "resnest200": CnnSpec("resnest200e", "resnest", 200, 128, (3, 24, 36, 3), "resnest200_d2-ca88e41f.pth"),
    "resnext50_32x4d": CnnSpec("resnext50_32x4d", "resnext", 50, 64, (3, 4, 6, 3), "resnext50-32x4d-0ab1a123.pth"),
    "resnext101_32x4d": CnnSpec(
        "resnext101_32x4d", "resnext", 101, 64, (3, 4, 23, 3), "resnext101_32x4d-a5af3160.pth"
    ),
}

_PARTS = ("conv1", "bn1", "act1", "maxpool", "layer1", "layer2", "layer3", "layer4")  # timm's, minus pool and fc


class CNNEncoder(nn.Module):
    """A timm ResNet-family network without its classifier, returning the four stage outputs.

    The timm model's children are adopted as they are, so the state-dict keys are exactly timm's (minus `fc`) and
    our checkpoints, timm's files and the mapped OpenMMLab files share one layout. BatchNorm follows the module's
    train/eval mode (the original's `norm_eval=False`)."""

    out_channels = (256, 512, 1024, 2048)

    def __init__(self, name: str, layers: tuple[int, int, int, int] | None = None) -> None:
        # timm takes seconds to import; MiT runs (and everything importing the checkpoint loader) never need it.
        import timm
        from timm.layers import AvgPool2dSame

        super().__init__()
        self.name = name
        self.spec = CNN_ENCODERS[name]
        extra = {} if layers is None else {"layers": list(layers)}
        net = timm.create_model(
            self.spec.timm_name, pretrained=False, num_classes=0, global_pool="", output_stride=8,
            drop_path_rate=0.0, **extra,
        )  # fmt: skip
        if self.spec.kind == "resnest":
            # timm gives the stride-1 dilated first blocks of layer3/layer4 a zero-padded 2x2 average on the
            # shortcut; mmseg's pool there is 1x1 with stride 1, the identity (docs/architectures.md §1).
            for stage in (net.layer3, net.layer4):
                if not isinstance(stage[0].downsample[0], AvgPool2dSame):
                    raise RuntimeError(f"unexpected timm {self.spec.timm_name} shortcut: {stage[0].downsample[0]}")
                stage[0].downsample[0] = nn.Identity()
        for part in _PARTS:
            setattr(self, part, getattr(net, part))

    def forward(self, x_B3HW: torch.Tensor) -> list[torch.Tensor]:
        """The outputs of layer1..layer4 (strides 4, 8, 8, 8), as a list like the MiT encoder's."""
        x = self.maxpool(self.act1(self.bn1(self.conv1(x_B3HW))))
        outs = []
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
            outs.append(x)
        return outs

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


def cnn_encoder(name: str, *, layers: tuple[int, int, int, int] | None = None) -> CNNEncoder:
    """The named CNN encoder (a key of CNN_ENCODERS), randomly initialised with timm's init; ImageNet weights come
    from `checkpoint.load_weights`. `layers` overrides the blocks per stage (reduced-depth tests only)."""
    if name not in CNN_ENCODERS:
        raise ValueError(f"unknown CNN encoder {name!r}; expected one of {', '.join(CNN_ENCODERS)}")
    return CNNEncoder(name, layers)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint key mapping: an encoder state dict in mmseg/mmcv naming -> our keys. `checkpoint.load_weights` detects
# the format, validates and compares with the model.

_STEM = re.compile(r"stem\.(\d+)\.(.+)")


def from_mmseg_resnet(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """mmseg/mmcv ResNet-family keys -> ours; returns (state, ignored keys).

    Deep stems: `stem.{0,1,3,4,6}.*` -> `conv1.{0,1,3,4,6}.*` and the last BN `stem.7.*` -> `bn1.*`. Everything
    else (`conv1`/`bn1` of the 7x7 stem, `layerL.b.*`) is named alike in both; the ImageNet classifier `fc.*` is
    ignored. Works on bare OpenMMLab ImageNet files and on the `backbone.`-stripped part of a DAFormer checkpoint.
    A BN without `num_batches_tracked` (torch.save before PyTorch 0.4.1 did not write it) gets a zero counter,
    the value the original's non-strict load leaves it at."""
    out, ignored = {}, []
    for k, v in state.items():
        if k.startswith("fc."):
            ignored.append(k)
        elif m := _STEM.fullmatch(k):
            out[f"bn1.{m[2]}" if m[1] == "7" else f"conv1.{m[1]}.{m[2]}"] = v
        else:
            out[k] = v
    for k in [k for k in out if k.endswith(".running_var")]:
        out.setdefault(k.removesuffix("running_var") + "num_batches_tracked", torch.tensor(0))
    return out, ignored


def guess_cnn(state: dict[str, torch.Tensor]) -> str | None:
    """Which CNN_ENCODERS entry a state in our keys (as `from_mmseg_resnet` returns) looks like, for readable
    hints when a file and a model differ; None when it matches none."""
    blocks = tuple(len({k.split(".")[1] for k in state if k.startswith(f"layer{i}.")}) for i in range(1, 5))
    deep = state.get("conv1.6.weight")
    stem = deep if deep is not None else state.get("conv1.weight")
    if not isinstance(stem, torch.Tensor):
        return None
    conv2 = state.get("layer1.0.conv2.weight")
    grouped = isinstance(conv2, torch.Tensor) and conv2.ndim == 4 and conv2.shape[1] < conv2.shape[0]
    if "layer1.0.conv2.conv.weight" in state:
        kind = "resnest"
    else:
        kind = ("v1c" if not grouped else None) if deep is not None else ("resnext" if grouped else None)
    for name, s in CNN_ENCODERS.items():
        if (s.kind, s.stem_channels, s.blocks) == (kind, stem.shape[0], blocks):
            return name
    return None
