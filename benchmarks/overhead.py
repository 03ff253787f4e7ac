"""Host overhead of one training step: what the host dispatches and where it waits, per execution mode.

    python benchmarks/overhead.py [--quick] [--config configs/gta2cs.yaml] [--crop N] [--set section.key=value ...]
                                  [--modes original eager compiled-regional compiled-full captured]
                                  [--compile-backend BACKEND] [--no-warm-start] [--time-iters N] [--threads N]
                                  [--json PATH]

Modes: `original` (`train.path: original`), `eager` (the fast path), `compiled-regional` and `compiled-full` (the
fast path with `train.compile: regional` or `full`; records written before both existed call the full one
`compiled`), `captured` (the fast step replayed from a CUDA graph, `train.cuda_graphs: true`; CUDA only, skipped
elsewhere with the reason in the record). Every mode runs one warm-up step first; the counts are of a later step.

Eager modes (`original`, `eager`): a `TorchDispatchMode` counts every op that reaches the dispatcher below autograd
(what a GPU turns into kernel launches, give or take fusions inside an op) and attributes it to a stage, and the
host-read rule of `HostReadDetector` lists the step's host syncs with their call sites. The stage rule, in order:
1. an op issued while autograd runs a backward (`torch._C._current_autograd_node()` is set) is `backward`, and
   so is the step's `_backward` adding a pass's gradients into the held ones;
2. otherwise the Python stack is walked from the innermost frame outwards and the first frame that matches decides:
   a frame whose `self` is one of the step's networks (student or its DDP wrapper, EMA teacher, MIC teacher,
   ImageNet encoder) gives that network's forward; a frame in `uda/losses.py`, `uda/fdist.py` or
   `uda/pseudo_label.py` gives `losses` (CE, feature distance, pseudo-labels and their weights); a frame in
   `ops/classmix_aug.py`, `ops/augment.py`, `uda/augment.py`, `uda/classmix.py` or `uda/mic.py` gives
   `classmix/augmentation`; a frame in `uda/ema.py`, `uda/schedule.py`, `torch/optim/` or the step's
   `_optimizer_step` gives `optimizer+ema`;
3. anything else is `other` (normalisation and transfer of the batch, sums of the losses, the step's outputs).
Innermost first means a loss computed on a network's output counts as a loss, and the ImageNet forward inside the
feature distance counts as the ImageNet forward.

Compiled and captured modes: while a `TorchDispatchMode` is active dynamo runs every frame eagerly, so the mode
would count the eager step. Instead `torch.profiler` records the CPU op events of the step, and the count is of the
top-level `aten::` events (those without an `aten::` parent, as the dispatch mode counts): the ops that still go
through the eager dispatcher, inside compiled code too (inductor's calls into aten, such as matmuls, convolutions
and buffer allocations). They are split only into `backward` (under an autograd engine event) and `not attributed`
(stacks are not recorded inside compiled graphs). Every mode also records this profiler count
(`profiler_ops_total`), the like-for-like comparison across modes (multi-tensor ops count once there, where the
dispatch mode also sees the per-tensor ops a CPU runs them as). benchmarks/compile_capture.py says what the compiled
records hold (graphs, graph breaks, recompiles per step, cold compile, and the warm start: a second process on the
same inductor cache folder, fresh for the cold run) and what the captured one holds. The compiled modes run before
the others (regional first), as in a fresh process; each compiles into its own new `TORCHINDUCTOR_CACHE_DIR`.

Backends: inductor, except `compiled-full` with `--quick` on CPU, which uses `aot_eager` (dynamo and AOT autograd,
no code generation: inductor's CPU compile of the whole networks takes many minutes); `--compile-backend` sets one
for both. `--quick` uses MiT-b0 at 64x64 crops.

Timing: on CPU, after all modes are counted, `--time-iters` steps of each measured mode are timed in turn (one
step of each mode, then the next round), so that load from other processes falls on all modes alike; `ms_per_iter`
is their median. On CUDA `compile_capture.cuda_timing` gives kernel launches and host vs device milliseconds per
mode instead.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_env import environment  # noqa: E402
from compile_capture import (  # noqa: E402
    FIRST_STEP_TAG, STEPS_FOR_RECOMPILES, captured_record, compiled_steps, cuda_timing, first_step_record,
    inductor_caches, profiled_ops, warm_start,
)  # fmt: skip
from throughput import _synthetic_batches  # noqa: E402

from daformer_fast.build import build_training  # noqa: E402
from daformer_fast.config import load_config  # noqa: E402

__all__ = ["COMPILED", "HOST_READS", "MODES", "STAGES", "HostReadDetector", "StageCounter", "main", "measure_mode",
           "stage_of", "summary_lines"]  # fmt: skip

aten = torch.ops.aten
MODES = ("original", "eager", "compiled-regional", "compiled-full", "captured")
COMPILED = {"compiled-regional": "regional", "compiled-full": "full"}
"""The compiled modes and the `train.compile` value each runs."""
STAGES = ("student forward", "teacher forward", "imagenet forward", "backward", "losses", "classmix/augmentation",
          "optimizer+ema", "other")  # fmt: skip
# Ops that wait for a device tensor's values: a scalar read, or an output whose size depends on the data.
HOST_READS = {
    aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default, aten.bincount.default,
    aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default, aten.argwhere.default,
    aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor,
}  # fmt: skip
_FILE_STAGES = (
    (("uda/losses.py", "uda/fdist.py", "uda/pseudo_label.py"), "losses"),
    (("ops/classmix_aug.py", "ops/augment.py", "uda/augment.py", "uda/classmix.py", "uda/mic.py"),
     "classmix/augmentation"),
    (("uda/ema.py", "uda/schedule.py", "torch/optim/"), "optimizer+ema"),
)  # fmt: skip
CAPTURED_SKIP = "needs a CUDA device (train.cuda_graphs captures the fast step with torch.cuda.graph)"


class HostReadDetector(TorchDispatchMode):
    """Records host reads of "device" tensors: `track` seeds them, op outputs inherit the mark from their inputs.

    On CPU there is no device to wait for, so tracked storages stand in for device memory: an op in `HOST_READS`
    that reads one is what would be a host sync on CUDA. `.tolist()` and `.cpu()` are no ops on CPU and stay
    invisible (`torch.cuda.set_sync_debug_mode` catches those on a GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.device_storages: set[int] = set()
        self.reads: list[str] = []

    def track(self, tensors) -> None:
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes():
                self.device_storages.add(t.untyped_storage().data_ptr())

    def _on_device(self, t) -> bool:
        return isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() in self.device_storages

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = tree_leaves((args, kwargs or {}))
        if func in HOST_READS and any(self._on_device(t) for t in inputs):
            where = [f for f in traceback.extract_stack() if "daformer_fast" in f.filename]
            self.reads.append(f"{func} at {where[-1].filename}:{where[-1].lineno} ({where[-1].line})" if where
                              else str(func))  # fmt: skip
        out = func(*args, **(kwargs or {}))
        if any(self._on_device(t) for t in inputs):
            self.track(tree_leaves(out))
        return out


def stage_of(frame, networks: dict[int, str]) -> str:
    """The stage of an op issued from `frame` outside a backward (the module docstring's rule 2-3); `networks` maps
    id() of each network to its stage name."""
    while frame is not None:
        self_ = frame.f_locals.get("self") if "self" in frame.f_code.co_varnames else None
        if self_ is not None and id(self_) in networks:
            return networks[id(self_)]
        path = frame.f_code.co_filename.replace("\\", "/")
        if "daformer_fast/step.py" in path and frame.f_code.co_name == "_optimizer_step":
            return "optimizer+ema"
        if "daformer_fast/step.py" in path and frame.f_code.co_name == "_backward":
            return "backward"  # the sum of a backward pass's gradients into the held ones
        for suffixes, stage in _FILE_STAGES:
            if any(s in path for s in suffixes):
                return stage
        frame = frame.f_back
    return "other"


class StageCounter(HostReadDetector):
    """Counts the ops of a step by stage (the module docstring's rule) while detecting its host reads."""

    def __init__(self, networks: dict[int, str]) -> None:
        super().__init__()
        self.networks = networks
        self.ops: collections.Counter[str] = collections.Counter()
        self.total = 0  # counted apart from the stages, so the record can check that every op got one

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.total += 1
        if torch._C._current_autograd_node() is not None:
            self.ops["backward"] += 1
        else:
            self.ops[stage_of(sys._getframe(1), self.networks)] += 1
        return super().__torch_dispatch__(func, types, args, kwargs)


def _networks(step) -> dict[int, str]:
    named = [(step.student, "student forward"), (step.student_fwd, "student forward"),
             (step.teacher, "teacher forward"), (step.mic_teacher, "teacher forward"),
             (step.imnet, "imagenet forward")]  # fmt: skip
    return {id(m): name for m, name in named if m is not None}




def _count_eager(step, batch, t: int) -> dict:
    counter = StageCounter(_networks(step))
    nets = [m for m in (step.student, step.teacher, step.imnet, step.mic_teacher) if m is not None]
    counter.track([*(p for m in nets for p in m.parameters()), *(b for m in nets for b in m.buffers())])
    counter.track([p.grad for p in step.student.parameters() if p.grad is not None])
    counter.track([v for s in step.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)])
    counter.track([batch["img"], batch["gt"], batch["target_img"]])
    with counter:
        step(batch, t)
    ops = {s: counter.ops.get(s, 0) for s in STAGES}
    return {"ops_total": counter.total, "ops_by_stage": ops, "host_syncs": len(counter.reads),
            "host_sync_sites": dict(collections.Counter(counter.reads))}  # fmt: skip


