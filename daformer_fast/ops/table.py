"""The op table: every op with a Triton kernel, as `ops.dispatch.dispatch` runs it (`Op` says what each field is).

`auto_uses_kernel` is where a GPU measurement enters: it is set for an op only when benchmarks/results holds a run
of `benchmarks/kernels.py` showing the kernel faster than its reference under torch.compile (for attention: at
least as fast as SDPA's flash path) at the model's shapes. No such run exists yet, so every op is False and `auto`
runs the references (SDPA for attention).

Importing this module imports the op modules, never Triton: kernels are named, and imported only once chosen.
"""

from __future__ import annotations

import torch

from daformer_fast.ops.attention import attention_ref, attention_sdpa, attention_unsupported
from daformer_fast.ops.classmix_aug import (
    gaussian_blur_kernel_args,
    gaussian_blur_ref,
    gaussian_blur_unsupported,
    mix_and_jitter_kernel_args,
    mix_and_jitter_ref,
    mix_and_jitter_unsupported,
)
from daformer_fast.ops.dispatch import Op
from daformer_fast.ops.mixffn import dwconv_gelu_ref, dwconv_gelu_unsupported
from daformer_fast.ops.pseudo_label import pseudo_label_argmax_ref, pseudo_label_unsupported
from daformer_fast.ops.seg_ce import seg_ce_ref, seg_ce_unsupported

__all__ = ["OPS"]

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)

OPS: dict[str, Op] = {
    op.name: op
    for op in (
        Op("attention", attention_ref, "attention:attention_triton", attention_unsupported, _FLOATS,
           auto_uses_kernel=False, on_device=3, fallback=attention_sdpa, fallback_name="SDPA"),
        Op("dwconv_gelu", dwconv_gelu_ref, "mixffn:dwconv_gelu_triton", dwconv_gelu_unsupported, _FLOATS,
           auto_uses_kernel=False, on_device=3),
        Op("seg_ce", seg_ce_ref, "seg_ce:seg_ce_triton", seg_ce_unsupported, _FLOATS,
           auto_uses_kernel=False, on_device=3),
        Op("pseudo_label", pseudo_label_argmax_ref, "pseudo_label:pseudo_label_triton", pseudo_label_unsupported,
           _FLOATS, auto_uses_kernel=False, on_device=1),
        Op("mix_and_jitter", mix_and_jitter_ref, "classmix_aug:classmix_jitter_triton", mix_and_jitter_unsupported,
           _FLOATS, auto_uses_kernel=False, on_device=6, kernel_args=mix_and_jitter_kernel_args),
        Op("gaussian_blur", gaussian_blur_ref, "blur:gaussian_blur_triton", gaussian_blur_unsupported, _FLOATS,
           auto_uses_kernel=False, on_device=1, kernel_args=gaussian_blur_kernel_args),
    )
}  # fmt: skip
