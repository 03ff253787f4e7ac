"""Encoder-decoder segmentor, its builder from `ModelConfig`, and the optimizer parameter groups.

    model = build_segmentor(cfg.model)          # .backbone (MiT or CNN), .neck (or None), .decode_head
    logits_BKhw = model(x_B3HW)                 # the head's stride (4, or 8 for the CNN-era heads)
    probs = model.predict(x_B3HW, out_size)     # two-step bilinear upsample for evaluation

Legend: B batch, K classes, H/W input size, h/w the head's output size.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from daformer_fast.config import ModelConfig, OptimConfig
from daformer_fast.models.attention_heads import DAHead, ISAHead
from daformer_fast.models.deeplab import DepthwiseSeparableASPPHead, DLV2Head, SegFormerAdapter
from daformer_fast.models.heads import DAFormerHead, SegFormerHead
from daformer_fast.models.mit import mit
from daformer_fast.models.resnet import cnn_encoder, from_mmseg_resnet
from daformer_fast.models.upernet import UPerHead

__all__ = ["Segmentor", "build_segmentor", "from_daformer", "from_daformer_fast", "param_groups"]


class Segmentor(nn.Module):
    """The original's EncoderDecoder: encoder → neck (if any) → decode head (docs/architectures.md §0)."""

    def __init__(self, backbone: nn.Module, decode_head: nn.Module, num_classes: int, neck: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        self.neck = neck  # parameter-free (the SegFormer adapter): adds no state-dict keys
        self.decode_head = decode_head
        self.num_classes = num_classes

    def features(self, x_B3HW: torch.Tensor) -> list[torch.Tensor]:
        """The encoder maps after the neck (the original's `extract_feat`): what the head and the feature distance
        see."""
        feats = self.backbone(x_B3HW)
        return self.neck(feats) if self.neck is not None else feats

    def encoder(self) -> nn.Module:
        """A module computing `features` (backbone, then the neck): what the ImageNet feature model copies."""
        return nn.Sequential(self.backbone, self.neck) if self.neck is not None else self.backbone

    def forward(self, x_B3HW: torch.Tensor, with_features: bool = False):
        """Logits at the head's stride; with `with_features`, also the encoder maps after the neck (the feature
        distance reuses the last one). A flag rather than a second method, so DDP and torch.compile wrappers reach
        both. Heads with auxiliary outputs (DANet) return a tuple (main, aux, ...) while training with autograd on;
        the losses sum over it (`uda.losses.seg_ce_loss`)."""
        feats = self.features(x_B3HW)
        logits = self.decode_head(feats)
        return (logits, feats) if with_features else logits

    @torch.no_grad()
    def predict(self, x_B3HW: torch.Tensor, out_size: tuple[int, int] | None = None) -> torch.Tensor:
        """Whole-image inference as the original evaluates: logits upsampled bilinearly to the network input,
        then (if `out_size` differs) to `out_size`; returns logits (B, K, *out_size)."""
        logits = F.interpolate(self(x_B3HW), size=x_B3HW.shape[-2:], mode="bilinear", align_corners=False)
        if out_size is not None and tuple(out_size) != tuple(logits.shape[-2:]):
            logits = F.interpolate(logits, size=tuple(out_size), mode="bilinear", align_corners=False)
        return logits


def build_segmentor(cfg: ModelConfig) -> Segmentor:
    """The configured encoder, neck and decoder, randomly initialised (pretrained weights: `checkpoint.load_weights`).
    Widths and wiring per docs/architectures.md §2 and §6."""
    mit_backbone = cfg.backbone.startswith("mit_")
    if mit_backbone:
        backbone: nn.Module = mit(cfg.backbone, drop_path_rate=cfg.drop_path_rate)
    else:
        backbone = cnn_encoder(cfg.backbone)
    dims, k, norm, drop = tuple(backbone.out_channels), cfg.num_classes, cfg.decoder_norm, cfg.dropout
    neck = None
    match cfg.decoder:
        case "daformer_sepaspp" | "daformer_aspp" | "daformer_conv1" | "daformer_isa" | "daformer_sepaspp_bottleneck":
            fusion = cfg.decoder.removeprefix("daformer_")
            if fusion == "sepaspp_bottleneck":  # context only at F4: F4 is upsampled ×8 to stride 4 first
                neck = SegFormerAdapter(scales=(8,))
            head: nn.Module = DAFormerHead(dims, k, cfg.head_channels or 256, fusion, drop)
        case "segformer":
            # SegFormer's own decoder width: 256 for B0/B1, 768 for B2..B5 (and the original's ResNet-101 variant).
            default = 256 if cfg.backbone in ("mit_b0", "mit_b1") else 768
            head = SegFormerHead(dims, k, cfg.head_channels or default, drop)
        case "dlv2red" | "dlv2":
            head = DLV2Head(dims, k, dilations=(6, 12) if cfg.decoder == "dlv2red" else (6, 12, 18, 24))
        case "dlv3p" | "sfa_dlv3p":
            if cfg.decoder == "sfa_dlv3p":  # F4 upsampled ×4 to stride 8 feeds the ASPP (MiT only)
                neck = SegFormerAdapter(scales=(4,))
            head = DepthwiseSeparableASPPHead(dims, k, norm=norm, channels=cfg.head_channels or 512, dropout=drop)
        case "danet":
            head = DAHead(dims, k, norm=norm, channels=cfg.head_channels or 512, dropout=drop)
        case "isanet":
            head = ISAHead(dims, k, norm=norm, channels=cfg.head_channels or 512, dropout=drop)
        case "upernet" | "upernet_ch256":
            width = cfg.head_channels or (512 if cfg.decoder == "upernet" else 256)
            head = UPerHead(dims, k, channels=width, norm=norm, dropout=drop)
        case _:
            raise ValueError(f"unknown decoder {cfg.decoder!r}")
    if neck is not None and not mit_backbone:
        raise ValueError(f"model.decoder={cfg.decoder} puts the SegFormer adapter on a MiT encoder; "
                         f"model.backbone={cfg.backbone} is not one")  # fmt: skip
    return Segmentor(backbone, head, cfg.num_classes, neck)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint key mapping: a file's segmentor-level state -> our Segmentor keys (`backbone.*`, `decode_head.*`), one
# function per format. Each returns (state, ignored keys) and raises ValueError, with a message for the user, when
# the file lacks the requested model; `checkpoint.load_weights` detects the format and turns that into its error.
# Encoder-only formats map in models/mit.py.

_DAFORMER_MODELS = ("model.", "ema_model.", "imnet_model.")  # student, EMA teacher, ImageNet feature model


def from_daformer(state: dict[str, torch.Tensor], part: str = "student") -> tuple[dict[str, torch.Tensor], list[str]]:
    """Official DAFormer (mmseg) weights, already unwrapped from `state_dict` and DDP's `module.`: a training
    checkpoint (`model.*` student, `ema_model.*` teacher, `imnet_model.*`), a published file (`model.*` only), or a
    plain segmentor (`backbone.*`, `decode_head.*`, the same keys as ours). `part`: "student" or "teacher".
    A CNN encoder's mmseg names (`backbone.stem.*`, docs/architectures.md §1) map to ours; the decode heads use the
    original's names already."""
    if not any(k.startswith(_DAFORMER_MODELS) for k in state):
        if part == "teacher":
            raise ValueError("the checkpoint holds one model only (backbone.*), no teacher")
        return _cnn_backbone_keys(dict(state), [])
    prefix = "ema_model." if part == "teacher" else "model."
    if not any(k.startswith(prefix) for k in state):
        # publish_model.py deletes ema_model.* and imnet_model.*: released files hold the student only.
        raise ValueError(f"the checkpoint has no {prefix}* weights (published files hold the student only)")
    out = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    return _cnn_backbone_keys(out, [k for k in state if not k.startswith(prefix)])


def _cnn_backbone_keys(state: dict[str, torch.Tensor], ignored: list[str]):
    """`backbone.*` of a ResNet-family encoder in mmseg names → ours (`models.resnet.from_mmseg_resnet`)."""
    if not any(k.startswith("backbone.layer1.") for k in state):
        return state, ignored  # a MiT encoder: the same names as ours
    backbone = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    mapped, dropped = from_mmseg_resnet(backbone)
    out = {k: v for k, v in state.items() if not k.startswith("backbone.")}
    out.update({"backbone." + k: v for k, v in mapped.items()})
    return out, ignored + ["backbone." + k for k in dropped]


def from_daformer_fast(obj: dict, part: str = "student") -> tuple[dict[str, torch.Tensor], list[str]]:
    """Our own checkpoints (`checkpoint.save_checkpoint`): `student` / `teacher` hold Segmentor state dicts as is."""
    if not isinstance(obj.get(part), dict):
        raise ValueError(f"the checkpoint has no {part} weights")
    return dict(obj[part]), []


def param_groups(model: Segmentor, cfg: OptimConfig) -> list[dict]:
    """AdamW parameter groups of the original (mmcv 1.3.7 paramwise rules with DAFormer's custom keys):

    - every decode-head parameter (BN affine and biases included): lr × head_lr_mult, weight decay;
    - every encoder LayerNorm parameter: base lr, weight decay × norm_decay_mult (0);
    - everything else in the encoder (weights and biases): base lr, weight decay.

    The original matches substrings `head` then `norm` of the dotted name; on this model that is exactly
    "under decode_head" and "a LayerNorm of the encoder" (tested). Each group carries `name` and `initial_lr`,
    which the LR schedule scales.
    """
    head_ids = {id(p) for p in model.decode_head.parameters()}
    norm_ids = {id(p) for m in model.backbone.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
    groups: dict[str, dict] = {
        "backbone": {"params": [], "lr": cfg.lr, "weight_decay": cfg.weight_decay},
        "backbone_norm": {"params": [], "lr": cfg.lr, "weight_decay": cfg.weight_decay * cfg.norm_decay_mult},
        "head": {"params": [], "lr": cfg.lr * cfg.head_lr_mult, "weight_decay": cfg.weight_decay},
    }
    for p in model.parameters():
        if not p.requires_grad:
            continue
        name = "head" if id(p) in head_ids else "backbone_norm" if id(p) in norm_ids else "backbone"
        groups[name]["params"].append(p)
    out = []
    for name, g in groups.items():
        if g["params"]:
            out.append({"name": name, "initial_lr": g["lr"], **g})
    return out
