"""Training-loader throughput: torch DataLoader vs DALI, in samples/s (source + target samples).

    python benchmarks/loader.py [--config CONFIG] [--root DIR] [--loader torch|dali|both] [--iters N]
                                [--workers N] [--dali-resize exact|fast|both] [--device DEV] [--json PATH]
                                [--cache] [--small]

Data: `--config` (its data section: real datasets, scales, crop, RCS); `--root DIR` replaces the source/target
roots by DIR/source (GTA layout) and DIR/target (Cityscapes layout), as `make_synthetic` writes them. Without
either, a synthetic benchmark at the paper's sizes is generated in a temporary folder: source 1914x1052 PNGs
(GTA size) resized to (1280, 720), target 2048x1024 (Cityscapes size) resized to (1024, 512), 512x512 crops,
RCS on, batch 2 + 2, `dacs` mode. `--small` divides every size, scale and crop by 4 (a quick run on a busy host).

`--cache`: also builds the npy cache of both datasets (`tools.cache_dataset --format npy`) in a temporary folder
and times every selected loader on it next to the original (PNG) path, in the same run and with the same worker
count: torch (`torch`, `torch-npy`) and, when DALI imports, DALI on `--device` (its CPU-only mode,
`device_id=None`, on a CPU device: `dali-exact`/`dali-fast`, `dali-npy`; the cache is never resized, so one DALI
run covers it). The build time is printed and not part of the loader figures; the result ends with DALI's
samples/s over torch's on the cache.

Figures per loader: samples/s and CPU seconds per sample (this process and all its descendants, e.g. DataLoader
workers, from /proc; Linux only, else omitted), over the timed batches.

Timing: the first `--warmup` batches (worker start, pipeline build, queue fill) are excluded; then `--iters`
batches are consumed as fast as the loader delivers them (on CUDA, after a synchronize), so the figure is the
loader's ceiling, not the trainer's data wait. With `--cache` and DALI, `--iters` is rounded up to whole
`NPY_CHUNK_ITERS` chunks (64 iterations) for every loader, and DALI on the cache warms up over its first chunk, so
its timed batches include one planning pause and pipeline build per chunk, as in training.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from daformer_fast.config import load_config, parse_config
from daformer_fast.data.dali_loader import NPY_CHUNK_ITERS, DaliTrainLoader, dali_available
from daformer_fast.data.torch_loader import TrainDataset, build_torch_loader
from daformer_fast.data.synthetic import make_synthetic

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_env import cpu_name as _cpu_name  # noqa: E402


def _synthetic(tmp: Path, n: int, div: int = 1):
    """GTA-sized source and Cityscapes-sized target images (two make_synthetic calls, one size each), every size,
    scale and crop divided by `div`."""
    t = time.perf_counter()
    src = make_synthetic(tmp / "gta", n_source=n, n_target=1, n_val=1, size=(1914 // div, 1052 // div), seed=0,
                         quiet=True)  # fmt: skip
    tgt = make_synthetic(tmp / "cs", n_source=1, n_target=n, n_val=1, size=(2048 // div, 1024 // div), seed=1,
                         quiet=True)  # fmt: skip
    print(f"generated {n} + {n} synthetic images in {time.perf_counter() - t:.0f} s under {tmp}")
    return parse_config({"data": {
        "source": {"root": str(src / "source"), "scale": [1280 // div, 720 // div]},
        "target": {"root": str(tgt / "target"), "scale": [1024 // div, 512 // div]},
        "crop": [512 // div, 512 // div], "rcs": {"min_pixels": 3000 // div**2},
    }}).data  # fmt: skip


def _npy_cached(data, out: Path):
    """`data` with both sides read from npy caches built under `out`."""
    from daformer_fast.tools.cache_dataset import cache_dataset

    t = time.perf_counter()
    roots = {side: cache_dataset(getattr(data, side), out, fmt="npy", nproc=min(8, os.cpu_count() or 1), quiet=True,
                                 say=None).root for side in ("source", "target")}  # fmt: skip
    print(f"built the npy cache in {time.perf_counter() - t:.1f} s under {out}")
    return dataclasses.replace(data, **{side: dataclasses.replace(getattr(data, side), root=str(root))
                                        for side, root in roots.items()})  # fmt: skip


def _cpu_seconds() -> float | None:
    """User + system CPU seconds of this process and all its live descendants (from /proc), or None off Linux."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    procs = {}
    try:
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                try:
                    fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue  # exited meanwhile
                procs[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    except OSError:
        return None
    mine, total, grew = {os.getpid()}, 0.0, True
    while grew:
        new = {pid for pid, (ppid, _) in procs.items() if ppid in mine} - mine
        grew, mine = bool(new), mine | new
    for pid in mine:
        total += procs.get(pid, (0, 0.0))[1]
    return total


def _time(loader, warmup: int, iters: int, device: torch.device) -> tuple[float, float | None]:
    """(wall seconds, CPU seconds) for `iters` batches after `warmup` batches."""
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t, cpu = time.perf_counter(), _cpu_seconds()
    for _ in range(iters):
        batch = next(it)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dt, cpu_end = time.perf_counter() - t, _cpu_seconds()
    del batch, it
    return dt, (cpu_end - cpu if cpu is not None and cpu_end is not None else None)


def _dali_resizes(choice: str, npy: bool) -> tuple[str, ...]:
    """The DALI resize modes to time on one source: one run on an npy cache, which is never resized."""
    if npy:
        return ("exact",)
    return ("exact", "fast") if choice == "both" else (choice,)


def _dali_mode(device: torch.device) -> str:
    return f"GPU {device}" if device.type == "cuda" else "CPU-only mode (device_id=None)"


def _npy_verdict(results: list[dict]) -> dict | None:
    """DALI's samples/s over the torch loader's, both on the npy cache, or None without both runs."""
    rate = {r["loader"]: r["samples_per_s"] for r in results}
    if "torch-npy" not in rate or "dali-npy" not in rate:
        return None
    ratio = rate["dali-npy"] / rate["torch-npy"]
    return {"dali_over_torch": round(ratio, 3), "dali_at_least_as_fast": ratio >= 1.0}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="YAML config (its data section is used)")
    p.add_argument("--root", help="folder with source/ (GTA layout) and target/ (Cityscapes layout)")
    p.add_argument("--loader", choices=["torch", "dali", "both"], default="both")
    p.add_argument("--dali-resize", choices=["exact", "fast", "both"], default="both")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--workers", type=int, default=None, help="default: min(data.workers, cpu count)")
    p.add_argument("--images", type=int, default=8, help="synthetic images per domain")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--cache", action="store_true", help="also time the loaders on an npy cache of the data")
    p.add_argument("--small", action="store_true", help="synthetic data at a quarter of the paper's sizes")
    args = p.parse_args(argv)
    device = torch.device(args.device)

    tmp = None
    if args.config:
        data = load_config(args.config).data
    elif args.root:
        data = parse_config().data
    else:
        tmp = tempfile.TemporaryDirectory(prefix="loader_bench_")
        data = _synthetic(Path(tmp.name), args.images, 4 if args.small else 1)
    if args.root:
        root = Path(args.root)
        data = dataclasses.replace(
            data, source=dataclasses.replace(data.source, root=str(root / "source")),
            target=dataclasses.replace(data.target, root=str(root / "target")),
        )  # fmt: skip
    workers = args.workers if args.workers is not None else min(data.workers, os.cpu_count() or 1)
    data = dataclasses.replace(data, workers=workers)
    kw = {"mode": "dacs", "num_classes": len(data.classes), "seed": 0}
    dali_ok, dali_why = dali_available()
    iters, npy_warmup = args.iters, args.warmup
    if args.cache and dali_ok and args.loader != "torch":
        # DALI on the cache plans NPY_CHUNK_ITERS iterations, then builds a pipeline: warm up over its first chunk,
        # time whole chunks (each with its planning pause and pipeline build); every loader times as many batches.
        iters, npy_warmup = -(-args.iters // NPY_CHUNK_ITERS) * NPY_CHUNK_ITERS, NPY_CHUNK_ITERS
    n_iters = args.warmup + iters
    per_iter = 2 * data.batch_size  # source + target samples

    dali_version = None
    if dali_ok:
        import nvidia.dali

        dali_version = nvidia.dali.__version__
    env = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu: {_cpu_name()}",
        "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
        "dali": dali_version, "workers": workers, "batch_size": data.batch_size, "crop": list(data.crop),
        "source": f"{data.source.root} scale {list(data.source.scale)}",
        "target": f"{data.target.root} scale {list(data.target.scale)}",
        "rcs": data.rcs.enabled, "warmup": args.warmup, "iters": iters,
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }  # fmt: skip
    for k, v in env.items():
        print(f"{k:>10}: {v}")

    sources = [("", "", data)]
    if args.cache:
        tmp = tmp or tempfile.TemporaryDirectory(prefix="loader_bench_")
        sources.append(("-npy", ", npy cache", _npy_cached(data, Path(tmp.name) / "npy_cache")))
    runs = []
    for tag, note, d in sources:  # every loader on one source, then the next source: same worker count throughout
        if args.loader in ("torch", "both"):
            what = "mmap crop" if tag else "decode + resize"
            loader = build_torch_loader(TrainDataset(d, rank=0, **kw), start_iter=0, max_iters=n_iters,
                                        workers=workers, pin_memory=device.type == "cuda")  # fmt: skip
            runs.append((f"torch{tag}", f"DataLoader, {workers} workers{note} ({what})", lambda x=loader: x,
                         args.warmup))  # fmt: skip
        if args.loader in ("dali", "both") and dali_ok:
            # An npy side is read at the cache's scale, never resized: one DALI run covers both resize modes.
            for resize in _dali_resizes(args.dali_resize, npy=bool(tag)):
                warm = npy_warmup if tag else args.warmup
                dl = DaliTrainLoader(d, max_iters=warm + iters, device=device, resize=resize, **kw)
                desc = (f"{'readers.numpy ROI' if tag else f'resize={resize}'}, {dl.num_threads} DALI threads + "
                        f"{dl.plan_workers} plan workers, {_dali_mode(device)}{note}")  # fmt: skip
                runs.append((f"dali{tag or '-' + resize}", desc, lambda dl=dl: dl, warm))
    if args.loader in ("dali", "both") and not dali_ok:
        print(f"skipping DALI: {dali_why}")

    results = []
    for name, desc, make, warm in runs:
        dt, cpu = _time(make(), warm, iters, device)
        n = iters * per_iter
        r = {"loader": name, "setup": desc, "warmup": warm, "seconds": round(dt, 3),
             "iters_per_s": round(iters / dt, 2),
             "samples_per_s": round(n / dt, 1), "cpu_ms_per_sample": round(1e3 * cpu / n, 2) if cpu else None}
        results.append(r)
        cpu_text = f", {r['cpu_ms_per_sample']:.1f} CPU ms/sample" if cpu else ""
        print(f"{name:>11}: {r['samples_per_s']:7.1f} samples/s{cpu_text}  ({r['iters_per_s']:.2f} it/s; {desc})")
    verdict = _npy_verdict(results)
    if verdict is not None:
        print(f"DALI vs torch on the npy cache: {verdict['dali_over_torch']:.2f}x the samples/s "
              f"({'at least as fast' if verdict['dali_at_least_as_fast'] else 'slower'})")  # fmt: skip
    out = {**env, "load_avg_1m_end": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
           "results": results, "npy_dali_vs_torch": verdict}  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    if tmp is not None:
        tmp.cleanup()
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
