"""Tensor memory of one training step, counted on any device (a CPU will do) at any setting.

    python benchmarks/step_memory.py [--config configs/gta2cs.yaml] [--set section.key=value ...] [--json PATH]
                                     [--flops] [--mic] [--threads N]

Counts, for the original path in fp32 and the fast path in fp32 and bf16 (with the kernels `auto` picks there),
the bytes of every tensor storage alive during one steady-state step: a `TorchDispatchMode` records each storage an
op creates and a weak reference drops it when it is freed, on top of the state that lives across steps (student,
EMA teacher and ImageNet copy, their buffers, the gradients of the previous step, AdamW's moments). The peak is
split into that state and everything else (activations saved for backward, autocast's weight copies, temporaries).
One untimed step runs first so that the optimizer state exists, as in training. `--mic` adds a fourth setting,
fast bf16 with MIC's masked pass (throughput.py's +MIC: `separatetrgaug`, cells of 32·crop/512 pixels), counted
the same way.

What this predicts for a GPU: the step's `torch.cuda.max_memory_allocated` to within what differs between devices
(the op implementations' temporaries, cuDNN workspaces, the CUDA caching allocator's 512-byte rounding), not what
`nvidia-smi` shows (the CUDA context and the allocator's reserved-but-free blocks come on top). On a GPU the record
also holds `torch.cuda.max_memory_allocated` of the counted step, which checks the count. With `--flops` the
same process also counts the step's FLOPs (benchmarks/step_flops.py), so the paper setting's numbers can be had
without a GPU.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_env import environment  # noqa: E402
from throughput import (  # noqa: E402
    Setting,
    _synthetic_batches,
    build_step,
    count_mic_flops,
    count_path_flops,
    initial_weights,
    mic_config,
)

from daformer_fast.config import load_config  # noqa: E402
from daformer_fast.step import UDAStep  # noqa: E402

__all__ = ["MIC_NAME", "SETTINGS", "StorageTracker", "step_memory"]

GIB = 2**30
# fp32 is the configs' default (the paper's precision); bf16 autocast is the fast configuration of the ladder.
SETTINGS = {
    "original fp32": Setting(),
    "fast fp32": Setting(path="fast", kernels="auto"),
    "fast bf16": Setting(path="fast", precision="bf16", kernels="auto"),
}
MIC_NAME = "fast bf16 + MIC"  # `--mic`: the "fast bf16" setting on mic_config(cfg)


class StorageTracker(TorchDispatchMode):
    """Live bytes of every tensor storage created by an op (or registered with `track`), and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[int, object]] = {}  # data_ptr -> (nbytes, token of that allocation)
        self.now = self.peak = 0
        self.peak_keys: frozenset[int] = frozenset()
        self.peak_at = ""  # the op that reached the peak, and whether autograd was running a backward

    def track(self, t: torch.Tensor, op: str = "") -> None:
        st = t.untyped_storage()
        key, n = st.data_ptr(), st.nbytes()
        if n == 0 or key in self.live or t.device.type == "meta":
            return
        token = object()  # a freed pointer may be reused before a late finalizer runs: free only our allocation
        self.live[key] = (n, token)
        self.now += n
        weakref.finalize(st, self._free, key, token)
        if self.now > self.peak:
            self.peak, self.peak_keys = self.now, frozenset(self.live)
            node = torch._C._current_autograd_node()
            self.peak_at = f"{op} in the backward of {node.name()}" if node is not None else f"{op} (forward)"

    def _free(self, key: int, token: object) -> None:
        entry = self.live.get(key)
        if entry is not None and entry[1] is token:
            del self.live[key]
            self.now -= entry[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t, str(func))
        return out


def _state_tensors(step: UDAStep) -> dict[str, list[torch.Tensor]]:
    """What lives across steps, by kind."""
    nets = [m for m in (step.student, getattr(step, "teacher", None), getattr(step, "imnet", None)) if m is not None]
    params = [p for m in nets for p in m.parameters()]
    return {
        "weights": params + [b for m in nets for b in m.buffers()],
        "gradients": [p.grad for p in params if p.grad is not None],
        "optimizer": [v for s in step.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)],
    }


