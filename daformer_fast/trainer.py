"""The training loop: data, the UDA step, logging, evaluation and checkpoints, on one or many processes.

    metrics = train(load_config("configs/demo.yaml"), resume="auto")

Per iteration t: the loaders' batch t (drawn from (seed, rank, t)) → `UDAStep` (docs/recipe.md §2.2) → every
`log_interval` one host read of the accumulated losses → `metrics.jsonl`, TensorBoard, the progress bar; every
`eval_interval` and at the end the student's mIoU on `data.val` (sharded over ranks, confusion matrices summed);
every `checkpoint_interval` and at the end an atomic checkpoint. SIGTERM finishes the step, checkpoints and
exits cleanly (preemption). A step with a non-finite loss or gradient is skipped (no update) and reported at the
next log line; `train.max_nonfinite` of them in a row stop the run (FloatingPointError).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import signal
import sys
import time
from pathlib import Path

import torch

from daformer_fast.build import build_training
from daformer_fast.config import Config, save_config
from daformer_fast.data.datasets import DatasetError, list_samples
from daformer_fast.data.loader import build_train_loader
from daformer_fast.data.synthetic import ensure_synthetic
from daformer_fast.data.torch_loader import FailureMonitor
from daformer_fast.distributed import Dist, all_reduce_sum, barrier, init_distributed, shutdown
from daformer_fast.inference import evaluate
from daformer_fast.metrics import format_table, segmentation_metrics
from daformer_fast.run_logs import MetricsLog
from daformer_fast.run_state import check_work_dir, find_resume, load_run_state, save_run_state
from daformer_fast.visualize import save_debug_grids

__all__ = ["Trainer", "train"]

log = logging.getLogger("daformer_fast.train")


def train(cfg: Config, resume: str | None = None, trust: bool = False) -> dict:
    """Train per `cfg`; returns the final evaluation metrics (empty without a validation set).

    resume: "auto" (newest checkpoint of the work dir, if any) or a checkpoint path. trust: allow full unpickling
    of `resume` and `model.pretrained` (see `checkpoint.read_checkpoint`); work-dir checkpoints never need it.
    """
    d = init_distributed(cfg.train.device)
    try:
        with Trainer(cfg, d, resume=resume, trust=trust) as trainer:
            return trainer.train()
    finally:
        shutdown(d)


class Trainer(contextlib.ExitStack):
    """One run: built from the config, entered as a context (which closes logs, files and handlers on exit)."""

    def __init__(self, cfg: Config, d: Dist, *, resume: str | None = None, trust: bool = False) -> None:
        super().__init__()
        self.d, self.work_dir = d, Path(cfg.train.work_dir)
        if d.main:
            self.work_dir.mkdir(parents=True, exist_ok=True)
        barrier(d)
        check_work_dir(self.work_dir)  # before anything is opened for writing (train.log below)
        self.callback(_remove_logging, *_setup_logging(self.work_dir, d.main))
        try:
            self._setup(cfg, resume, trust)
        except BaseException:
            self.close()
            raise

    def _setup(self, cfg: Config, resume: str | None, trust: bool) -> None:
        d = self.d
        if d.main:
            save_config(cfg, self.work_dir / "config.yaml")
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True)
        if cfg.data.synthetic_root is not None:
            # Generated on first use by rank 0; the others wait for it.
            if d.main and ensure_synthetic(cfg.data.synthetic_root):
                log.info("generated the synthetic benchmark in %s", cfg.data.synthetic_root)
            barrier(d)
        self.cfg = cfg = _scaled_lr(cfg, d.world_size)
        log.info("%s on %s × %d process(es), %s path, %s", cfg.uda.mode, d.device, d.world_size, cfg.train.path,
                 cfg.train.precision)  # fmt: skip
        self.student, self.step, self.optimizer = build_training(
            cfg, d.device, rank=d.rank, ddp=d.enabled, trust=trust, log=log.info if d.main else None
        )
        self.start = 0
        found = find_resume(self.work_dir, resume, trust=trust) if resume else None
        if found is not None:
            path, state = found
            self.start = load_run_state(state, student=self.student, teacher=self.step.teacher,
                                        mic_teacher=self.step.mic_teacher, optimizer=self.optimizer, path=path)
            log.info("resumed from %s at iteration %d", path, self.start)
        if self.start >= cfg.train.max_iters:
            log.info("nothing to do: iteration %d >= train.max_iters %d", self.start, cfg.train.max_iters)
        self.val_samples = list_samples(cfg.data.val) if cfg.train.eval_interval else []
        self.loader = build_train_loader(
            cfg.data, mode=cfg.uda.mode, num_classes=cfg.model.num_classes, seed=cfg.train.seed, rank=d.rank,
            start_iter=self.start, max_iters=cfg.train.max_iters, device=d.device,
        )  # fmt: skip
        # Which loader runs, and the DALI self-check's verdict: in train.log and the first metrics row.
        check = getattr(self.loader, "loader_check", None)
        if check is not None:
            log.info("loader: %s (self-check: %s)", check["loader"], check["check"])
        imgs_per_step = cfg.data.batch_size * (2 if cfg.uda.mode == "dacs" else 1) * d.world_size
        first_row = {"loader": check} if check is not None else None
        self.logs = self.enter_context(MetricsLog(self.work_dir, self.start, cfg.train.max_iters, imgs_per_step,
                                                  d.device, enabled=d.main, first_row=first_row))  # fmt: skip
        self.guard = NonFiniteGuard(cfg.train.max_nonfinite, d.device, self.start)
        self.stop = self.enter_context(StopAgreement(d))
        self.monitor = FailureMonitor()

    # -------------------------------------------------------------------------------------------------------------

    def train(self) -> dict:
        """The loop; returns the last evaluation's metrics."""
        cfg, final = self.cfg, {}
        self.step.train()
        batches = iter(self.loader)
        for t in range(self.start, cfg.train.max_iters):
            t0 = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                raise DatasetError(f"the loader ended early at iteration {t}")
            wait = time.perf_counter() - t0
            self.monitor.update(batch)
            out = self.step(batch, t, debug=self._debug_due(t))
            if "debug" in out:
                panels = out.pop("debug")
                if self.d.main:
                    self._save_debug(t, panels)
            self.guard.update(out["skipped"])
            self.logs.add(out, wait)
            t_done = t + 1
            last = t_done == cfg.train.max_iters
            if t_done % cfg.train.log_interval == 0 or last:
                means = self.logs.write_train(t_done, self.optimizer, failed_draws=self.monitor.failed)
                self.guard.check(t_done, means.get("skipped", 0.0))
            if self.val_samples and (t_done % cfg.train.eval_interval == 0 or last):
                final = self._evaluate(t_done)
            stop = self.stop.agreed()
            if stop:
                log.warning("SIGTERM: checkpointing at iteration %d and stopping", t_done)
            if t_done % cfg.train.checkpoint_interval == 0 or last or stop:
                self._checkpoint(t_done)
            if stop:
                break
        if final and self.d.main:
            key = "mIoU16" if "mIoU16" in final else "mIoU"
            print(f"final {key} on {cfg.data.val.root}: {final[key]:.2f}", flush=True)
        return final

    # -------------------------------------------------------------------------------------------------------------

    def _debug_due(self, t: int) -> bool:
        # The same answer on every rank (rank 0 alone draws): a captured step runs debug iterations eagerly, and
        # under DDP the ranks' gradient all-reduces must be the same kind of step to pair up.
        every = self.cfg.uda.debug_img_interval
        return self.cfg.uda.mode == "dacs" and every > 0 and t % every == 0

    def _save_debug(self, t: int, panels: dict) -> None:
        """Debug grids outside the step (docs/recipe.md §2.9); a drawing problem never stops training."""
        try:
            save_debug_grids(self.work_dir / "class_mix_debug", t, panels, self.cfg.data.palette)
        except Exception as e:  # noqa: BLE001 — diagnostics only
            log.warning("debug images at iteration %d failed: %s", t, e)

    def _evaluate(self, t_done: int) -> dict:
        cfg, d = self.cfg, self.d
        self.student.eval()
        conf = evaluate(
            self.student, self.val_samples[d.rank :: d.world_size], cfg.data.val.scale, cfg.model.num_classes,
            d.device, bf16=cfg.train.precision == "bf16", workers=min(cfg.data.workers, 4), progress=False,
        )  # fmt: skip
        conf = all_reduce_sum(conf.to(d.device), d).cpu()
        m = segmentation_metrics(conf, cfg.data.classes, synthia=cfg.data.source.name == "synthia")
        self.step.train()
        if d.main:
            log.info("iteration %d evaluation on %s:\n%s", t_done, cfg.data.val.root, format_table(m, cfg.data.classes))
        self.logs.write_eval(t_done, m)
        return m

    def _checkpoint(self, t_done: int) -> None:
        if self.d.main:
            path = save_run_state(
                self.work_dir, t_done, student=self.student, teacher=self.step.teacher, optimizer=self.optimizer,
                config=self.cfg, extra={"world_size": self.d.world_size}, keep=self.cfg.train.keep_checkpoints,
                mic_teacher=self.step.mic_teacher,
            )  # fmt: skip
            log.info("saved %s", path)
        barrier(self.d)


