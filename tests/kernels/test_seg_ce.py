"""Fused upsample + weighted cross-entropy kernel against `seg_ce_ref`: loss and the logits' gradient over odd
shapes, upsample ratios (up, down, none), weights, ignored pixels and dtypes; determinism of the gather backward;
the public op under torch.compile, the dispatch point and the UDA loss built on it (opcheck of the registered
ops: test_opcheck.py).

Without a GPU these run in the Triton interpreter (tests/conftest.py) at tiny shapes; on a GPU the `gpu` test also
runs the model's shape (B = 2, K = 19, 128² → 512²).
"""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

import daformer_fast.kernels.seg_ce as kce  # noqa: E402
from helpers import DEVICE  # noqa: E402

from daformer_fast.ops import dispatch  # noqa: E402
from daformer_fast.ops.seg_ce import TOLERANCES, seg_ce, seg_ce_ref  # noqa: E402
from daformer_fast.uda.losses import seg_ce_loss  # noqa: E402
BILINEAR = {"mode": "bilinear", "align_corners": False}

# (B, K, h, w, H, W): non-integer ratios over several pixel blocks; no resize; the model's 4× with 16 classes;
# downsampling (logit pixels no label pixel samples get zero gradient); a one-row logit map.
SHAPES = [(2, 19, 7, 5, 20, 13), (1, 19, 6, 6, 6, 6), (1, 16, 5, 7, 20, 28), (1, 19, 13, 9, 7, 5), (1, 3, 1, 4, 5, 9)]


def _inputs(B, K, h, w, H, W, dtype, weighted, ignored=0.1):
    logits = (3 * torch.randn(B, K, h, w, device=DEVICE)).to(dtype).requires_grad_()
    labels = torch.randint(0, K, (B, H, W), device=DEVICE)
    labels[torch.rand(B, H, W, device=DEVICE) < ignored] = 255
    weight = torch.rand(B, H, W, device=DEVICE) if weighted else None
    return logits, labels, weight


def _exact(logits, labels, weight, ignore_index=255):
    """Loss and gradient of the computation the kernel implements, in fp64 after the reference's dtype rounding.

    Forward: the reference under autocast (F.interpolate in the logits' dtype, cross-entropy in fp32). Gradient:
    the fp64 upsample adjoint of the fp64 CE gradient at those rounded logits (rounding passes gradients through).
    """
    size = labels.shape[-2:]
    with torch.no_grad():
        up = logits if tuple(logits.shape[-2:]) == tuple(size) else F.interpolate(logits, size=tuple(size), **BILINEAR)
    up64 = up.double().requires_grad_()
    loss = seg_ce_ref(up64, labels, None if weight is None else weight.double(), ignore_index)
    (g_up,) = torch.autograd.grad(loss, up64)
    x64 = logits.detach().double().requires_grad_()
    up_x = x64 if tuple(x64.shape[-2:]) == tuple(size) else F.interpolate(x64, size=tuple(size), **BILINEAR)
    (grad,) = torch.autograd.grad(up_x, x64, g_up)
    return loss.detach(), grad


def _check(logits, labels, weight, ignore_index=255):
    loss = kce.seg_ce_triton(logits, labels, weight, ignore_index)
    (grad,) = torch.autograd.grad(loss, logits)
    assert loss.dtype == torch.float32 and loss.shape == () and grad.dtype == logits.dtype
    loss_want, grad_want = _exact(logits, labels, weight, ignore_index)
    tol = TOLERANCES[logits.dtype]
    atol, rtol = tol["loss"]
    torch.testing.assert_close(loss.double(), loss_want, atol=max(atol, 1e-6), rtol=max(rtol, 1e-5))
    atol, rtol = tol["dlogits"]
    # Relative to the largest gradient: one rounding of the stored gradient (bf16/fp16) or fp32 summation order.
    scale = grad_want.abs().max().item()
    torch.testing.assert_close(grad.double(), grad_want, atol=atol + rtol * scale, rtol=0.0)
    if logits.dtype == torch.float32:  # and the reference itself, on the same inputs, to its own tolerance
        ref_logits = logits.detach().requires_grad_()
        ref = seg_ce_ref(ref_logits, labels, weight, ignore_index)
        torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(grad, torch.autograd.grad(ref, ref_logits)[0], atol=1e-7 + 1e-4 * scale, rtol=0)
    return loss, grad


# Each shape in both dtypes; the weight given in fp32 and absent in bf16 (the interpreter is slow enough that the
# full cross product would cost more than it adds: the weight is one multiply per pixel in both passes).
@pytest.mark.parametrize(("dtype", "weighted"), [(torch.float32, True), (torch.bfloat16, False)],
                         ids=["fp32-weighted", "bf16"])  # fmt: skip
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-K{}-{}x{}-to-{}x{}".format(*s))
def test_matches_reference(shape, dtype, weighted):
    _check(*_inputs(*shape, dtype, weighted))


def test_bf16_matches_the_autocast_reference():
    # The trainer's bf16 path: the reference under autocast interpolates in bf16 and takes the CE in fp32.
    logits, labels, weight = _inputs(2, 19, 7, 5, 20, 13, torch.bfloat16, weighted=True)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        want = seg_ce_ref(logits, labels, weight)
        got = seg_ce(logits, labels, weight, impl="triton")
    assert want.dtype == got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)


def test_fp16_strided_logits_and_other_ignore_index():
    logits, labels, weight = _inputs(2, 10, 6, 5, 13, 17, torch.float16, weighted=True)
    logits = logits.detach().to(memory_format=torch.channels_last).requires_grad_()
    labels[labels == 255] = -1
    _check(logits, labels, weight, ignore_index=-1)


