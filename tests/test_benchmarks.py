"""The benchmark scripts at toy sizes (MiT-b0, 32x32 crops, no warm-up): throughput.py's record (schema, FLOP
counts), the FLOP counter's grouped convolution fix, and kernels.py's clean exit without a GPU."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
# benchmarks/kernels.py under another name: a top-level `kernels` is the name setup.py keeps free (the kernel package
# imports as daformer_fast.kernels). Registered before it runs: dataclasses look their module up in sys.modules.
_spec = importlib.util.spec_from_file_location("bench_kernels", Path(__file__).parents[1] / "benchmarks/kernels.py")
kernel_bench = sys.modules["bench_kernels"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kernel_bench)
import step_memory  # noqa: E402
import throughput  # noqa: E402
from bench_env import peak_for  # noqa: E402
from step_flops import flop_counter  # noqa: E402
from step_memory import StorageTracker  # noqa: E402

from daformer_fast.config import parse_config  # noqa: E402
from daformer_fast.models import build_segmentor  # noqa: E402

ENTRY_KEYS = {"img_s", "ms_p50", "ms_p90", "peak_mem_gib", "data_wait_pct", "warmup_s", "tflops", "mfu", "gain",
              "speedup_vs_original", "setting", "status", "rung"}  # fmt: skip


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    cfg = parse_config({"model": {"backbone": "mit_b0"}, "data": {"crop": [32, 32]}})
    path = tmp_path_factory.mktemp("bench") / "throughput.json"
    # One thread: on a loaded host, OpenMP threads that wait for each other at every op make a step 10-30x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rec = throughput.run_benchmark(cfg, torch.device("cpu"), iters=2, warmup=0, quick=True, order="interleaved",
                                       skip=("+bf16",), json_path=path, log=lambda m: None)  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert json.loads(path.read_text()) == json.loads(json.dumps(rec))  # what was written is what was returned
    return rec


def test_record_schema(record):
    assert {"original", "fast", "ladder", "device", "versions", "flops", "setup", "date"} <= set(record)
    assert {"torch", "triton", "python", "git"} <= set(record["versions"])
    assert record["device"].startswith("cpu")
    assert [e["rung"] for e in record["ladder"]] == [name for name, _ in throughput.LADDER]
    status = {e["rung"]: e["status"] for e in record["ladder"]}
    assert status["+bf16"] == "skipped" and status["+compile"] == "skipped" and status["+DALI"] == "skipped"
    assert all(e["reason"] for e in record["ladder"] if e["status"] == "skipped")
    measured = [e for e in record["ladder"] if e["status"] == "measured"]
    assert [e["rung"] for e in measured] == ["fp32 eager original", "+sync-free batched step", "+fused kernels"]
    for e in measured:
        assert ENTRY_KEYS <= set(e), ENTRY_KEYS - set(e)
        assert e["img_s"] > 0 and 0 < e["ms_p50"] <= e["ms_p90"] and len(e["ms_all"]) == 2
        assert e["mfu"] is None and e["peak_mem_gib"] is None  # CPU: no peak table, interleaved order
    # The cumulative settings: each measured rung carries the changes of the measured rungs above it.
    assert measured[1]["setting"] == {"path": "fast", "precision": "fp32", "compile": False, "kernels": "reference",
                                      "loader": "torch"}  # fmt: skip
    assert measured[2]["setting"]["kernels"] == "auto" and measured[2]["setting"]["path"] == "fast"
    assert record["original"]["rung"] == "fp32 eager original" and record["fast"]["rung"] == "+fused kernels"
    assert record["fast"]["speedup"] == pytest.approx(record["fast"]["img_s"] / record["original"]["img_s"], 1e-2)


def test_flop_counts_positive_and_consistent(record):
    f = record["flops"]
    model, ref = f["model_flop_per_iter"], f["original_flop_per_iter"]
    assert model > 0 and ref > 0
    # Same model, same four passes and two backward passes; the original path adds only the second encoder backward
    # of the feature distance, a small share of the step.
    assert model <= ref <= 1.25 * model
    # Every counted forward op appears for both paths with the same forward FLOPs.
    assert f["by_op"]["fast"]["aten.convolution"] == f["by_op"]["original"]["aten.convolution"]
    e = record["fast"]
    assert e["tflops"] == pytest.approx(model / (e["ms_p50"] * 1e-3) / 1e12, rel=1e-3)


@pytest.mark.parametrize("groups", [1, 8], ids=["dense", "grouped"])
def test_conv_backward_counts_like_forward(groups):
    """FlopCounterMode's own backward formula ignores groups; ours charges each gradient one forward."""
    conv = nn.Conv2d(16, 16, 3, padding=2, dilation=2, groups=groups)
    x = torch.randn(2, 16, 12, 12, requires_grad=True)
    with flop_counter() as fwd:
        y = conv(x)
    with flop_counter() as bwd:
        y.sum().backward()
    assert fwd.get_total_flops() == 2 * 2 * (16 * 16 // groups * 9) * 144
    assert bwd.get_total_flops() == 2 * fwd.get_total_flops()


def test_no_peak_on_cpu():
    assert peak_for(torch.device("cpu")) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit")
def test_kernel_bench_exits_cleanly_without_gpu(capsys, tmp_path):
    assert kernel_bench.main(["--csv", str(tmp_path / "k.csv")]) == 0
    out = capsys.readouterr().out
    assert "no CUDA device" in out and "attention" in out
    assert not (tmp_path / "k.csv").exists()


def test_storage_tracker_counts_storages_once_and_frees_them():
    tr = StorageTracker()
    with tr:
        a = torch.empty(1000)  # 4000 bytes
        b = a.view(10, 100)[:, :50]  # a view: no new storage
        c = torch.empty(500, dtype=torch.float64)  # +4000
        del a, b  # the storage goes only with its last view
        d = torch.empty(250)  # +1000
        assert tr.now == 5000
    assert tr.peak == 8000 and len(tr.peak_keys) == 2
    del c, d
    assert tr.now == 0 and not tr.live


def test_step_memory_accounts_for_the_persistent_state():
    """At a toy size the split at the peak is hand-countable: weights of student, teacher and ImageNet encoder,
    one gradient per student parameter, AdamW's two moments (plus one step counter) per student parameter."""
    cfg = parse_config({"model": {"backbone": "mit_b0", "pretrained": None}, "data": {"crop": [32, 32]}})
    torch.manual_seed(0)
    student = build_segmentor(cfg.model)
    state = student.state_dict()
    batches = throughput._synthetic_batches(cfg, torch.device("cpu"), 2)

    def nbytes(tensors):
        return sum(t.numel() * t.element_size() for t in tensors)

    params = nbytes(student.parameters())
    weights = 2 * nbytes(student.state_dict().values()) + nbytes(student.backbone.state_dict().values())
    for setting in step_memory.SETTINGS.values():
        m = step_memory.step_memory(cfg, setting, state, batches, torch.device("cpu"))
        at = m["at_peak_bytes"]
        assert at["weights"] == weights
        assert at["gradients"] == params
        # Fused AdamW keeps each parameter's step count as a 4-byte tensor; the reference's are CPU scalars too.
        assert 2 * params <= at["optimizer"] <= 2 * params + 4 * len(list(student.parameters()))
        assert at["activations and temporaries"] > 0
        assert m["peak_bytes"] == sum(at.values()) and m["before_step_bytes"] <= m["peak_bytes"]
