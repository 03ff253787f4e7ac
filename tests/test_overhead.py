"""benchmarks/overhead.py at toy size (MiT-b0, 32x32 crops, eager modes): the fast path dispatches fewer ops than the
original and reads nothing back, the original's host syncs are found with their call sites, every op gets a stage,
and the JSON record has the documented keys. Regional compilation (with `aot_eager`, no code generation) compiles
the hand-counted set of graphs once, without graph breaks or later recompiles, and leaves fewer ops to the eager
dispatcher than the eager step issues; the warm-start process and the report's summary lines."""

import json
import logging
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import compile_capture  # noqa: E402
import overhead  # noqa: E402


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    path = tmp_path_factory.mktemp("overhead") / "overhead.json"
    threads = torch.get_num_threads()
    try:
        rec = overhead.main(["--quick", "--crop", "32", "--device", "cpu", "--threads", "1",
                             "--modes", "original", "eager", "captured", "--json", str(path)])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert json.loads(path.read_text()) == json.loads(json.dumps(rec))  # what was written is what was returned
    return rec


def test_record_keys(record):
    assert {"command", "setup", "environment", "modes"} <= set(record)
    assert {"device", "versions", "load_avg_1m", "load_avg_1m_end"} <= set(record["environment"])
    assert {"torch", "git"} <= set(record["environment"]["versions"])
    assert record["setup"]["backbone"] == "mit_b0" and record["setup"]["crop"] == [32, 32]
    assert list(record["modes"]) == ["original", "eager", "captured"]
    for mode in ("original", "eager"):
        assert {"status", "ops_total", "ops_by_stage", "host_syncs", "host_sync_sites"} <= set(record["modes"][mode])
        assert list(record["modes"][mode]["ops_by_stage"]) == list(overhead.STAGES)
    captured = record["modes"]["captured"]
    assert captured["status"] == "skipped" and "CUDA" in captured["reason"]


def test_every_op_gets_a_stage_and_each_stage_has_ops(record):
    for mode in ("original", "eager"):
        r = record["modes"][mode]
        assert sum(r["ops_by_stage"].values()) == r["ops_total"] > 0
        # Every stage issues ops at this setting (dacs with FD): an attribution rule that lost one would show 0.
        assert all(n > 0 for s, n in r["ops_by_stage"].items() if s != "other"), r["ops_by_stage"]


def test_fast_path_dispatches_fewer_ops_and_never_syncs(record):
    original, fast = record["modes"]["original"], record["modes"]["eager"]
    assert fast["ops_total"] < original["ops_total"]
    # The fused AdamW is a handful of ops where the for-loop one issues several per parameter.
    assert fast["ops_by_stage"]["optimizer+ema"] < original["ops_by_stage"]["optimizer+ema"]
    assert fast["host_syncs"] == 0 and fast["host_sync_sites"] == {}
    assert original["host_syncs"] == sum(original["host_sync_sites"].values()) > 0
    sites = list(original["host_sync_sites"])
    assert any("_local_scalar_dense" in s and "step.py" in s and "pw.amax().item()" in s for s in sites), sites
    assert any("unique" in s and "classmix.py" in s for s in sites), sites


def test_stage_rule_on_a_hand_built_stack():
    """The rule itself: the innermost matching frame decides, a network's `self` before any file rule."""
    net = torch.nn.Linear(1, 1)
    networks = {id(net): "teacher forward"}

    def in_forward(self):  # a frame whose `self` is a network
        return sys._getframe()

    assert overhead.stage_of(in_forward(net), networks) == "teacher forward"
    assert overhead.stage_of(sys._getframe(), networks) == "other"  # this test file matches no rule
    namespace = {"sys": sys}
    exec(compile("def f():\n    return sys._getframe()\n", "/x/daformer_fast/uda/ema.py", "exec"), namespace)
    assert overhead.stage_of(namespace["f"](), networks) == "optimizer+ema"


def test_recompile_reasons_keep_the_failed_guards():
    reasons = compile_capture.RecompileReasons()
    msg = ("Recompiling function forward in segmentor.py:30\n    triggered by the following guard failure(s):\n"
           "    - 0/1: with_features == False  # comment\n    - User stack trace:\n    -   File \"x.py\", line 3\n"
           "    - 0/0: GLOBAL_STATE changed: grad_mode ")  # fmt: skip
    reasons.emit(logging.LogRecord("recompiles", 10, "guards.py", 1, msg, (), None))
    assert reasons.messages == ["Recompiling function forward in segmentor.py:30 - 0/1: with_features == False "
                                "# comment - 0/0: GLOBAL_STATE changed: grad_mode"]  # fmt: skip


def _compiled(mode: str) -> dict:
    threads = torch.get_num_threads()
    try:
        return overhead.main(["--quick", "--crop", "32", "--device", "cpu", "--threads", "1", "--modes", mode,
                              "--compile-backend", "aot_eager", "--time-iters", "0"])["modes"][mode]  # fmt: skip
    finally:
        torch.set_num_threads(threads)


