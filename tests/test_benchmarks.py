"""The benchmark scripts at toy sizes (MiT-b0, 32x32 crops, no warm-up): throughput.py's record (schema, FLOP
counts, the +MIC entry), the FLOP counter's grouped convolution fix, and kernels.py's clean exit without a GPU."""

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
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
from daformer_fast.data.pipeline import normalize  # noqa: E402
from daformer_fast.models import build_segmentor  # noqa: E402
from daformer_fast.ops.classmix_aug import gaussian_blur  # noqa: E402
from daformer_fast.ops.dispatch import using_impl  # noqa: E402
from daformer_fast.uda.losses import seg_ce_loss  # noqa: E402

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
    assert status["+CUDA graphs"] == "skipped"
    assert all(e["reason"] for e in record["ladder"] if e["status"] == "skipped")
    entries = {e["rung"]: e for e in record["ladder"]}
    assert "CUDA device" in entries["+CUDA graphs"]["reason"]
    assert entries["+compile"]["change"] == {"compile": "regional"} and record["setup"]["compile"] == "regional"
    measured = [e for e in record["ladder"] if e["status"] == "measured"]
    assert [e["rung"] for e in measured] == ["fp32 eager original", "+sync-free batched step", "+fused kernels"]
    for e in measured:
        assert ENTRY_KEYS <= set(e), ENTRY_KEYS - set(e)
        assert e["img_s"] > 0 and 0 < e["ms_p50"] <= e["ms_p90"] and len(e["ms_all"]) == 2
        assert e["mfu"] is None and e["peak_mem_gib"] is None  # CPU: no peak table, interleaved order
    # The cumulative settings: each measured rung carries the changes of the measured rungs above it.
    assert measured[1]["setting"] == {"path": "fast", "precision": "fp32", "compile": "off", "kernels": "reference",
                                      "loader": "torch", "cuda_graphs": False}  # fmt: skip
    # train.precision fp32 is IEEE fp32 for matmuls and convolutions, stated by every entry.
    assert all(e["fp32_precision"] == {"matmul": "ieee", "conv": "ieee"} for e in measured)
    assert all("cuda_graphs" not in e for e in measured)  # no capture, no capture state
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
    # Every counted forward op appears for both paths with the same forward FLOPs, but for the Gaussian blur's two
    # convolutions: the fast step computes the blur whatever the batch's coin says and selects (its device body
    # branches on nothing drawn), the original only when the coin says blur.
    images = torch.zeros(2, 3, 32, 32)
    with using_impl("reference"), flop_counter() as blur:
        gaussian_blur(images, torch.full(images.shape[:1], 0.5))
    conv = f["by_op"]["fast"]["aten.convolution"] - f["by_op"]["original"]["aten.convolution"]
    assert conv in (0, blur.get_total_flops()) and blur.get_total_flops() > 0
    e = record["fast"]
    assert e["tflops"] == pytest.approx(model / (e["ms_p50"] * 1e-3) / 1e12, rel=1e-3)


def test_record_mic_entry(record):
    """+MIC extends the last measured rung with MIC on, timed beside it, with its own FLOPs and the differences."""
    mic, fast = record["mic"], record["fast"]
    assert mic["rung"] == throughput.MIC_RUNG and mic["status"] == "measured" and mic["extends"] == fast["rung"]
    assert ENTRY_KEYS <= set(mic), ENTRY_KEYS - set(mic)
    assert mic["change"] == {"uda.mic.mode": "separatetrgaug", "uda.mic.block_size": 2}  # 32 px at 512: 2 at 32
    assert mic["setting"] == fast["setting"]
    assert len(mic["ms_all"]) == 2 and 0 < mic["ms_p50"] <= mic["ms_p90"] and mic["img_s"] > 0
    assert mic["mfu"] is None and mic["peak_mem_gib"] is None and mic["added_peak_mem_gib"] is None  # interleaved
    assert mic["added_ms_p50"] == pytest.approx(mic["ms_p50"] - fast["ms_p50"], abs=1e-3)
    assert mic["added_flop_per_iter"] == mic["flop_per_iter"] - record["flops"]["model_flop_per_iter"] > 0
    assert mic["tflops"] == pytest.approx(mic["flop_per_iter"] / (mic["ms_p50"] * 1e-3) / 1e12, rel=1e-3)
    assert mic["gain"] == pytest.approx(mic["img_s"] / fast["img_s"], rel=1e-2)
    assert [e["rung"] for e in record["ladder"]] == [name for name, _ in throughput.LADDER]  # not a ladder rung


