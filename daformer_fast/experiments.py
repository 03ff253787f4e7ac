"""The paper's experiment sets as generated configs: `python -m daformer_fast.experiments --exp ID`.

IDs 1–8 are the tables of the DAFormer paper (CVPR 2022) and its CS→ACDC / CS→DarkZurich extension; 80–85 are
the MIC paper's (CVPR 2023) sets as the original `lhoyer/MIC` `seg/experiments.py` lists them (docs/mic.md §9); 100
and 101 are two-iteration smoke sets (docs/recipe.md §6.3). Each set is a list of runs described in the original's
vocabulary (architecture, backbone, UDA variant, RCS temperature, PL crop, MIC mask, schedule, seed) and named with
the original's rule (docs/recipe.md §6.2, docs/mic.md §9), so work dirs line up with the paper's tables. A run
becomes a YAML file holding only the fields that differ from `daformer_fast.config` defaults (the defaults are the
final GTA→CS DAFormer setting).

Every architecture and encoder of sets 1–8, 100 and 101 is built (docs/architectures.md); runs of a host method
daformer_fast does not implement (HRDA, AdvSeg, MinEnt in the MIC sets) are listed as unavailable with the reason,
never dropped, so a table's missing rows stay visible.

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

EXPERIMENT_IDS = (1, 2, 3, 4, 5, 6, 7, 8, 80, 81, 82, 83, 84, 85, 100, 101)

GTA2CS = ("gta", "cityscapes")

# Reference architecture names → (our decoder, BatchNorm in the decoder); `_nodbn` drops it (docs/architectures.md §0).
_ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "segformer": ("segformer", True),
    "daformer_conv1": ("daformer_conv1", True),
    "daformer_aspp": ("daformer_aspp", True),
    "daformer_sepaspp": ("daformer_sepaspp", True),
    "daformer_isa": ("daformer_isa", True),
    "daformer_sepaspp_bottleneck": ("daformer_sepaspp_bottleneck", True),
    "dlv2red": ("dlv2red", True),  # DeepLabV2 has no BN in its classifier either way
    "da_nodbn": ("danet", False),
    "isa_nodbn": ("isanet", False),
    "dlv3p_nodbn": ("dlv3p", False),
    "sfa_dlv3p_nodbn": ("sfa_dlv3p", False),
    "upernet": ("upernet", True),
    "upernet_ch256": ("upernet_ch256", True),
}

# Reference backbone names → our encoder (docs/architectures.md §6).
_BACKBONES: dict[str, str] = {
    "mitb3": "mit_b3",
    "mitb4": "mit_b4",
    "mitb5": "mit_b5",
    "mitb5-del": "mit_b5",  # "-del": MiT-B5 replacing (not merged into) a CNN model base's backbone dict
    "r50v1c": "resnet50_v1c",
    "r101v1c": "resnet101_v1c",
    "x50-32": "resnext50_32x4d",
    "x101-32": "resnext101_32x4d",
    "s50": "resnest50",
    "s101": "resnest101",
    "s200": "resnest200",
}

# HRDA architectures are `hrda1-<hr crop>-<hr loss weight>_<architecture>`; the multi-resolution model is missing.
_HRDA_REASON = "HRDA (multi-resolution training) not implemented"

# Host methods other than DACS/DAFormer self-training that the MIC sets use (docs/mic.md §9).
_UDA_REASONS = {
    "advseg": "AdvSeg host (adversarial output alignment) not implemented",
    "minent": "MinEnt host (entropy minimisation) not implemented",
    "dacs_srconly": "MIC on the source_only baseline is not implemented",
}

# MIC mask modes → the original's name tag (docs/mic.md §9).
_MASK_TAGS = {"separate": "sep", "separateaug": "spa", "separatesrc": "sps", "separatesrcaug": "spsa",
              "separatetrg": "spt", "separatetrgaug": "spta"}  # fmt: skip

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

@dataclass(frozen=True)
class Run:
    """One run of an experiment set, in the original's vocabulary (docs/recipe.md §6.2, docs/mic.md §9).

    Numbers enter the name as the original prints them, so the MIC fields keep its literal types: ratio 0 and
    alpha 0 are ints (`m32-0`, `a0`), the HRDA min crop 2.0 is a float (`rcs001-20`).
    """

    exp: int
    source: str
    target: str
    architecture: str
    backbone: str
    uda: str
    """source-only | target-only | dacs | dacs_fd | dacs_fdthings | dacs_a999_fdthings; the MIC sets add advseg,
    minent and dacs_srconly, which are unavailable"""
    seed: int
    rcs_temp: float | None = None
    plcrop: bool | str = False
    """True (= "v1") ignores pseudo-label rows 15/120; "v2" is HRDA's loader-side margin crop (unavailable)"""
    schedule: str = "poly10warm"
    iters: int = 40000
    mask_mode: str | None = None
    """MIC mask mode (`uda.mic.mode`); None = no MIC"""
    mask_block_size: int = 32
    mask_ratio: float = 0.7
    mask_alpha: float | str = "same"
    mask_pseudo_threshold: float | str | None = "same"
    mask_lambda: float = 1
    # Only the unavailable HRDA, AdvSeg and MinEnt rows change these; they are here so those rows are named right.
    crop: str = "512x512"
    rcs_min_crop: float = 0.5
    inference: str = "whole"
    opt: str = "adamw"
    lr: float = 6e-5
    pmult: bool = True

    @property
    def is_dacs(self) -> bool:
        return "dacs" in self.uda

    @property
    def name(self) -> str:
        # RCS and PL crop only mean something for self-training; the original omits them for the baselines
        # (the PL crop is named for any MIC run too, as the MIC original does).
        uda = self.uda
        if self.is_dacs and self.rcs_temp is not None:
            uda += f"_rcs{self.rcs_temp}" + (f"-{self.rcs_min_crop}" if self.rcs_min_crop != 0.5 else "")
        if (self.is_dacs or self.mask_mode is not None) and self.plcrop:
            uda += "_cpl" if self.plcrop in (True, "v1") else f"_cpl{self.plcrop[1:]}"
        if self.mask_mode is not None:
            uda += f"_m{self.mask_block_size}-{self.mask_ratio}-"
            uda += f"a{self.mask_alpha}-" if self.mask_alpha != "same" else ""
            uda += f"p{self.mask_pseudo_threshold}-" if self.mask_pseudo_threshold != "same" else ""
            uda += _MASK_TAGS[self.mask_mode] + (f"-w{self.mask_lambda}" if self.mask_lambda != 1 else "")
        crop = "" if self.crop == "512x512" else f"_{self.crop}"
        arch = self.architecture + ("_sl" if self.inference == "slide" else "")
        name = f"{self.source}2{self.target}{crop}_{uda}_{arch}_{self.backbone}_{self.schedule}"
        name += (f"_{self.opt}" if self.opt != "adamw" else "") + (f"_{self.lr}" if self.lr != 6e-5 else "")
        name += (f"_pm{self.pmult}" if not self.pmult else "") + f"_s{self.seed}"
        for old, new in ((".", ""), ("True", "T"), ("False", "F"), ("None", "N"), ("[", ""), ("]", ""), (",", "j"),
                         (" ", ""), ("cityscapes", "cs"), ("synthia", "syn"), ("darkzurich", "dzur")):  # fmt: skip
            name = name.replace(old, new)
        return name

    @property
    def unavailable_reason(self) -> str | None:
        arch, reasons = self.architecture, []
        if arch.startswith("hrda"):
            reasons.append(_HRDA_REASON)
            arch = arch.split("_", 1)[1]
        if self.uda in _UDA_REASONS:
            reasons.append(_UDA_REASONS[self.uda])
        reasons += [f"unknown architecture {arch!r}"] if arch not in _ARCHITECTURES else []
        reasons += [f"unknown backbone {self.backbone!r}"] if self.backbone not in _BACKBONES else []
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
_MITB5 = ("daformer_sepaspp", "mitb5")
# MIC(DAFormer) at 512² crops (docs/mic.md §9): the full recipe plus `separatetrgaug`; the Run defaults give block 32
# (half the paper's 64, as DAFormer trains at half resolution), ratio 0.7, λ 1 and DAFormer's teacher ('same').
_MIC = {"rcs_temp": 0.01, "plcrop": True, "mask_mode": "separatetrgaug"}
# HRDA at 1024² crops: RCS min crop scaled by 2² with the crop area, slide inference, block 64.
_HRDA = {"crop": "1024x1024", "rcs_min_crop": 0.5 * 2**2, "inference": "slide", "mask_block_size": 64}
_HRDA_DAFORMER = ("hrda1-512-0.1_daformer_sepaspp", "mitb5")


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
    if exp in (80, 82):  # MIC Tab. 2, MIC(HRDA) on four benchmarks; Tab. 6, domain study with other mask modes
        gta, acdc = ("gtaHR", "cityscapesHR"), ("cityscapesHR", "acdcHR")
        rows = ([(*gta, "separatetrgaug"), ("synthiaHR", "cityscapesHR", "separatetrgaug"), (*acdc, "separate"),
                 ("cityscapesHR", "darkzurichHR", "separate")] if exp == 80
                else [(*gta, "separatesrcaug"), (*gta, "separateaug"), (*acdc, "separatesrc"), (*acdc, "separatetrg")])
        # ACDC and DarkZurich images have no rectification border, so only a Cityscapes target gets the PL crop.
        return [Run(exp, src, tgt, *_HRDA_DAFORMER, _FULL, seed, rcs_temp=0.01, mask_mode=mode,
                    plcrop="v2" if "cityscapes" in tgt else False, **_HRDA)
                for src, tgt, mode in rows for seed in _SEEDS3]  # fmt: skip
    if exp == 81:  # MIC Tab. 1: MIC on other UDA methods (MIC(HRDA-DAFormer) is exp 80's first row)
        sgd = {"opt": "sgd", "lr": 0.0025, "pmult": False}
        hrda = {**_HRDA, "rcs_temp": 0.01, "plcrop": "v2"}
        rows = [("gta", "cityscapes", "dlv2red", "r101v1c", "advseg", sgd),
                ("gta", "cityscapes", "dlv2red", "r101v1c", "minent", sgd),
                ("gta", "cityscapes", "dlv2red", "r101v1c", "dacs", {}),
                ("gta", "cityscapes", "dlv2red", "r101v1c", _FULL, _MIC),
                ("gtaHR", "cityscapesHR", "hrda1-512-0.1_dlv2red", "r101v1c", _FULL, hrda),
                ("gta", "cityscapes", *_MITB5, _FULL, _MIC)]  # fmt: skip
        return [Run(exp, src, tgt, arch, bb, uda, seed, **{"mask_mode": "separatetrgaug", **extra})
                for src, tgt, arch, bb, uda, extra in rows for seed in _SEEDS3]  # fmt: skip
    if exp == 83:  # MIC Tab. 7: ablations (the complete MIC(DAFormer) is exp 81's last row)
        # (mode, ratio, alpha, pseudo threshold): w/o colour aug, w/o masking, w/o EMA teacher, w/o confidence weight
        rows = [("separatetrg", 0.7, "same", "same"), ("separatetrgaug", 0, "same", "same"),
                ("separatetrgaug", 0.7, 0, "same"), ("separatetrgaug", 0.7, "same", None)]  # fmt: skip
        return [Run(exp, *GTA2CS, *_MITB5, _FULL, seed, rcs_temp=0.01, plcrop=True, mask_mode=mode, mask_ratio=r,
                    mask_alpha=a, mask_pseudo_threshold=p) for mode, r, a, p in rows for seed in _SEEDS3]  # fmt: skip
    if exp == 84:  # MIC Tab. 8: block size × mask ratio ((32, 0.7) is exp 81's last row)
        grid = itertools.product((16, 32, 64, 128), (0.3, 0.5, 0.7, 0.9), _SEEDS3)
        return [Run(exp, *GTA2CS, *_MITB5, _FULL, seed, **_MIC, mask_block_size=b, mask_ratio=r)
                for b, r, seed in grid if (b, r) != (32, 0.7)]  # fmt: skip
    if exp == 85:  # MIC Tab. 9: supervised Cityscapes training with MIC on the labelled images
        return [Run(exp, "cityscapes", "cityscapes", *_MITB5, "dacs_srconly", seed, mask_mode="separatesrc")
                for seed in _SEEDS3]  # fmt: skip
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
    """uda.* and data.rcs.* of a run; the original's `_base_/uda/dacs*.py` files as deltas from the final recipe,
    plus the MIC keys (docs/mic.md §9) of a run with a mask mode."""
    # λ is 1 in every MIC set; 'same' keeps MIC on DAFormer's teacher and pseudo-labels (no second teacher).
    mic = {} if run.mask_mode is None else {"mic": {
        "mode": run.mask_mode, "block_size": run.mask_block_size, "ratio": run.mask_ratio, "lambda_": run.mask_lambda,
        "alpha": run.mask_alpha, "pseudo_threshold": run.mask_pseudo_threshold}}  # fmt: skip
    if not run.is_dacs:
        mode = run.uda.replace("-", "_")
        # The baselines are plain supervised training: no FD loss, no RCS, no pseudo-labels.
        return {"uda": {"mode": mode, "fd_lambda": 0.0, **mic}, "rcs": {"enabled": False}}
    if run.uda not in ("dacs", "dacs_fd", "dacs_fdthings", _FULL):
        raise ValueError(f"unknown UDA variant {run.uda!r}")
    uda: dict[str, Any] = {"mode": "dacs", "alpha": 0.999 if "a999" in run.uda else 0.99, **mic}
    if "fd" not in run.uda:
        uda["fd_lambda"] = 0.0
    elif "fdthings" not in run.uda:
        uda["fd_classes"] = None  # FD over all cells (Tab. 5 ablation); the default is the thing classes
    top, bottom = (15, 120) if run.plcrop else (0, 0)
    uda |= {"pseudo_weight_ignore_top": top, "pseudo_weight_ignore_bottom": bottom}
    rcs: dict[str, Any] = {"enabled": False}
    if run.rcs_temp is not None:
        rcs = {"enabled": True, "class_temp": float(run.rcs_temp), "min_crop_ratio": float(run.rcs_min_crop)}
    return {"uda": uda, "rcs": rcs}


