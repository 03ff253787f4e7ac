"""Train DAFormer (or a baseline) from a YAML config.

    python -m daformer_fast.train configs/demo.yaml
    python -m daformer_fast.train configs/gta2cs.yaml --set train.precision=bf16 train.compile=true
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

from daformer_fast.checkpoint import CheckpointError
from daformer_fast.config import ConfigError, load_config
from daformer_fast.data.datasets import DatasetError

__all__ = ["main"]


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m daformer_fast.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("config", help="YAML config (deltas from the paper's GTA→Cityscapes defaults)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides, e.g. train.max_iters=100")
    p.add_argument("--resume", metavar="auto|PATH", help="auto = newest checkpoint in the work dir, if any")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow full unpickling (can run code) of --resume PATH and model.pretrained")  # fmt: skip
    return p.parse_args(argv)


def _short(e: Exception) -> str:
    """The message of `e`; for an error re-raised from a DataLoader worker, only the original error's last line
    (torch puts the worker's whole traceback into the message)."""
    msg = str(e)
    if "Original Traceback" in msg:
        last = msg.strip().splitlines()[-1]
        msg = last.split(": ", 1)[1] if last.startswith(type(e).__name__ + ": ") else last
    return msg


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        from daformer_fast.trainer import train  # after the config check: importing torch takes a few seconds

        train(cfg, resume=args.resume, trust=args.trust_checkpoint)
    except (ConfigError, DatasetError, CheckpointError, FloatingPointError) as e:
        # User-facing failures: one short message, no traceback; checkpoints already written stay as they are.
        print(f"error: {_short(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
