"""Train the demo configs over several seeds and summarise the final target mIoU (the README's demo results).

    python benchmarks/demo_seeds.py                      # UDA, source-only, UDA bf16 and MIC, seeds 0 1 2
    python benchmarks/demo_seeds.py --seeds 0 --runs uda source_only

Each run is `python -m daformer_fast.train CONFIG --set train.seed=S train.work_dir=DIR ...` in its own work dir
under `--out`; a run whose metrics.jsonl already ends with the final evaluation is not repeated. Prints a Markdown
table (mean ± sample standard deviation over seeds, and every seed's value) and writes `summary.json` in `--out`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RUNS = {
    "uda": ("configs/demo.yaml", []),
    "source_only": ("configs/demo_source_only.yaml", []),
    "uda_bf16": ("configs/demo.yaml", ["train.precision=bf16"]),
    "mic": ("configs/demo_mic.yaml", []),
}


def _final_miou(work_dir: Path, max_iters: int) -> float | None:
    path = work_dir / "metrics.jsonl"
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    final = [r for r in rows if "mIoU" in r and r["step"] == max_iters]
    return final[-1]["mIoU"] if final else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--runs", nargs="+", choices=sorted(RUNS), default=list(RUNS))
    p.add_argument("--out", default="work_dirs/demo_seeds")
    args = p.parse_args(argv)

    from daformer_fast.config import load_config

    out = Path(args.out)
    results: dict[str, dict[int, float]] = {}
    seconds: dict[str, list[float]] = {}
    for name in args.runs:
        config, extra = RUNS[name]
        max_iters = load_config(REPO / config, extra).train.max_iters
        for seed in args.seeds:
            work = out / f"{name}_s{seed}"
            miou = _final_miou(work, max_iters)
            if miou is None:
                cmd = [sys.executable, "-m", "daformer_fast.train", config, "--set", *extra, f"train.seed={seed}",
                       f"train.work_dir={work}"]  # fmt: skip
                print("+", " ".join(cmd[1:]), flush=True)
                t0 = time.perf_counter()
                subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
                seconds.setdefault(name, []).append(time.perf_counter() - t0)
                miou = _final_miou(work, max_iters)
                if miou is None:
                    raise SystemExit(f"{work}: the run ended without a final evaluation")
            results.setdefault(name, {})[seed] = miou

    print(f"\nfinal target mIoU (%), {len(args.seeds)} seed(s), {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {datetime.date.today()}\n")  # fmt: skip
    print("| run | mean ± std | " + " | ".join(f"seed {s}" for s in args.seeds) + " |")
    print("|---|---|" + "---|" * len(args.seeds))
    for name, by_seed in results.items():
        vals = [by_seed[s] for s in args.seeds]
        std = statistics.stdev(vals) if len(vals) > 1 else 0.0
        print(f"| {name} | {statistics.mean(vals):.2f} ± {std:.2f} | " + " | ".join(f"{v:.2f}" for v in vals) + " |")
    summary = {
        "results": results, "train_seconds": seconds, "date": str(datetime.date.today()),
        "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
    }  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
