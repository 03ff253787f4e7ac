"""What compiling and capturing the training step costs and what it buys, for benchmarks/overhead.py.

- `compiled_steps`: the first steps of a compiled step with dynamo's statistics: graphs, graph breaks with their
  reasons, frames compiled in each step (every one after the first is a recompile, with the failed guards from
  dynamo's `recompiles` log), the first step's wall time (the cold compile) and the second's.
- `inductor_caches` / `warm_start`: inductor's FX-graph cache and AOTAutograd's cache (both on by default in torch
  2.14) keep compiled code on disk under `TORCHINDUCTOR_CACHE_DIR`. The cold run compiles into a fresh folder;
  `warm_start` then starts a second process on the same folder and times its first step, which finds the compiled
  graphs there (dynamo still traces the Python code: that part is not cached).
- `cuda_timing`: kernel launches of one step (the profiler's CUDA device events; the host's launch calls beside
  them), host milliseconds per step (until the step returns) against device milliseconds per step (CUDA events
  around the steps) and the device's busy time (the kernels' durations summed).
- `captured_record`: the step replayed from a CUDA graph (`daformer_fast.graphs.CapturedStep`, as
  `train.cuda_graphs: true` builds it): the first-use self-check's outcome and log line, then `cuda_timing` of the
  replayed steps and the replay alone (`graph.replay()` with no host work around it).

The CUDA parts run only on a GPU; none was available where this was written, so they use the package's own APIs
and the profiler's public events, and record an error instead of raising where an API may differ.
"""

from __future__ import annotations

import collections
import copy
import json
import logging
import os
import re
import subprocess
import sys
import time

import torch

from daformer_fast.graphs import CHECK_ITERS, CapturedStep, KernelCheck

__all__ = ["FIRST_STEP_TAG", "STEPS_FOR_RECOMPILES", "RecompileReasons", "captured_record", "compiled_steps",
           "cuda_timing", "first_step_record", "inductor_caches", "profiled_ops", "warm_start"]  # fmt: skip

STEPS_FOR_RECOMPILES = 5
"""Steps after the first whose recompiles are counted."""
FIRST_STEP_TAG = "first-step record: "
"""Prefix of the JSON line a `--first-step-of` process prints (what `warm_start` reads back)."""
# The host calls that put work on a CUDA stream (runtime and driver API names as the profiler records them).
_LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaGraphLaunch",
                 "cudaMemcpyAsync", "cudaMemsetAsync")  # fmt: skip
# Profiler events of compiled code: a dynamo frame's forward, and the backward of an AOT-compiled graph.
_COMPILED_EVENTS = ("Torch-Compiled Region", "autograd::engine::evaluate_function: CompiledFunctionBackward")


class RecompileReasons(logging.Handler):
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


def _counters() -> dict:
    return torch._dynamo.utils.counters


def cache_counters() -> dict:
    """Hits and misses of inductor's FX-graph cache and AOTAutograd's cache so far in this process."""
    c = _counters()
    return {**{k: v for k, v in c["inductor"].items() if k.startswith("fxgraph_cache")},
            **{k: v for k, v in c["aot_autograd"].items() if k.startswith("autograd_cache")}}  # fmt: skip


def inductor_caches() -> dict:
    """The cache switches the cold and warm runs ran under, and the folder they share."""
    return {"fx_graph_cache": bool(torch._inductor.config.fx_graph_cache),
            "autograd_cache": bool(torch._functorch.config.enable_autograd_cache),
            "cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR")}  # fmt: skip


def compiled_steps(step, batches: list[dict], t: int) -> dict:
    """Run the first 1 + STEPS_FOR_RECOMPILES steps of a freshly built compiled step from iteration `t`: timings
    and dynamo's statistics (module docstring). Dynamo's counters should be cleared before the step was built."""
    c = _counters()
    t0 = time.perf_counter()
    step(copy.copy(batches[0]), t)
    cold = time.perf_counter() - t0
    rec = {"cold_step_s": round(cold, 2), "graphs": c["stats"]["unique_graphs"], "cold_cache": cache_counters()}
    by_step, times = [c["frames"]["ok"]], []
    with RecompileReasons() as reasons:
        for i in range(1, STEPS_FOR_RECOMPILES + 1):
            before = c["frames"]["ok"]
            t0 = time.perf_counter()
            step(copy.copy(batches[i % len(batches)]), t + i)
            times.append(time.perf_counter() - t0)
            by_step.append(c["frames"]["ok"] - before)
    rec.update(warm_step_s=round(times[0], 2), graphs_after=c["stats"]["unique_graphs"],
               graph_breaks={str(k): v for k, v in c["graph_break"].items()}, frames_compiled_by_step=by_step,
               recompiles=sum(by_step[1:]), recompiles_after_step_2=sum(by_step[2:]),
               recompile_reasons=reasons.messages, recompiles_over_steps=STEPS_FOR_RECOMPILES)  # fmt: skip
    return rec


