"""The paper's experiment sets as generated configs: `python -m daformer_fast.experiments --exp ID`.

IDs 1–8 are the tables of the DAFormer paper (CVPR 2022) and its CS→ACDC / CS→DarkZurich extension; 100 and 101
are two-iteration smoke sets (docs/recipe.md §6.3). Each set is a list of runs described in the original's vocabulary
(architecture, backbone, UDA variant, RCS temperature, PL crop, schedule, seed) and named with the original's
rule (docs/recipe.md §6.2), so work dirs line up with the paper's tables. A run becomes a YAML file holding only the
fields that differ from `daformer_fast.config` defaults (the defaults are the final GTA→CS DAFormer setting).

Runs whose architecture or encoder daformer_fast does not implement (CNN encoders, DeepLab/DANet/ISANet/UperNet
decoders, ...) are listed as unavailable with the reason, never dropped, so a table's missing rows stay visible.

    python -m daformer_fast.experiments --exp 6 --list
    python -m daformer_fast.experiments --exp 7 --set data.source.root=/data/synthia --run
    python -m daformer_fast.experiments --exp 101 --torchrun 2
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from daformer_fast.cli import add_common_args, config_overrides, run_cli
from daformer_fast.config import Config, ConfigError, DatasetConfig, config_to_dict, load_config, parse_config

__all__ = ["EXPERIMENT_IDS", "Run", "build_config", "config_delta", "experiment_runs", "main", "write_experiment"]

EXPERIMENT_IDS = (1, 2, 3, 4, 5, 6, 7, 8, 100, 101)

GTA2CS = ("gta", "cityscapes")

# Reference architecture names → our decoder, or None with the reason it is missing.
_ARCHITECTURES: dict[str, tuple[str | None, str]] = {
    "segformer": ("segformer", ""),
    "daformer_conv1": ("daformer_conv1", ""),
    "daformer_aspp": ("daformer_aspp", ""),
    "daformer_sepaspp": ("daformer_sepaspp", ""),
    "dlv2red": (None, "DeepLabV2 decoder (dilations 6, 12) not implemented"),
    "da_nodbn": (None, "DANet decoder not implemented"),
    "isa_nodbn": (None, "ISANet decoder not implemented"),
    "dlv3p_nodbn": (None, "DeepLabV3+ decoder not implemented"),
    "sfa_dlv3p_nodbn": (None, "SegFormerAdapter neck with DeepLabV3+ decoder not implemented"),
    "upernet": (None, "UperNet decoder not implemented"),
    "upernet_ch256": (None, "UperNet decoder (256 channels) not implemented"),
    "daformer_isa": (None, "DAFormer head with ISA fusion not implemented"),
    "daformer_sepaspp_bottleneck": (None, "DAFormer head with context only at F4 not implemented"),
}

# Reference backbone names → our MiT size, or None with the reason it is missing.
_CNN = "CNN encoders are not implemented (MiT only)"
_BACKBONES: dict[str, tuple[str | None, str]] = {
    "mitb3": ("mit_b3", ""),
    "mitb4": ("mit_b4", ""),
    "mitb5": ("mit_b5", ""),
    # `-del` = MiT-B5 under a CNN model base; only used with the SegFormerAdapter, which is unavailable anyway.
    "mitb5-del": ("mit_b5", ""),
    "r50v1c": (None, f"ResNet-50 V1c: {_CNN}"),
    "r101v1c": (None, f"ResNet-101 V1c: {_CNN}"),
    "x50-32": (None, f"ResNeXt-50 32x4d: {_CNN}"),
    "x101-32": (None, f"ResNeXt-101 32x4d: {_CNN}"),
    "s50": (None, f"ResNeSt-50: {_CNN}"),
    "s101": (None, f"ResNeSt-101: {_CNN}"),
    "s200": (None, f"ResNeSt-200: {_CNN}"),
}

# Datasets of each (source, target) pair as deltas from the GTA→CS defaults (mirrors configs/*.yaml).
_CS_TRAIN = DatasetConfig(name="cityscapes", root="data/cityscapes", split="train", scale=(1024, 512))
_PAIRS: dict[tuple[str, str], dict[str, DatasetConfig]] = {
    GTA2CS: {},
    ("synthia", "cityscapes"): {"source": DatasetConfig(name="synthia", root="data/synthia", scale=(1280, 760))},
    ("cityscapes", "acdc"): {
        "source": _CS_TRAIN,
        "target": DatasetConfig(name="acdc", root="data/acdc", split="train", scale=(960, 540)),
        "val": DatasetConfig(name="acdc", root="data/acdc", split="val", scale=(960, 540)),
    },
    ("cityscapes", "darkzurich"): {
        "source": _CS_TRAIN,
        "target": DatasetConfig(name="darkzurich", root="data/dark_zurich", split="train/night", scale=(960, 540)),
        "val": DatasetConfig(name="darkzurich", root="data/dark_zurich", split="val", scale=(960, 540)),
    },
}

BASELINE_NOTE = (
    "known deviation: the original's source-only/target-only loaders add PhotoMetricDistortion; "
    "DataConfig has no photometric loader augmentation, so these baselines train without it"
)


@dataclass(frozen=True)
class Run:
    """One run of an experiment set, in the original's vocabulary (docs/recipe.md §6.2)."""

    exp: int
    source: str
    target: str
    architecture: str
    backbone: str
    uda: str
    """source-only | target-only | dacs | dacs_fd | dacs_fdthings | dacs_a999_fdthings"""
    seed: int
    rcs_temp: float | None = None
    plcrop: bool = False
    schedule: str = "poly10warm"
    iters: int = 40000

    @property
    def is_dacs(self) -> bool:
        return "dacs" in self.uda

    @property
    def name(self) -> str:
        # RCS and PL crop only mean something for self-training; the original omits them for the baselines.
        uda = self.uda
        if self.is_dacs and self.rcs_temp is not None:
            uda += f"_rcs{self.rcs_temp}"
        if self.is_dacs and self.plcrop:
            uda += "_cpl"
        name = f"{self.source}2{self.target}_{uda}_{self.architecture}_{self.backbone}_{self.schedule}_s{self.seed}"
        for old, new in ((".", ""), ("True", "T"), ("False", "F"), ("cityscapes", "cs"), ("synthia", "syn"),
                         ("darkzurich", "dzur")):  # fmt: skip
            name = name.replace(old, new)
        return name

    @property
    def unavailable_reason(self) -> str | None:
        reasons = [r for table, key in ((_ARCHITECTURES, self.architecture), (_BACKBONES, self.backbone))
                   if (r := table[key][1])]  # fmt: skip
        return "; ".join(reasons) or None

    @property
    def is_baseline(self) -> bool:
        return not self.is_dacs


