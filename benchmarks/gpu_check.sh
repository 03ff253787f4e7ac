#!/usr/bin/env bash
# One call for a rare GPU lease: report the GPU, run the kernel and parity tests on it, time the training step at
# the paper's setting (MiT-B5, 512x512, 2+2) and the kernels, measure the host overhead of the eager, CUDA-graph and
# regionally compiled steps (benchmarks/overhead.py), and print a short table last: its last lines are the kernel
# launches, host ms and ms per iteration of each overhead mode.
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine; results in $OUT if set, else benchmarks/results/
#   bash benchmarks/gpu_check.sh --dry-run  # CPU plumbing check: same steps at toy sizes, about 3 minutes
#
# Installs nothing: the package is imported from this checkout (an editable install without dependencies or build
# isolation only when `daformer_fast.kernels` does not import). The DALI rung is skipped with its reason (no DALI
# in the GPU image; the torch loader is used). Every part runs under `timeout` so the whole stays within 8 minutes
# on an H100 (parts after the eager ones get at most what is left, `left`); the eager numbers come first, so no
# compilation can cost them. throughput.py rewrites its JSON after each rung and kernels.py flushes each CSV row, so
# a part cut short still leaves what it measured.
set -u
cd "$(dirname "$0")/.."
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
RES="${OUT:-benchmarks/results}"
mkdir -p "$RES"
export PYTHONUNBUFFERED=1
START=$SECONDS
LOG="$RES/gpu_check.log"
: >"$LOG"

part() {  # part NAME SECONDS CMD...: run CMD under a time limit, log it, remember its status (under 20 s: skipped)
    local name=$1 limit=$2
    shift 2
    if ((limit < 20)); then
        echo "=== $name: skipped, ${limit}s of the budget left" | tee -a "$LOG"
        STATUS+=("$(printf '%-22s skipped (budget)' "$name")")
        return
    fi
    echo "=== $name (limit ${limit}s, t=$((SECONDS - START))s): $*" | tee -a "$LOG"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    STATUS+=("$(printf '%-22s rc=%-4s %4ss' "$name" "$rc" "$((SECONDS - t0))")")
}
STATUS=()
left() {  # left DEFAULT: DEFAULT seconds, or what is left of the budget (470 s) if less
    local rest=$((470 - (SECONDS - START)))
    ((rest < $1)) && echo $((rest < 0 ? 0 : rest)) || echo "$1"
}

# 1. The machine.
part gpu 20 bash -c 'nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit \
    --format=csv 2>/dev/null || echo "nvidia-smi not available"'
part torch 30 python -c 'import platform, torch; print("python", platform.python_version(), "torch", torch.__version__,
    "cuda", torch.version.cuda, "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device")'

# 2. The package from this checkout (kernels/ imports as daformer_fast.kernels only through setup.py's mapping).
if ! python -c "import daformer_fast.kernels" 2>/dev/null; then
    part install 60 python -m pip install -q --no-deps --no-build-isolation -e .
fi
if python -c "import nvidia.dali" 2>/dev/null; then
    echo "DALI is installed: the +DALI rung needs --real-data, which this check does not use (synthetic batches)" | tee -a "$LOG"
else
    echo "DALI: not installed here; the +DALI rung is skipped and the torch loader is the loader" | tee -a "$LOG"
fi

if [[ $DRY == 1 ]]; then
    # Plumbing only: collect the tests, run the benchmarks at toy sizes on the CPU.
    part tests 60 python -m pytest -q --collect-only tests/kernels tests/test_train_step.py tests/test_step_sync.py \
        tests/test_graphs.py
    TOY=(--device cpu --iters 1 --warmup 1 --skip +compile --set model.backbone=mit_b0 "data.crop=[64,64]")
    part throughput-eager 120 python benchmarks/throughput.py "${TOY[@]}" --json "$RES/throughput_eager.json"
    part kernels 30 python benchmarks/kernels.py --csv "$RES/kernels.csv"
    part memory 60 python benchmarks/step_memory.py --device cpu --mic --set model.backbone=mit_b0 \
        "data.crop=[64,64]" --json "$RES/step_memory.json"
    part throughput-full 30 python benchmarks/throughput.py --device cpu --iters 1 --warmup 0 --quick \
        --skip +compile +bf16 +sync-free\ batched\ step +fused\ kernels --set "data.crop=[32,32]" \
        --json "$RES/throughput.json"
    TOYO=(--quick --crop 32 --device cpu --threads 1 --time-iters 1)
    part overhead-eager 90 python benchmarks/overhead.py "${TOYO[@]}" --modes eager captured \
        --json "$RES/overhead_eager.json"
    part overhead-compiled 90 python benchmarks/overhead.py "${TOYO[@]}" --modes compiled-regional \
        --compile-backend aot_eager --warm-start on --json "$RES/overhead_compiled.json"