def step_memory(cfg, setting: Setting, state: dict, batches: list[dict], device: torch.device) -> dict:
    """Peak live tensor bytes of one steady-state step of `setting`, split into persistent state and the rest."""
    step = build_step(cfg, setting, state, device)
    student = step.student
    t = cfg.schedule.warmup_iters
    step(copy.copy(batches[0]), t)  # creates the gradients and AdamW's moments
    tracker = StorageTracker()
    kinds = _state_tensors(step)
    for tensors in kinds.values():
        for x in tensors:
            tracker.track(x)
    start = tracker.now
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    with tracker:
        out = step(copy.copy(batches[1]), t + 1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    if int(out["skipped"]):
        raise RuntimeError(f"{setting}: the measured step was skipped (non-finite gradients)")
    at_peak = {}
    for kind, tensors in _state_tensors(step).items():  # this step's gradients: same storages at its peak
        keys = {x.untyped_storage().data_ptr() for x in tensors} & tracker.peak_keys
        at_peak[kind] = sum(tracker.live[k][0] if k in tracker.live else 0 for k in keys)
    at_peak["activations and temporaries"] = tracker.peak - sum(at_peak.values())
    return {
        "peak_gib": round(tracker.peak / GIB, 3), "peak_bytes": tracker.peak, "peak_at": tracker.peak_at,
        "before_step_bytes": start, "at_peak_bytes": at_peak, "step_s": round(seconds, 1),
        "params_m": round(sum(p.numel() for p in student.parameters()) / 1e6, 2),
        # The allocator's own peak of the same step, for checking the count where a GPU is at hand.
        "cuda_max_allocated_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/gta2cs.yaml")
    p.add_argument("--set", nargs="*", default=[], help="config overrides, section.key=value")
    p.add_argument("--device", default="cpu")
    p.add_argument("--flops", action="store_true", help="also count the step's FLOPs (one more step per path)")
    p.add_argument("--mic", action="store_true", help=f"a fourth setting, {MIC_NAME!r} (and its FLOPs)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--json", help="write the record here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = load_config(args.config, args.set)
    r = dataclasses.replace
    cfg = r(cfg, model=r(cfg.model, pretrained=None))
    state = initial_weights(cfg)
    batches = _synthetic_batches(cfg, device, 2)
    record = {
        "command": " ".join(["python", "benchmarks/step_memory.py", *(argv if argv is not None else sys.argv[1:])]),
        "setup": {"backbone": cfg.model.backbone, "decoder": cfg.model.decoder, "crop": list(cfg.data.crop),
                  "batch": cfg.data.batch_size, "mode": cfg.uda.mode, "fd": cfg.uda.fd_lambda > 0},
        "device": str(device), "environment": environment(device), "paths": {},
    }  # fmt: skip
    print(f"{cfg.model.backbone} + {cfg.model.decoder}, crop {tuple(cfg.data.crop)}, batch {cfg.data.batch_size}+"
          f"{cfg.data.batch_size}, {device}")  # fmt: skip
    runs = [(name, setting, cfg) for name, setting in SETTINGS.items()]
    if args.mic:
        runs.append((MIC_NAME, SETTINGS["fast bf16"], mic_config(cfg)))
        record["setup"]["mic_block_size"] = runs[-1][2].uda.mic.block_size
    for name, setting, run_cfg in runs:
        m = step_memory(run_cfg, setting, state, batches, device)
        record["paths"][name] = m
        parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in m["at_peak_bytes"].items())
        if m["cuda_max_allocated_bytes"] is not None:
            parts += f"; torch.cuda.max_memory_allocated {m['cuda_max_allocated_bytes'] / GIB:.2f}"
        print(f"{name:<16} peak {m['peak_gib']:.2f} GiB ({parts}); step {m['step_s']} s; peak at {m['peak_at']}",
              flush=True)
    if args.flops:
        for path, f in count_path_flops(cfg, state, batches[0], device).items():
            record.setdefault("flops", {})[path] = f["total"]
            print(f"FLOPs per iteration, {path} path: {f['total'] / 1e12:.3f} TFLOP", flush=True)
        if args.mic:
            total = count_mic_flops(cfg, state, batches[0], device)
            record["flops"]["fast + MIC"] = total
            print(f"FLOPs per iteration, fast path + MIC: {total / 1e12:.3f} TFLOP", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    return record


if __name__ == "__main__":
    main()
