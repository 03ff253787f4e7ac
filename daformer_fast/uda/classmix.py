"""ClassMix masks and mixing (DAFormer recipe §2.4, §2.5 step 1; checklist item 4).

For every sample i the reference (`get_class_masks`) takes the candidate classes K = sorted unique labels of the
**whole** source batch — 255 included — and picks k = ceil(|K|/2) of them uniformly without replacement; the mask
M_i marks the pixels of sample i whose label is among the chosen classes. Because K is the batch union, a sample
often receives fewer than half of its own classes (known quirk, DAFormer issue #19, kept for fidelity); if 255 is
picked, the source's ignore regions are pasted and stay 255 in the mixed label.

Sync-free formulation: instead of `torch.unique` (a device→host sync) the batch's classes are a presence vector
over the 256 possible label values, filled by a scatter. Each sample gets i.i.d. uniform keys for all 256 values;
absent values get +inf. Ranking the keys yields a uniformly random order of the present classes, so "rank < k"
selects a uniformly random k-subset of K — the distribution of `np.random.choice(K, k, replace=False)`.
`chosen_classes` returns that choice as a (B, 256) table, `masks_from_chosen` looks it up at every pixel (the fused
mixing kernel does the same lookup itself) and `class_masks` does both. `class_masks_reference` consumes the same
keys but follows the reference's per-sample order (unique, choose, compare), so both give identical masks for the
same generator state.

Shape legend: B batch, H/W crop resolution, V = 256 possible label values.
"""

from __future__ import annotations

import math

import torch

__all__ = ["chosen_classes", "class_masks", "class_masks_reference", "draw_class_keys", "masks_from_chosen", "mix"]

NUM_VALUES = 256  # labels are uint8 train ids (0..K−1) or 255


def _host_to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a small CPU tensor to `device` without a host sync (pinned memory + non_blocking on CUDA)."""
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def draw_class_keys(batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """Per-sample random keys, (B, 256) float64 on CPU; the lowest-keyed present classes get pasted.

    float64 makes ties between the ≤ 256 keys of a row practically impossible; a tie would still give a valid
    choice, resolved identically by both variants (stable sort by value).
    """
    return torch.rand(batch_size, NUM_VALUES, generator=generator, dtype=torch.float64)


def chosen_classes(labels_BHW: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Batched, sync-free ClassMix choice: which of the 256 label values get pasted for each sample.

    Args:
        labels_BHW: source labels, integer values in [0, 256) (255 = ignore).
        generator: CPU generator for the class choice.

    Returns:
        chosen_BV: bool, True for the k = ceil(|K|/2) values of the batch's classes K chosen for sample i.
    """
    B = labels_BHW.shape[0]
    device = labels_BHW.device
    keys_BV = _host_to_device(draw_class_keys(B, generator), device)
    present_V = torch.zeros(NUM_VALUES, dtype=torch.bool, device=device)
    present_V.scatter_(0, labels_BHW.reshape(-1).long(), True)
    num_present = present_V.sum()
    k = (num_present + 1) // 2  # ceil(n/2); the reference writes (n + n % 2) / 2
    keys_BV = torch.where(present_V, keys_BV, torch.inf)
    # rank of every value among its row's keys; absent values (+inf) rank last, i.e. >= n >= k.
    order_BV = torch.argsort(keys_BV, dim=1, stable=True)
    arange_BV = torch.arange(NUM_VALUES, device=device).expand(B, NUM_VALUES)
    rank_BV = torch.empty_like(order_BV).scatter_(1, order_BV, arange_BV)
    return rank_BV < k


def masks_from_chosen(labels_BHW: torch.Tensor, chosen_BV: torch.Tensor) -> torch.Tensor:
    """mask_B1HW = chosen_BV[i, labels[i, p]]: True where the pixel's class was chosen for its sample."""
    B = labels_BHW.shape[0]
    mask_BN = torch.gather(chosen_BV, 1, labels_BHW.reshape(B, -1).long())
    return mask_BN.view(B, 1, *labels_BHW.shape[1:])


def class_masks(labels_BHW: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Batched, sync-free ClassMix masks: bool (B, 1, H, W), `chosen_classes` looked up at every pixel."""
    return masks_from_chosen(labels_BHW, chosen_classes(labels_BHW, generator))


def class_masks_reference(labels_BHW: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The reference's per-sample order (`torch.unique` of the batch, choose, compare), on the same random keys.

    Host-syncing and looping over the batch by design: it is the definition `class_masks` is tested against.
    """
    B = labels_BHW.shape[0]
    keys_BV = draw_class_keys(B, generator)
    classes = torch.unique(labels_BHW)  # sorted union over the whole batch, 255 included
    n = classes.numel()
    k = math.ceil(n / 2)
    masks = []
    for i in range(B):
        keys_n = keys_BV[i, classes.long().cpu()]
        chosen = classes[torch.argsort(keys_n, stable=True)[:k].to(classes.device)]
        masks.append(torch.isin(labels_BHW[i], chosen).unsqueeze(0))
    return torch.stack(masks)


def mix(mask_B1HW: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pixelwise select: `a` where the mask is set (pasted source), `b` elsewhere (target).

    Works for images (B, C, H, W) and for labels or weights (B, H, W). torch.where is exact, like the
    reference's M·a + (1 − M)·b for a binary M and finite inputs.
    """
    mask = mask_B1HW.bool()
    if a.dim() == 3:
        mask = mask.squeeze(1)  # (B, 1, H, W) would otherwise broadcast against (B, H, W) to (B, B, H, W)
    return torch.where(mask, a, b)