else
    # 3. Kernel tests, the fast-vs-original parity tests and the sync-free step test, on the GPU.
    part tests 180 python -m pytest -q -x tests/kernels tests/test_train_step.py tests/test_step_sync.py \
        tests/test_graphs.py -p no:cacheprovider
    # 4. The ladder without compilation first: minutes of inductor time cannot then cost the eager numbers. Its
    #    +CUDA graphs rung is the fast step replayed from one CUDA graph (warm-up covers the capture's self-check);
    #    its +MIC line (the last rung with MIC on) is the eager cost of MIC; the full ladder's comes last in step 9.
    part throughput-eager 150 python benchmarks/throughput.py --config configs/gta2cs.yaml --iters 20 --warmup 3 \
        --skip +compile --json "$RES/throughput_eager.json"
    # 5. Host overhead at the paper setting, eager and captured: ops, kernel launches, host vs device ms per step,
    #    the capture's self-check and the replay alone (5 timed steps each).
    part overhead-eager "$(left 90)" python benchmarks/overhead.py --config configs/gta2cs.yaml --modes eager \
        captured --cuda-iters 5 --json "$RES/overhead_eager.json"
    # 6. Kernel microbenchmarks at MiT-B5's shapes for 512x512 crops.
    part kernels "$(left 60)" python benchmarks/kernels.py --dtype bf16 --csv "$RES/kernels.csv"
    # 7. Tensor memory of one step counted op by op, beside the allocator's peak: checks the CPU-side count.
    part memory "$(left 60)" python benchmarks/step_memory.py --device cuda --config configs/gta2cs.yaml \
        --json "$RES/step_memory.json"
    # 8. Regional compilation (inductor): graphs, graph breaks, recompiles, cold compile into a fresh cache folder,
    #    and the warm start of a second process on it; its launches and host vs device ms per step.
    part overhead-compiled "$(left 200)" python benchmarks/overhead.py --config configs/gta2cs.yaml --modes \
        compiled-regional --cuda-iters 5 --json "$RES/overhead_compiled.json"
    # 9. The full ladder with torch.compile, in what time is left of the 8 minutes (partial JSON if cut short).
    part throughput-full "$(left 470)" python benchmarks/throughput.py --config configs/gta2cs.yaml --iters 20 \
        --warmup 3 --json "$RES/throughput.json"
fi

# 10. Short table last; the overhead modes' launches and milliseconds per iteration are its last lines.
{
    echo
    echo "=== summary ($((SECONDS - START)) s)"
    printf '%s\n' "${STATUS[@]}"
    python - "$RES" <<'EOF'
import csv, json, sys
from pathlib import Path

res = Path(sys.argv[1])
for name in ("throughput_eager.json", "throughput.json"):
    p = res / name
    if not p.exists():
        print(f"{name}: missing")
        continue
    r = json.loads(p.read_text())
    print(f"{name}: {r['device']}, {r['setup']['backbone']} {r['setup']['crop']}, "
          f"{r['flops']['model_flop_per_iter'] / 1e12:.3f} TFLOP/iter")
    for e in r["ladder"]:
        if e.get("status") == "measured":
            mem = e["peak_mem_gib"]
            mfu = f"{100 * e['mfu']:.1f}%" if e["mfu"] is not None else "-"
            print(f"  {e['rung']:<25}{e['img_s']:>9.2f} img/s {e['ms_p50']:>9.1f} ms  "
                  f"{(f'{mem:.2f} GiB') if mem is not None else '-':>10}  MFU {mfu:>6}  x{e['speedup_vs_original']:.2f}"
                  f"  {e['setting']['compile']} compile, fp32 {e.get('fp32_precision', {}).get('matmul', '?')}")
            if "cuda_graphs" in e:
                print(f"    CUDA graphs: {e['cuda_graphs']}; {'; '.join(e.get('cuda_graphs_log', []))[:300]}")
        else:
            print(f"  {e['rung']:<25}{e.get('status', 'not reached')}: {e.get('reason', '')[:70]}")
    mic = r.get("mic")
    if mic and mic.get("status") == "measured":
        mem = mic["peak_mem_gib"]
        added = mic.get("added_ms_p50")
        print(f"  {'+MIC':<25}{mic['img_s']:>9.2f} img/s {mic['ms_p50']:>9.1f} ms  "
              f"{(f'{mem:.2f} GiB') if mem is not None else '-':>10}  over {mic['extends']}: "
              + (f"{added:+.1f} ms, {mic['added_flop_per_iter'] / 1e12:+.3f} TFLOP" if added is not None else "-"))
    elif mic:
        print(f"  {'+MIC':<25}{mic.get('status', 'not reached')}: {mic.get('reason', '')[:70]}")
    if "fast" in r:
        print(f"  fast vs original: {r['fast']['speedup']:.2f}x; targets: {r.get('targets')}")
p = res / "step_memory.json"
if p.exists():
    r = json.loads(p.read_text())
    for name, m in r["paths"].items():
        cuda = m["cuda_max_allocated_bytes"]
        print(f"step_memory {name}: counted peak {m['peak_gib']:.2f} GiB"
              + (f", torch.cuda.max_memory_allocated {cuda / 2**30:.2f} GiB" if cuda is not None else ""))
p = res / "kernels.csv"
if p.exists():
    rows = list(csv.DictReader(p.open()))
    last = rows[-1]["date"] if rows else None
    rows = [r for r in rows if r["date"] == last and not r.get("error")]
    print(f"kernels.csv: {len(rows)} rows of this run (ms p50, fwd/bwd)")
    best = {}
    for r in rows:
        best.setdefault((r["kernel"], r["shape"], r["dtype"], r["mode"]), {})[r["provider"]] = float(r["ms_p50"])
    for (k, s, d, m), v in best.items():
        print(f"  {k:<10}{s:<34}{d:<5}{m:<9}" + " ".join(f"{p}={t:.3f}" for p, t in v.items()))
try:  # the overhead modes last: launches/iter, host ms/iter, ms/iter
    sys.path.insert(0, "benchmarks")
    from overhead import summary_lines
except Exception as e:  # noqa: BLE001  (the tables above must still print)
    summary_lines = None
    print(f"overhead summary unavailable: {type(e).__name__}: {e}")
for name in ("overhead_compiled.json", "overhead_eager.json"):
    p = res / name
    if not p.exists():
        print(f"{name}: missing")
    elif summary_lines is not None:
        r = json.loads(p.read_text())
        print(f"{name}: {r['environment']['device']}, {r['setup']['backbone']} {r['setup']['crop']}")
        for line in summary_lines(r):
            print(f"  {line}")
EOF
} 2>&1 | tee -a "$LOG"
