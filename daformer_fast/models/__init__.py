"""Models: MiT and CNN encoders, the DAFormer/SegFormer and CNN-era decoders, the segmentor and its parameter groups
(docs/architectures.md)."""

from daformer_fast.models.attention_heads import DAHead, ISAHead
from daformer_fast.models.deeplab import DepthwiseSeparableASPPHead, DLV2Head, SegFormerAdapter
from daformer_fast.models.heads import DAFormerHead, SegFormerHead
from daformer_fast.models.mit import MIT_SIZES, MixVisionTransformer, mit
from daformer_fast.models.resnet import CNN_ENCODERS, CNNEncoder, cnn_encoder
from daformer_fast.models.segmentor import Segmentor, build_segmentor, param_groups
from daformer_fast.models.upernet import UPerHead

__all__ = [
    "CNN_ENCODERS",
    "MIT_SIZES",
    "CNNEncoder",
    "DAFormerHead",
    "DAHead",
    "DLV2Head",
    "DepthwiseSeparableASPPHead",
    "ISAHead",
    "MixVisionTransformer",
    "SegFormerAdapter",
    "SegFormerHead",
    "Segmentor",
    "UPerHead",
    "build_segmentor",
    "cnn_encoder",
    "mit",
    "param_groups",
]
