"""Host overhead of one training step: what the host dispatches and where it waits, per execution mode.

    python benchmarks/overhead.py [--quick] [--config configs/gta2cs.yaml] [--crop N] [--set section.key=value ...]
                                  [--modes original eager compiled captured] [--compile-backend BACKEND]
                                  [--threads N] [--json PATH]

Modes: `original` (`train.path: original`), `eager` (the fast path), `compiled` (the fast path with
`train.compile: true`), `captured` (the fast step replayed from a CUDA graph; CUDA only, skipped elsewhere with the
reason in the record). Every mode runs one warm-up step first; the counts are of the next step.

Eager modes (`original`, `eager`): a `TorchDispatchMode` counts every op that reaches the dispatcher below autograd
(what a GPU turns into kernel launches, give or take fusions inside an op) and attributes it to a stage, and the
host-read rule of `HostReadDetector` lists the step's host syncs with their call sites. The stage rule, in order:
1. an op issued while autograd runs a backward (`torch._C._current_autograd_node()` is set) is `backward`;
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

Compiled mode: while a `TorchDispatchMode` is active dynamo runs every frame eagerly, so the mode would count the
eager step. Instead `torch.profiler` records the CPU op events of the step, and the count is of the top-level
`aten::` events (those without an `aten::` parent, as the dispatch mode counts); they are split only into
`backward` (under an autograd engine event) and `not attributed` (stacks are not recorded inside compiled
graphs). Every mode also records this profiler count (`profiler_ops_total`), the like-for-like comparison across
modes. Dynamo's counters give the graphs, the graph breaks with their reasons and the recompiles over 5 steps (with
the failed guards from dynamo's `recompiles` log); the first step's wall time is the cold compile, the next one's
the warm step. The compiled mode runs before the others, as in a fresh process. On CPU inductor's compile of MiT
takes many minutes: `--quick` uses MiT-b0 at 64x64 crops and, on CPU, the `aot_eager` backend (dynamo and AOT
autograd, no code generation) unless `--compile-backend` says otherwise.

On CUDA each mode also records the kernel launches of the step (profiler CUDA events), and host vs device time: the
host's wall time until the step returns, and the device's time from CUDA events around the step.
"""

from __future__ import annotations

import argparse
import collections
import copy
import dataclasses
import json
import logging
import re
import sys
import time
import traceback
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_env import environment  # noqa: E402
from throughput import _synthetic_batches  # noqa: E402

from daformer_fast.build import build_training  # noqa: E402
from daformer_fast.config import load_config  # noqa: E402

__all__ = ["HOST_READS", "MODES", "STAGES", "HostReadDetector", "StageCounter", "main", "measure_mode", "stage_of"]

aten = torch.ops.aten
MODES = ("original", "eager", "compiled", "captured")
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
STEPS_FOR_RECOMPILES = 5


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


def _mode_config(cfg, mode: str):
    r = dataclasses.replace
    train = r(cfg.train, path="original" if mode == "original" else "fast", compile=mode == "compiled")
    return r(cfg, train=train)


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


def _count_profiled(step, batch, t: int) -> dict:
    """Top-level aten ops of one step from the profiler's CPU events (for compiled frames)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(batch, t)
    backward = other = 0
    for e in prof.events():
        if not e.name.startswith("aten::"):
            continue
        parent, in_backward, top = e.cpu_parent, False, True
        while parent is not None:
            top = top and not parent.name.startswith("aten::")
            in_backward = in_backward or parent.name.startswith("autograd::engine")
            parent = parent.cpu_parent
        if top:
            backward, other = backward + in_backward, other + (not in_backward)
    return {"ops_total": backward + other, "ops_by_stage": {"backward": backward, "not attributed": other},
            "host_syncs": None, "host_sync_sites": None}  # fmt: skip


def _cuda_timing(step, batch, t: int) -> dict:
    """Kernel launches, host and device milliseconds of one step (CUDA only; kept simple, untested without one)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step(batch, t)
        torch.cuda.synchronize()
    launches = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    start.record()
    step(batch, t + 1)
    host_ms = (time.perf_counter() - t0) * 1e3
    end.record()
    torch.cuda.synchronize()
    return {"kernel_launches": launches, "host_ms": round(host_ms, 2), "device_ms": round(start.elapsed_time(end), 2)}


def _dynamo_stats(before: dict) -> dict:
    c = torch._dynamo.utils.counters
    return {"graphs": c["stats"]["unique_graphs"] - before.get("graphs", 0),
            "frames_compiled": c["frames"]["ok"] - before.get("frames", 0),
            "graph_breaks": {str(k): v for k, v in c["graph_break"].items()}}  # fmt: skip