def test_regional_compile_record(record):
    """train.compile: regional at MiT-b0: each of the 4 stages' patch embedding and block, with and without
    autograd (student; teachers and ImageNet encoder), the first block (rate 0: no DropPath factors) with autograd,
    and the decode head with and without: 4 x 2 x 2 + 1 + 2 = 19 graphs, all in the first step, none after it, no
    graph break. The dispatcher then sees fewer ops outside compiled code (plus one call per compiled forward or
    backward) than the eager fast step issues."""
    rec = _compiled("compiled-regional")
    assert rec["status"] == "measured" and rec["compile"] == "regional" and rec["compile_backend"] == "aot_eager"
    assert rec["graphs"] == rec["graphs_after"] == 19 and rec["frames_compiled_by_step"] == [19, 0, 0, 0, 0, 0]
    assert rec["graph_breaks"] == {} and rec["recompiles"] == rec["recompiles_after_step_2"] == 0
    assert rec["recompile_reasons"] == [] and rec["cold_step_s"] > rec["warm_step_s"] > 0
    assert rec["warm_start"]["status"] == "skipped" and "aot_eager" in rec["warm_start"]["reason"]
    assert rec["caches"]["fx_graph_cache"] in (True, False) and rec["caches"]["cache_dir"]  # a fresh folder
    assert rec["ops_total"] == sum(rec["ops_by_stage"].values()) == rec["profiler_ops_total"]
    outside = rec["ops_total"] - rec["ops_in_compiled_code"]
    assert 0 < outside and rec["compiled_calls"] > 0
    assert outside + rec["compiled_calls"] < record["modes"]["eager"]["profiler_ops_total"]


def test_warm_start_reads_the_child_record(tmp_path):
    """The warm-start process runs on the given cache folder and its tagged JSON line becomes the record."""
    child = ["-c", "import json, os; print('noise'); print(" + repr(compile_capture.FIRST_STEP_TAG) +
             " + json.dumps({'first_step_s': 1.5, 'dir': os.environ['TORCHINDUCTOR_CACHE_DIR']}))"]  # fmt: skip
    rec = compile_capture.warm_start(child, str(tmp_path))
    assert rec["status"] == "measured" and rec["first_step_s"] == 1.5 and rec["dir"] == str(tmp_path)
    assert rec["process_s"] > 0
    failed = compile_capture.warm_start(["-c", "import sys; sys.exit('no record')"], str(tmp_path))
    assert failed["status"] == "failed" and "no record" in failed["reason"]


def test_summary_lines():
    modes = {
        "eager": {"status": "measured", "kernel_launches": 24000, "host_launch_calls": 23000, "host_ms": 90.0,
                  "ms_per_iter": 95.0, "device_busy_ms": 30.0, "profiler_ops_total": 20680},
        "compiled-regional": {"status": "measured", "profiler_ops_total": 4000, "graphs": 26,
                              "graph_breaks": {"x": 1}, "recompiles_after_step_2": 0, "cold_step_s": 100.0,
                              "warm_start": {"status": "measured", "first_step_s": 20.0}},
        "captured": {"status": "skipped", "reason": "needs a CUDA device"},
    }  # fmt: skip
    lines = overhead.summary_lines({"modes": modes})
    assert lines[0] == ("eager: launches/iter 24000 (host launch calls 23000); host ms/iter 90.0; ms/iter 95.0; "
                        "device busy ms 30.0; aten ops 20680")  # fmt: skip
    assert lines[1].startswith("compiled-regional: launches/iter - (host launch calls -)")
    assert lines[1].endswith("graphs 26, breaks 1, recompiles after step 2 0, cold 100.0 s, warm start 20.0 s")
    assert lines[2] == "captured: skipped (needs a CUDA device)"


@pytest.mark.slow
def test_compiled_mode_record(tmp_path):
    """The full compile (aot_eager, no code generation): profiler counts split into backward and the rest, and
    dynamo's graph statistics."""
    rec = _compiled("compiled-full")
    assert rec["status"] == "measured" and rec["compile_backend"] == "aot_eager" and rec["compile"] == "full"
    assert rec["ops_total"] == sum(rec["ops_by_stage"].values()) == rec["profiler_ops_total"]
    assert set(rec["ops_by_stage"]) == {"backward", "not attributed"} and all(rec["ops_by_stage"].values())
    # Student, teacher and ImageNet encoder are compiled apart: at least one graph each.
    assert rec["graphs"] >= 3 and isinstance(rec["graph_breaks"], dict)
    assert rec["recompiles_over_steps"] == 5 and rec["recompiles"] == len(rec["recompile_reasons"])
    assert rec["cold_step_s"] > rec["warm_step_s"] > 0
