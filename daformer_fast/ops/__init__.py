"""Public ops: each has a plain PyTorch reference (`*_ref`) and, for those in the op table (`ops/table.py`), a
Triton kernel chosen by `ops.dispatch` (the process default: `set_default_impl` / `using_impl`).

Importing this package never imports Triton.
"""

from daformer_fast.ops.attention import attention, attention_ref
from daformer_fast.ops.classmix_aug import gaussian_blur, gaussian_blur_ref, mix_and_jitter, mix_and_jitter_ref
from daformer_fast.ops.dispatch import Impl, choose_impl, default_impl, set_default_impl, using_impl
from daformer_fast.ops.mixffn import dwconv_gelu, dwconv_gelu_ref
from daformer_fast.ops.pseudo_label import pseudo_label_argmax, pseudo_label_argmax_ref
from daformer_fast.ops.seg_ce import seg_ce, seg_ce_ref

__all__ = [
    "Impl",
    "attention",
    "attention_ref",
    "choose_impl",
    "default_impl",
    "dwconv_gelu",
    "dwconv_gelu_ref",
    "gaussian_blur",
    "gaussian_blur_ref",
    "mix_and_jitter",
    "mix_and_jitter_ref",
    "pseudo_label_argmax",
    "pseudo_label_argmax_ref",
    "seg_ce",
    "seg_ce_ref",
    "set_default_impl",
    "using_impl",
]
