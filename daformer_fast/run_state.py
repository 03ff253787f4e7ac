"""Training checkpoints in a work dir: `iter_XXXXXX.pth` files, a `latest.pth` link, rotation and resume.

Each file is written atomically by `checkpoint.save_checkpoint` (temporary file, fsync, rename); `latest.pth` is a
relative symlink replaced by an atomic rename, so a crash at any moment leaves either the old or the new link,
never a truncated file; the `*.tmp` a crash leaves behind is ignored and removed by the next save. A resumed run
needs only the iteration: every random draw derives from (seed, rank, t), and the loaders restart at t.

The trainer writes only inside its work dir: `check_work_dir` refuses a work dir in which one of the names it
writes or resumes from is a symlink leading outside it (a planted `metrics.jsonl -> ~/.bashrc` would otherwise be
appended to, a planted `latest.pth` would feed foreign weights to `--resume auto`).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch

from daformer_fast.checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from daformer_fast.config import ConfigError

__all__ = ["check_work_dir", "find_resume", "list_checkpoints", "load_run_state", "save_run_state"]

log = logging.getLogger("daformer_fast.train")
_ITER = re.compile(r"^iter_(\d+)\.pth$")
LATEST = "latest.pth"
# Every name the trainer writes in (or resumes from) its work dir, with the `.tmp` of its atomic writes.
_OWNED = re.compile(r"^(config\.yaml|train\.log|metrics\.jsonl|tb|class_mix_debug|latest\.pth|iter_\d+\.pth)(\.tmp)?$")


def check_work_dir(work_dir: Path) -> None:
    """Raise ConfigError if an entry the trainer writes or reads is a symlink resolving outside `work_dir`.

    The work dir itself may be a symlink (e.g. to a scratch disk): the rule is about what lies inside it.
    """
    if not work_dir.is_dir():
        return
    root = work_dir.resolve()
    for entry in sorted(work_dir.iterdir()):
        if _OWNED.match(entry.name) and entry.is_symlink() and not entry.resolve().is_relative_to(root):
            raise ConfigError(
                f"train.work_dir: {entry} is a symlink to {os.readlink(entry)}, outside the work dir; the trainer "
                "writes and resumes only inside its work dir — remove the link"
            )


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
    work_dir: Path, iteration: int, *, student, teacher, optimizer, config, extra: dict, keep: int, mic_teacher=None
) -> Path:
    """Write `iter_<iteration>.pth`, point `latest.pth` at it, delete all but the newest `keep` files."""
    parts = (("student", student), ("teacher", teacher), ("mic_teacher", mic_teacher), ("optimizer", optimizer))
    for name, obj in parts:
        # Never persist a broken state: the previous checkpoint stays the one to resume from. Buffers count too
        # (a non-finite input poisons BatchNorm running statistics even when the update is skipped).
        bad = next((k for k, v in _float_tensors(obj.state_dict() if obj is not None else {})
                    if not torch.isfinite(v).all()), None)  # fmt: skip
        if bad is not None:
            raise FloatingPointError(f"{name} {bad} is not finite at iteration {iteration}; checkpoint not written")
    path = save_checkpoint(
        work_dir / f"iter_{iteration:06d}.pth", student=student, teacher=teacher, mic_teacher=mic_teacher,
        optimizer=optimizer, iteration=iteration, config=config, extra=extra,
    )  # fmt: skip
    _point_latest(work_dir, path)
    for old in list_checkpoints(work_dir)[:-keep]:
        old.unlink(missing_ok=True)
    for partial in work_dir.glob("iter_*.pth.tmp"):  # left by a run killed mid-write; only rank 0 writes here
        partial.unlink(missing_ok=True)
    return path


def _float_tensors(obj, prefix: str = ""):
    """(key, tensor) of every floating-point tensor in a nested state dict."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point():
            yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _float_tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            yield from _float_tensors(v, f"{prefix}[{i}]")


def find_resume(work_dir: Path, resume: str, trust: bool = False) -> tuple[Path, dict] | None:
    """The checkpoint to resume from and its contents, or None to start fresh.

    `auto`: the newest complete checkpoint of the work dir (the `iter_*` file with the highest iteration, then
    older ones if it is damaged, with a warning; `latest.pth` only when there is no `iter_*` file); no checkpoint
    at all starts from scratch. Otherwise `resume` is a path that must load (`trust`: see `read_checkpoint`).
    """
    if resume != "auto":
        path = Path(resume)
        state = read_checkpoint(path, trust=trust)
        if "student" not in state or "iteration" not in state:
            raise CheckpointError(f"{path} is not a training checkpoint (no student/iteration)")
        return path, state
    # By iteration rather than through latest.pth: a kill between the rename of iter_N and the update of the link
    # leaves latest.pth one checkpoint behind, and every iter_* file is complete (written by rename).
    candidates = list(reversed(list_checkpoints(work_dir)))
    if not candidates and (work_dir / LATEST).is_file():
        candidates = [work_dir / LATEST]
    for path in candidates:
        try:
            state = read_checkpoint(path)
            if "student" not in state or "iteration" not in state:
                raise CheckpointError(f"{path} is not a training checkpoint (no student/iteration)")
            return path, state
        except CheckpointError as e:
            log.warning("skipping damaged checkpoint: %s", e)
    return None


def load_run_state(
    state: dict, *, student, teacher, optimizer, path: Path | str = "checkpoint", mic_teacher=None
) -> int:
    """Restore the modules and optimizer in place; returns the iteration to continue from."""
    if teacher is not None and "teacher" not in state:
        raise CheckpointError(f"{path} has no teacher; it was not written by a UDA run")
    if mic_teacher is not None and "mic_teacher" not in state:
        raise CheckpointError(f"{path} has no MIC teacher; it was written without uda.mic alpha/pseudo_threshold")
    try:
        student.load_state_dict(state["student"])
        if teacher is not None:
            teacher.load_state_dict(state["teacher"])
        if mic_teacher is not None:
            mic_teacher.load_state_dict(state["mic_teacher"])
        if optimizer is not None and "optimizer" in state:
            optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        # torch lists every mismatching key; the first lines say enough (usually another backbone or head).
        lines = str(e).strip().splitlines()
        raise CheckpointError(f"{path} does not fit this model/config: {' '.join(lines[:2])[:300]}") from None
    return int(state["iteration"])
