"""Test setup: run Triton kernels in the interpreter when there is no GPU; keep CPU tests deterministic."""

import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    # Must be set before any @triton.jit decorator runs (i.e. before kernel modules are imported).
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _squeeze_interpreter_index() -> None:
    """Triton < 3.8's interpreter turns a loop bound into an int with `int(ndarray of shape (1,))`, an error from
    numpy 2.5 on ("only 0-dimensional arrays can be converted"); triton 3.8 squeezes first. Give the older
    interpreter 3.8's conversion so the kernel tests also run on triton 3.6 (the GPU image's version) on a CPU."""
    import triton
    from triton.runtime import interpreter

    if tuple(int(p) for p in triton.__version__.split(".")[:2]) >= (3, 8):
        return
    patch = interpreter._patch_lang_tensor

    def _patch_lang_tensor(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = _patch_lang_tensor


if os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None:
    _squeeze_interpreter_index()  # without triton the kernel tests skip (importorskip) and there is nothing to patch

import pytest  # noqa: E402


def gradient_difference(ref: torch.nn.Module, other: torch.nn.Module) -> float:
    """‖g_other − g_ref‖ / ‖g_ref‖ over all parameter gradients of two same-shaped networks taken as one vector: the
    parity tests' comparison where tiny input differences make single tensors' gradients differ more."""
    g_ref = torch.cat([p.grad.flatten() for p in ref.parameters()])
    g_other = torch.cat([p.grad.flatten() for p in other.parameters()])
    return float((g_other - g_ref).norm() / g_ref.norm())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def ops_log(caplog, monkeypatch):
    """caplog at INFO for the dispatch point's logger ("daformer_fast.ops"), with no decision logged yet.

    Each decision is logged once per process (`utils.log_once`): a fresh record of what was logged lets a test see
    its own. caplog listens on the root logger; the trainer turns off propagation of the package logger for its own
    handlers, so a training run earlier in the same process would otherwise hide these records.
    """
    monkeypatch.setattr(logging.getLogger("daformer_fast"), "propagate", True)
    monkeypatch.setattr("daformer_fast.utils._logged", set())
    caplog.set_level(logging.INFO, logger="daformer_fast.ops")
    return caplog


@pytest.fixture
def torchrun_check(tmp_path):
    """Run one of tests/ddp_*_check.py under torchrun on 2 CPU processes; each rank writes OUT/rank<r>.ok when its
    assertions pass."""

    def run(script: str) -> None:
        repo = Path(__file__).resolve().parents[1]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(repo / "tests" / script), str(tmp_path)]  # fmt: skip
        res = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, res.stderr[-3000:]
        assert sorted(p.name for p in tmp_path.glob("rank*.ok")) == ["rank0.ok", "rank1.ok"]

    return run