def _mode_config(cfg, mode: str):
    r = dataclasses.replace
    train = r(cfg.train, path="original" if mode == "original" else "fast", compile=COMPILED.get(mode, "off"),
              cuda_graphs=mode == "captured")  # fmt: skip
    return r(cfg, train=train)


@contextlib.contextmanager
def _default_backend(backend: str | None):
    """torch.compile with `backend` where a call names none: build_training's `nn.Module.compile` and
    `compile_regions` both call torch.compile while the step is built."""
    if backend is None:
        yield
        return
    compile_ = torch.compile
    torch.compile = lambda *a, **kw: compile_(*a, **{"backend": backend, **kw})
    try:
        yield
    finally:
        torch.compile = compile_


def build_mode(cfg, mode: str, device: torch.device, backend: str | None = None, log=None):
    """The training step of `mode`, built as the trainer builds it (`backend`: the compiled modes' torch.compile
    backend, None for inductor)."""
    with _default_backend(backend if mode in COMPILED else None):
        return build_training(_mode_config(cfg, mode), device, log=log)[1]


def measure_mode(cfg, mode: str, batches: list[dict], device: torch.device, compile_backend: str | None = None, *,
                 steps: dict | None = None, cuda_iters: int = 5) -> dict:  # fmt: skip
    """The record of one mode: ops by stage and host syncs (or the compile statistics, or the capture's), CUDA
    timings on a GPU. `steps`, a dict, receives (step, next iteration) for timing after all modes."""
    t = cfg.schedule.warmup_iters
    if mode == "captured":
        if device.type != "cuda":
            return {"status": "skipped", "reason": CAPTURED_SKIP}
        lines: list[str] = []
        step = build_mode(cfg, mode, device, log=lines.append)
        # Not kept for the CPU timing: this mode runs on CUDA only, and its replays alone moved the weights on.
        return captured_record(step, batches[0], t, cuda_iters, lines)
    if mode in COMPILED:
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
    step = build_mode(cfg, mode, device, compile_backend)
    rec: dict = {"status": "measured"}
    if mode in COMPILED:
        rec.update(compile=COMPILED[mode], compile_backend=compile_backend or "inductor", caches=inductor_caches())
        rec.update(compiled_steps(step, batches, t))
        t += STEPS_FOR_RECOMPILES + 1
        rec.update(profiled_ops(step, batches[1].copy(), t))
        rec["profiler_ops_total"] = rec["ops_total"]
    else:
        step(batches[0].copy(), t)  # warm-up: gradients, AdamW state
        rec.update(_count_eager(step, batches[1].copy(), t + 1))
        # The compiled modes' counting method on the same step, so that the modes compare like with like.
        prof = profiled_ops(step, batches[1].copy(), t + 2)
        rec.update(profiler_ops_total=prof["ops_total"], top_ops=prof["top_ops"])
        t += 2
    if device.type == "cuda":
        rec.update(cuda_timing(step, batches[1], t + 1, cuda_iters))
    if steps is not None:
        steps[mode] = (step, t + cuda_iters + 2)
    return rec


