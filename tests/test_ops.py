"""Dispatch point: the op table, forced paths, the environment kill switch, rejection reasons; package layout of
kernels/."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from daformer_fast import utils
from daformer_fast.ops import attention, dispatch, using_impl
from daformer_fast.ops.dispatch import choose_impl, kernel_reasons, set_default_impl
from daformer_fast.ops.table import OPS

ROOT = Path(__file__).resolve().parents[1]


def test_forced_reference_and_rejection_reasons():
    assert choose_impl("demo_op", "reference") == "reference"
    assert choose_impl("demo_op", "auto", ["K > 32"]) == "reference"
    with pytest.raises(ValueError, match="demo_op: triton implementation cannot run: K > 32"):
        choose_impl("demo_op", "triton", ["K > 32"])
    with pytest.raises(ValueError, match="impl must be"):
        choose_impl("demo_op", "fastest")


def test_auto_uses_triton_only_when_available(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_available", lambda: (False, "DAFORMER_FAST_KERNELS=0"))
    assert choose_impl("demo_op2", "auto") == "reference"
    with pytest.raises(ValueError, match="DAFORMER_FAST_KERNELS=0"):
        choose_impl("demo_op2", "triton")
    monkeypatch.setattr(dispatch, "triton_available", lambda: (True, ""))
    assert choose_impl("demo_op2", "auto") == "triton"


def test_fallback_logged_once_with_reason(ops_log):
    for _ in range(3):
        choose_impl("demo_op3", "auto", ["unsupported dtype torch.float64"])
    msgs = [r.getMessage() for r in ops_log.records if "demo_op3" in r.getMessage()]
    assert msgs == ["demo_op3: using reference (unsupported dtype torch.float64)"]


def test_dispatch_under_compile_logs_without_graph_break(ops_log):

    def f(x):
        return x + (1 if choose_impl("demo_compiled", "auto", ["not on CUDA"]) == "reference" else 2)

    assert torch.compile(f, fullgraph=True)(torch.zeros(2)).tolist() == [1.0, 1.0]
    # Only the package's own records: pytest ≥ 9.2 also captures torch's loggers (the first CPU compile may warn
    # about a missing CUDA runtime).
    ours = [r.getMessage() for r in ops_log.records if r.name.startswith("daformer_fast")]
    assert ours == ["demo_compiled: using reference (not on CUDA)"]
    # The dispatcher's logging and kernel import carry Dynamo's constant-result marker, set by hand (see
    # utils.log_once); it must stay torch's.
    marked = torch.compiler.assume_constant_result(lambda: None)
    assert list(vars(marked)) == ["_dynamo_marked_constant"] and utils.log_once._dynamo_marked_constant
    assert dispatch._log._dynamo_marked_constant and dispatch._import_kernel._dynamo_marked_constant


def test_forced_reference_goes_through_the_table_and_is_logged_once(ops_log):
    q = torch.randn(1, 1, 4, 8)
    attention(q, q, q, 1.0, impl="reference")
    with using_impl("reference"):
        attention(q, q, q, 1.0)
    msgs = [r.getMessage() for r in ops_log.records if r.getMessage().startswith("attention:")]
    assert msgs == ["attention: using reference (forced)"]


def test_using_impl_restores_the_default():
    with pytest.raises(RuntimeError), using_impl("reference"):
        assert dispatch.default_impl() == "reference"
        raise RuntimeError
    assert dispatch.default_impl() == "auto"


def test_attention_rejection_reasons_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, q16 = torch.randn(1, 1, 4, 32), torch.randn(1, 1, 4, 16, dtype=torch.float64)
    assert kernel_reasons("attention", "triton", q, q, q, 1.0) == ["tensor not on CUDA"]
    assert kernel_reasons("attention", "triton", q16, q16, q16, 1.0) == [
        "tensor not on CUDA",
        "dtypes torch.float64, torch.float64, torch.float64 (need one of fp32/bf16/fp16)",
        "head dim 16 (need 32, 64 or 128)",
    ]


@pytest.mark.slow
def test_env_switch_disables_kernels():
    code = (
        "from daformer_fast.ops.dispatch import triton_available, choose_impl; "
        "print(triton_available()[1], choose_impl('x', 'auto'))"
    )
    env = dict(os.environ, DAFORMER_FAST_KERNELS="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "DAFORMER_FAST_KERNELS=0 reference"


def test_default_impl_from_config_routes_attention(monkeypatch):
    calls = []
    counting = dataclasses.replace(OPS["attention"], reference=lambda *a: calls.append(1) or a[0])
    monkeypatch.setitem(OPS, "attention", counting)
    q = torch.randn(1, 1, 4, 8)
    try:
        set_default_impl("reference")
        attention(q, q, q, 1.0)
        assert calls == [1]
        set_default_impl("auto")
        attention(q, q, q, 1.0)
        assert calls == [1]
    finally:
        set_default_impl("auto")
    with pytest.raises(ValueError, match="kernels.impl"):
        set_default_impl("cuda")


def test_kernels_folder_imports_as_package_member():
    # Run outside the repository so that only the installed mapping can resolve the import.
    code = "import daformer_fast.kernels as k, importlib.util as u; print(k.__file__); print(u.find_spec('kernels'))"
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, check=True).stdout
    path, spec = out.strip().splitlines()
    assert Path(path).resolve() == (ROOT / "kernels" / "__init__.py").resolve()
    assert spec == "None"  # no top-level module named plain `kernels` is installed


@pytest.mark.slow
def test_importing_ops_does_not_import_triton():
    code = "import sys, daformer_fast.ops, daformer_fast.models; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
