"""The stages of one DAFormer/DACS self-training step (docs/recipe.md §2), as functions of tensors, configs and host
numbers that keep no state of their own; `daformer_fast.step` composes them.

Each module holds one stage: `ema` (mean teacher, §2.2 step 1: updates the teacher's parameters in place),
`schedule` (poly + warmup LR, §1.5: sets the optimizer's learning rates), `losses` (pixel-mean CE, §2.6),
`pseudo_label` (teacher labels and confidence weight, §2.3), `classmix` (the random class choice, §2.4),
`augment` (the random draws of colour jitter and blur, §2.5) and `fdist` (ImageNet feature distance, §2.7). The
others return new tensors. The tensor math with a Triton kernel lives in `daformer_fast.ops` (the ClassMix mixing,
the kornia-0.5.8 colour jitter and the blur among it); of the package, these modules import only `ops`, `config`
and `utils`.

The default functions are batched and free of host syncs; where the original works per sample, an `*_original`
twin reproduces its per-sample order from the same random draws (`train.path: original`).
"""