def _time_in_turn(steps: dict, batches: list[dict], iters: int) -> dict[str, list[float]]:
    """Host-clock milliseconds of `iters` steps of every mode, one step of each mode per round."""
    times: dict[str, list[float]] = {mode: [] for mode in steps}
    for i in range(iters):
        for mode, (step, t) in steps.items():
            t0 = time.perf_counter()
            step(batches[i % len(batches)].copy(), t + i)
            times[mode].append(round((time.perf_counter() - t0) * 1e3, 1))
    return times


_ROWS = ("graphs", "recompiles", "recompiles_after_step_2", "cold_step_s", "warm_step_s", "ms_per_iter",
         "kernel_launches", "host_launch_calls", "host_ms", "device_busy_ms", "replay_ms", "self_check")  # fmt: skip


def print_table(record: dict) -> None:
    """The modes side by side: ops per stage, host syncs, compile statistics, timings."""
    modes = [m for m in record["modes"] if record["modes"][m]["status"] == "measured"]
    recs = [record["modes"][m] for m in modes]
    rows = [("ops per iteration", [r["ops_total"] for r in recs])]
    for s in [*STAGES, "not attributed"]:
        rows.append((f"  {s}", [r["ops_by_stage"].get(s, "") for r in recs]))
    rows.append(("top-level aten ops (profiler)", [r.get("profiler_ops_total") for r in recs]))
    rows.append(("host syncs", [r.get("host_syncs") for r in recs]))
    rows += [(key, [r.get(key, "") for r in recs]) for key in _ROWS if any(key in r for r in recs)]
    if any("warm_start" in r for r in recs):
        rows.append(("warm start: first step s", [r.get("warm_start", {}).get("first_step_s", "") for r in recs]))
    print("| | " + " | ".join(modes) + " |\n|---|" + "---|" * len(modes))
    for name, vals in rows:
        print(f"| {name} | " + " | ".join("" if v is None else str(v) for v in vals) + " |")
    for m, r in record["modes"].items():
        if r["status"] != "measured":
            print(f"{m}: {r['status']}: {r['reason']}")
        for site, n in (r.get("host_sync_sites") or {}).items():
            print(f"{m}: {n}x {site}")
        for reason, n in (r.get("graph_breaks") or {}).items():
            print(f"{m}: graph break {n}x: {reason}")
        for reason in r.get("recompile_reasons") or []:
            print(f"{m}: recompile: {reason}")
        ws = r.get("warm_start")
        if ws and ws["status"] != "measured":
            print(f"{m}: warm start {ws['status']}: {ws['reason']}")


