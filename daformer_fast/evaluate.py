"""Evaluate a checkpoint's student on a validation/test split, or export its predictions (docs/recipe.md §5).

    python -m daformer_fast.evaluate configs/gta2cs.yaml --checkpoint work_dirs/run/latest.pth
    python -m daformer_fast.evaluate configs/cs2acdc.yaml --checkpoint ckpt.pth --split test --format-only
    python -m daformer_fast.evaluate configs/gta2cs.yaml --checkpoint ckpt.pth \
        --dg cityscapes=data/cityscapes bdd100k=data/bdd100k mapillary=data/mapillary [--per-class]

The protocol (keep-ratio resize to `data.val.scale`, ImageNet normalisation, whole-image inference, logits upsampled
to the original size) is `daformer_fast.inference`'s; this module is the command line around it. Writes
`<out>/metrics.json`, or with `--format-only` one PNG per image under `<out>/labelTrainIds` (`labelIds` with
`--label-ids`, for the Cityscapes test server).

`--dg NAME=ROOT ...` is the domain-generalisation evaluation (docs/architectures.md §4): the checkpoint is scored on
the `val` split of each named layout at its root (`data.val.scale`, `--limit` per set), instead of `data.val`; it
prints one row per set and the average of the sets' mIoUs (`--per-class`: also the class IoUs, one column per set)
and writes `<out>/dg_metrics.json` ({"datasets": {NAME: metrics as in metrics.json}, "mIoU_avg": ...}).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from daformer_fast.checkpoint import load_weights
from daformer_fast.cli import add_common_args, config_overrides, run_cli
from daformer_fast.config import Config, ConfigError, DatasetConfig, load_config
from daformer_fast.data.datasets import LAYOUT_NAMES, DatasetError, Sample, list_samples
from daformer_fast.distributed import resolve_device
from daformer_fast.inference import (
    TRAIN_ID_TO_LABEL_ID,
    Prediction,
    evaluate,
    evaluate_sets,
    iter_predictions,
    save_prediction_png,
)
from daformer_fast.metrics import format_table, segmentation_metrics
from daformer_fast.models import Segmentor, build_segmentor
from daformer_fast.utils import json_safe

__all__ = ["main"]


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m daformer_fast.evaluate", description=__doc__.split("\n\n")[0])
    add_common_args(p, config_help="YAML config (the run's config.yaml or a file in configs/)")
    p.add_argument("--checkpoint", required=True, help="checkpoint file; the student is evaluated")
    p.add_argument("--split", help="override data.val.split, e.g. test (labels then not required)")
    p.add_argument("--out", help="output folder (default: <train.work_dir>/eval)")
    p.add_argument("--format-only", action="store_true", help="write prediction PNGs instead of metrics")
    p.add_argument("--label-ids", action="store_true", help="with --format-only: Cityscapes label ids, not trainIds")
    p.add_argument("--batch-size", type=int, default=1, help="images per forward (equal-size images only)")
    p.add_argument("--workers", type=int, default=2, help="decoding threads")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast on CUDA (a deviation from the original's fp32)")
    p.add_argument("--limit", type=int, help="evaluate only the first N images (smoke tests)")
    p.add_argument("--dg", nargs="+", metavar="NAME=ROOT", help="domain generalisation: score the val split of each "
                   f"dataset layout NAME ({', '.join(LAYOUT_NAMES)}) at ROOT and average the mIoUs")  # fmt: skip
    p.add_argument("--per-class", action="store_true", help="with --dg: also print the class IoUs of every set")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    if args.label_ids and not args.format_only:
        p.error("--label-ids needs --format-only")
    if args.dg and (args.format_only or args.split):
        p.error("--dg scores the val split of each set; it does not combine with --format-only or --split")
    if args.per_class and not args.dg:
        p.error("--per-class needs --dg (the single-set evaluation always prints the class table)")
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


def _dg_sets(entries: list[str], cfg: Config, limit: int | None) -> dict[str, tuple[DatasetConfig, list[Sample]]]:
    """{NAME: (dataset, labelled samples)} of the `--dg NAME=ROOT` entries, every root checked before any model
    work, so that a typo costs no inference time."""
    sets: dict[str, tuple[DatasetConfig, list[Sample]]] = {}
    for entry in entries:
        name, sep, root = entry.partition("=")
        if not sep or not name or not root:
            raise ConfigError(f"--dg takes NAME=ROOT entries, got {entry!r}")
        if name not in LAYOUT_NAMES:
            raise ConfigError(f"--dg {entry}: unknown dataset layout {name!r}; expected one of "
                              f"{', '.join(LAYOUT_NAMES)}")  # fmt: skip
        if name in sets:
            raise ConfigError(f"--dg names {name} twice")
        if not Path(root).is_dir():
            raise DatasetError(f"--dg {name}: dataset root {root} does not exist")
        ds = DatasetConfig(name=name, root=root, split="val", scale=cfg.data.val.scale)
        sets[name] = (ds, list_samples(ds, need_labels=True)[:limit])
    return sets


def _dg_table(result: dict, class_names: tuple[str, ...], per_class: bool) -> str:
    """One row per set (images, mIoU, mAcc, aAcc) and the average mIoU; with `per_class` the class IoUs first."""
    names = list(result["datasets"])
    width = max(len("Average"), *(len(n) for n in names))
    lines = []
    if per_class:
        cw = max(len("Class"), *(len(c) for c in class_names))
        cols = [max(len(n), 6) for n in names]
        lines.append(f"{'Class':<{cw}} | " + " | ".join(f"{n:>{w}}" for n, w in zip(names, cols)))
        lines.append("-" * len(lines[0]))
        for c in class_names:
            values = (result["datasets"][n]["IoU"][c] for n in names)
            lines.append(f"{c:<{cw}} | " + " | ".join(f"{v:{w}.2f}" for v, w in zip(values, cols)))
        lines.append("")
    head = f"{'Dataset':<{width}} | {'Images':>6} | {'mIoU':>6} | {'mAcc':>6} | {'aAcc':>6}"
    lines += [head, "-" * len(head)]
    for n in names:
        m = result["datasets"][n]
        lines.append(f"{n:<{width}} | {m['num_images']:6d} | {m['mIoU']:6.2f} | {m['mAcc']:6.2f} | {m['aAcc']:6.2f}")
    lines += ["-" * len(head), f"{'Average':<{width}} | {'':>6} | {result['mIoU_avg']:6.2f} |"]
    return "\n".join(lines)


def _device(args: argparse.Namespace, cfg: Config) -> torch.device:
    device = resolve_device(cfg.train.device)
    if args.bf16 and device.type != "cuda":
        print("note: --bf16 applies on CUDA only; running fp32", file=sys.stderr)
    return device


def _student(args: argparse.Namespace, cfg: Config, device: torch.device) -> Segmentor:
    """The checkpoint's student on `device`, in eval mode."""
    model = build_segmentor(cfg.model)
    load_weights(model, args.checkpoint, strict=True, trust=args.trust_checkpoint, key="student")
    return model.to(device).eval()