def _product(exp: int, models, udas, seeds, pairs=(GTA2CS,), **extra) -> list[Run]:
    return [
        Run(exp, src, tgt, arch, bb, uda, seed, **extra)
        for (src, tgt), (arch, bb), uda, seed in itertools.product(pairs, models, udas, seeds)
    ]


_SEEDS3 = (0, 1, 2)
_BASELINES_AND_DACS = ("source-only", "dacs", "target-only")
_FULL = "dacs_a999_fdthings"


def experiment_runs(exp: int) -> list[Run]:
    """The runs of one experiment set, in the original's order (docs/recipe.md §6.3)."""
    if exp == 1:  # Tab. 1: architectures × {source-only, DACS, oracle}
        models = [("dlv2red", "r101v1c"), ("da_nodbn", "r101v1c"), ("isa_nodbn", "r101v1c"),
                  ("dlv3p_nodbn", "r101v1c"), ("segformer", "mitb5")]  # fmt: skip
        return _product(exp, models, _BASELINES_AND_DACS, _SEEDS3)
    if exp == 2:  # Tab. 2: encoder/decoder swap (the MiT-B5 + SegFormer and R101 + DLv3+ rows come from exp 1)
        return _product(exp, [("sfa_dlv3p_nodbn", "mitb5-del"), ("segformer", "r101v1c")], ("dacs", "target-only"),
                        _SEEDS3)  # fmt: skip
    if exp == 3:  # Tab. 3: encoders (R101 and MiT-B5 rows come from exp 1)
        models = [("dlv2red", "r50v1c"), ("dlv2red", "s50"), ("dlv2red", "s101"), ("dlv2red", "s200"),
                  ("segformer", "mitb3"), ("segformer", "mitb4")]  # fmt: skip
        return _product(exp, models, _BASELINES_AND_DACS, (0,))
    if exp == 4:  # Tab. 4: no warmup (the warmup rows come from exp 1)
        models = [("dlv2red", "r101v1c"), ("segformer", "mitb5")]
        return _product(exp, models, ("dacs", "target-only"), (0,), schedule="poly10")
    if exp == 5:  # Tab. 5: RCS and FD
        rows = [("segformer", "mitb5", "dacs", math.inf, False), ("segformer", "mitb5", "dacs", 0.01, False),
                ("segformer", "mitb5", "dacs_fd", None, False), ("segformer", "mitb5", "dacs_fdthings", None, False),
                ("segformer", "mitb5", "dacs_fdthings", 0.01, False), ("segformer", "mitb5", _FULL, 0.01, True),
                ("dlv2red", "r101v1c", _FULL, 0.01, True)]  # fmt: skip
        return [Run(exp, *GTA2CS, arch, bb, uda, seed, rcs_temp=t, plcrop=pl)
                for arch, bb, uda, t, pl in rows for seed in _SEEDS3]  # fmt: skip
    if exp == 6:  # Tab. 7: decoders with the full recipe (the last row is the final GTA→CS DAFormer)
        decoders = ["daformer_conv1", "upernet", "upernet_ch256", "daformer_isa", "daformer_sepaspp_bottleneck",
                    "daformer_aspp", "daformer_sepaspp"]  # fmt: skip
        return _product(exp, [(d, "mitb5") for d in decoders], (_FULL, "target-only"), _SEEDS3,
                        rcs_temp=0.01, plcrop=True)  # fmt: skip
    if exp in (7, 8):  # Tab. 6 Synthia→CS; extension CS→ACDC and CS→DarkZurich
        pairs = [("synthia", "cityscapes")] if exp == 7 else [("cityscapes", "acdc"), ("cityscapes", "darkzurich")]
        return _product(exp, [("daformer_sepaspp", "mitb5")], (_FULL,), _SEEDS3, pairs, rcs_temp=0.01, plcrop=True)
    if exp == 100:  # startup smoke test: every architecture/backbone pair, oracle training
        models = [("dlv2red", "r101v1c"), ("dlv3p_nodbn", "r101v1c"), ("da_nodbn", "r101v1c"), ("segformer", "mitb5"),
                  ("isa_nodbn", "r101v1c"), ("dlv2red", "r50v1c"), ("dlv2red", "s50"), ("dlv2red", "s101"),
                  ("dlv2red", "s200"), ("dlv2red", "x50-32"), ("dlv2red", "x101-32"), ("segformer", "mitb4"),
                  ("segformer", "mitb3"), ("sfa_dlv3p_nodbn", "mitb5-del"), ("segformer", "r101v1c"),
                  ("daformer_conv1", "mitb5"), ("daformer_isa", "mitb5"), ("daformer_sepaspp_bottleneck", "mitb5"),
                  ("daformer_aspp", "mitb5"), ("daformer_sepaspp", "mitb5"), ("upernet", "mitb5"),
                  ("upernet_ch256", "mitb5")]  # fmt: skip
        return _product(exp, models, ("target-only",), (0,), iters=2)
    if exp == 101:  # UDA smoke test: every UDA variant once
        rows = [("source-only", None, False), ("target-only", None, False), ("dacs", None, False),
                ("dacs", math.inf, False), ("dacs", 0.01, False), ("dacs_fd", None, False),
                ("dacs_fdthings", None, False), ("dacs_fdthings", 0.01, False), (_FULL, 0.01, True)]  # fmt: skip
        return [Run(exp, *GTA2CS, "segformer", "mitb5", uda, 0, rcs_temp=t, plcrop=pl, iters=2)
                for uda, t, pl in rows]  # fmt: skip
    raise ConfigError(f"unknown experiment id {exp}; valid ids: {', '.join(map(str, EXPERIMENT_IDS))}")