def test_mic_block_scales_with_the_crop():
    sizes = {512: 32, 1024: 64, 128: 8, 32: 2, 24: 2, 16: 1, 8: 1}  # 32·crop/512 rounded, at least 1
    for crop, block in sizes.items():
        cfg = throughput.mic_config(parse_config({"data": {"crop": [crop, crop]}}))
        assert (cfg.uda.mic.mode, cfg.uda.mic.block_size) == ("separatetrgaug", block), crop


def test_each_rung_runs_under_its_own_fp32_precision():
    """Interleaved rungs share one process, where the builder set the precision of the rung built last: each step
    sets its rung's (fp32 -> IEEE, tf32 and bf16 -> TF32) and the entry states what it ran under."""
    seen = []

    def step(batch, t):
        seen.append((torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision))
        return {"skipped": torch.tensor(0)}

    before = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    rungs = [throughput._Rung(p, throughput.Setting(precision=p), step, iter([{}] * 2)) for p in ("bf16", "fp32")]
    try:
        for rung in rungs + rungs[::-1]:
            rung.run(0, torch.device("cpu"))
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = before
    assert seen == [("tf32", "tf32"), ("ieee", "ieee"), ("ieee", "ieee"), ("tf32", "tf32")]
    assert rungs[0].fp32_precision == {"matmul": "tf32", "conv": "tf32"}
    assert rungs[1].fp32_precision == {"matmul": "ieee", "conv": "ieee"}


def test_cuda_graphs_rung_skip_reasons():
    """+CUDA graphs needs CUDA, and the fast path (the rung above it may have been skipped)."""
    change = dict(throughput.LADDER)["+CUDA graphs"]
    fast, original = throughput.Setting(path="fast"), throughput.Setting()
    why = throughput._skip_reason("+CUDA graphs", change, fast, torch.device("cpu"), False, False, ())
    assert "CUDA device" in why
    why = throughput._skip_reason("+CUDA graphs", change, original, torch.device("cuda"), False, False, ())
    assert "fast step only" in why
    assert throughput._skip_reason("+CUDA graphs", change, fast, torch.device("cuda"), False, False, ()) is None
    names = [n for n, _ in throughput.LADDER]
    assert names.index("+fused kernels") < names.index("+CUDA graphs") < names.index("+DALI")


def test_capture_state_of_a_step_built_with_cuda_graphs_on_cpu():
    """On CPU the builder's CapturedStep runs eager steps with its reason; the entry says so (through the
    KernelCheck wrapper too), and a step without capture has no capture state."""
    from daformer_fast.build import build_training
    from daformer_fast.graphs import KernelCheck

    cfg = parse_config({"model": {"backbone": "mit_b0", "pretrained": None}, "data": {"crop": [32, 32]},
                        "train": {"cuda_graphs": True}})  # fmt: skip
    step = build_training(cfg, "cpu")[1]
    state = throughput.capture_state(step)
    assert state == {"self_check": "failed", "eager_fallback_reason": "train.cuda_graphs needs a CUDA device",
                     "replays": 0}  # fmt: skip
    assert throughput.capture_state(KernelCheck(step)) == state
    assert throughput.capture_state(step.step) is None