def summary_lines(record: dict) -> list[str]:
    """One line per mode for a report's last lines: launches, host ms and ms per iteration, and for the compiled
    and captured modes what decides whether they can be trusted (graph breaks, recompiles, the self-check)."""
    out = []
    for mode, r in record["modes"].items():
        if r["status"] != "measured":
            out.append(f"{mode}: {r['status']} ({r.get('reason', '')})")
            continue
        get = lambda key: r.get(key, "-")  # noqa: E731
        parts = [f"launches/iter {get('kernel_launches')} (host launch calls {get('host_launch_calls')})",
                 f"host ms/iter {get('host_ms')}", f"ms/iter {get('ms_per_iter')}",
                 f"device busy ms {get('device_busy_ms')}", f"aten ops {get('profiler_ops_total')}"]  # fmt: skip
        if mode in COMPILED:
            ws = r.get("warm_start", {})
            parts.append(f"graphs {r['graphs']}, breaks {sum(r['graph_breaks'].values())}, recompiles after step 2 "
                         f"{r['recompiles_after_step_2']}, cold {r['cold_step_s']} s, warm start "
                         f"{ws.get('first_step_s', ws.get('status'))} s")  # fmt: skip
        if mode == "captured":
            parts.append(f"self-check {r['self_check']}, replay ms {r.get('replay_ms', '-')}")
        out.append(f"{mode}: " + "; ".join(parts))
    return out


