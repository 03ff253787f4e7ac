"""Fused depthwise 3×3 conv + bias + GELU kernel against `dwconv_gelu_ref`: forward, dx, dweight, dbias; odd shapes,
dtypes, strided input, the public op under torch.compile, the dispatch point and MiT's MixFFN wiring (opcheck of
the registered ops: test_opcheck.py).

Without a GPU these run in the Triton interpreter (tests/conftest.py) at tiny shapes. The kernel has no `tl.dot`,
so the interpreter computes what the GPU computes.
"""

import dataclasses

import pytest
import torch

pytest.importorskip("triton")

import daformer_fast.kernels.mixffn as km  # noqa: E402
from helpers import DEVICE, assert_three_way  # noqa: E402

from daformer_fast.models.mit import MixFFN  # noqa: E402
from daformer_fast.ops import dispatch  # noqa: E402
from daformer_fast.ops.dispatch import kernel_reasons, using_impl  # noqa: E402
from daformer_fast.ops.mixffn import TOLERANCES, dwconv_gelu, dwconv_gelu_ref  # noqa: E402
from daformer_fast.ops.table import OPS  # noqa: E402

# (B, h, w, C): C over two channel blocks with a tail, N = 35 < one token block; a 9×13 map (row wrap inside a
# block); a single row and a single column (every neighbour above/below or left/right is padding); N = 130 over
# three token blocks.
SHAPES = [(2, 5, 7, 70), (1, 9, 13, 32), (1, 1, 6, 8), (1, 6, 1, 8), (1, 10, 13, 16)]


def _inputs(B, h, w, C, dtype, strided=False):
    if strided:  # a (B, N, C) view with a channel stride of 2, as a slice of a wider activation would be
        x = torch.randn(B, h * w, 2 * C, device=DEVICE, dtype=dtype)[..., ::2].detach().requires_grad_()
    else:
        x = torch.randn(B, h * w, C, device=DEVICE, dtype=dtype, requires_grad=True)
    weight = (0.3 * torch.randn(C, 1, 3, 3, device=DEVICE, dtype=dtype)).requires_grad_()
    bias = (0.1 * torch.randn(C, device=DEVICE, dtype=dtype)).requires_grad_()
    return x, weight, bias


def _run(fn, args, h, w, dy):
    y = fn(*args, h, w)
    return [y.detach(), *torch.autograd.grad(y, args, dy)]