def build_config(run: Run, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The Config of an available run; `overrides` (`key=value`) apply last."""
    reason = run.unavailable_reason
    if reason:
        raise ConfigError(f"{run.name} is unavailable: {reason}")
    backbone = _BACKBONES[run.backbone]
    decoder, decoder_norm = _ARCHITECTURES[run.architecture]
    if run.schedule == "poly10warm":
        schedule: dict[str, Any] = {}
    elif run.schedule == "poly10":
        # No warmup and min_lr 1e-4, literally as the original's ablation (docs/recipe.md §1.5): the backbone lr rises.
        schedule = {"warmup": "none", "min_lr": 1e-4}
    else:
        raise ValueError(f"unknown schedule {run.schedule!r}")
    # Settings only the (unavailable) HRDA/AdvSeg/MinEnt rows use; refuse them rather than drop them silently.
    unsupported = [f"{key}={getattr(run, key)!r}" for key, ok in (
        ("crop", run.crop == "512x512"), ("inference", run.inference == "whole"), ("opt", run.opt == "adamw"),
        ("lr", run.lr == 6e-5), ("pmult", run.pmult), ("plcrop", run.plcrop in (False, True, "v1")))
        if not ok]  # fmt: skip
    if unsupported:
        raise ValueError(f"{run.name}: not expressible in Config: {', '.join(unsupported)}")
    uda = _uda_delta(run)
    data: dict[str, Any] = {k: dataclasses.asdict(v) for k, v in _PAIRS[(run.source, run.target)].items()}
    data["rcs"] = uda["rcs"]
    # The baselines' loaders add PhotoMetricDistortion; the UDA configs comment it out (docs/architectures.md §3).
    data["photometric"] = run.is_baseline
    # Reference runner (§6.2): checkpoint at the end, evaluate 10 times; the 2-iteration smoke sets use an
    # evaluation interval of 100 as the original does, so they never evaluate mid-run.
    eval_interval = run.iters // 10 if run.iters >= 10 else 100
    values = {
        "model": {"backbone": backbone, "decoder": decoder, "decoder_norm": decoder_norm,
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
