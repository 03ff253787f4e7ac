"""What the command-line tools (train, evaluate, predict, experiments) share: the common flags and the error exit.

    p = argparse.ArgumentParser(...)
    add_common_args(p, config="positional")       # config, --set, --device, --trust-checkpoint
    args = p.parse_args(argv)
    return run_cli(_run, args)                    # user errors: "error: <message>" on stderr, exit 2

`--set KEY=VALUE ...` takes one or more overrides and may be repeated; repeated `--set` flags accumulate, in
order, and the last value of a key wins (`--set a=1 b=2 --set a=3` applies a=1, b=2, a=3). The positional
arguments of a tool therefore go before `--set`.

Exit codes: 0 success, 2 a user error (bad config or overrides, data layout, checkpoint, device, a non-finite
loss), 130 interrupted (Ctrl-C); argparse's own usage errors also exit 2. Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any, Literal

__all__ = ["add_common_args", "config_overrides", "run_cli", "short_message", "user_errors"]


def add_common_args(
    p: argparse.ArgumentParser,
    *,
    config: Literal["positional", "option"] | None = "positional",
    config_help: str = "YAML config (deltas from the paper's GTA→Cityscapes defaults)",
    set_help: str = "config overrides, e.g. train.max_iters=100; repeated --set flags accumulate",
    device: bool = True,
    trust: bool = True,
    trust_help: str = "allow full unpickling of the checkpoint (can run code; only for files you trust)",
) -> None:
    """Add the flags the tools share: `config` (positional, `--config` option, or none), `--set`, and optionally
    `--device` (a shortcut for train.device) and `--trust-checkpoint`."""
    if config == "positional":
        p.add_argument("config", help=config_help)
    elif config == "option":
        p.add_argument("--config", help=config_help)
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE", help=set_help)
    if device:
        p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: train.device)")
    if trust:
        p.add_argument("--trust-checkpoint", action="store_true", help=trust_help)


def config_overrides(args: argparse.Namespace) -> list[str]:
    """The `--set` overrides, then `--device` (when given) as `train.device`: one way for every tool to pick it."""
    device = getattr(args, "device", None)
    return list(args.set) + ([f"train.device={device}"] if device else [])


def user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions a tool reports as one message without a traceback. Imported here, not at module level, so
    that a tool's `--help` and the config-only tools do not pay for importing torch."""
    from daformer_fast.checkpoint import CheckpointError
    from daformer_fast.config import ConfigError
    from daformer_fast.data.datasets import DatasetError

    return ConfigError, DatasetError, CheckpointError, FloatingPointError


def short_message(e: BaseException) -> str:
    """The message of `e`; for an error re-raised from a DataLoader worker, only the original error's last line
    (torch puts the worker's whole traceback into the message)."""
    msg = str(e)
    if "Original Traceback" in msg:
        last = msg.strip().splitlines()[-1]
        msg = last.split(": ", 1)[1] if last.startswith(type(e).__name__ + ": ") else last
    return msg


def run_cli(fn: Callable[..., int | None], *args: Any) -> int:
    """`fn(*args)` as a tool's body: its return value (None = 0) is the exit code; a user error prints
    `error: <message>` on stderr and gives 2, Ctrl-C prints `interrupted` and gives 130.

    The message is one line, except for a checkpoint/model mismatch, whose key listing follows on indented lines.
    Checkpoints already written stay as they are.
    """
    try:
        return fn(*args) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if not isinstance(e, user_errors()):
            raise
        print(f"error: {short_message(e)}", file=sys.stderr)
        return 2