def _student_flops(cfg, state, images):
    """(forward, backward, first convolution's forward, blur) FLOPs of the student alone on `images` and of the
    Gaussian blur of `images`, each counted apart."""
    student = build_segmentor(cfg.model)
    student.load_state_dict(state)
    student.train()
    with using_impl("reference"):
        with flop_counter() as fwd:
            logits = student(images)
        with flop_counter() as bwd:
            seg_ce_loss(logits, torch.zeros(images.shape[:1] + images.shape[2:], dtype=torch.long)).backward()
        with flop_counter() as first, torch.no_grad():
            student.backbone.patch_embed1.proj(images)
        with flop_counter() as blur:
            gaussian_blur(images, torch.full(images.shape[:1], 0.5))
    return fwd.get_total_flops(), bwd.get_total_flops(), first.get_total_flops(), blur.get_total_flops()


def test_mic_flops_are_one_more_student_pass(record):
    """The masked pass is one student forward+backward on the target batch (same shapes as the batch), so MIC adds
    exactly what that costs counted on its own, plus its blur's two 1-D convolutions when the batch's coin says
    blur; by hand, the backward is two forwards except the gradient of the image (the first convolution's input,
    which needs none): 3·forward − first convolution, within [2.9, 3] forwards. A separate MIC teacher adds one
    more (no-grad) forward of the same network."""
    cfg = parse_config({"model": {"backbone": "mit_b0", "pretrained": None}, "data": {"crop": [32, 32]}})
    state = throughput.initial_weights(cfg)
    batch = throughput._synthetic_batches(cfg, torch.device("cpu"), 1)[0]
    fwd, bwd, first, blur = _student_flops(cfg, state, normalize(batch["target_img"]))
    added = record["mic"]["added_flop_per_iter"]
    assert added - (fwd + bwd) in (0, blur) and 0 < blur < 0.01 * fwd
    assert bwd == 2 * fwd - first and 2.9 * fwd <= fwd + bwd <= 3 * fwd
    r = dataclasses.replace
    separate = r(cfg, uda=r(cfg.uda, mic=r(cfg.uda.mic, alpha=0.99)))  # its own EMA teacher
    total = throughput.count_mic_flops(separate, state, batch, torch.device("cpu"))
    assert total - record["mic"]["flop_per_iter"] == fwd


def test_skip_mic_from_the_command_line(capsys):
    """`--skip +MIC` leaves a skipped entry with its reason, and the table says so."""
    rungs = [name for name, _ in throughput.LADDER if name != "fp32 eager original"]
    threads = torch.get_num_threads()
    try:
        rec = throughput.main(["--quick", "--config", str(ROOT / "configs/gta2cs.yaml"), "--iters", "1", "--warmup",
                               "0", "--threads", "1", "--set", "data.crop=[32,32]", "--skip", *rungs,
                               throughput.MIC_RUNG])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert rec["mic"]["status"] == "skipped" and rec["mic"]["reason"] == "--skip"
    assert not {"added_ms_p50", "ms_p50"} & set(rec["mic"])
    assert f"{throughput.MIC_RUNG:<25}skipped: --skip" in capsys.readouterr().out


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
    def held(m):  # parameters and buffers, the derived ones (not saved: MiT's DropPath keep rates) included
        return nbytes([*m.parameters(), *m.buffers()])

    weights = 2 * held(student) + held(student.backbone)
    # MIC with DAFormer's teacher keeps no more state across steps.
    runs = [(cfg, s) for s in step_memory.SETTINGS.values()]
    runs.append((throughput.mic_config(cfg), step_memory.SETTINGS["fast bf16"]))
    for run_cfg, setting in runs:
        m = step_memory.step_memory(run_cfg, setting, state, batches, torch.device("cpu"))
        at = m["at_peak_bytes"]
        assert at["weights"] == weights
        assert at["gradients"] == params
        # Fused AdamW keeps each parameter's step count as a 4-byte tensor; the reference's are CPU scalars too.
        assert 2 * params <= at["optimizer"] <= 2 * params + 4 * len(list(student.parameters()))
        assert at["activations and temporaries"] > 0
        assert m["peak_bytes"] == sum(at.values()) and m["before_step_bytes"] <= m["peak_bytes"]