def test_all_ignored_and_single_valid_pixel():
    logits, labels, weight = _inputs(1, 19, 4, 4, 11, 10, torch.float32, weighted=True)
    labels.fill_(255)
    loss, grad = _check(logits, labels, weight)
    assert loss.item() == 0.0 and not grad.any()
    labels[0, 7, 6] = 4
    loss, grad = _check(logits, labels, None)
    # One pixel feeds at most its 2×2 corners, each with all classes; every other logit gets exactly 0.
    assert 0 < int((grad.abs().sum(1) > 0).sum()) <= 4


@pytest.mark.parametrize("bad", [19, -1])
def test_label_outside_the_classes_fails_like_the_reference(bad):
    logits, labels, _ = _inputs(1, 19, 3, 3, 6, 6, torch.float32, weighted=False)
    labels[0, 2, 3] = bad
    with pytest.raises((IndexError, RuntimeError)):
        seg_ce_ref(logits, labels)
    with pytest.raises(RuntimeError, match=r"outside \[0, 19\) and is not ignore_index 255"):
        kce.seg_ce_triton(logits, labels, None, 255)


def test_zero_weight_rows_give_zero_gradient_from_them():
    # The pseudo-label crop: rows with weight 0 contribute neither loss nor gradient.
    logits, labels, _ = _inputs(1, 5, 4, 4, 16, 16, torch.float32, weighted=False, ignored=0.0)
    weight = torch.ones(1, 16, 16, device=DEVICE)
    weight[:, :8] = 0.0
    _, grad = _check(logits, labels, weight)
    assert not grad[:, :, 0].any() and grad[:, :, 3].any()  # logit row 0 only feeds label rows 0..5


def test_backward_is_deterministic():
    logits, labels, weight = _inputs(2, 19, 4, 3, 10, 7, torch.float32, weighted=True)
    grads = [torch.autograd.grad(kce.seg_ce_triton(logits, labels, weight, 255), logits)[0] for _ in range(2)]
    assert torch.equal(grads[0], grads[1])


def test_uda_loss_same_with_either_implementation():
    logits, labels, weight = _inputs(2, 19, 4, 4, 16, 16, torch.float32, weighted=True)
    losses = [seg_ce_loss(logits, labels, weight, impl=impl) for impl in ("reference", "triton")]
    torch.testing.assert_close(losses[1], losses[0], atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_compile_public_op_fullgraph(ops_log):
    # The dispatch decision must be logged from inside the trace without a graph break.
    logits, labels, weight = _inputs(1, 19, 4, 5, 9, 11, torch.float32, weighted=True)

    def f(x, op_impl):
        return seg_ce(x * 2, labels, weight, impl=op_impl) * 3

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(logits, "triton")
    # Read before the eager reference below, which logs its own (forced) decision.
    assert [r.getMessage() for r in ops_log.records if r.getMessage().startswith("seg_ce:")] == ["seg_ce: using triton"]
    want = f(logits, "reference")
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    g_got, g_want = (torch.autograd.grad(v, logits)[0] for v in (got, want))
    torch.testing.assert_close(g_got, g_want, atol=1e-7, rtol=1e-4)


def test_auto_on_cpu_uses_reference_and_logs_why(monkeypatch, ops_log):
    monkeypatch.setattr(kce, "seg_ce_triton", lambda *a: pytest.fail("auto must not run the kernel"))
    logits, labels, _ = _inputs(1, 4, 3, 3, 5, 5, torch.float32, weighted=False)
    torch.testing.assert_close(seg_ce(logits, labels, impl="auto"), seg_ce_ref(logits, labels))
    msgs = [r.getMessage() for r in ops_log.records if r.getMessage().startswith("seg_ce:")]
    assert len(msgs) == 1 and "using reference" in msgs[0] and "auto uses the reference" in msgs[0]
    if not torch.cuda.is_available():
        assert "tensor not on CUDA" in msgs[0]


def test_default_impl_reaches_the_kernel(monkeypatch):
    calls = []
    monkeypatch.setattr(kce, "seg_ce_triton", lambda *a: calls.append(a) or seg_ce_ref(*a))
    monkeypatch.setattr(dispatch, "_default_impl", "triton")
    seg_ce_loss(*_inputs(1, 3, 2, 2, 4, 4, torch.float32, weighted=True))
    assert len(calls) == 1


def test_forced_triton_rejects_unsupported_inputs(monkeypatch):
    logits, labels, weight = _inputs(1, 3, 2, 2, 4, 4, torch.float32, weighted=True)
    cases = [
        ((logits.double(), labels, None), "logits dtype torch.float64"),
        ((logits, labels.float(), None), "labels dtype torch.float32"),
        ((logits, labels, weight[:, :2]), r"weight torch.float32 \(1, 2, 4\)"),
        ((logits, labels, weight.requires_grad_()), "weight requires grad"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=f"seg_ce: triton implementation cannot run: .*{match}"):
            seg_ce(*args, impl="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="tensor not on CUDA"):
        seg_ce(logits.cpu(), labels.cpu(), impl="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_model_shape_on_gpu(dtype):
    logits, labels, weight = _inputs(2, 19, 128, 128, 512, 512, dtype, weighted=True)
    _check(logits, labels, weight)
    torch.cuda.set_sync_debug_mode("error")  # forward and backward must not read anything back to the host
    try:
        torch.autograd.grad(kce.seg_ce_triton(logits, labels, weight, 255), logits)
    finally:
        torch.cuda.set_sync_debug_mode(0)
