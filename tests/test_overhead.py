"""benchmarks/overhead.py at toy size (MiT-b0, 32x32 crops, eager modes): the fast path dispatches fewer ops than the
original and reads nothing back, the original's host syncs are found with their call sites, every op gets a stage,
and the JSON record has the documented keys."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
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
    reasons = overhead._RecompileReasons()
    msg = ("Recompiling function forward in segmentor.py:30\n    triggered by the following guard failure(s):\n"
           "    - 0/1: with_features == False  # comment\n    - User stack trace:\n    -   File \"x.py\", line 3\n"
           "    - 0/0: GLOBAL_STATE changed: grad_mode ")  # fmt: skip
    reasons.emit(overhead.logging.LogRecord("recompiles", 10, "guards.py", 1, msg, (), None))
    assert reasons.messages == ["Recompiling function forward in segmentor.py:30 - 0/1: with_features == False "
                                "# comment - 0/0: GLOBAL_STATE changed: grad_mode"]  # fmt: skip


@pytest.mark.slow
def test_compiled_mode_record(tmp_path):
    """The compiled mode (aot_eager, no code generation): profiler counts split into backward and the rest, and
    dynamo's graph statistics."""
    threads = torch.get_num_threads()
    try:
        rec = overhead.main(["--quick", "--crop", "32", "--device", "cpu", "--threads", "1", "--modes", "compiled",
                             "--compile-backend", "aot_eager"])["modes"]["compiled"]  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert rec["status"] == "measured" and rec["compile_backend"] == "aot_eager"
    assert rec["ops_total"] == sum(rec["ops_by_stage"].values()) == rec["profiler_ops_total"]
    assert set(rec["ops_by_stage"]) == {"backward", "not attributed"} and all(rec["ops_by_stage"].values())
    # Student, teacher and ImageNet encoder are compiled apart: at least one graph each.
    assert rec["graphs"] >= 3 and isinstance(rec["graph_breaks"], dict)
    assert rec["recompiles_over_steps"] == 5 and rec["recompiles"] == len(rec["recompile_reasons"])
    assert rec["cold_step_s"] > rec["warm_step_s"] > 0