def _child_argv(args, mode: str, backend: str | None) -> list[str]:
    """This script's command line for the warm-start process of `mode`: the same config, one mode."""
    argv = [str(Path(__file__).resolve()), "--first-step-of", mode, "--config", args.config, "--device", args.device]
    argv += ["--set", *args.set] if args.set else []
    argv += ["--quick"] if args.quick else []
    argv += ["--crop", str(args.crop)] if args.crop else []
    argv += ["--threads", str(args.threads)] if args.threads else []
    return argv + (["--compile-backend", backend] if backend else [])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/gta2cs.yaml")
    p.add_argument("--set", nargs="*", default=[], help="config overrides, section.key=value")
    p.add_argument("--quick", action="store_true", help="MiT-b0 at 64x64 crops")
    p.add_argument("--crop", type=int, help="square crop (the op counts do not depend on it)")
    p.add_argument("--modes", nargs="*", default=list(MODES), choices=MODES)
    p.add_argument("--compile-backend", help="torch.compile backend of the compiled modes (default: inductor; "
                   "aot_eager for compiled-full with --quick on CPU)")
    p.add_argument("--warm-start", choices=["auto", "on", "off"], default="auto",
                   help="time a second process's first compiled step on the cold run's cache (auto: with inductor)")
    p.add_argument("--time-iters", type=int, default=3, help="CPU: timed steps per mode, in turn (0: none)")
    p.add_argument("--cuda-iters", type=int, default=5, help="CUDA: timed steps per mode")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", help="write the record here")
    p.add_argument("--threads", type=int, help="torch CPU threads (on a shared host, 1 keeps the timings sane)")
    p.add_argument("--first-step-of", choices=list(COMPILED), help=argparse.SUPPRESS)  # the warm-start process
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    overrides = list(args.set) + ["model.pretrained=null"]
    if args.quick:
        overrides = ["model.backbone=mit_b0", *overrides]
    crop = args.crop or (64 if args.quick else None)
    if crop:
        overrides.append(f"data.crop=[{crop},{crop}]")
    cfg = load_config(args.config, overrides)

    def backend(mode: str) -> str | None:
        if args.compile_backend:
            return args.compile_backend
        return "aot_eager" if mode == "compiled-full" and args.quick and device.type == "cpu" else None

    batches = _synthetic_batches(cfg, device, 3)
    if args.first_step_of:
        mode = args.first_step_of
        rec = first_step_record(lambda: build_mode(cfg, mode, device, backend(mode)), batches[0],
                                cfg.schedule.warmup_iters)  # fmt: skip
        print(FIRST_STEP_TAG + json.dumps(rec))
        return rec
    record = {
        "command": " ".join(["python", "benchmarks/overhead.py", *(argv if argv is not None else sys.argv[1:])]),
        "setup": {"backbone": cfg.model.backbone, "crop": list(cfg.data.crop), "batch": cfg.data.batch_size,
                  "mode": cfg.uda.mode, "fd": cfg.uda.fd_lambda > 0, "mic": cfg.uda.mic.mode,
                  "torch_threads": torch.get_num_threads()},
        "environment": environment(device),
    }  # fmt: skip
    # The compiled modes first, as in a fresh training process: the eager modes would run the kernels' one-time
    # availability probe before them, and hide the recompile that probe would cause (its global is a guard).
    runs, steps = {mode: None for mode in args.modes}, {}
    cache_env = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    try:
        for mode in sorted(args.modes, key=lambda m: (m not in COMPILED, m != "compiled-regional")):
            cache = tempfile.mkdtemp(prefix=f"overhead_{mode}_") if mode in COMPILED else None
            if cache:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # a fresh folder: the first step compiles cold
            runs[mode] = measure_mode(cfg, mode, batches, device, backend(mode), steps=steps,
                                      cuda_iters=args.cuda_iters)  # fmt: skip
            if cache:
                warm = args.warm_start == "on" or (args.warm_start == "auto" and backend(mode) in (None, "inductor"))
                runs[mode]["warm_start"] = (warm_start(_child_argv(args, mode, backend(mode)), cache) if warm else
                                            {"status": "skipped", "reason": f"--warm-start {args.warm_start}, "
                                             f"backend {backend(mode) or 'inductor'}: only inductor's code is cached"})
                shutil.rmtree(cache, ignore_errors=True)
    finally:
        os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        if cache_env is not None:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_env
    if device.type == "cpu" and args.time_iters:
        for mode, times in _time_in_turn(steps, batches, args.time_iters).items():
            runs[mode].update(ms_per_iter=round(statistics.median(times), 1), ms_all=times)
    eager = (runs.get("eager") or {}).get("profiler_ops_total")
    for mode, r in runs.items():
        if eager and r["status"] == "measured" and mode not in ("original", "eager"):
            r["times_fewer_ops_than_eager"] = round(eager / r["profiler_ops_total"], 2)  # profiler counts both
    record["modes"] = runs
    record["environment"]["load_avg_1m_end"] = environment(device)["load_avg_1m"]
    print_table(record)
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    return record


if __name__ == "__main__":
    main()
