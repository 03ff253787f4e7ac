"""ClassMix's class choice (docs/recipe.md §2.4, §2.5 step 1, §8 item 4).

For every sample i the original (`get_class_masks`) takes the candidate classes K = sorted unique labels of the
**whole** source batch — 255 included — and picks k = ceil(|K|/2) of them uniformly without replacement; the mask
M_i marks the pixels of sample i whose label is among the chosen classes. Because K is the batch union, a sample
often receives fewer than half of its own classes (known quirk, DAFormer issue #19, kept for fidelity); if 255 is
picked, the source's ignore regions are pasted and stay 255 in the mixed label.

Sync-free formulation: instead of `torch.unique` (a device→host sync) the batch's classes are a presence vector
over the 256 possible label values, filled by a scatter. Each sample gets i.i.d. uniform keys for all 256 values;
absent values get +inf. Ranking the keys yields a uniformly random order of the present classes, so "rank < k"
selects a uniformly random k-subset of K — the distribution of `np.random.choice(K, k, replace=False)`.
`chosen_classes` returns that choice as a (B, 256) table; the op `ops.classmix_aug.mix_and_jitter` looks it up at
every pixel (`ops.classmix_aug.masks_from_chosen`) and mixes. `class_masks_original` consumes the same keys but
follows the original's per-sample order (unique, choose, compare), so both give identical masks for the same
keys.

Shape legend: B batch, H/W crop resolution, V = 256 possible label values.
"""

from __future__ import annotations

import math

import torch


__all__ = ["chosen_classes", "class_masks_original", "draw_class_keys"]

NUM_VALUES = 256  # labels are uint8 train ids (0..K−1) or 255


def draw_class_keys(batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """Per-sample random keys, (B, 256) float64 on CPU; the lowest-keyed present classes get pasted.

    float64 makes ties between the ≤ 256 keys of a row practically impossible; a tie would still give a valid
    choice, resolved identically by both variants (stable sort by value).
    """
    return torch.rand(batch_size, NUM_VALUES, generator=generator, dtype=torch.float64)


def chosen_classes(labels_BHW: torch.Tensor, keys_BV: torch.Tensor) -> torch.Tensor:
    """Batched, sync-free ClassMix choice: which of the 256 label values get pasted for each sample.

    Args:
        labels_BHW: source labels, integer values in [0, 256) (255 = ignore).
        keys_BV: `draw_class_keys` of the step, on the labels' device.

    Returns:
        chosen_BV: bool, True for the k = ceil(|K|/2) values of the batch's classes K chosen for sample i.
    """
    B = labels_BHW.shape[0]
    device = labels_BHW.device
    present_V = torch.zeros(NUM_VALUES, dtype=torch.bool, device=device)
    present_V.scatter_(0, labels_BHW.reshape(-1).long(), True)
    num_present = present_V.sum()
    k = (num_present + 1) // 2  # ceil(n/2); the original writes (n + n % 2) / 2
    keys_BV = torch.where(present_V, keys_BV, torch.inf)
    # rank of every value among its row's keys; absent values (+inf) rank last, i.e. >= n >= k.
    order_BV = torch.argsort(keys_BV, dim=1, stable=True)
    arange_BV = torch.arange(NUM_VALUES, device=device).expand(B, NUM_VALUES)
    rank_BV = torch.empty_like(order_BV).scatter_(1, order_BV, arange_BV)
    return rank_BV < k


def class_masks_original(labels_BHW: torch.Tensor, keys_BV: torch.Tensor) -> torch.Tensor:
    """The original's per-sample order (`torch.unique` of the batch, choose, compare), on the same random keys:
    bool masks (B, 1, H, W).

    Host-syncing and looping over the batch by design: it is the definition `chosen_classes` is tested against.
    """
    B = labels_BHW.shape[0]
    keys_BV = keys_BV.cpu()
    classes = torch.unique(labels_BHW)  # sorted union over the whole batch, 255 included
    n = classes.numel()
    k = math.ceil(n / 2)
    masks = []
    for i in range(B):
        keys_n = keys_BV[i, classes.long().cpu()]
        chosen = classes[torch.argsort(keys_n, stable=True)[:k].to(classes.device)]
        masks.append(torch.isin(labels_BHW[i], chosen).unsqueeze(0))
    return torch.stack(masks)