class _RecompileReasons(logging.Handler):
    """Dynamo's "recompiles" log (the failed guard of each recompile), collected while in a `with` block."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []
        self.log = logging.getLogger("torch._dynamo.guards.__recompiles")

    def emit(self, record: logging.LogRecord) -> None:
        # The function and its failed guards ("- 0/2: with_features == False ..."), without the stack traces.
        lines = [" ".join(x.split()) for x in record.getMessage().splitlines()]
        self.messages.append(" ".join(lines[:1] + [x for x in lines[1:] if re.match(r"- \d+/\d+: ", x)]))

    def __enter__(self):
        torch._logging.set_logs(recompiles=True)
        self.log.addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        self.log.removeHandler(self)
        torch._logging.set_logs()


def measure_mode(cfg, mode: str, batches: list[dict], device: torch.device, compile_backend: str | None) -> dict:
    """The record of one mode: ops by stage and host syncs (or the compile statistics), CUDA timings on a GPU."""
    if mode == "captured":
        return {"status": "skipped", "reason": "needs CUDA (a CUDA-graph capture of the fast step)"
                if device.type != "cuda" else "the fast step has no CUDA-graph capture path yet"}  # fmt: skip
    if mode == "compiled":
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
    patched = None
    if mode == "compiled" and compile_backend:  # nn.Module.compile of build_training takes the backend from here
        patched, compile_ = torch.nn.Module.compile, torch.nn.Module.compile
        torch.nn.Module.compile = lambda self, **kw: compile_(self, **{"backend": compile_backend, **kw})
    try:
        _, step, _ = build_training(_mode_config(cfg, mode), device)
    finally:
        if patched is not None:
            torch.nn.Module.compile = patched
    t = cfg.schedule.warmup_iters
    rec: dict = {"status": "measured"}
    t0 = time.perf_counter()
    step(copy.copy(batches[0]), t)  # warm-up: gradients, AdamW state (and the compile)
    if mode == "compiled":
        rec["cold_step_s"] = round(time.perf_counter() - t0, 2)
        rec["compile_backend"] = compile_backend or "inductor"
        first = _dynamo_stats({})
        reasons = _RecompileReasons()
        with reasons:
            t0 = time.perf_counter()
            step(copy.copy(batches[1]), t + 1)
            rec["warm_step_s"] = round(time.perf_counter() - t0, 2)
            for i in range(2, STEPS_FOR_RECOMPILES + 1):
                step(copy.copy(batches[i % len(batches)]), t + i)
        later = _dynamo_stats({})
        rec["recompile_reasons"] = reasons.messages
        rec.update(graphs=first["graphs"], graph_breaks=later["graph_breaks"],
                   recompiles=later["frames_compiled"] - first["frames_compiled"],
                   recompiles_over_steps=STEPS_FOR_RECOMPILES)  # fmt: skip
        t += STEPS_FOR_RECOMPILES
        rec.update(_count_profiled(step, copy.copy(batches[1]), t + 1))
        rec["profiler_ops_total"] = rec["ops_total"]
    else:
        rec.update(_count_eager(step, copy.copy(batches[1]), t + 1))
        # The compiled mode's counting method on the same step, so that the modes compare like with like.
        rec["profiler_ops_total"] = _count_profiled(step, copy.copy(batches[1]), t + 1)["ops_total"]
        t += 1
    if device.type == "cuda":
        rec.update(_cuda_timing(step, copy.copy(batches[1]), t + 2))
    return rec


def print_table(record: dict) -> None:
    """The modes side by side: ops per stage, host syncs, compile statistics."""
    modes = [m for m in record["modes"] if record["modes"][m]["status"] == "measured"]
    rows = [("ops per iteration", [record["modes"][m]["ops_total"] for m in modes])]
    for s in [*STAGES, "not attributed"]:
        rows.append((f"  {s}", [record["modes"][m]["ops_by_stage"].get(s, "") for m in modes]))
    rows.append(("top-level aten ops (profiler)", [record["modes"][m].get("profiler_ops_total") for m in modes]))
    rows.append(("host syncs", [record["modes"][m]["host_syncs"] for m in modes]))
    for key in ("graphs", "recompiles", "cold_step_s", "warm_step_s", "kernel_launches", "host_ms", "device_ms"):
        if any(key in record["modes"][m] for m in modes):
            rows.append((key, [record["modes"][m].get(key, "") for m in modes]))
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


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/gta2cs.yaml")
    p.add_argument("--set", nargs="*", default=[], help="config overrides, section.key=value")
    p.add_argument("--quick", action="store_true", help="MiT-b0 at 64x64 crops")
    p.add_argument("--crop", type=int, help="square crop (the op counts do not depend on it)")
    p.add_argument("--modes", nargs="*", default=list(MODES), choices=MODES)
    p.add_argument("--compile-backend", help="torch.compile backend of the compiled mode (default inductor; "
                   "aot_eager with --quick on CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", help="write the record here")
    p.add_argument("--threads", type=int, help="torch CPU threads (on a shared host, 1 keeps the timings sane)")
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
    backend = args.compile_backend or ("aot_eager" if args.quick and device.type == "cpu" else None)
    batches = _synthetic_batches(cfg, device, 3)
    record = {
        "command": " ".join(["python", "benchmarks/overhead.py", *(argv if argv is not None else sys.argv[1:])]),
        "setup": {"backbone": cfg.model.backbone, "crop": list(cfg.data.crop), "batch": cfg.data.batch_size,
                  "mode": cfg.uda.mode, "fd": cfg.uda.fd_lambda > 0, "mic": cfg.uda.mic.mode},
        "environment": environment(device),
    }  # fmt: skip
    # The compiled mode first, as in a fresh training process: the eager modes would run the kernels' one-time
    # availability probe before it, and hide the recompile that probe causes (its global is a guard of the graph).
    runs = {mode: None for mode in args.modes}
    for mode in sorted(args.modes, key=lambda m: m != "compiled"):
        runs[mode] = measure_mode(cfg, mode, batches, device, backend)
    record["modes"] = runs
    record["environment"]["load_avg_1m_end"] = environment(device)["load_avg_1m"]
    print_table(record)
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    return record


if __name__ == "__main__":
    main()
