"""Train DAFormer (or a baseline) from a YAML config.

    python -m daformer_fast.train configs/demo.yaml
    python -m daformer_fast.train configs/gta2cs.yaml --set train.precision=bf16 train.cuda_graphs=true
    python -m daformer_fast.train configs/gta2cs.yaml --resume auto
    torchrun --standalone --nproc_per_node=4 -m daformer_fast.train configs/gta2cs.yaml
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29400 \\
        -m daformer_fast.train configs/gta2cs.yaml --resume auto

The work dir (`train.work_dir`) receives config.yaml, train.log, metrics.jsonl, tb/ (TensorBoard),
class_mix_debug/ and iter_XXXXXX.pth checkpoints with a latest.pth link.
"""

from __future__ import annotations

import argparse
import sys

from daformer_fast.cli import add_common_args, config_overrides, run_cli
from daformer_fast.config import load_config

__all__ = ["main"]


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m daformer_fast.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_common_args(p, trust_help="allow full unpickling (can run code) of --resume PATH and model.pretrained")
    p.add_argument("--resume", metavar="auto|PATH", help="auto = newest checkpoint in the work dir, if any")
    return p.parse_args(argv)


def _run(args: argparse.Namespace) -> None:
    cfg = load_config(args.config, config_overrides(args))
    from daformer_fast.trainer import train  # after the config check: importing torch takes a few seconds

    train(cfg, resume=args.resume, trust=args.trust_checkpoint)


def main(argv: list[str] | None = None) -> int:
    return run_cli(_run, _parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