class NonFiniteGuard:
    """Counts consecutive skipped (non-finite) steps on the device; checked at log intervals, where the loop reads
    the host anyway."""

    def __init__(self, max_run: int, device: torch.device, start: int) -> None:
        self.max_run, self.last_check = max_run, start
        self.run = torch.zeros((), device=device)  # current run of consecutive skipped steps
        self.worst = torch.zeros((), device=device)  # longest run since the start

    def update(self, skipped: torch.Tensor) -> None:
        self.run = (self.run + skipped) * skipped
        self.worst = torch.maximum(self.worst, self.run)

    def check(self, t_done: int, skipped_mean: float) -> None:
        """Warn about the skipped steps since the last check (`skipped_mean`: their share of the interval's steps);
        raise FloatingPointError after `max_run` in a row."""
        start, self.last_check = self.last_check, t_done
        if skipped_mean > 0:
            log.warning("iterations %d-%d: %d step(s) skipped, non-finite loss or gradient (no update)",
                        start + 1, t_done, round(skipped_mean * (t_done - start)))  # fmt: skip
        worst = int(self.worst)
        if worst >= self.max_run:
            raise FloatingPointError(
                f"{worst} consecutive steps with a non-finite loss or gradient (up to iteration {t_done}); stopping "
                f"(train.max_nonfinite={self.max_run}). The last checkpoint holds finite weights — lower the lr or "
                "check the data"
            )