def _write_json(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_safe(record), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    print(f"wrote {path}")


def _run_dg(args: argparse.Namespace, cfg: Config) -> None:
    sets = _dg_sets(args.dg, cfg, args.limit)
    device = _device(args, cfg)
    model = _student(args, cfg, device)
    kw = dict(batch_size=args.batch_size, bf16=args.bf16, workers=args.workers, progress=True)
    result = evaluate_sets(model, {name: (samples, ds.scale) for name, (ds, samples) in sets.items()},
                           cfg.data.classes, device, synthia=cfg.data.source.name == "synthia", **kw)  # fmt: skip
    print(_dg_table(result, cfg.data.classes, args.per_class))
    for name, (ds, _) in sets.items():
        result["datasets"][name].update(root=ds.root, split=ds.split)
    record = {**result, "checkpoint": str(args.checkpoint), "scale": list(cfg.data.val.scale)}
    _write_json((Path(args.out) if args.out else Path(cfg.train.work_dir) / "eval") / "dg_metrics.json", record)


def _run(args: argparse.Namespace) -> None:
    cfg = load_config(args.config, config_overrides(args))
    if args.dg:
        return _run_dg(args, cfg)
    ds = cfg.data.val if args.split is None else dataclasses.replace(cfg.data.val, split=args.split)
    if args.label_ids and cfg.model.num_classes != len(TRAIN_ID_TO_LABEL_ID):
        raise ConfigError(f"--label-ids maps the 19 Cityscapes trainIds; model.num_classes is {cfg.model.num_classes}")
    device = _device(args, cfg)
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

    model = _student(args, cfg, device)
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
    _write_json(out_dir / "metrics.json", record)


def main(argv: list[str] | None = None) -> int:
    return run_cli(_run, _parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
