"""Whole-image inference as the original evaluates (docs/recipe.md §5): the prediction stream, the confusion matrix,
PNGs.

    conf_KK = evaluate(model, samples, cfg.data.val.scale, cfg.model.num_classes, device)
    for sample, img_HW3, label_HW, pred_HW in iter_predictions(model, samples, scale, device, with_labels=False):
        save_prediction_png(out / f"{sample.name}.png", pred_HW.cpu().numpy(), cfg.data.palette)

Protocol of the original (`mode='whole'`): every image is resized keep-ratio to the scale (cv2 bilinear on
uint8), normalised with the ImageNet mean/std in RGB (`data.pipeline.normalize`, the same as training), the logits
are upsampled bilinearly to the network input and then to the original size (`Segmentor.predict`), argmax; the
confusion matrix is taken against the original-resolution label with 255 ignored. Images of equal size can be
batched (the original uses batch 1; results are the same because the model is in eval mode).

Domain generalisation (docs/architectures.md §4) scores one model on several labelled sets and averages their mIoUs:

    result = evaluate_sets(model, {"cityscapes": (cs_samples, scale), "bdd100k": (bdd_samples, scale)},
                           cfg.data.classes, device)
    result["mIoU_avg"], result["datasets"]["bdd100k"]["IoU"]["road"]

Used by the trainer's periodic evaluation and by the evaluate and predict CLIs.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from tqdm import tqdm

from daformer_fast.data.datasets import DatasetError, Sample, read_image, read_label, rescale_size, resize_image
from daformer_fast.data.pipeline import normalize
from daformer_fast.metrics import confusion_matrix, segmentation_metrics

__all__ = ["TRAIN_ID_TO_LABEL_ID", "Prediction", "evaluate", "evaluate_sets", "iter_predictions", "save_prediction_png"]

# Cityscapes trainId -> labelId (cityscapesscripts' trainId2label), for test-server submissions.
TRAIN_ID_TO_LABEL_ID = {
    0: 7, 1: 8, 2: 11, 3: 12, 4: 13, 5: 17, 6: 19, 7: 20, 8: 21, 9: 22, 10: 23, 11: 24, 12: 25, 13: 26, 14: 27,
    15: 28, 16: 31, 17: 32, 18: 33,
}  # fmt: skip

# One item of the prediction stream: sample, original RGB image (H, W, 3), label (H, W) or None, pred (H, W) int64.
Prediction = tuple[Sample, np.ndarray, "np.ndarray | None", torch.Tensor]


def _load(sample: Sample, scale: tuple[int, int], with_label: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    img = read_image(sample.img)
    h, w = img.shape[:2]
    resized = resize_image(img, rescale_size(w, h, scale))
    label = None
    if with_label and sample.label is not None:
        label = read_label(sample.label)
        if label.shape != (h, w):
            raise DatasetError(f"label {sample.label} is {label.shape[1]}x{label.shape[0]}, image {w}x{h}")
    return img, resized, label


def _prefetch(fn: Callable[[Sample], Any], items: list[Sample], workers: int, depth: int) -> Iterator[Any]:
    """`map(fn, items)` in order, decoding up to `depth` items ahead on threads (cv2/PIL release the GIL)."""
    if workers <= 0:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque(pool.submit(fn, it) for it in items[:depth])
        for nxt in items[depth:]:
            yield pending.popleft().result()
            pending.append(pool.submit(fn, nxt))
        while pending:
            yield pending.popleft().result()


def iter_predictions(
    model: nn.Module,
    samples: list[Sample],
    scale: tuple[int, int],
    device: str | torch.device,
    *,
    batch_size: int = 1,
    bf16: bool = False,
    with_labels: bool = True,
    workers: int = 2,
    progress: bool = False,
) -> Iterator[Prediction]:
    """Whole-image predictions at the original resolution, in the order of `samples`.

    Consecutive images of equal size are batched (up to `batch_size`). The model is put in eval mode for the
    duration and restored afterwards, so the trainer can pass its training student.
    """
    device = torch.device(device)
    use_bf16 = bf16 and device.type == "cuda"
    was_training = model.training
    model.eval()
    loaded = _prefetch(partial(_load, scale=scale, with_label=with_labels), samples, workers, batch_size + 2 * workers)
    bar = tqdm(total=len(samples), disable=not progress, unit="img", dynamic_ncols=True)
    try:
        batch: list[tuple[Sample, tuple]] = []
        for sample, item in zip(samples, loaded):
            if batch and (len(batch) == batch_size or item[0].shape != batch[0][1][0].shape):
                yield from _run_batch(model, batch, device, use_bf16)
                bar.update(len(batch))
                batch = []
            batch.append((sample, item))
        if batch:
            yield from _run_batch(model, batch, device, use_bf16)
            bar.update(len(batch))
    finally:
        bar.close()
        model.train(was_training)


def _run_batch(model: nn.Module, batch: list, device: torch.device, use_bf16: bool) -> Iterator[Prediction]:
    x_BHW3 = torch.from_numpy(np.stack([item[1] for _, item in batch])).to(device)
    x_B3HW = normalize(x_BHW3.permute(0, 3, 1, 2))  # the training normalisation; contiguous NCHW float32
    out_size = batch[0][1][0].shape[:2]
    autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16) if use_bf16 else nullcontext()
    with torch.inference_mode(), autocast:
        logits_BKHW = model.predict(x_B3HW, out_size=out_size)
        # The original applies softmax before argmax; softmax is monotonic, so argmax of the logits is the same.
        pred_BHW = logits_BKHW.argmax(dim=1)
    for i, (sample, (img, _, label)) in enumerate(batch):
        yield sample, img, label, pred_BHW[i]


def evaluate(
    model: nn.Module,
    samples: list[Sample],
    scale: tuple[int, int],
    num_classes: int,
    device: str | torch.device,
    *,
    batch_size: int = 1,
    bf16: bool = False,
    workers: int = 2,
    progress: bool = True,
    ignore_index: int = 255,
) -> torch.Tensor:
    """[label, pred] confusion matrix (K×K int64, CPU) of `model` over labelled `samples`; see `metrics.py`."""
    conf_KK = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    stream = iter_predictions(
        model, samples, scale, device, batch_size=batch_size, bf16=bf16, workers=workers, progress=progress
    )
    for sample, _, label, pred_HW in stream:
        if label is None:
            raise DatasetError(f"no label file for {sample.img}")
        conf_KK += confusion_matrix(pred_HW, torch.from_numpy(label).to(pred_HW.device), num_classes, ignore_index)
    return conf_KK.cpu()


def evaluate_sets(
    model: nn.Module,
    sets: dict[str, tuple[list[Sample], tuple[int, int]]],
    class_names: tuple[str, ...] | list[str],
    device: str | torch.device,
    *,
    synthia: bool = False,
    **kw: Any,
) -> dict:
    """Metrics of `model` on each labelled set {name: (samples, scale)} and the plain mean of their mIoUs.

    Each set is scored on its own confusion matrix (`segmentation_metrics`); the average weights every set equally,
    whatever its number of images, as domain-generalisation tables report it. `kw` goes to `evaluate`.

    Returns:
        {"datasets": {name: {**metrics, "num_images": n}}, "mIoU_avg": mean mIoU (NaN if a set has none)}
    """
    per_set = {}
    for name, (samples, scale) in sets.items():
        conf_KK = evaluate(model, samples, scale, len(class_names), device, **kw)
        per_set[name] = {**segmentation_metrics(conf_KK, class_names, synthia=synthia), "num_images": len(samples)}
    mean = float(np.mean([m["mIoU"] for m in per_set.values()])) if per_set else float("nan")
    return {"datasets": per_set, "mIoU_avg": mean}


def save_prediction_png(path: Path, pred_HW: np.ndarray, palette: Iterable[Iterable[int]] | None) -> None:
    """8-bit PNG of class ids; with a palette a 'P' image (colours for viewers, values = ids), else plain 'L'."""
    im = Image.fromarray(pred_HW.astype(np.uint8))
    if palette is not None:
        flat = [int(c) for rgb in palette for c in rgb]
        im.putpalette(flat + [0] * (768 - len(flat)))
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
