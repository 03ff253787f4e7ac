"""Training checkpoints in a work dir: `iter_XXXXXX.pth` files, a `latest.pth` link, rotation and resume.

Each file is written atomically by `checkpoint.save_checkpoint` (temporary file, fsync, rename); `latest.pth` is a
relative symlink replaced by an atomic rename, so a crash at any moment leaves either the old or the new link,
never a truncated file. A resumed run needs only the iteration: every random draw derives from (seed, rank, t),
and the loaders restart at t.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch

from daformer_fast.checkpoint import CheckpointError, read_checkpoint, save_checkpoint

__all__ = ["find_resume", "list_checkpoints", "load_run_state", "save_run_state"]

log = logging.getLogger("daformer_fast.train")
_ITER = re.compile(r"^iter_(\d+)\.pth$")
LATEST = "latest.pth"


def list_checkpoints(work_dir: Path) -> list[Path]:
    """`iter_*.pth` files of the work dir, oldest first."""
    if not work_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in work_dir.iterdir() if (m := _ITER.match(p.name)) and p.is_file()]
    return [p for _, p in sorted(found)]


def _point_latest(work_dir: Path, target: Path) -> None:
    tmp = work_dir / (LATEST + ".tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(target.name, tmp)  # relative: the work dir stays movable
    os.replace(tmp, work_dir / LATEST)


def save_run_state(
    work_dir: Path, iteration: int, *, student, teacher, optimizer, config, extra: dict, keep: int
) -> Path:
    """Write `iter_<iteration>.pth`, point `latest.pth` at it, delete all but the newest `keep` files."""
    for name, module in (("student", student), ("teacher", teacher)):
        if module is not None and not all(torch.isfinite(p).all() for p in module.parameters()):
            # Never persist a broken model: the previous checkpoint stays the one to resume from.
            raise FloatingPointError(f"{name} weights are not finite at iteration {iteration}; checkpoint not written")
    path = save_checkpoint(
        work_dir / f"iter_{iteration:06d}.pth", student=student, teacher=teacher, optimizer=optimizer,
        iteration=iteration, config=config, extra=extra,
    )  # fmt: skip
    _point_latest(work_dir, path)
    for old in list_checkpoints(work_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def find_resume(work_dir: Path, resume: str) -> tuple[Path, dict] | None:
    """The checkpoint to resume from and its contents, or None to start fresh.

    `auto`: the newest complete checkpoint of the work dir (`latest.pth`, then older `iter_*` files if it is
    damaged, with a warning); no checkpoint at all starts from scratch. Otherwise `resume` is a path that must load.
    """
    if resume != "auto":
        path = Path(resume)
        return path, read_checkpoint(path)
    candidates = list(reversed(list_checkpoints(work_dir)))
    latest = work_dir / LATEST
    if latest.exists():
        target = latest.resolve()
        candidates = [target] + [c for c in candidates if c.resolve() != target]
    for path in candidates:
        try:
            state = read_checkpoint(path)
            if "student" not in state or "iteration" not in state:
                raise CheckpointError(f"{path} is not a training checkpoint (no student/iteration)")
            return path, state
        except CheckpointError as e:
            log.warning("skipping damaged checkpoint: %s", e)
    return None


def load_run_state(state: dict, *, student, teacher, optimizer) -> int:
    """Restore the modules and optimizer in place; returns the iteration to continue from."""
    student.load_state_dict(state["student"])
    if teacher is not None:
        if "teacher" not in state:
            raise CheckpointError("checkpoint has no teacher; it was not written by a UDA run")
        teacher.load_state_dict(state["teacher"])
    if optimizer is not None and "optimizer" in state:
        optimizer.load_state_dict(state["optimizer"])
    return int(state["iteration"])