def _uda_delta(run: Run) -> dict[str, Any]:
    """uda.* and data.rcs.* of a run; the original's `_base_/uda/dacs*.py` files as deltas from the final recipe."""
    if not run.is_dacs:
        mode = run.uda.replace("-", "_")
        # The baselines are plain supervised training: no FD loss, no RCS, no pseudo-labels.
        return {"uda": {"mode": mode, "fd_lambda": 0.0}, "rcs": {"enabled": False}}
    if run.uda not in ("dacs", "dacs_fd", "dacs_fdthings", _FULL):
        raise ValueError(f"unknown UDA variant {run.uda!r}")
    uda: dict[str, Any] = {"mode": "dacs", "alpha": 0.999 if "a999" in run.uda else 0.99}
    if "fd" not in run.uda:
        uda["fd_lambda"] = 0.0
    elif "fdthings" not in run.uda:
        uda["fd_classes"] = None  # FD over all cells (Tab. 5 ablation); the default is the thing classes
    top, bottom = (15, 120) if run.plcrop else (0, 0)
    uda |= {"pseudo_weight_ignore_top": top, "pseudo_weight_ignore_bottom": bottom}
    rcs = {"enabled": False} if run.rcs_temp is None else {"enabled": True, "class_temp": float(run.rcs_temp)}
    return {"uda": uda, "rcs": rcs}


