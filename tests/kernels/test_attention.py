"""Triton attention kernel against `attention_ref`: forward, every gradient, odd shapes, dtypes, layouts, the
public op under torch.compile and the dispatch point (opcheck of the registered ops: test_opcheck.py).

Without a GPU these run in the Triton interpreter (tests/conftest.py), at tiny shapes. There every `tl.dot` runs on
fp32 operands (the interpreter's bf16 dot is wrong), so the bf16/fp16 cases check the storage-dtype loads/stores and
fp32 accumulation, not the tensor-core dots; on a GPU the same tests exercise those.
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

import daformer_fast.kernels.attention as ka  # noqa: E402
from helpers import DEVICE, assert_three_way  # noqa: E402

from daformer_fast.models.mit import mit  # noqa: E402
from daformer_fast.ops.attention import TOLERANCES, attention, attention_ref  # noqa: E402
from daformer_fast.ops.dispatch import using_impl  # noqa: E402

# (B, M, N, L, D): one query and one key; N and L not multiples of the 64 block; MiT's L = 256 over several query
# blocks; the largest head dim.
SHAPES = [(1, 1, 1, 1, 32), (2, 2, 100, 70, 32), (1, 2, 130, 256, 64), (1, 1, 33, 45, 128)]


def _inputs(B, M, N, L, D, dtype, layout="contiguous"):
    """q, k, v leaf tensors; layout "mit" builds them as views of the linear outputs, as EfficientSelfAttention does."""
    if layout == "mit":
        q_lin = torch.randn(B, N, M * D, device=DEVICE, dtype=dtype, requires_grad=True)
        kv_lin = torch.randn(B, L, 2 * M * D, device=DEVICE, dtype=dtype, requires_grad=True)
        kv = kv_lin.reshape(B, L, 2, M, D).permute(2, 0, 3, 1, 4)
        return (q_lin, kv_lin), (q_lin.reshape(B, N, M, D).transpose(1, 2), kv[0], kv[1])
    leaves = [torch.randn(B, M, n, D, device=DEVICE, dtype=dtype, requires_grad=True) for n in (N, L, L)]
    return leaves, leaves


def _run(fn, leaves, qkv, do):
    out = fn(*qkv, qkv[0].shape[-1] ** -0.5)
    grads = torch.autograd.grad(out, leaves, do)
    return [out.detach(), *grads]


def _fp32_copy(leaves, layout, shape):
    leaves32 = [t.detach().float().requires_grad_() for t in leaves]
    if layout == "mit":
        B, M, N, L, D = shape
        kv = leaves32[1].reshape(B, L, 2, M, D).permute(2, 0, 3, 1, 4)
        return leaves32, (leaves32[0].reshape(B, N, M, D).transpose(1, 2), kv[0], kv[1])
    return leaves32, leaves32


def _check(shape, dtype, layout="contiguous"):
    leaves, qkv = _inputs(*shape, dtype, layout)
    B, M, N, L, D = shape
    do = torch.randn(B, M, N, D, device=DEVICE, dtype=dtype)
    got = _run(ka.attention_triton, leaves, qkv, do)
    leaves32, qkv32 = _fp32_copy(leaves, layout, shape)
    want = _run(attention_ref, leaves32, qkv32, do.float())
    names = ["out", *(["dq_lin", "dkv_lin"] if layout == "mit" else ["dq", "dk", "dv"])]
    for name, g in zip(names, got, strict=True):
        assert g.dtype == dtype, name
    if dtype == torch.float32:
        atol, rtol = TOLERANCES[dtype]
        for name, g, w in zip(names, got, want, strict=True):
            torch.testing.assert_close(g, w, atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")
        return
    assert_three_way(names, got, want, _run(attention_ref, leaves, qkv, do), atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-M{}-N{}-L{}-D{}".format(*s))
def test_matches_reference(shape, dtype):
    _check(shape, dtype)


def test_fp16():
    _check((2, 1, 70, 19, 64), torch.float16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_mit_strided_layout(dtype):
    # q and k/v as the non-contiguous views MiT passes; gradients flow back into the linear outputs.
    _check((2, 2, 65, 17, 32), dtype, layout="mit")


@pytest.mark.parametrize("N", [130, 300])
def test_dkdv_split_over_query_chunks(monkeypatch, N):
    # On a GPU the dk/dv kernel splits the queries into chunks and sums fp32 partials; under the interpreter the
    # launcher keeps one chunk, so force several: 3 chunks of one block, or 2 chunks of 3 and 2 blocks.
    monkeypatch.setattr(ka, "_TARGET_DKDV_PROGRAMS", 64 if N == 130 else 4)
    _check((1, 2, N, 40, 32), torch.float32)


def test_lse_output_and_its_gradient():
    q, k, v = (torch.randn(1, 2, n, 32, device=DEVICE, requires_grad=True) for n in (50, 20, 20))
    w_o, w_lse = torch.randn(1, 50, 2, 32, device=DEVICE), torch.randn(1, 2, 50, device=DEVICE)
    o, lse = ka.attention_fwd(q, k, v, 0.2)
    got = torch.autograd.grad((o * w_o).sum() + (lse * w_lse).sum(), (q, k, v))
    s = q @ k.transpose(-2, -1) * 0.2
    o_ref, lse_ref = (s.softmax(-1) @ v).transpose(1, 2), s.logsumexp(-1)
    want = torch.autograd.grad((o_ref * w_o).sum() + (lse_ref * w_lse).sum(), (q, k, v))
    torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, lse_ref, atol=1e-5, rtol=1e-5)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_compile_public_op_fullgraph(ops_log):
    # The dispatch decision must be logged from inside the trace without a graph break.
    q, k, v = (torch.randn(1, 2, n, 32, device=DEVICE, requires_grad=True) for n in (40, 24, 24))

    def loss(q, k, v, op_impl):
        return attention(q * 2, k, v, 0.3, impl=op_impl).sin().sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True)
    got = torch.autograd.grad(compiled(q, k, v, "triton"), (q, k, v))
    # Read before the eager reference below, which logs its own (forced) decision.
    assert [r.getMessage() for r in ops_log.records if "attention:" in r.getMessage()] == ["attention: using triton"]
    want = torch.autograd.grad(loss(q, k, v, "reference"), (q, k, v))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_mit_with_triton_attention_matches_reference():
    torch.manual_seed(0)
    ref = mit("b0", drop_path_rate=0.0).to(DEVICE)
    fast = mit("b0", drop_path_rate=0.0).to(DEVICE)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(1, 3, 64, 48, device=DEVICE)
    outs = []
    for m, impl in ((ref, "reference"), (fast, "triton")):  # the model's ops follow the process default
        with using_impl(impl):
            outs.append(m(x))
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    for out in outs:
        sum(o.square().mean() for o in out).backward()
    for (name, p), p_fast in zip(ref.named_parameters(), fast.parameters(), strict=True):
        torch.testing.assert_close(p_fast.grad, p.grad, atol=1e-4, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_auto_runs_sdpa_and_logs_why(monkeypatch, ops_log):
    monkeypatch.setattr(ka, "attention_triton", lambda *a: pytest.fail("auto must not run the kernel"))
    q, k, v = (torch.randn(1, 2, n, 32, device=DEVICE) for n in (10, 5, 5))
    torch.testing.assert_close(attention(q, k, v, 0.5, impl="auto"), F.scaled_dot_product_attention(q, k, v, scale=0.5))
    assert any(
        "attention: using SDPA" in r.getMessage() and "auto uses SDPA" in r.getMessage() for r in ops_log.records
    )


@pytest.mark.parametrize(
    ("dtype", "D", "match"),
    [(torch.float64, 32, "dtypes torch.float64"), (torch.float32, 48, "head dim 48")],
)
def test_forced_triton_rejects_unsupported_inputs(dtype, D, match):
    q = torch.randn(1, 1, 8, D, device=DEVICE, dtype=dtype)
    with pytest.raises(ValueError, match=f"attention: triton implementation cannot run: .*{match}"):
        attention(q, q, q, 1.0, impl="triton")


def test_forced_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.randn(1, 1, 8, 32)
    with pytest.raises(ValueError, match="tensor not on CUDA"):
        attention(q, q, q, 1.0, impl="triton")
    torch.testing.assert_close(attention(q, q, q, 1.0, impl="auto"), attention_ref(q, q, q, 1.0))


@pytest.mark.slow
def test_kill_switch_forces_sdpa_and_blocks_forced_triton():
    code = (
        "import torch; from daformer_fast.ops.attention import attention\n"
        "q = torch.randn(1, 1, 8, 32)\n"
        "attention(q, q, q, 1.0, impl='auto')\n"
        "try:\n    attention(q, q, q, 1.0, impl='triton')\nexcept ValueError as e:\n    print(e)\n"
        "print('triton' in __import__('sys').modules)\n"
    )
    env = dict(os.environ, DAFORMER_FAST_KERNELS="0", TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["attention: triton implementation cannot run: DAFORMER_FAST_KERNELS=0", "False"]