class StopAgreement(contextlib.AbstractContextManager):
    """SIGTERM sets a flag; all ranks stop at the same iteration.

    Ranks can receive SIGTERM at different iterations but must stop at the same one: the flags are summed every
    step and the sum is read one step later, so the read never waits on the running step.
    """

    def __init__(self, d: Dist) -> None:
        self.d, self.requested = d, False
        self._pending: torch.Tensor | None = None
        self._old = signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame) -> None:
        self.requested = True

    def agreed(self) -> bool:
        if not self.d.enabled:
            return self.requested
        agreed = self._pending
        self._pending = all_reduce_sum(torch.tensor(float(self.requested), device=self.d.device), self.d)
        return agreed is not None and bool(agreed)

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGTERM, self._old)


def _scaled_lr(cfg: Config, world_size: int) -> Config:
    factor = {"none": 1.0, "linear": float(world_size), "sqrt": math.sqrt(world_size)}[cfg.optim.lr_scaling]
    if factor == 1.0:
        return cfg
    log.info("optim.lr_scaling=%s: lr %.3g → %.3g for %d processes", cfg.optim.lr_scaling, cfg.optim.lr,
             cfg.optim.lr * factor, world_size)  # fmt: skip
    return dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=cfg.optim.lr * factor))


def _setup_logging(work_dir: Path, main: bool) -> tuple[list[logging.Handler], tuple[int, bool]]:
    """Console (and on rank 0 `train.log`) handlers for this run; removed at the end (restoring the logger's level
    and propagation), so that several runs in one process each log to their own work dir and the host
    application's logging is left as it was."""
    root = logging.getLogger("daformer_fast")
    saved = (root.level, root.propagate)
    root.setLevel(logging.INFO if main else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if main:
        handlers.append(logging.FileHandler(work_dir / "train.log"))
    for h in handlers:
        h.setFormatter(fmt)
        root.addHandler(h)
    root.propagate = False
    return handlers, saved


def _remove_logging(handlers: list[logging.Handler], saved: tuple[int, bool]) -> None:
    root = logging.getLogger("daformer_fast")
    for h in handlers:
        root.removeHandler(h)
        h.close()
    root.setLevel(saved[0])
    root.propagate = saved[1]
