"""The training loop: data, the UDA step, logging, evaluation and checkpoints, on one or many processes.

    metrics = train(load_config("configs/demo.yaml"), resume="auto")

Per iteration t: the loaders' batch t (drawn from (seed, rank, t)) → `UDAStep` (recipe §2.2) → every
`log_interval` one host read of the accumulated losses → `metrics.jsonl`, TensorBoard, the progress bar; every
`eval_interval` and at the end the student's mIoU on `data.val` (sharded over ranks, confusion matrices summed);
every `checkpoint_interval` and at the end an atomic checkpoint. SIGTERM finishes the step, checkpoints and
exits cleanly (preemption). A step with a non-finite loss or gradient is skipped (no update) and reported at the
next log line; `train.max_nonfinite` of them in a row stop the run (FloatingPointError).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
import sys
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from daformer_fast.checkpoint import load_weights
from daformer_fast.config import Config, save_config
from daformer_fast.data.datasets import DatasetError, list_samples
from daformer_fast.data.loader import build_train_loader
from daformer_fast.data.torch_loader import FailureMonitor
from daformer_fast.distributed import Dist, all_reduce_sum, barrier, init_distributed, shutdown
from daformer_fast.evaluate import evaluate
from daformer_fast.metrics import format_table, segmentation_metrics
from daformer_fast.models import build_segmentor
from daformer_fast.ops._dispatch import set_default_impl
from daformer_fast.run_state import check_work_dir, find_resume, load_run_state, save_run_state
from daformer_fast.uda.dacs import UDAStep, build_optimizer

__all__ = ["train"]

log = logging.getLogger("daformer_fast.train")


def _setup_logging(work_dir: Path, main: bool) -> tuple[list[logging.Handler], tuple[int, bool]]:
    """Console (and on rank 0 `train.log`) handlers for this run; the caller removes them at the end (restoring
    the logger's level and propagation), so that several runs in one process each log to their own work dir and
    the host application's logging is left as it was."""
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


def _prepare_data(cfg: Config, d: Dist) -> Config:
    """Generate the synthetic benchmark on first use (rank 0; the others wait) and point the roots into it."""
    root = cfg.data.synthetic_root
    if root is None:
        return cfg
    root = Path(root)
    if d.main and not (root / "source" / "sample_class_stats.json").exists():
        from daformer_fast.tools.make_synthetic import make_synthetic

        log.info("generating the synthetic benchmark in %s", root)
        make_synthetic(root)
    barrier(d)
    return cfg


def _scaled_lr(cfg: Config, world_size: int) -> Config:
    factor = {"none": 1.0, "linear": float(world_size), "sqrt": math.sqrt(world_size)}[cfg.optim.lr_scaling]
    if factor == 1.0:
        return cfg
    log.info("optim.lr_scaling=%s: lr %.3g → %.3g for %d processes", cfg.optim.lr_scaling, cfg.optim.lr,
             cfg.optim.lr * factor, world_size)  # fmt: skip
    return dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=cfg.optim.lr * factor))


class _Preemption:
    """SIGTERM sets a flag; the loop checkpoints after the current step and leaves."""

    def __init__(self) -> None:
        self.requested = False
        self._old = signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame) -> None:
        self.requested = True

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._old)