def warm_start(child_argv: list[str], cache_dir: str, timeout_s: float = 1200) -> dict:
    """Run `overhead.py --first-step-of MODE ...` (`child_argv`) in a new process on `cache_dir`; its record with
    the whole process's wall time (interpreter start, imports, build, first step) added."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir}
    t0 = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, *child_argv], env=env, capture_output=True, text=True,
                              timeout=timeout_s)  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"status": "failed", "reason": f"no result within {timeout_s:.0f} s"}
    wall = round(time.perf_counter() - t0, 2)
    lines = [x for x in done.stdout.splitlines() if x.startswith(FIRST_STEP_TAG)]
    if done.returncode or not lines:
        return {"status": "failed", "reason": f"exit {done.returncode}: {(done.stderr or done.stdout)[-500:]}"}
    return {"status": "measured", "process_s": wall, **json.loads(lines[-1][len(FIRST_STEP_TAG):])}


def first_step_record(build, batch: dict, t: int) -> dict:
    """What the warm process reports: build time, first step's wall time, graphs, frames compiled, cache hits."""
    t0 = time.perf_counter()
    step = build()
    built = time.perf_counter() - t0
    t0 = time.perf_counter()
    step(copy.copy(batch), t)
    c = _counters()
    return {"build_s": round(built, 2), "first_step_s": round(time.perf_counter() - t0, 2),
            "graphs": c["stats"]["unique_graphs"], "frames_compiled": c["frames"]["ok"], "cache": cache_counters(),
            "caches": inductor_caches()}  # fmt: skip


def profiled_ops(step, batch, t: int) -> dict:
    """Top-level aten ops of one step from the profiler's CPU events (for compiled frames), the commonest by name,
    and how many ran inside compiled code (under a "Torch-Compiled Region" forward or a compiled backward) against
    how many compiled calls there were: what the dispatcher still sees of the compiled code."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(batch, t)
    backward = other = inside = calls = 0
    names: collections.Counter[str] = collections.Counter()
    for e in prof.events():
        if e.name.startswith(_COMPILED_EVENTS):
            calls += 1
        if not e.name.startswith("aten::"):
            continue
        parent, in_backward, top, compiled = e.cpu_parent, False, True, False
        while parent is not None:
            top = top and not parent.name.startswith("aten::")
            in_backward = in_backward or parent.name.startswith("autograd::engine")
            compiled = compiled or parent.name.startswith(_COMPILED_EVENTS)
            parent = parent.cpu_parent
        if top:
            backward, other, inside = backward + in_backward, other + (not in_backward), inside + compiled
            names[e.name] += 1
    return {"ops_total": backward + other, "ops_by_stage": {"backward": backward, "not attributed": other},
            "host_syncs": None, "host_sync_sites": None, "ops_in_compiled_code": inside, "compiled_calls": calls,
            "top_ops": dict(names.most_common(12))}  # fmt: skip


def cuda_timing(step, batch: dict, t: int, iters: int) -> dict:
    """Launches of one step and host vs device milliseconds per step over `iters` steps (module docstring)."""
    from torch.profiler import ProfilerActivity, profile

    rec: dict = {}
    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step(copy.copy(batch), t)
            torch.cuda.synchronize()
        events = prof.events()
        device = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        rec.update(kernel_launches=len(device), host_launch_calls=sum(e.name in _LAUNCH_CALLS for e in events),
                   device_busy_ms=round(sum(e.time_range.elapsed_us() for e in device) / 1e3, 3))  # fmt: skip
    except Exception as e:  # noqa: BLE001  (an API that differs on this torch: the timings below still run)
        rec["profiler_error"] = f"{type(e).__name__}: {e}"[:300]
    host, device_ms = _timed(lambda i: step(copy.copy(batch), t + 1 + i), iters)
    rec.update(host_ms=host, ms_per_iter=device_ms, timed_iters=iters)
    return rec


def _timed(run, iters: int) -> tuple[float, float]:
    """(host ms, device ms) per call of `run(i)` over `iters` calls, the device's from CUDA events around them."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    start.record()
    for i in range(iters):
        run(i)
    host = (time.perf_counter() - t0) * 1e3 / iters
    end.record()
    torch.cuda.synchronize()
    return round(host, 3), round(start.elapsed_time(end) / iters, 3)


def captured_record(step, batch: dict, t: int, iters: int, log_lines: list[str]) -> dict:
    """The captured mode: its first `CHECK_ITERS` + 1 steps (capture, checked replays, one plain replay), the
    self-check's outcome with its log lines, `cuda_timing` of replayed steps, and the replay alone."""
    captured = step.step if isinstance(step, KernelCheck) else step
    if not isinstance(captured, CapturedStep):
        return {"status": "failed", "reason": f"the builder returned {type(captured).__name__}, not CapturedStep"}
    for i in range(CHECK_ITERS + 1):
        step(copy.copy(batch), t + i)
    torch.cuda.synchronize()
    ok = captured.disabled is None and captured.checked >= captured.check_iters
    rec = {"status": "measured", "self_check": "passed" if ok else "failed", "self_check_log": list(log_lines),
           "eager_fallback_reason": captured.disabled}  # fmt: skip
    t += CHECK_ITERS + 1
    rec.update(profiled_ops(step, copy.copy(batch), t))  # the host's ops around a replay (copies, the draws)
    rec["profiler_ops_total"] = rec["ops_total"]
    rec.update(cuda_timing(step, batch, t + 1, iters))
    rec["replays"] = captured.replays
    if ok:  # the graph alone, no host work: the iteration's kernels back to back (it moves the weights on)
        rec["replay_host_ms"], rec["replay_ms"] = _timed(lambda i: captured.replay(), iters)
    return rec
