"""The tiny full-recipe run the end-to-end tests train: MiT-b0, a 32-channel head, 64² crops of the synthetic data."""

import json
from pathlib import Path


def write_config(directory: Path, syn: Path, train: dict, *, source: Path | None = None, debug_img_interval: int = 0):
    """Write `directory/run.yaml` for the synthetic data at `syn` (its source replaced by `source` if given) with
    the given train section; returns the path. The work dir defaults to `directory/work`."""
    cfg = {
        "model": {"backbone": "mit_b0", "pretrained": None, "head_channels": 32},
        "data": {
            "source": {"name": "gta", "root": str(source or syn / "source"), "scale": [128, 64]},
            "target": {"name": "cityscapes", "root": str(syn / "target"), "scale": [128, 64]},
            "val": {"name": "cityscapes", "root": str(syn / "target"), "split": "val", "scale": [128, 64]},
            "crop": [64, 64], "workers": 0, "rcs": {"min_pixels": 20},
        },
        "uda": {"pseudo_weight_ignore_top": 2, "pseudo_weight_ignore_bottom": 15,
                "debug_img_interval": debug_img_interval},
        "optim": {"lr": 6e-4},
        "schedule": {"warmup_iters": 2},
        "train": {"work_dir": str(directory / "work"), "deterministic": True, **train},
    }  # fmt: skip
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "run.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path
