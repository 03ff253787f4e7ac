"""The whole UDA step: fast path against the original-order path, the NaN guard, baselines and reproducibility.

Runs on CUDA when a GPU is present (`DAFORMER_TEST_DEVICE=cpu|cuda` overrides); `train.precision: fp32` turns TF32
off (`build.set_fp32_precision`), so the 1e-5 parity tolerances mean the same as on CPU.
"""

import os

import pytest
import torch

from daformer_fast.config import parse_config
from daformer_fast.models import build_segmentor
from daformer_fast.build import build_training
from daformer_fast.step import step_seed
from conftest import gradient_difference  # tests/ is on sys.path under pytest (no __init__.py)

B, H, W = 2, 64, 64
DEVICE = torch.device(os.environ.get("DAFORMER_TEST_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))


def _cfg(path="fast", mode="dacs", kernels="auto", colour=True, **train):
    # colour=False: no colour jitter and no blur, so both paths mix bit-identical images.
    off = {} if colour else {"color_jitter_probability": 0.0, "blur": False}
    return parse_config({
        "model": {"backbone": "mit_b0", "pretrained": None},
        "kernels": {"impl": kernels},
        # A low threshold so that a random teacher yields a non-zero pseudo-label weight; PL crop scaled to 64 rows.
        "uda": {"mode": mode, "pseudo_threshold": 0.06,
                "pseudo_weight_ignore_top": 2, "pseudo_weight_ignore_bottom": 8, **off},
        "train": {"max_iters": 4000, "path": path, **train},
    })  # fmt: skip


def _batch(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # 32-pixel label blocks, so the 1/32 FD grid has pure thing-class cells (classes 11..18) and stuff cells.
    gt = torch.randint(0, 19, (B, H // 32, W // 32), generator=g)
    gt[0, 0, 0], gt[1, 1, 1] = 13, 11
    gt = gt.repeat_interleave(32, 1).repeat_interleave(32, 2)
    gt[0, :5] = 255
    return {
        "img": torch.randint(0, 256, (B, 3, H, W), generator=g, dtype=torch.uint8),
        "target_img": torch.randint(0, 256, (B, 3, H, W), generator=g, dtype=torch.uint8),
        "gt": gt,
    }


@pytest.fixture(scope="module")
def base_model():
    torch.manual_seed(0)
    return build_segmentor(_cfg().model)


def _run(cfg, model, ts, batches, debug=False):
    _, step, _ = build_training(cfg, DEVICE, initial_state=model.state_dict())
    outs = [step(b, t, debug=debug) for t, b in zip(ts, batches)]
    return step, outs


@pytest.mark.parametrize("colour", [True, False], ids=["colour", "no-colour"])
@pytest.mark.parametrize("t", [0, 1600], ids=["warmup-start", "after-warmup"])
def test_fast_equals_original(base_model, t, colour):
    """One step of both paths from the same state, seed and batch, both with the plain-PyTorch ops: the step's own
    composition (batched stages, fused backward, fused AdamW) against the original's order."""
    ts, batches = [t], [_batch(1)]
    ref, ref_out = _run(_cfg("original", colour=colour), base_model, ts, batches, debug=True)
    fast, fast_out = _run(_cfg("fast", kernels="reference", colour=colour), base_model, ts, batches, debug=True)
    for r, f in zip(ref_out, fast_out):
        assert set(r) == set(f)
        for k in r.keys() - {"debug"}:
            torch.testing.assert_close(f[k].float(), r[k].float(), rtol=1e-5, atol=1e-7, msg=k)
    # Every term is active, so the comparison covers each stage.
    assert ref_out[0]["loss_fd"] > 0 and ref_out[0]["pseudo_weight"] > 0 and ref_out[0]["loss_mix"] > 0
    mixed_ref, mixed_fast = ref_out[0]["debug"]["mixed_img"], fast_out[0]["debug"]["mixed_img"]
    if not colour:
        assert torch.equal(mixed_fast, mixed_ref)
        # The gradients agree to 1e-5 of each tensor's scale (fused vs separate backward passes only change the
        # summation order).
        for (name, a), (_, b) in zip(ref.student.named_parameters(), fast.student.named_parameters()):
            assert (a.grad - b.grad).abs().max() <= 1e-5 * a.grad.abs().max(), name
    else:
        # The batched jitter and blur against the per-sample ones: a few 1e-7 apart where the draws switch them
        # on. This random network is steep enough to turn that into gradient differences of up to a few percent
        # of a tensor's largest gradient at t = 0 (an AVX2 CPU; with the same mixed image, 1e-6 as above), so the
        # whole gradient is compared here; a wrong jitter factor or blur σ is orders of magnitude above the bound.
        torch.testing.assert_close(mixed_fast, mixed_ref, rtol=0, atol=1e-6)
        assert gradient_difference(ref.student, fast.student) <= 2e-3
    # Weights: 1e-5 relative, plus 2% of one lr step. Adam's first update is lr·g/(|g| + eps), so the ~1e-10
    # rounding differences of gradients near zero move a weight by up to ~1% of lr (a property of Adam, the same
    # between two runs of the reference with another summation order); with the colour ops' larger gradient
    # differences a near-zero gradient can change sign: up to two lr steps.
    lr = max(g["lr"] for g in ref.optimizer.param_groups)
    for (name, a), (_, b) in zip(ref.student.named_parameters(), fast.student.named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=(2.0 if colour else 0.02) * lr, msg=name)
    for (name, a), (_, b) in zip(ref.teacher.state_dict().items(), fast.teacher.state_dict().items()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-8, msg=name)


def test_gradient_sums_equal_autograd_accumulation(base_model):
    """The fast step sums each backward pass's gradients into the held ones in one list (`UDAStep._backward`);
    autograd's per-parameter accumulation, which runs when a wrapper (DDP) drives the student, must give the same
    gradients and weights bit for bit, over two iterations of two backward passes each."""
    ts, batches = [1600, 1601], [_batch(1), _batch(2)]
    listed, _ = _run(_cfg("fast"), base_model, ts, batches)
    _, wrapped, _ = build_training(_cfg("fast"), DEVICE, initial_state=base_model.state_dict())
    wrapped.student_fwd = lambda *args, **kwargs: wrapped.student(*args, **kwargs)
    for t, b in zip(ts, batches):
        wrapped(b, t)
    for (name, a), (_, b) in zip(listed.student.named_parameters(), wrapped.student.named_parameters()):
        assert torch.equal(a.grad, b.grad) and torch.equal(a, b), name
        # held in the parameter's layout, as autograd keeps them (the fused AdamW reads both as flat memory)
        assert all(n == 1 or sa == sp for n, sa, sp in zip(a.shape, a.grad.stride(), a.stride())), name


def test_gradient_sums_keep_no_tensor_twice():
    """The backward of w1 + w2 hands both parameters one tensor: kept twice, the next pass would add its gradient
    into that memory twice. Each parameter must end with its own gradient, equal to autograd's accumulation."""
    from types import SimpleNamespace

    from daformer_fast.step import UDAStep

    x = torch.randn(3)
    sums = {}
    for how in ("listed", "autograd"):
        torch.manual_seed(0)
        w1, w2 = torch.randn(3, requires_grad=True), torch.randn(3, requires_grad=True)
        net = torch.nn.Module()
        stub = SimpleNamespace(original=how == "autograd", student=net, student_fwd=net, grad_params=[w1, w2])
        for scale in (1.0, 2.0):  # two backward passes
            UDAStep._backward(stub, (scale * x * (w1 + w2)).sum())
        sums[how] = (w1.grad, w2.grad)
    (a1, a2), (b1, b2) = sums["listed"], sums["autograd"]
    assert a1.data_ptr() != a2.data_ptr()
    torch.testing.assert_close(a1, 3 * x, rtol=0, atol=0)
    assert torch.equal(a1, b1) and torch.equal(a2, b2)


def test_fast_with_auto_ops_close_to_original(base_model):
    """The live fast step (`kernels.impl: auto`: SDPA attention, whose online softmax sums in another order) against
    the original path with the materialising attention."""
    ref, ref_out = _run(_cfg("original"), base_model, [1600], [_batch(1)])
    fast, fast_out = _run(_cfg("fast"), base_model, [1600], [_batch(1)])
    for k in ref_out[0]:
        torch.testing.assert_close(fast_out[0][k].float(), ref_out[0][k].float(), rtol=1e-5, atol=1e-7, msg=k)
    # SDPA and the materialising attention differ by ~1e-7 per call; this random network is steep enough to turn
    # that into gradient differences whose size depends on the CPU's kernels (up to ~1e-2 of a tensor's largest
    # gradient on an AVX2 machine, below 1e-4 on an AVX-512 one), so the whole gradient is compared: a missing or
    # mis-scaled term is orders of magnitude above this bound.
    rel = gradient_difference(ref.student, fast.student)
    assert rel <= 1e-3, rel


def test_paths_stay_together_over_steps(base_model):
    batches = [_batch(10 + i) for i in range(3)]
    _, ref_out = _run(_cfg("original"), base_model, [1600, 1601, 1602], batches)
    _, fast_out = _run(_cfg("fast"), base_model, [1600, 1601, 1602], batches)
    for r, f in zip(ref_out, fast_out):
        for k in r:
            torch.testing.assert_close(f[k].float(), r[k].float(), rtol=1e-3, atol=1e-6, msg=k)


def test_step_changes_weights_and_follows_lr(base_model):
    cfg = _cfg()
    step, _ = _run(cfg, base_model, [1600], [_batch(3)])
    lrs = {g["name"]: g["lr"] for g in step.optimizer.param_groups}
    assert lrs["backbone"] == pytest.approx(6e-5 * (1 - 1600 / 4000))
    assert lrs["head"] == pytest.approx(10 * lrs["backbone"])
    moved = [not torch.equal(a, b.cpu()) for a, b in zip(base_model.parameters(), step.student.parameters())]
    assert all(moved)
    # The teacher was copied at construction and EMA-updated at t=1600 before the student moved: still the init.
    for a, b in zip(base_model.parameters(), step.teacher.parameters()):
        torch.testing.assert_close(b.cpu(), a)


def test_same_seed_same_step_bitwise(base_model):
    _, a = _run(_cfg(), base_model, [5], [_batch(4)])
    _, b = _run(_cfg(), base_model, [5], [_batch(4)])
    if DEVICE.type == "cpu":
        assert all(torch.equal(a[0][k], b[0][k]) for k in a[0])
    else:  # CUDA does not promise bitwise repeatability (cuDNN algorithm choice, atomics): equal to rounding
        for k in a[0]:
            torch.testing.assert_close(a[0][k], b[0][k], rtol=1e-5, atol=1e-7, msg=k)
    _, c = _run(_cfg(seed=1), base_model, [5], [_batch(4)])
    assert not torch.equal(a[0]["loss_mix"], c[0]["loss_mix"])  # other seed: other dropout/mix draws


def test_step_seed_differs_by_rank_and_step():
    seeds = {step_seed(0, r, t) for r in range(3) for t in range(50)}
    assert len(seeds) == 150


@pytest.mark.parametrize("path", ["fast", "original"])
def test_non_finite_loss_skips_update(base_model, path):
    cfg = _cfg(path)
    batch = _batch(5)
    batch["img"] = batch["img"].clone()
    step, _ = _run(cfg, base_model, [], [])
    before = [p.detach().clone() for p in step.student.parameters()]
    # A NaN weight in the classifier makes every loss non-finite.
    with torch.no_grad():
        step.student.decode_head.conv_seg.weight[0, 0] = float("nan")
    out = step(batch, 1600)
    assert out["skipped"] == 1
    for p0, p in zip(before, step.student.parameters()):
        torch.testing.assert_close(p[p == p], p0[p == p])  # nothing but the injected NaN differs
    state = step.optimizer.state
    assert all(float(s["step"]) == 0 for s in state.values())  # the skipped update is not counted either


@pytest.mark.parametrize("path", ["fast", "original"])
def test_overflowing_gradient_skips_update(base_model, path):
    """A finite gradient whose square overflows fp32 would leave AdamW's exp_avg_sq at inf: skipped instead."""
    step, _ = _run(_cfg(path), base_model, [], [])
    params = list(step.student.parameters())
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.full_like(p, 1e-3)
    params[3].grad.view(-1)[0] = 1e20  # finite, but 1e40 is not
    assert step._optimizer_step(torch.tensor(1.0, device=DEVICE)) == 1
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert all(float(s["step"]) == 0 for s in step.optimizer.state.values())
    params[3].grad.view(-1)[0] = 1e3  # large but harmless: the update happens
    assert step._optimizer_step(torch.tensor(1.0, device=DEVICE)) == 0
    assert not torch.equal(params[3], before[3])
    assert all(torch.isfinite(s["exp_avg_sq"]).all() for s in step.optimizer.state.values())


@pytest.mark.parametrize("mode", ["source_only", "target_only"])
def test_supervised_baselines(base_model, mode):
    cfg = _cfg(mode=mode)
    step, (out,) = _run(cfg, base_model, [1600], [_batch(6)])
    assert step.teacher is None and step.imnet is None
    assert set(out) == {"loss_src", "skipped"} and out["loss_src"] > 0 and out["skipped"] == 0


def test_bf16_step_runs_close_to_fp32(base_model):
    _, (f32,) = _run(_cfg(), base_model, [1600], [_batch(7)])
    _, (b16,) = _run(_cfg(precision="bf16"), base_model, [1600], [_batch(7)])
    for k in ("loss_src", "loss_mix"):
        torch.testing.assert_close(b16[k], f32[k], rtol=5e-2, atol=1e-2)


@pytest.mark.slow
def test_compiled_step_matches_eager(base_model, monkeypatch):
    """torch.compile of the three networks (graph capture and compiled autograd through AOTAutograd). The
    aot_eager backend keeps the test fast on CPU; inductor code generation itself is torch's and runs on GPU."""
    import functools

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    batches = [_batch(1), _batch(2)]
    _, eager = _run(_cfg(), base_model, [1600, 1601], batches)
    step, compiled = _run(_cfg(compile=True), base_model, [1600, 1601], batches)
    assert all(net._compiled_call_impl is not None for net in (step.student, step.teacher, step.imnet))
    for e, c in zip(eager, compiled):
        for k in e:
            torch.testing.assert_close(c[k], e[k], rtol=1e-5, atol=1e-7, msg=k)
