"""Fused pseudo-label kernel against `pseudo_label_argmax_ref`: labels and confident counts over odd shapes, upsample
ratios and dtypes, the inclusive threshold and first-index ties, the public op under torch.compile, the dispatch
point and the UDA stage built on it (opcheck of the registered op: test_opcheck.py).

Without a GPU these run in the Triton interpreter (tests/conftest.py) at tiny shapes; on a GPU the `gpu` test also
runs the model's shape (B = 2, K = 19, 128² → 512²).
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

import daformer_fast.kernels.pseudo_label as kpl  # noqa: E402
from helpers import DEVICE  # noqa: E402

from daformer_fast.ops import dispatch  # noqa: E402
from daformer_fast.ops.pseudo_label import TOLERANCES, pseudo_label_argmax, pseudo_label_argmax_ref  # noqa: E402
from daformer_fast.uda.pseudo_label import pseudo_label  # noqa: E402

# (B, K, h, w, H, W): non-integer ratios with a pixel count not a multiple of the 128-pixel block (2·260 pixels);
# no resize; the model's 4× with 16 classes; downsampling; a one-row logit map (both corners of every pixel are
# row 0).
SHAPES = [(2, 19, 7, 5, 20, 13), (1, 19, 6, 6, 6, 6), (1, 16, 5, 7, 20, 28), (1, 19, 13, 9, 7, 5), (1, 3, 1, 4, 5, 9)]


def _check(logits, size, threshold):
    """Kernel against the reference on the same logits; only near-ties and near-threshold pixels may differ."""
    tol = TOLERANCES[logits.dtype]
    label, count = kpl.pseudo_label_triton(logits, size, threshold)
    label_ref, count_ref = pseudo_label_argmax_ref(logits, size, threshold)
    assert label.dtype == torch.int64 and label.shape == label_ref.shape and count.shape == ()
    # The reference's own probabilities, to find the pixels where a last-bit difference may decide.
    up = (
        logits
        if tuple(logits.shape[-2:]) == tuple(size)
        else F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    )
    top2 = torch.softmax(up.float(), dim=1).topk(min(2, logits.shape[1]), dim=1).values
    near_tie = (top2[:, 0] - top2[:, -1] < tol["tie_gap"]) if logits.shape[1] > 1 else torch.zeros_like(label_ref) > 0
    assert near_tie.float().mean() < 0.25, "too many near-ties for a meaningful comparison"
    bad = (label != label_ref) & ~near_tie
    assert not bad.any(), f"{int(bad.sum())} labels differ outside near-ties, first at {bad.nonzero()[0].tolist()}"
    ulp = torch.finfo(torch.float32).eps * threshold
    near_threshold = ((top2[:, 0] - threshold).abs() <= tol["threshold_ulps"] * ulp).sum()
    assert abs(int(count) - int(count_ref)) <= int(near_threshold), (int(count), int(count_ref), int(near_threshold))
    return label, count


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-K{}-{}x{}-to-{}x{}".format(*s))
def test_matches_reference(shape, dtype):
    B, K, h, w, H, W = shape
    logits = (3 * torch.randn(B, K, h, w, device=DEVICE)).to(dtype)
    # A threshold that splits the pixels, so that the count is tested, not just 0 or B·H·W.
    _, count = _check(logits, (H, W), 0.5)
    assert 0 < int(count) < B * H * W


def test_fp16_and_strided_logits():
    # Channels-last logits (the layout a conv head may hand over): the kernel reads any strides.
    logits = (4 * torch.randn(2, 10, 6, 5, device=DEVICE)).half().to(memory_format=torch.channels_last)
    _check(logits, (17, 11), 0.6)


def test_inclusive_threshold_and_first_index_ties():
    # Exact probabilities: n tied maxima and the other classes at −1e4 (exp underflows to 0) give 1/n exactly.
    # Pixel kinds: one clear winner (p = 1), a two-way tie (p = 0.5, classes 1 and 3), a three-way tie (p = 1/3).
    K, H, W = 5, 4, 6
    logits = torch.full((1, K, H, W), -1e4, device=DEVICE)
    kind = torch.arange(H * W, device=DEVICE).view(H, W) % 3
    logits[0, 2][kind == 0] = 1.0
    logits[0, 1][kind == 1] = logits[0, 3][kind == 1] = 0.5
    for k in (0, 2, 4):
        logits[0, k][kind == 2] = -0.25
    for dtype in (torch.float32, torch.bfloat16):
        x = logits.to(dtype)
        label, count = kpl.pseudo_label_triton(x, (H, W), 0.5)
        want = torch.tensor([2, 1, 0], device=DEVICE)[kind]  # the first of the tied classes, as torch.max picks
        assert torch.equal(label[0], want)
        assert int(count) == int((kind != 2).sum())  # p = 0.5 counts at threshold 0.5: the test is ≥
        label_ref, count_ref = pseudo_label_argmax_ref(x, (H, W), 0.5)
        assert torch.equal(label, label_ref) and int(count) == int(count_ref)
        above = torch.nextafter(torch.tensor(0.5), torch.tensor(1.0)).item()
        assert int(kpl.pseudo_label_triton(x, (H, W), above)[1]) == int((kind == 0).sum())
        assert int(kpl.pseudo_label_triton(x, (H, W), 1.0)[1]) == int((kind == 0).sum())


def test_confident_count_sums_over_programs_and_images():
    # 2 images × 3 programs of 128 pixels; every pixel confident: the partial counts must add up exactly.
    logits = torch.zeros(2, 4, 5, 5, device=DEVICE)
    logits[:, 1] = 30.0
    label, count = kpl.pseudo_label_triton(logits, (17, 19), 0.968)
    assert int(count) == 2 * 17 * 19 and bool((label == 1).all())


def test_uda_stage_same_with_either_implementation():
    logits = 3 * torch.randn(2, 19, 6, 6, device=DEVICE)
    ref = pseudo_label(logits, (22, 22), 0.7, 3, 5, impl="reference")
    fast = pseudo_label(logits, (22, 22), 0.7, 3, 5, impl="triton")
    assert torch.equal(fast[0], ref[0]) and torch.equal(fast[1], ref[1])
    assert fast[1].dtype == torch.float32 and fast[1].is_contiguous()


@pytest.mark.slow
def test_compile_public_op_fullgraph():
    logits = 3 * torch.randn(1, 19, 4, 5, device=DEVICE)

    def f(x, op_impl):
        label, count = pseudo_label_argmax(x * 2, (9, 11), 0.6, impl=op_impl)
        return label + 1, count

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(logits, "triton")
    want = f(logits, "reference")
    assert torch.equal(got[0], want[0]) and int(got[1]) == int(want[1])


def test_auto_on_cpu_uses_reference_and_logs_why(monkeypatch, ops_log):
    monkeypatch.setattr(kpl, "pseudo_label_triton", lambda *a: pytest.fail("auto must not run the kernel"))
    logits = torch.randn(1, 4, 3, 3)
    got = pseudo_label_argmax(logits, (5, 5), 0.5, impl="auto")
    want = pseudo_label_argmax_ref(logits, (5, 5), 0.5)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    msgs = [r.getMessage() for r in ops_log.records if r.getMessage().startswith("pseudo_label:")]
    assert len(msgs) == 1 and "using reference" in msgs[0] and "auto uses the reference" in msgs[0]
    if not torch.cuda.is_available():
        assert "tensor not on CUDA" in msgs[0]


def test_default_impl_reaches_the_kernel(monkeypatch):
    calls = []
    monkeypatch.setattr(kpl, "pseudo_label_triton", lambda *a: calls.append(a) or pseudo_label_argmax_ref(*a))
    monkeypatch.setattr(dispatch, "_default_impl", "triton")
    pseudo_label(torch.randn(1, 3, 2, 2, device=DEVICE), (4, 4), 0.5, 1, 1)
    assert len(calls) == 1


def test_forced_triton_rejects_unsupported_inputs(monkeypatch):
    with pytest.raises(ValueError, match=r"pseudo_label: triton implementation cannot run: .*dtype torch.float64"):
        pseudo_label_argmax(torch.randn(1, 3, 2, 2, device=DEVICE, dtype=torch.float64), (4, 4), 0.5, impl="triton")
    with pytest.raises(ValueError, match=r"K ≤ 128"):
        pseudo_label_argmax(torch.randn(1, 129, 2, 2, device=DEVICE), (4, 4), 0.5, impl="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="tensor not on CUDA"):
        pseudo_label_argmax(torch.randn(1, 3, 2, 2), (4, 4), 0.5, impl="triton")


@pytest.mark.slow
def test_kill_switch_keeps_reference_and_blocks_forced_triton():
    code = (
        "import sys, torch; from daformer_fast.ops import pseudo_label_argmax, seg_ce\n"
        "x = torch.randn(1, 3, 2, 2); y = torch.zeros(1, 4, 4, dtype=torch.long)\n"
        "pseudo_label_argmax(x, (4, 4), 0.5, impl='auto'); seg_ce(x, y, impl='auto')\n"
        "for f in (lambda: pseudo_label_argmax(x, (4, 4), 0.5, impl='triton'), lambda: seg_ce(x, y, impl='triton')):\n"
        "    try:\n        f()\n    except ValueError as e:\n        print(e)\n"
        "print('triton' in sys.modules)\n"
    )
    env = dict(os.environ, DAFORMER_FAST_KERNELS="0", TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == [
        "pseudo_label: triton implementation cannot run: DAFORMER_FAST_KERNELS=0",
        "seg_ce: triton implementation cannot run: DAFORMER_FAST_KERNELS=0",
        "False",
    ]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_model_shape_on_gpu(dtype):
    logits = (4 * torch.randn(2, 19, 128, 128, device="cuda")).to(dtype)
    _check(logits, (512, 512), 0.968)
    torch.cuda.set_sync_debug_mode("error")  # the kernel path must not read anything back to the host
    try:
        kpl.pseudo_label_triton(logits, (512, 512), 0.968)
    finally:
        torch.cuda.set_sync_debug_mode(0)