def _check(shape, dtype, strided=False):
    B, h, w, C = shape
    args = _inputs(B, h, w, C, dtype, strided)
    dy = torch.randn(B, h * w, C, device=DEVICE, dtype=dtype)
    got = _run(km.dwconv_gelu_triton, args, h, w, dy)
    args32 = [t.detach().float().requires_grad_() for t in args]
    want = _run(dwconv_gelu_ref, args32, h, w, dy.float())
    names = ["forward", "dx", "dweight", "dbias"]
    for name, g, like in zip(names, got, [dy, *args], strict=True):
        assert g.dtype == dtype and g.shape == like.shape, name
    if dtype == torch.float32:
        tol = TOLERANCES[dtype]
        for name, g, r in zip(names, got, want, strict=True):
            atol, rtol = tol["dweight" if name == "dbias" else name]
            torch.testing.assert_close(g, r, atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")
        return
    # The kernel computes in fp32 and rounds once on store: the floor is one rounding step of the largest values.
    assert_three_way(names, got, want, _run(dwconv_gelu_ref, args, h, w, dy), rel_floor=2.0**-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-h{}-w{}-C{}".format(*s))
def test_matches_reference(shape, dtype):
    _check(shape, dtype)


def test_fp16_and_strided_input():
    _check((2, 4, 5, 24), torch.float16, strided=True)


def test_partial_sums_over_several_token_chunks(monkeypatch):
    # On a GPU the dz/dw kernel splits tokens into chunks and adds per-chunk partials; force that here:
    # N = 130 → three blocks → chunks of 2 and 1 blocks, for each of two batch items.
    monkeypatch.setattr(km, "_TARGET_DZ_PROGRAMS", 2)
    _check((2, 10, 13, 16), torch.float32)


def test_reference_equals_original_module_path():
    # MixFFN now calls the op; its reference path must give the same values as the original nn.Conv2d + nn.GELU.
    mlp = MixFFN(8, 32).to(DEVICE)
    x = torch.randn(2, 6 * 5, 32, device=DEVICE)
    conv = mlp.dwconv.dwconv
    original = torch.nn.GELU()(conv(x.transpose(1, 2).reshape(2, 32, 6, 5)).flatten(2).transpose(1, 2))
    assert torch.equal(dwconv_gelu_ref(x, conv.weight, conv.bias, 6, 5), original)


def test_mixffn_module_triton_matches_reference():
    ref = MixFFN(8, 32).to(DEVICE)
    fast = MixFFN(8, 32).to(DEVICE)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(1, 7 * 9, 8, device=DEVICE)
    out = []
    for m, impl in ((ref, "reference"), (fast, "triton")):  # the modules' ops follow the process default
        with using_impl(impl):
            out.append(m(x, 7, 9))
    torch.testing.assert_close(out[1], out[0], atol=1e-5, rtol=1e-5)
    for o in out:
        o.square().sum().backward()
    for (name, p), p_fast in zip(ref.named_parameters(), fast.parameters(), strict=True):
        torch.testing.assert_close(p_fast.grad, p.grad, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.slow
def test_compile_public_op_fullgraph():
    args = _inputs(1, 4, 6, 16, torch.float32)

    def loss(x, weight, bias, op_impl):
        return dwconv_gelu(x * 2, weight, bias, 4, 6, impl=op_impl).sin().sum()

    torch._dynamo.reset()
    got = torch.autograd.grad(torch.compile(loss, fullgraph=True)(*args, "triton"), args)
    want = torch.autograd.grad(loss(*args, "reference"), args)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


def test_auto_on_cpu_uses_reference_and_logs_why(monkeypatch, ops_log):
    monkeypatch.setattr(km, "dwconv_gelu_triton", lambda *a: pytest.fail("auto must not run the kernel on CPU"))
    x, weight, bias = _inputs(1, 3, 3, 4, torch.float32)
    x = x.cpu()
    torch.testing.assert_close(
        dwconv_gelu(x, weight.cpu(), bias.cpu(), 3, 3, impl="auto"), dwconv_gelu_ref(x, weight.cpu(), bias.cpu(), 3, 3)
    )
    msgs = [r.getMessage() for r in ops_log.records if r.getMessage().startswith("dwconv_gelu:")]
    assert msgs == ["dwconv_gelu: using reference (tensor not on CUDA; auto uses the reference until a GPU measurement "
                    "shows the kernel faster)"]  # fmt: skip


def test_auto_keeps_reference_until_measured(monkeypatch, ops_log):
    """Even where the kernel could run, `auto` takes the reference while the op table's `auto_uses_kernel` is off."""
    monkeypatch.setattr(dispatch, "device_reasons", lambda tensors, impl: [])  # as if the tensors were on CUDA
    monkeypatch.setattr(km, "dwconv_gelu_triton", lambda *a: pytest.fail("auto must not run the kernel yet"))
    x, weight, bias = _inputs(1, 3, 3, 4, torch.float32)
    dwconv_gelu(x.cpu(), weight.cpu(), bias.cpu(), 3, 3, impl="auto")
    monkeypatch.setitem(OPS, "dwconv_gelu", dataclasses.replace(OPS["dwconv_gelu"], auto_uses_kernel=True))
    monkeypatch.setattr(km, "dwconv_gelu_triton", lambda *a: "kernel")
    assert dwconv_gelu(x.cpu(), weight.cpu(), bias.cpu(), 3, 3, impl="auto") == "kernel"


def test_forced_triton_rejects_unsupported_inputs(monkeypatch):
    x, weight, bias = (t.detach() for t in _inputs(1, 3, 3, 4, torch.float32))
    with pytest.raises(ValueError, match=r"dwconv_gelu: triton implementation cannot run: .*h·w 12"):
        dwconv_gelu(x, weight, bias, 3, 4, impl="triton")
    with pytest.raises(ValueError, match="dtypes torch.float64"):
        dwconv_gelu(x.double(), weight, bias, 3, 3, impl="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert kernel_reasons("dwconv_gelu", "triton", x.cpu(), weight.cpu(), bias.cpu(), 3, 3) == ["tensor not on CUDA"]
    monkeypatch.setattr(dispatch, "triton_available", lambda: (False, "DAFORMER_FAST_KERNELS=0"))
    with pytest.raises(ValueError, match="DAFORMER_FAST_KERNELS=0"):
        dwconv_gelu(x, weight, bias, 3, 3, impl="triton")
