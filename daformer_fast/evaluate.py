"""Evaluate a checkpoint's student on a validation/test split, or export its predictions (recipe §5).

    python -m daformer_fast.evaluate configs/gta2cs.yaml --checkpoint work_dirs/run/latest.pth
    python -m daformer_fast.evaluate configs/cs2acdc.yaml --checkpoint ckpt.pth --split test --format-only

Protocol of the reference (`mode='whole'`): every image is resized keep-ratio to `data.val.scale` (cv2 bilinear on
uint8), normalised with the ImageNet mean/std in RGB, the logits are upsampled bilinearly to the network input and
then to the original size (`Segmentor.predict`), argmax; the confusion matrix is taken against the original-
resolution label with 255 ignored. Images of equal size can be batched (the reference uses batch 1; results are
the same because the model is in eval mode).

`evaluate()` / `iter_predictions()` are the reusable parts (the trainer's periodic evaluation calls `evaluate`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
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

from daformer_fast.checkpoint import CheckpointError, load_weights
from daformer_fast.config import ConfigError, load_config
from daformer_fast.data.datasets import (
    DatasetError,
    Sample,
    list_samples,
    read_image,
    read_label,
    rescale_size,
    resize_image,
)
from daformer_fast.metrics import confusion_matrix, format_table, segmentation_metrics
from daformer_fast.models import Segmentor, build_segmentor

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "TRAIN_ID_TO_LABEL_ID",
    "evaluate",
    "iter_predictions",
    "main",
    "resolve_device",
    "save_prediction_png",
]

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
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


def _normalize(imgs_BHW3: np.ndarray, device: torch.device) -> torch.Tensor:
    x_BHW3 = torch.from_numpy(imgs_BHW3).to(device)
    mean = torch.tensor(IMAGENET_MEAN, device=device)
    # mmcv multiplies by 1/std (computed in float64) instead of dividing; same here to stay within an ulp.
    stdinv = torch.tensor([1.0 / s for s in IMAGENET_STD], dtype=torch.float64).float().to(device)
    return ((x_BHW3.float() - mean) * stdinv).permute(0, 3, 1, 2).contiguous()


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
    x_B3HW = _normalize(np.stack([item[1] for _, item in batch]), device)
    out_size = batch[0][1][0].shape[:2]
    autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16) if use_bf16 else nullcontext()
    with torch.inference_mode(), autocast:
        logits_BKHW = model.predict(x_B3HW, out_size=out_size)
        # The reference applies softmax before argmax; softmax is monotonic, so argmax of the logits is the same.
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


def save_prediction_png(path: Path, pred_HW: np.ndarray, palette: Iterable[Iterable[int]] | None) -> None:
    """8-bit PNG of class ids; with a palette a 'P' image (colours for viewers, values = ids), else plain 'L'."""
    im = Image.fromarray(pred_HW.astype(np.uint8))
    if palette is not None:
        flat = [int(c) for rgb in palette for c in rgb]
        im.putpalette(flat + [0] * (768 - len(flat)))
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


def resolve_device(name: str | None) -> torch.device:
    """`auto`/None = cuda when available, else cpu; a CUDA device without CUDA is a ConfigError."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available")
    return device


def _json_safe(obj: Any) -> Any:
    """NaN (a class absent from labels and predictions) becomes null: strict JSON has no NaN."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m daformer_fast.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="YAML config (the run's config.yaml or a file in configs/)")
    p.add_argument("--checkpoint", required=True, help="checkpoint file; the student is evaluated")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--split", help="override data.val.split, e.g. test (labels then not required)")
    p.add_argument("--out", help="output folder (default: <train.work_dir>/eval)")
    p.add_argument("--format-only", action="store_true", help="write prediction PNGs instead of metrics")
    p.add_argument("--label-ids", action="store_true", help="with --format-only: Cityscapes label ids, not trainIds")
    p.add_argument("--batch-size", type=int, default=1, help="images per forward (equal-size images only)")
    p.add_argument("--workers", type=int, default=2, help="decoding threads")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: train.device)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast on CUDA (a deviation from the fp32 reference)")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow full unpickling of the checkpoint")
    p.add_argument("--limit", type=int, help="evaluate only the first N images (smoke tests)")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    if args.label_ids and not args.format_only:
        p.error("--label-ids needs --format-only")
    return args


def _export(stream: Iterator[Prediction], out_dir: Path, palette: Any, label_ids: bool) -> int:
    lut = np.zeros(256, dtype=np.uint8)  # trainId -> labelId; anything else -> 0 (unlabeled)
    for train_id, label_id in TRAIN_ID_TO_LABEL_ID.items():
        lut[train_id] = label_id
    count = 0
    for sample, _, _, pred_HW in stream:
        pred = pred_HW.to(torch.uint8).cpu().numpy()
        if label_ids:
            save_prediction_png(out_dir / f"{sample.img.stem}.png", lut[pred], None)
        else:
            save_prediction_png(out_dir / f"{sample.img.stem}.png", pred, palette)
        count += 1
    return count


def _run(args: argparse.Namespace) -> None:
    cfg = load_config(args.config, args.set)
    ds = cfg.data.val if args.split is None else dataclasses.replace(cfg.data.val, split=args.split)
    if args.label_ids and cfg.model.num_classes != len(TRAIN_ID_TO_LABEL_ID):
        raise ConfigError(f"--label-ids maps the 19 Cityscapes trainIds; model.num_classes is {cfg.model.num_classes}")
    device = resolve_device(args.device or cfg.train.device)
    if args.bf16 and device.type != "cuda":
        print("note: --bf16 applies on CUDA only; running fp32", file=sys.stderr)
    need_labels = not args.format_only and args.split != "test"
    samples = list_samples(ds, need_labels=need_labels)[: args.limit]
    if not args.format_only:
        unlabelled = [s for s in samples if s.label is None]
        if unlabelled:
            raise DatasetError(
                f"{len(unlabelled)} images of split {ds.split!r} have no labels (e.g. {unlabelled[0].img}); "
                "use --format-only to export predictions"
            )
    if args.format_only and len({s.img.stem for s in samples}) != len(samples):
        raise DatasetError("several images share a file name; --format-only writes one PNG per image name")

    model: Segmentor = build_segmentor(cfg.model)
    load_weights(model, args.checkpoint, strict=True, trust=args.trust_checkpoint, key="student")
    model.to(device).eval()
    out_dir = Path(args.out) if args.out else Path(cfg.train.work_dir) / "eval"
    kw = dict(batch_size=args.batch_size, bf16=args.bf16, workers=args.workers)

    if args.format_only:
        folder = out_dir / ("labelIds" if args.label_ids else "labelTrainIds")
        stream = iter_predictions(model, samples, ds.scale, device, with_labels=False, progress=True, **kw)
        count = _export(stream, folder, cfg.data.palette, args.label_ids)
        print(f"wrote {count} predictions to {folder}")
        return

    conf_KK = evaluate(model, samples, ds.scale, cfg.model.num_classes, device, progress=True, **kw)
    metrics = segmentation_metrics(conf_KK, cfg.data.classes, synthia=cfg.data.source.name == "synthia")
    print(format_table(metrics, cfg.data.classes))
    record = {**metrics, "num_images": len(samples), "checkpoint": str(args.checkpoint), "split": ds.split}
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "metrics.json"
    path.write_text(json.dumps(_json_safe(record), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        _run(args)
    except (ConfigError, DatasetError, CheckpointError) as e:
        # User errors (bad config, data layout, checkpoint): the message only, no traceback. It is one line except
        # for a checkpoint/model mismatch, whose key listing follows on indented lines.
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
