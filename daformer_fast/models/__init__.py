"""Models: MiT encoder, DAFormer/SegFormer decoders, the segmentor and its parameter groups."""

from daformer_fast.models.heads import DAFormerHead, SegFormerHead
from daformer_fast.models.mit import MIT_SIZES, MixVisionTransformer, mit
from daformer_fast.models.segmentor import Segmentor, build_segmentor, param_groups

__all__ = [
    "MIT_SIZES",
    "DAFormerHead",
    "MixVisionTransformer",
    "SegFormerHead",
    "Segmentor",
    "build_segmentor",
    "mit",
    "param_groups",
]
