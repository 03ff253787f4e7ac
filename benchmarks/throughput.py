"""End-to-end training throughput: the original-order and the fast DAFormer step, built from one config, timed in one
process, with the optimisation ladder between them.

    python benchmarks/throughput.py [--config configs/gta2cs.yaml] [--device cuda|cpu] [--quick] [--iters N]
                                    [--warmup N] [--json PATH] [--real-data] [--order sequential|interleaved]

Ladder (cumulative; each rung changes one setting of the rung above it, everything else comes from the config):
fp32 eager original (`train.path=original`, `kernels.impl=reference`) → +bf16 → +compile (`train.compile=regional`,
or `full` with `--compile full`) → +sync-free batched step (`train.path=fast`) → +fused kernels
(`kernels.impl=triton` on CUDA, forcing every Triton kernel: the measurement `auto` waits for; `auto` elsewhere) →
+CUDA graphs (`train.cuda_graphs=true`: the fast step replayed from one CUDA graph; CUDA only) → +DALI
(`data.loader=dali`, only with `--real-data` on CUDA with DALI installed). A rung that cannot run here is skipped
with the reason, and the rungs below it go on without its change. "original" in the JSON is the first rung, "fast"
the last one measured.

+compile compiles `regional` by default: each MiT block (its DropPath factors drawn outside, as inputs), patch
embedding and the decode head once per distinct shape (`daformer_fast.build.compile_regions`), the same number of
graphs at any MiT depth, where `full` unrolls MiT-B5's 52 blocks in each network it compiles (inductor's CPU compile
of `full` took 887 s at MiT-b0, regional's a few minutes at MiT-B5: benchmarks/results/README.md). `--compile full` measures the other; the entry's `setting.compile` says which one ran. The +CUDA graphs
rung warms up for at least the capture's self-check (`graphs.CHECK_ITERS` checked iterations and one replay), so
its timed steps are replays; `cuda_graphs` in its entry says whether the check passed (a failed one falls back to
eager steps, which the entry then times). Every measured entry states the fp32 matmul and convolution precision its
steps ran under (`fp32_precision`, set per step from the rung's `train.precision`: interleaved rungs share one
process).

+MIC (beside the ladder, `record["mic"]`): the last measured rung with Masked Image Consistency on
(`uda.mic.mode=separatetrgaug` with DAFormer's teacher, as the reference MIC(DAFormer); cells of 32·crop/512
pixels, at least 1, so the grid is that run's 16×16 cells at any crop), timed the same way, with its own
fast-path FLOP count (its TFLOP/s and MFU use it) and what it adds to the rung it extends (`added_ms_p50`,
`added_peak_mem_gib`, `added_flop_per_iter`): one more student forward+backward on the target batch per
iteration. img/s counts the ladder's 2·batch images per iteration (the masked images are the target batch again).
`--skip +MIC` leaves it out.

Protocol: every rung starts from the same initial weights (`model.pretrained` is forced to null: no weight files,
and the arithmetic does not depend on the values). `--warmup` steps (compilation included) are timed apart and
excluded; then `--iters` steps are timed one by one (CUDA events on GPU, a host clock on CPU) and the median and
90th percentile reported. `sequential` (default on CUDA) runs the rungs one after another with the device memory
freed in between, so peak memory is per rung; `interleaved` (default on CPU) times one step of each rung in turn,
so that load from other processes on a shared host falls on all rungs alike (peak memory then is not reported).
Batches are synthetic uint8 tensors in host memory (pinned on CUDA) unless `--real-data`, which goes through the
training loaders: the config's datasets when their folders exist, else a small synthetic benchmark
(`daformer_fast.data.synthetic`) generated in a temporary folder. Data wait is the host time spent waiting
for the next batch, as a share of the timed wall time.

FLOPs: one eager fp32 step of each path is counted from the model (benchmarks/step_flops.py says what is counted).
The original path executes more (its separate feature-distance backward runs through the encoder a second
time), so TFLOP/s and MFU of every rung use the fast path's count, the work the iteration needs (model FLOPs);
both counts are in the JSON. MFU is against the datasheet dense peak of the rung's precision
(benchmarks/bench_env.py); none on CPU.

`--quick`: CPU, MiT-b0, 128×128 crops, 1 warm-up + 3 timed steps per rung; inductor's compile of the step takes
minutes on two cores, so the compile rung is skipped there (run without --quick to measure it).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_env import environment, peak_for  # noqa: E402
from step_flops import count_step_flops  # noqa: E402

from daformer_fast.config import Config, load_config, parse_config  # noqa: E402
from daformer_fast.data.dali_loader import dali_available  # noqa: E402
from daformer_fast.data.loader import build_train_loader  # noqa: E402
from daformer_fast.models import build_segmentor  # noqa: E402
from daformer_fast.build import build_training, set_fp32_precision  # noqa: E402
from daformer_fast.graphs import CHECK_ITERS, CapturedStep, KernelCheck  # noqa: E402
from daformer_fast.step import UDAStep  # noqa: E402

__all__ = ["LADDER", "MIC_RUNG", "Setting", "build_step", "capture_state", "count_mic_flops", "count_path_flops",
           "initial_weights", "main", "mic_block", "mic_config", "run_benchmark"]


@dataclass(frozen=True)
class Setting:
    path: str = "original"
    precision: str = "fp32"
    compile: str = "off"  # train.compile: off | regional | full
    kernels: str = "reference"
    loader: str = "torch"
    cuda_graphs: bool = False


# (rung name, the one setting it changes).
LADDER: tuple[tuple[str, dict], ...] = (
    ("fp32 eager original", {}),
    ("+bf16", {"precision": "bf16"}),
    ("+compile", {"compile": "regional"}),
    ("+sync-free batched step", {"path": "fast"}),
    ("+fused kernels", {"kernels": "auto"}),
    ("+CUDA graphs", {"cuda_graphs": True}),
    ("+DALI", {"loader": "dali"}),
)
MIC_RUNG = "+MIC"


def mic_config(cfg: Config) -> Config:
    """`cfg` with MIC(DAFormer)'s masked pass on: mode `separatetrgaug`, 32-pixel cells at 512-pixel crops scaled
    to the crop (at least 1 pixel), the other MIC settings (ratio 0.7, DAFormer's teacher) as configured."""
    r = dataclasses.replace
    return r(cfg, uda=r(cfg.uda, mic=r(cfg.uda.mic, mode="separatetrgaug", block_size=mic_block(cfg))))


def mic_block(cfg: Config) -> int:
    """MIC's mask cell side for `cfg`'s crop: MIC(DAFormer)'s 32 pixels at 512 (docs/mic.md §9), in proportion."""
    return max(1, round(32 * min(cfg.data.crop) / 512))


def _mic_skip_reason(cfg: Config, skip: tuple[str, ...]) -> str | None:
    if MIC_RUNG in skip:
        return "--skip"
    if cfg.uda.mode != "dacs":
        return f"MIC runs on the DAFormer step (uda.mode dacs), not on {cfg.uda.mode}"
    if cfg.uda.mic.mode is not None:
        return f"the config already runs MIC (uda.mic.mode={cfg.uda.mic.mode}): every rung includes it"
    return None


def _apply(cfg: Config, s: Setting) -> Config:
    r = dataclasses.replace
    train = r(cfg.train, path=s.path, precision=s.precision, compile=s.compile, cuda_graphs=s.cuda_graphs)
    return r(cfg, train=train, kernels=r(cfg.kernels, impl=s.kernels), data=r(cfg.data, loader=s.loader))


def _skip_reason(name: str, change: dict, setting: Setting, device: torch.device, quick: bool, real_data: bool,
                 skip: tuple[str, ...]) -> str | None:  # fmt: skip
    """Why the rung `name` (its `change` to the `setting` above it) cannot run here; None when it can."""
    if name in skip:
        return "--skip"
    if change.get("compile") and device.type == "cpu" and quick:
        return "--quick on CPU: inductor's compile takes minutes on two cores (run without --quick)"
    if change.get("cuda_graphs"):
        if device.type != "cuda":
            return "train.cuda_graphs needs a CUDA device (the step is captured with torch.cuda.graph)"
        if setting.path != "fast":
            return "train.cuda_graphs captures the fast step only (the +sync-free batched step rung did not run)"
    if change.get("loader") == "dali":
        if not real_data:
            return "synthetic in-memory batches: the loader is not exercised (use --real-data)"
        if device.type != "cuda":
            return "DALI runs on CUDA devices only"
        ok, why = dali_available()
        if not ok:
            return f"NVIDIA DALI not installed ({why})"
    return None


def _synthetic_batches(cfg: Config, device: torch.device, n: int = 4) -> list[dict[str, torch.Tensor]]:
    """uint8 images and label maps made of 32-pixel blocks over all 19 classes (thing classes included, so the
    feature distance and ClassMix have work), in host memory as the loaders deliver them."""
    g = torch.Generator().manual_seed(0)
    b, (h, w) = cfg.data.batch_size, cfg.data.crop
    out = []
    for _ in range(n):
        gt = torch.randint(0, cfg.model.num_classes, (b, -(-h // 32), -(-w // 32)), generator=g)
        gt = gt.repeat_interleave(32, 1).repeat_interleave(32, 2)[:, :h, :w].contiguous()
        batch = {"img": torch.randint(0, 256, (b, 3, h, w), generator=g, dtype=torch.uint8), "gt": gt,
                 "target_img": torch.randint(0, 256, (b, 3, h, w), generator=g, dtype=torch.uint8)}  # fmt: skip
        out.append({k: v.pin_memory() for k, v in batch.items()} if device.type == "cuda" else batch)
    return out


def _real_data_config(cfg: Config, tmp: Path) -> Config:
    """The config's datasets if both exist, else a synthetic benchmark whose images are twice the crop wide."""
    if Path(cfg.data.source.root).is_dir() and Path(cfg.data.target.root).is_dir():
        return cfg
    from daformer_fast.data.rcs import suggest_min_pixels
    from daformer_fast.data.synthetic import make_synthetic

    h, w = cfg.data.crop
    size = (2 * w, h)
    root = make_synthetic(tmp, n_source=8, n_target=8, n_val=0, size=size, seed=0, quiet=True)
    r = dataclasses.replace
    data = r(cfg.data, source=r(cfg.data.source, root=str(root / "source"), scale=size),
             target=r(cfg.data.target, root=str(root / "target"), scale=size),
             rcs=r(cfg.data.rcs, min_pixels=suggest_min_pixels(size[0] * size[1])))  # fmt: skip
    return r(cfg, data=data)


@dataclass
class _Rung:
    """One rung's step, its batch source and its measurements."""

    name: str
    setting: Setting
    step: UDAStep
    batches: object
    times_ms: list[float] = field(default_factory=list)
    wait_s: float = 0.0
    wall_s: float = 0.0
    warmup_s: float = 0.0
    skipped_steps: int = 0
    dispatch: list[str] = field(default_factory=list)
    warmup_steps: int = 0
    fp32_precision: dict[str, str] = field(default_factory=dict)

    def next_batch(self) -> dict[str, torch.Tensor]:
        t0 = time.perf_counter()
        batch = next(self.batches)
        self.wait_s += time.perf_counter() - t0
        return batch

    def run(self, t: int, device: torch.device) -> None:
        """One timed step; on CUDA the events time the device work, the host clock the wall time. The rung's
        fp32 precision is set first: the builder sets it process-wide, for the rung built last."""
        set_fp32_precision(self.setting.precision)
        self.fp32_precision = {"matmul": torch.backends.cuda.matmul.fp32_precision,
                               "conv": torch.backends.cudnn.conv.fp32_precision}  # fmt: skip
        w0 = time.perf_counter()
        batch = self.next_batch()
        if device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            ev[0].record()
            out = self.step(batch, t)
            ev[1].record()
            self.times_ms.append(ev)  # read after the loop's synchronize: reading now would sync every step
        else:
            t0 = time.perf_counter()
            out = self.step(batch, t)
            self.times_ms.append((time.perf_counter() - t0) * 1e3)
        self.skipped_steps += out["skipped"]  # a device tensor: summed on the device, read once at the end
        self.wall_s += time.perf_counter() - w0


def capture_state(step) -> dict | None:
    """Whether a `train.cuda_graphs` step replays its graph (its first-use self-check passed) or fell back to eager
    steps, and why; None for a step without capture."""
    captured = step.step if isinstance(step, KernelCheck) else step
    if not isinstance(captured, CapturedStep):
        return None
    ok = captured.disabled is None and captured.checked >= captured.check_iters
    return {"self_check": "passed" if ok else "failed", "eager_fallback_reason": captured.disabled,
            "replays": captured.replays}  # fmt: skip


class _DispatchLog(logging.Handler):
    """Collects the ops dispatch decisions (logged once per op and choice) so each rung states what ran, and the
    CUDA-graph capture's log lines."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def build_step(cfg: Config, setting: Setting, state: dict, device: torch.device) -> UDAStep:
    """The train step of `setting` from the given initial weights, in training mode."""
    return build_training(_apply(cfg, setting), device, initial_state=state)[1]


def initial_weights(cfg: Config) -> dict[str, torch.Tensor]:
    """The student's seeded random initial weights, which every step built from `cfg` starts from."""
    torch.manual_seed(cfg.train.seed)
    return {k: v.clone() for k, v in build_segmentor(cfg.model).state_dict().items()}


def count_path_flops(cfg: Config, state: dict, batch: dict, device: torch.device) -> dict[str, dict]:
    """{path: {"total", "by_op"}} for the fast and the original-order step at the steady-state iteration."""
    flops = {}
    for path in ("fast", "original"):
        total, by_op = count_step_flops(_apply(cfg, Setting(path=path)), state, batch, cfg.schedule.warmup_iters,
                                        device)  # fmt: skip
        flops[path] = {"total": total, "by_op": by_op}
    return flops


def count_mic_flops(cfg: Config, state: dict, batch: dict, device: torch.device) -> int:
    """FLOPs of the fast step with MIC on (`mic_config`) at the steady-state iteration."""
    return count_step_flops(_apply(mic_config(cfg), Setting(path="fast")), state, batch, cfg.schedule.warmup_iters,
                            device)[0]  # fmt: skip


def _build(name, setting, cfg, state, device, args_iters, real_tmp) -> _Rung:
    rcfg = _apply(cfg, setting)
    step = build_step(cfg, setting, state, device)
    if real_tmp is None:
        pool = _synthetic_batches(rcfg, device)
        batches = (pool[i % len(pool)] for i in range(10**9))
    else:
        batches = iter(build_train_loader(rcfg.data, mode=rcfg.uda.mode, num_classes=rcfg.model.num_classes,
                                          seed=rcfg.train.seed, max_iters=args_iters, device=device))  # fmt: skip
    return _Rung(name, setting, step, batches)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _summary(r: _Rung, device: torch.device, imgs: int, model_flop: int, peak_mem: tuple | None) -> dict:
    times = [a.elapsed_time(b) for a, b in r.times_ms] if device.type == "cuda" else r.times_ms
    p50, p90 = (float(x) for x in np.percentile(times, [50, 90]))
    tflops = model_flop / (p50 * 1e-3) / 1e12
    peak = peak_for(device)
    return {
        "img_s": round(imgs / (p50 * 1e-3), 3), "ms_p50": round(p50, 3), "ms_p90": round(p90, 3),
        "ms_all": [round(t, 3) for t in times],
        "peak_mem_gib": round(peak_mem[0], 3) if peak_mem else None,
        "peak_reserved_gib": round(peak_mem[1], 3) if peak_mem else None,
        "data_wait_pct": round(100 * r.wait_s / max(r.wall_s, 1e-9), 2), "warmup_s": round(r.warmup_s, 2),
        "tflops": float(f"{tflops:.4g}"),  # significant digits: a CPU reads in GFLOP/s
        "mfu": round(tflops / peak.tflops(r.setting.precision), 4) if peak else None,
        "skipped_steps": int(r.skipped_steps), "dispatch": r.dispatch, "fp32_precision": r.fp32_precision,
        "warmup_steps": r.warmup_steps,
    }  # fmt: skip


def run_benchmark(
    cfg: Config, device: torch.device, *, iters: int, warmup: int, quick: bool = False, real_data: bool = False,
    order: str = "sequential", skip: tuple[str, ...] = (), json_path: str | Path | None = None, log=print,
    command: str = "", compile_mode: str = "regional",
) -> dict:  # fmt: skip
    """Count the step's FLOPs, then build and time every rung of `LADDER`; returns the JSON record. `compile_mode`:
    what the +compile rung sets `train.compile` to (regional or full)."""
    r = dataclasses.replace
    cfg = r(cfg, model=r(cfg.model, pretrained=None))
    if order == "interleaved" and device.type == "cuda":
        log("interleaved on CUDA: peak memory is not per rung and is not reported")
    state = initial_weights(cfg)
    t0 = cfg.schedule.warmup_iters  # past the LR warm-up: the steady-state step
    imgs = cfg.data.batch_size * (2 if cfg.uda.mode == "dacs" else 1)
    tmp = tempfile.TemporaryDirectory(prefix="throughput_") if real_data else None
    if tmp is not None:
        cfg = _real_data_config(cfg, Path(tmp.name))

    flop_batch = _synthetic_batches(cfg, device, 1)[0]
    flops = count_path_flops(cfg, state, flop_batch, device)
    model_flop = flops["fast"]["total"]
    log(f"FLOPs per iteration: {model_flop / 1e12:.4f} TFLOP (fast path); the original path executes "
        f"{flops['original']['total'] / 1e12:.4f}")  # fmt: skip
    mic_why, mic_cfg, mic_flop = _mic_skip_reason(cfg, skip), None, None
    if mic_why is None:
        mic_cfg = mic_config(cfg)
        mic_flop = count_mic_flops(cfg, state, flop_batch, device)
        log(f"FLOPs per iteration with MIC: {mic_flop / 1e12:.4f} TFLOP (fast path)")

    record = {
        **environment(device),
        "setup": {"command": command, "backbone": cfg.model.backbone, "decoder": cfg.model.decoder,
                  "crop": list(cfg.data.crop), "batch": f"{cfg.data.batch_size}+{cfg.data.batch_size}",
                  "iters": iters, "warmup": warmup, "order": order, "quick": quick, "compile": compile_mode,
                  "data": "loaders" if real_data else "synthetic in-memory batches", "torch_threads":
                  torch.get_num_threads()},  # fmt: skip
        "flops": {"model_flop_per_iter": model_flop, "original_flop_per_iter": flops["original"]["total"],
                  "by_op": {p: f["by_op"] for p, f in flops.items()},
                  "counted": "matmul/conv/SDPA forward+backward of one eager fp32 step, 2 FLOPs per MAC "
                             "(benchmarks/step_flops.py)"},  # fmt: skip
        "ladder": [],
    }
    if any("compile" in c for _, c in LADDER) and hasattr(torch._dynamo.config, "recompile_limit"):
        # Each compiled rung recompiles the same module code (other precision, impl, module instance).
        torch._dynamo.config.recompile_limit = 64
    dispatch_log, graphs_log = _DispatchLog(), _DispatchLog()
    for name, handler in (("daformer_fast.ops", dispatch_log), ("daformer_fast.graphs", graphs_log)):
        logging.getLogger(name).addHandler(handler)
        logging.getLogger(name).setLevel(logging.INFO)

    def write() -> None:
        if json_path:
            Path(json_path).parent.mkdir(parents=True, exist_ok=True)
            Path(json_path).write_text(json.dumps(record, indent=2) + "\n")

    setting, last, live = Setting(), None, []
    n_steps = warmup + iters

    def attempt(name: str, entry: dict, candidate: Setting, rcfg: Config, flop: int) -> bool:
        """Build and warm up one rung (and time it, `sequential`); False when it failed."""
        if order == "sequential":
            live.clear()
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
        try:
            n_before, n_graphs = len(dispatch_log.lines), len(graphs_log.lines)
            rung = _build(name, candidate, rcfg, state, device, n_steps, tmp)
            # A captured step's first CHECK_ITERS iterations also run eager ones: warm up past them and one replay.
            rung.warmup_steps = max(warmup, CHECK_ITERS + 1) if candidate.cuda_graphs else warmup
            w = time.perf_counter()
            for i in range(rung.warmup_steps):
                rung.run(t0 + i, device)
            _sync(device)
            rung.warmup_s = time.perf_counter() - w
            rung.dispatch = dispatch_log.lines[n_before:]
            if candidate.cuda_graphs:
                entry["cuda_graphs_log"] = graphs_log.lines[n_graphs:]
        except Exception as e:  # a rung that fails here (e.g. a compiler error) must not lose the others
            entry.update(status="failed", reason=f"{type(e).__name__}: {e}"[:500])
            log(f"{name}: failed ({type(e).__name__}: {e})")
            return False
        rung.times_ms, rung.wait_s, rung.wall_s, rung.skipped_steps = [], 0.0, 0.0, 0
        live.append((rung, entry, flop))
        if order == "sequential":
            for i in range(iters):
                rung.run(t0 + rung.warmup_steps + i, device)
            _sync(device)
            peak = None
            if device.type == "cuda":
                peak = (torch.cuda.max_memory_allocated(device) / 2**30,
                        torch.cuda.max_memory_reserved(device) / 2**30)  # fmt: skip
            _finish(record, rung, entry, device, imgs, flop, peak, log)
            write()
        return True  # with `live` cleared by the next rung, nothing then holds this rung's model and state

    try:
        for name, change in LADDER:
            change = {**change, "compile": compile_mode} if "compile" in change else change
            entry = {"rung": name, "change": change}
            record["ladder"].append(entry)
            why = _skip_reason(name, change, setting, device, quick, real_data, skip)
            if why:
                entry.update(status="skipped", reason=why)
                log(f"{name}: skipped ({why})")
                continue
            if change.get("kernels") == "auto" and device.type == "cuda":
                # `auto` keeps the references until the kernels are measured; this rung is that measurement.
                change = {**change, "kernels": "triton"}
                entry["change"] = change
            candidate = dataclasses.replace(setting, **change)
            if attempt(name, entry, candidate, cfg, model_flop):
                setting, last = candidate, name
        mic = record["mic"] = {"rung": MIC_RUNG, "extends": last, "flop_per_iter": mic_flop, "change":
                               {"uda.mic.mode": "separatetrgaug", "uda.mic.block_size": mic_block(cfg)}}  # fmt: skip
        why = mic_why or (None if last else "no ladder rung ran to extend")
        if why:
            mic.update(status="skipped", reason=why)
            log(f"{MIC_RUNG}: skipped ({why})")
        else:
            attempt(MIC_RUNG, mic, setting, mic_cfg, mic_flop)
        if order == "interleaved":
            for i in range(iters):
                for rung, _, _ in live:
                    rung.run(t0 + rung.warmup_steps + i, device)
            _sync(device)
            for rung, entry, flop in live:
                _finish(record, rung, entry, device, imgs, flop, None, log)
    finally:
        logging.getLogger("daformer_fast.ops").removeHandler(dispatch_log)
        logging.getLogger("daformer_fast.graphs").removeHandler(graphs_log)
        if tmp is not None:
            tmp.cleanup()
    _mic_added(record)
    measured = [e for e in record["ladder"] if e.get("status") == "measured"]
    if measured:
        ref, fast = measured[0], measured[-1]
        record["original"] = {**ref, "flop_per_iter_executed": flops["original"]["total"]}
        record["fast"] = {**fast, "speedup": round(fast["img_s"] / ref["img_s"], 3)}
        if device.type == "cuda":
            record["targets"] = {  # the project's targets for one H100 at the paper's setting
                "speedup_ge_10x": fast["img_s"] >= 10 * ref["img_s"], "ms_p50_le_25": fast["ms_p50"] <= 25,
                "peak_mem_le_6gb": (fast["peak_mem_gib"] or 0) * 2**30 <= 6e9, "data_wait_lt_5pct":
                fast["data_wait_pct"] < 5,
            }  # fmt: skip
    record["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    write()
    return record


def _finish(record, rung, entry, device, imgs, model_flop, peak, log) -> None:
    """Fill `entry` with the rung's numbers; gains are against the nearest measured rung above it (+MIC: the
    whole ladder's, i.e. the rung it extends)."""
    s = _summary(rung, device, imgs, model_flop, peak)
    ladder = record["ladder"]
    above = [e for e in ladder[: ladder.index(entry) if entry in ladder else None] if e.get("status") == "measured"]
    s["gain"] = round(s["img_s"] / above[-1]["img_s"], 3) if above else 1.0
    s["speedup_vs_original"] = round(s["img_s"] / above[0]["img_s"], 3) if above else 1.0
    entry.update(status="measured", setting=dataclasses.asdict(rung.setting), **s)
    if (captured := capture_state(rung.step)) is not None:
        entry["cuda_graphs"] = captured
    log(f"{rung.name}: {s['img_s']:.3f} img/s, p50 {s['ms_p50']:.1f} ms, gain {s['gain']:.2f}x")


def _mic_added(record: dict) -> None:
    """What +MIC adds to the rung it extends: time, peak memory (where measured), FLOPs."""
    mic = record.get("mic")
    if not mic or mic.get("status") != "measured":
        return
    base = next(e for e in record["ladder"] if e["rung"] == mic["extends"])
    if base.get("status") != "measured":
        return
    mems = mic["peak_mem_gib"], base["peak_mem_gib"]
    mem = None if None in mems else round(mems[0] - mems[1], 3)  # None: not per rung (CPU, interleaved)
    mic.update(added_ms_p50=round(mic["ms_p50"] - base["ms_p50"], 3), added_peak_mem_gib=mem,
               added_flop_per_iter=mic["flop_per_iter"] - record["flops"]["model_flop_per_iter"])  # fmt: skip


def print_table(record: dict) -> None:
    print(f"\n{record['device']} | torch {record['versions']['torch']} | {record['setup']['backbone']} "
          f"{record['setup']['crop'][0]}x{record['setup']['crop'][1]}, batch {record['setup']['batch']}, "
          f"{record['flops']['model_flop_per_iter'] / 1e12:.3f} TFLOP/iter")  # fmt: skip
    head = f"{'rung':<25}{'img/s':>9}{'ms p50':>10}{'ms p90':>10}{'GiB':>7}{'wait%':>7}{'TFLOP/s':>9}{'MFU':>7}"
    print(head + f"{'gain':>7}{'total':>7}")
    mic = record.get("mic")
    for e in record["ladder"] + ([mic] if mic else []):
        if e["status"] != "measured":
            print(f"{e['rung']:<25}{e['status']}: {e['reason']}")
            continue
        mem = f"{e['peak_mem_gib']:.2f}" if e["peak_mem_gib"] is not None else "-"
        mfu = f"{100 * e['mfu']:.1f}%" if e["mfu"] is not None else "-"
        print(f"{e['rung']:<25}{e['img_s']:>9.3f}{e['ms_p50']:>10.1f}{e['ms_p90']:>10.1f}{mem:>7}"
              f"{e['data_wait_pct']:>7.1f}{e['tflops']:>9.3f}{mfu:>7}{e['gain']:>6.2f}x"
              f"{e['speedup_vs_original']:>6.2f}x")  # fmt: skip
    if mic and "added_ms_p50" in mic:
        mem = f", {mic['added_peak_mem_gib']:+.3f} GiB peak" if mic["added_peak_mem_gib"] is not None else ""
        print(f"{MIC_RUNG} over {mic['extends']}: {mic['added_ms_p50']:+.1f} ms p50, "
              f"{mic['added_flop_per_iter'] / 1e12:+.4f} TFLOP/iter{mem}")  # fmt: skip
    if "fast" in record:
        print(f"fast vs original: {record['fast']['speedup']:.2f}x")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/gta2cs.yaml")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu (--quick: cpu)")
    p.add_argument("--quick", action="store_true", help="CPU, MiT-b0, 128x128 crops, 1 warm-up + 3 timed steps")
    p.add_argument("--iters", type=int, default=None, help="timed steps per rung (default 30 on CUDA, 5 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per rung (default 5 on CUDA, 2 on CPU)")
    p.add_argument("--json", help="write the record here (rewritten after every rung)")
    p.add_argument("--real-data", action="store_true", help="batches from the training loaders")
    p.add_argument("--order", choices=["sequential", "interleaved"], default=None)
    p.add_argument("--skip", nargs="*", default=[], choices=[n for n, _ in LADDER] + [MIC_RUNG], metavar="RUNG",
                   help="rungs to leave out (a later rung then goes on without that change; +MIC: no MIC line)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice, one per core)")
    p.add_argument("--compile", choices=["regional", "full"], default="regional", help="train.compile of +compile")
    p.add_argument("--set", nargs="*", default=[], help="config overrides, section.key=value")
    args = p.parse_args(argv)
    # --quick's settings first, so that --set can still change them.
    overrides = (["model.backbone=mit_b0", "data.crop=[128,128]"] if args.quick else []) + list(args.set)
    cfg = load_config(args.config, overrides=overrides) if args.config else parse_config()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cpu" if args.quick or not torch.cuda.is_available() else "cuda"))
    cuda = device.type == "cuda"
    iters = args.iters or (3 if args.quick else 30 if cuda else 5)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5 if cuda else 2)
    order = args.order or ("sequential" if cuda else "interleaved")
    t = time.perf_counter()
    command = "python benchmarks/throughput.py " + " ".join(argv if argv is not None else sys.argv[1:])
    record = run_benchmark(cfg, device, iters=iters, warmup=warmup, quick=args.quick, real_data=args.real_data,
                           order=order, skip=tuple(args.skip), json_path=args.json, command=command,
                           compile_mode=args.compile)  # fmt: skip
    record["wall_s"] = round(time.perf_counter() - t, 1)
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    print_table(record)
    print(f"total {record['wall_s']:.0f} s")
    return record


if __name__ == "__main__":
    main()