class _Meter:
    """Sums the step outputs on the device; one host read per log interval."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.wait = 0.0
        self.start = time.perf_counter()

    def add(self, out: dict[str, torch.Tensor], wait: float) -> None:
        for k, v in out.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
        self.count += 1
        self.wait += wait

    def read(self) -> tuple[dict[str, float], float, float]:
        """(means of the interval, seconds per step, data-wait fraction); resets."""
        elapsed = time.perf_counter() - self.start
        means = {k: float(v) / self.count for k, v in self.sums.items()}  # the interval's one sync
        per_step, wait = elapsed / max(self.count, 1), self.wait / max(elapsed, 1e-9)
        self.sums, self.count, self.wait, self.start = {}, 0, 0.0, time.perf_counter()
        return means, per_step, wait


def _memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # peak RSS (KiB on Linux)


def _evaluate(cfg: Config, student, d: Dist, samples) -> dict:
    student.eval()
    conf = evaluate(
        student, samples[d.rank :: d.world_size], cfg.data.val.scale, cfg.model.num_classes, d.device,
        bf16=cfg.train.precision == "bf16", workers=min(cfg.data.workers, 4), progress=False,
    )  # fmt: skip
    conf = all_reduce_sum(conf.to(d.device), d).cpu()
    return segmentation_metrics(conf, cfg.data.classes, synthia=cfg.data.source.name == "synthia")


def _json_row(row: dict) -> str:
    clean = lambda v: None if isinstance(v, float) and not math.isfinite(v) else v  # noqa: E731
    return json.dumps({k: ({n: clean(x) for n, x in v.items()} if isinstance(v, dict) else clean(v))
                       for k, v in row.items()})  # fmt: skip


def train(cfg: Config, resume: str | None = None, trust: bool = False) -> dict:
    """Train per `cfg`; returns the final evaluation metrics (empty without a validation set).

    resume: "auto" (newest checkpoint of the work dir, if any) or a checkpoint path. trust: allow full unpickling
    of `resume` and `model.pretrained` (see `checkpoint.read_checkpoint`); work-dir checkpoints never need it.
    """
    d = init_distributed(cfg.train.device)
    try:
        return _train(cfg, resume, trust, d)
    finally:
        shutdown(d)


def _train(cfg: Config, resume: str | None, trust: bool, d: Dist) -> dict:
    work_dir = Path(cfg.train.work_dir)
    if d.main:
        work_dir.mkdir(parents=True, exist_ok=True)
    barrier(d)
    check_work_dir(work_dir)  # before anything is opened for writing (train.log below)
    handlers, saved = _setup_logging(work_dir, d.main)
    try:
        return _run(cfg, resume, trust, d, work_dir)
    finally:
        _remove_logging(handlers, saved)


def _run(cfg: Config, resume: str | None, trust: bool, d: Dist, work_dir: Path) -> dict:
    if d.main:
        save_config(cfg, work_dir / "config.yaml")
    set_default_impl(cfg.kernels.impl)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    cfg = _scaled_lr(_prepare_data(cfg, d), d.world_size)
    log.info("%s on %s × %d process(es), %s path, %s", cfg.uda.mode, d.device, d.world_size, cfg.train.path,
             cfg.train.precision)  # fmt: skip

    # The same initial weights on every rank and after every restart (the ImageNet copy is rebuilt, not saved).
    torch.manual_seed(cfg.train.seed)
    student = build_segmentor(cfg.model)
    if cfg.model.pretrained:
        load_weights(student, cfg.model.pretrained, trust=trust, log=log.info if d.main else (lambda m: None))
    student.to(d.device)
    fast = cfg.train.path == "fast"
    optimizer = build_optimizer(cfg, student, fused=fast)
    student_fwd = DDP(student, device_ids=[d.device.index] if d.device.type == "cuda" else None) if d.enabled else None
    step = UDAStep(cfg, student, optimizer, device=d.device, rank=d.rank, student_fwd=student_fwd)

    start = 0
    if resume:
        found = find_resume(work_dir, resume, trust=trust)
        if found is not None:
            path, state = found
            start = load_run_state(state, student=student, teacher=step.teacher, optimizer=optimizer, path=path)
            log.info("resumed from %s at iteration %d", path, start)
    max_iters = cfg.train.max_iters
    val_samples = list_samples(cfg.data.val) if cfg.train.eval_interval else []
    if start >= max_iters:
        log.info("nothing to do: iteration %d >= train.max_iters %d", start, max_iters)
    loader = build_train_loader(
        cfg.data, mode=cfg.uda.mode, num_classes=cfg.model.num_classes, seed=cfg.train.seed, rank=d.rank,
        start_iter=start, max_iters=max_iters, device=d.device,
    )  # fmt: skip

    writer = None
    if d.main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(work_dir / "tb"), purge_step=start + 1)
    metrics_file = open(work_dir / "metrics.jsonl", "a", encoding="utf-8") if d.main else None
    bar = tqdm(total=max_iters, initial=start, disable=not d.main, dynamic_ncols=True, desc="train")
    imgs_per_step = cfg.data.batch_size * (2 if cfg.uda.mode == "dacs" else 1) * d.world_size
    monitor, meter, preempt = FailureMonitor(), _Meter(), _Preemption()
    nonfinite_run = torch.zeros((), device=d.device)  # current run of consecutive skipped steps
    nonfinite_worst = torch.zeros((), device=d.device)  # longest run since the start, read at log intervals
    stop_pending: torch.Tensor | None = None
    last_log = start
    final: dict = {}

    def checkpoint(t_done: int) -> None:
        if d.main:
            path = save_run_state(
                work_dir, t_done, student=student, teacher=step.teacher, optimizer=optimizer, config=cfg,
                extra={"world_size": d.world_size}, keep=cfg.train.keep_checkpoints,
            )  # fmt: skip
            log.info("saved %s", path)
        barrier(d)

    def log_eval(t_done: int) -> dict:
        m = _evaluate(cfg, student, d, val_samples)
        step.train()
        if d.main:
            log.info("iteration %d evaluation on %s:\n%s", t_done, cfg.data.val.root, format_table(m, cfg.data.classes))
            metrics_file.write(_json_row({"step": t_done, **m}) + "\n")
            metrics_file.flush()
            for k in ("mIoU", "mAcc", "aAcc"):
                writer.add_scalar(f"val/{k}", m[k], t_done)
        return m

    try:
        step.train()
        it = iter(loader)
        for t in range(start, max_iters):
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                raise DatasetError(f"the loader ended early at iteration {t}") from None
            wait = time.perf_counter() - t0
            monitor.update(batch)
            debug = d.main and cfg.uda.debug_img_interval > 0 and t % cfg.uda.debug_img_interval == 0
            out = step(batch, t, debug=debug and cfg.uda.mode == "dacs")
            nonfinite_run = (nonfinite_run + out["skipped"]) * out["skipped"]  # consecutive skips, on the device
            nonfinite_worst = torch.maximum(nonfinite_worst, nonfinite_run)
            meter.add(out, wait)
            if debug and step.debug:
                _save_debug(work_dir, t, step.debug, cfg)
            t_done = t + 1
            bar.update(1)
            if t_done % cfg.train.log_interval == 0 or t_done == max_iters:
                means, per_step, wait_frac = meter.read()
                if means.get("skipped", 0.0) > 0:
                    log.warning("iterations %d-%d: %d step(s) skipped, non-finite loss or gradient (no update)",
                                last_log + 1, t_done, round(means["skipped"] * (t_done - last_log)))  # fmt: skip
                last_log = t_done
                if int(nonfinite_worst) >= cfg.train.max_nonfinite:
                    raise FloatingPointError(
                        f"{int(nonfinite_worst)} consecutive steps with a non-finite loss or gradient (up to "
                        f"iteration {t_done}); stopping (train.max_nonfinite={cfg.train.max_nonfinite}). The last "
                        "checkpoint holds finite weights — lower the lr or check the data"
                    )
                if d.main:
                    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
                    row = {"step": t_done, "lr": lrs.get("backbone"), "lr_head": lrs.get("head"), **means,
                           "step_ms": per_step * 1e3, "img_s": imgs_per_step / per_step,
                           "data_wait_pct": 100 * wait_frac, "mem_gib": _memory_gib(d.device),
                           "failed_draws": monitor.failed}  # fmt: skip
                    metrics_file.write(_json_row(row) + "\n")
                    metrics_file.flush()
                    for k, v in row.items():
                        if k != "step" and isinstance(v, int | float):
                            writer.add_scalar(f"train/{k}", v, t_done)
                    bar.set_postfix(loss_src=f"{means['loss_src']:.3f}", img_s=f"{row['img_s']:.1f}")
            if val_samples and (t_done % cfg.train.eval_interval == 0 or t_done == max_iters):
                final = log_eval(t_done)
            stop = preempt.requested
            if d.enabled:
                # Ranks can receive SIGTERM at different iterations but must stop at the same one: the flags are
                # summed every step and the sum is read one step later, so the read never waits on the running step.
                agreed, stop_pending = stop_pending, all_reduce_sum(torch.tensor(float(stop), device=d.device), d)
                stop = agreed is not None and bool(agreed)
            if stop:
                log.warning("SIGTERM: checkpointing at iteration %d and stopping", t_done)
            if t_done % cfg.train.checkpoint_interval == 0 or t_done == max_iters or stop:
                checkpoint(t_done)
            if stop:
                break
        if final and d.main:
            key = "mIoU16" if "mIoU16" in final else "mIoU"
            print(f"final {key} on {cfg.data.val.root}: {final[key]:.2f}", flush=True)
        return final
    finally:
        bar.close()
        preempt.restore()
        if metrics_file is not None:
            metrics_file.close()
        if writer is not None:
            writer.close()


def _save_debug(work_dir: Path, t: int, panels: dict, cfg: Config) -> None:
    """Debug grids outside the step (recipe §2.9); a drawing problem never stops training."""
    try:
        from daformer_fast.visualize import save_debug_grids
    except ImportError:
        return
    try:
        save_debug_grids(work_dir / "class_mix_debug", t, panels, cfg.data.palette)
    except Exception as e:  # noqa: BLE001 — diagnostics only
        log.warning("debug images at iteration %d failed: %s", t, e)
