"""The stages of one DAFormer/DACS self-training step (recipe §2), as tensor-in/tensor-out functions.

Each module holds one stage: `ema` (mean teacher, §2.2 step 1), `schedule` (poly + warmup LR, §1.5), `losses`
(pixel-mean CE, §2.6), `pseudo_label` (teacher labels and confidence weight, §2.3), `classmix` (class masks and
mixing, §2.4), `augment` (colour jitter + blur with kornia-0.5.8 semantics, §2.5) and `fdist` (ImageNet feature
distance, §2.7). The default functions are batched and free of host syncs; where the original works per sample,
a `*_reference` twin reproduces its per-sample order from the same random draws (used by parity tests).
"""