def build_config(run: Run, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The Config of an available run; `overrides` (`key=value`) apply last."""
    reason = run.unavailable_reason
    if reason:
        raise ConfigError(f"{run.name} is unavailable: {reason}")
    backbone = _BACKBONES[run.backbone][0]
    if run.schedule == "poly10warm":
        schedule: dict[str, Any] = {}
    elif run.schedule == "poly10":
        # No warmup and min_lr 1e-4, literally as the original's ablation (docs/recipe.md §1.5): the backbone lr rises.
        schedule = {"warmup": "none", "min_lr": 1e-4}
    else:
        raise ValueError(f"unknown schedule {run.schedule!r}")
    uda = _uda_delta(run)
    data: dict[str, Any] = {k: dataclasses.asdict(v) for k, v in _PAIRS[(run.source, run.target)].items()}
    data["rcs"] = uda["rcs"]
    # Reference runner (§6.2): checkpoint at the end, evaluate 10 times; the 2-iteration smoke sets use an
    # evaluation interval of 100 as the original does, so they never evaluate mid-run.
    eval_interval = run.iters // 10 if run.iters >= 10 else 100
    values = {
        "model": {"backbone": backbone, "decoder": _ARCHITECTURES[run.architecture][0],
                  "pretrained": f"pretrained/{backbone}.pth"},
        "data": data,
        "uda": uda["uda"],
        "schedule": schedule,
        "train": {"seed": run.seed, "max_iters": run.iters, "eval_interval": eval_interval,
                  "checkpoint_interval": run.iters, "work_dir": f"work_dirs/exp{run.exp}/{run.name}"},
    }  # fmt: skip
    return parse_config(values, overrides)


def config_delta(cfg: Config) -> dict[str, Any]:
    """Nested dict of the fields of `cfg` that differ from the defaults (what a YAML file in configs/ holds)."""

    def diff(value: dict, default: dict) -> dict:
        out = {}
        for key, v in value.items():
            d = default[key]
            if isinstance(v, dict) and isinstance(d, dict):
                if sub := diff(v, d):
                    out[key] = sub
            elif v != d:
                out[key] = v
        return out

    return diff(config_to_dict(cfg), config_to_dict(Config()))


def write_experiment(exp: int, out_dir: str | Path = "configs/generated",
                     overrides: list[str] | tuple[str, ...] = ()) -> tuple[list[Path], list[Run]]:  # fmt: skip
    """Write the available runs of `exp` as YAML deltas; return (written paths, unavailable runs)."""
    folder = Path(out_dir) / f"exp{exp}"
    written, unavailable = [], []
    for run in experiment_runs(exp):
        if run.unavailable_reason:
            unavailable.append(run)
            continue
        cfg = build_config(run, overrides)
        header = (f"# exp {exp}: {run.name}\n# generated by python -m daformer_fast.experiments; "
                  "only the fields that differ from daformer_fast/config.py defaults\n")  # fmt: skip
        text = yaml.safe_dump(config_delta(cfg), sort_keys=False, default_flow_style=None, width=120)
        path = folder / f"{run.name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(header + text, encoding="utf-8")
        written.append(path)
    return written, unavailable


def _run_all(paths: list[Path]) -> int:
    from daformer_fast.distributed import resolve_device  # lazy: training pulls in torch, models and data
    from daformer_fast.train import main as train_main

    for path in paths:  # a device this host lacks would fail every run of the sweep: say so once, up front
        resolve_device(load_config(path).train.device)
    failed = []
    for i, path in enumerate(paths, 1):
        print(f"[{i}/{len(paths)}] training {path}", flush=True)
        rc = train_main([str(path)])
        if rc:
            # Keep going: a sweep runs unattended, and one bad run should not cost the rest of the table.
            print(f"run failed (exit {rc}): {path}", file=sys.stderr)
            failed.append(path)
    if failed:
        print(f"{len(failed)} of {len(paths)} runs failed: " + ", ".join(p.stem for p in failed), file=sys.stderr)
    return 1 if failed else 0


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m daformer_fast.experiments", description=__doc__.split("\n\n")[0])
    p.add_argument("--exp", type=int, required=True, help=f"experiment id, one of {list(EXPERIMENT_IDS)}")
    p.add_argument("--list", action="store_true", help="list available and unavailable runs; write nothing")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--run", action="store_true", help="train the available runs one after another")
    mode.add_argument("--torchrun", type=int, metavar="N", help="print one torchrun command line per run (N GPUs)")
    add_common_args(p, config=None, trust=False,
                    set_help="config overrides applied to every run (e.g. data roots); repeated --set flags accumulate")
    p.add_argument("--out", default="configs/generated", help="folder for the exp<ID>/ config folders")
    return p.parse_args(argv)


def _main(args: argparse.Namespace) -> int:
    if args.torchrun is not None and args.torchrun < 1:
        raise ConfigError(f"--torchrun needs N >= 1, got {args.torchrun}")
    # With --torchrun, stdout carries only the command lines so it can be piped into a shell or a job file.
    info = sys.stderr if args.torchrun is not None else sys.stdout
    runs = experiment_runs(args.exp)
    paths: list[Path] = []
    if not args.list:
        paths, _ = write_experiment(args.exp, args.out, config_overrides(args))
    for run in runs:
        reason = run.unavailable_reason
        if reason:
            print(f"unavailable: {run.name} ({reason})", file=info)
        elif args.list:
            print(f"available: {run.name}", file=info)
    for path in paths:
        print(f"wrote {path}", file=info)
    if any(r.is_baseline and not r.unavailable_reason for r in runs):
        print(f"note: {BASELINE_NOTE}", file=info)
    num_unavailable = sum(1 for r in runs if r.unavailable_reason)
    where = f" (written to {Path(args.out) / f'exp{args.exp}'})" if paths else ""
    print(f"exp {args.exp}: {len(runs)} runs, {len(runs) - num_unavailable} available{where}, "
          f"{num_unavailable} unavailable", file=info)  # fmt: skip
    if args.torchrun is not None:
        for path in paths:
            print(f"torchrun --standalone --nproc_per_node={args.torchrun} -m daformer_fast.train {path}")
    elif args.run and not args.list:
        return _run_all(paths)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, _parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
