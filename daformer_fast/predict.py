"""Predict segmentations of arbitrary images with a checkpoint's student.

    python -m daformer_fast.predict --checkpoint work_dirs/run/latest.pth photos/ street.jpg --out preds/

Inputs are image files or folders (searched recursively for .png/.jpg/.jpeg). Each image is processed like an
evaluation image (keep-ratio resize to `--scale` or `data.val.scale`, ImageNet normalisation, whole-image
inference, logits upsampled to the original size) and gives two files:

    <stem>_pred.png     8-bit palette PNG; pixel values = class ids, colours = the config's palette
    <stem>_overlay.jpg  the image blended with the class colours (`--opacity`)

Files found inside a folder keep their sub-folder below `--out`. The model config comes from `--config`, else
from the config stored in a daformer_fast checkpoint, else the defaults (MiT-B5 DAFormer, Cityscapes classes);
`--set` overrides apply in every case.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

from daformer_fast.checkpoint import FORMAT, load_weights, read_checkpoint
from daformer_fast.cli import add_common_args, config_overrides, run_cli
from daformer_fast.config import Config, load_config, parse_config
from daformer_fast.data.datasets import DatasetError, Sample
from daformer_fast.distributed import resolve_device
from daformer_fast.inference import iter_predictions, save_prediction_png
from daformer_fast.models import build_segmentor

__all__ = ["find_images", "main", "overlay"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def find_images(inputs: list[str]) -> list[Sample]:
    """One Sample per input file, and per image file found recursively in input folders, in a stable order.

    `Sample.name` is the output name: the stem for files given directly, `<sub-folder>/<stem>` inside folders.
    """
    samples: list[Sample] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_file():
            samples.append(Sample(img=path, label=None, name=path.stem))
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise DatasetError(f"no .png/.jpg/.jpeg images found in {path}")
            samples += [Sample(img=p, label=None, name=p.relative_to(path).with_suffix("").as_posix()) for p in found]
        else:
            raise DatasetError(f"input not found: {path}")
    names = [s.name for s in samples]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise DatasetError(f"two inputs would both be written as {dup}_pred.png; rename one or predict separately")
    return samples


def overlay(img_HW3: np.ndarray, pred_HW: np.ndarray, palette: np.ndarray, opacity: float) -> np.ndarray:
    """uint8 RGB blend `(1 - opacity) * image + opacity * colour(pred)`."""
    color_HW3 = palette[pred_HW].astype(np.float32)
    return np.clip(img_HW3 * (1.0 - opacity) + color_HW3 * opacity + 0.5, 0, 255).astype(np.uint8)


def _config(args: argparse.Namespace) -> Config:
    if args.config is not None:
        return load_config(args.config, config_overrides(args))
    state = read_checkpoint(args.checkpoint, trust=args.trust_checkpoint)
    if state.get("format") == FORMAT and isinstance(state.get("config"), dict):
        print(f"using the config stored in {args.checkpoint}")
        return parse_config(state["config"], config_overrides(args))
    print("no config given or stored in the checkpoint; using the defaults (pass --config to change)")
    return parse_config({}, config_overrides(args))


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m daformer_fast.predict", description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders")
    p.add_argument("--checkpoint", required=True, help="checkpoint file; the student predicts")
    p.add_argument("--out", required=True, help="output folder")
    add_common_args(p, config="option", config_help="YAML config (default: the one stored in the checkpoint)")
    p.add_argument("--scale", nargs=2, type=int, metavar=("LONG", "SHORT"), help="resize target (default data.val)")
    p.add_argument("--opacity", type=float, default=0.5, help="colour weight in the overlay, 0..1")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast on CUDA")
    args = p.parse_args(argv)
    if not 0.0 <= args.opacity <= 1.0:
        p.error("--opacity must be in [0, 1]")
    return args


def _run(args: argparse.Namespace) -> None:
    samples = find_images(args.inputs)
    cfg = _config(args)
    device = resolve_device(cfg.train.device)
    scale = tuple(args.scale) if args.scale else cfg.data.val.scale
    num_classes = cfg.model.num_classes
    palette = np.zeros((256, 3), dtype=np.uint8)  # a 256-entry lookup, so any uint8 id indexes it
    palette[:num_classes] = np.asarray(cfg.data.palette, dtype=np.uint8)

    model = build_segmentor(cfg.model)
    load_weights(model, args.checkpoint, strict=True, trust=args.trust_checkpoint, key="student")
    model.to(device).eval()
    out = Path(args.out)
    # Images differ in size, so no batching; decoding still runs ahead on a thread.
    stream = iter_predictions(model, samples, scale, device, bf16=args.bf16, with_labels=False, progress=True)
    for sample, img_HW3, _, pred in stream:
        pred_HW = pred.cpu().numpy().astype(np.uint8)
        save_prediction_png(out / f"{sample.name}_pred.png", pred_HW, palette[:num_classes].tolist())
        blend = overlay(img_HW3, pred_HW, palette, args.opacity)
        path = out / f"{sample.name}_overlay.jpg"
        if not cv2.imwrite(str(path), cv2.cvtColor(blend, cv2.COLOR_RGB2BGR)):
            raise DatasetError(f"cannot write {path}")
    print(f"wrote {len(samples)} predictions to {out}")


def main(argv: list[str] | None = None) -> int:
    return run_cli(_run, _parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
