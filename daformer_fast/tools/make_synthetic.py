"""Command line of the synthetic domain-shift benchmark (`daformer_fast.data.synthetic`, described below).

    python -m daformer_fast.tools.make_synthetic ROOT [--n-source N] [--n-target M] [--n-val V] [--size WxH] [--seed S]
"""

from __future__ import annotations

import argparse
import sys

from daformer_fast.data import synthetic
from daformer_fast.data.synthetic import make_synthetic

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m daformer_fast.tools.make_synthetic",
                                     description=f"{__doc__}\n{synthetic.__doc__}",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("root")
    parser.add_argument("--n-source", type=int, default=200)
    parser.add_argument("--n-target", type=int, default=100)
    parser.add_argument("--n-val", type=int, default=40)
    parser.add_argument("--size", default="512x256", help="WxH of every image")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        w, h = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        print(f"error: --size must look like 512x256, got {args.size!r}", file=sys.stderr)
        return 2
    if w < 32 or h < 32:
        print(f"error: --size must be at least 32x32, got {args.size}", file=sys.stderr)
        return 2
    try:
        make_synthetic(args.root, args.n_source, args.n_target, args.n_val, (w, h), args.seed)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
