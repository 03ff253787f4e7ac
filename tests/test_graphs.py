"""CUDA-graph capture (`daformer_fast.graphs`) as far as a CPU can prove it: the capture contract of the step's
device body, and the first-use self-check with its fallback.

A CPU has no graphs, so the capture itself is replaced by a stand-in that does what a replay does — run the body
captured once, on the same static tensors, every iteration — eagerly. What this proves: the body reads only what is
in its static inputs and draws (a value frozen at capture would show at the next iteration), it reads nothing back
to the host and makes no tensor from host data, and a mismatch or a capture error falls back to eager with the
state of the eager iteration and one logged reason.
"""

import sys
from pathlib import Path

import pytest
import torch
from torch.utils._pytree import tree_leaves

from daformer_fast.build import build_training
from daformer_fast.config import parse_config
from daformer_fast.data.pipeline import _inv_std, _norm_stats
from daformer_fast.graphs import CHECK_ITERS, CapturedStep, KernelCheck

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from overhead import HostReadDetector  # noqa: E402

B, H, W = 2, 64, 64
TS = range(0, 5)


def _cfg(mic=False, **train):
    return parse_config({
        # A narrow decode head: what is tested is the capture and its check, not the head's width (at the default
        # 256 channels this file takes twice as long).
        "model": {"backbone": "mit_b0", "pretrained": None, "head_channels": 32},
        "uda": {"pseudo_threshold": 0.06, "pseudo_weight_ignore_top": 2, "pseudo_weight_ignore_bottom": 8,
                **({"mic": {"mode": "separatetrgaug", "block_size": 8}} if mic else {})},
        "train": {"max_iters": 100, **train},
    })  # fmt: skip


def _batch(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    gt = torch.randint(0, 19, (B, H // 32, W // 32), generator=g).repeat_interleave(32, 1).repeat_interleave(32, 2)
    gt[0, 0, 0] = 13
    return {
        "img": torch.randint(0, 256, (B, 3, H, W), generator=g, dtype=torch.uint8),
        "target_img": torch.randint(0, 256, (B, 3, H, W), generator=g, dtype=torch.uint8),
        "gt": gt,
        "valid_hw": torch.tensor([[H, W], [H - 8, W]]),  # one padded source image
        "target_valid_hw": torch.tensor([[H, W], [H, W]]),
    }


BATCHES = [_batch(10 + t) for t in TS]


def eager_replay_capture(step, corrupt=None):
    """The stand-in for `torch.cuda.graph`: (replay, static outputs) where a replay runs the body on the static
    tensors it was given at capture, with fresh gradients (a captured backward writes, not accumulates)."""
    calls = []

    def capture(body, inputs, draws, prepare):
        out = {}

        def replay():
            step.optimizer.zero_grad(set_to_none=True)
            out.update(body(inputs, draws))
            calls.append(1)
            if corrupt is not None:
                corrupt(out)

        return replay, out

    capture.calls = calls
    return capture


def _run(wrap, cfg):
    torch.manual_seed(0)
    student, step, _ = build_training(cfg, "cpu")
    stepper = wrap(step)
    outs = [stepper(b, t) for t, b in zip(TS, BATCHES)]
    return student, stepper, outs


@pytest.fixture(scope="module", params=[False, True], ids=["daformer", "mic"])
def plain(request):
    return request.param, _run(lambda s: s, _cfg(mic=request.param))


def _assert_same(a, b):
    (sa, _, oa), (sb, _, ob) = a, b
    for x, y in zip(oa, ob, strict=True):
        assert set(x) == set(y)
        for k in x:
            assert torch.equal(x[k], y[k]), k
    for (n, p), q in zip(sa.state_dict().items(), sb.state_dict().values(), strict=True):
        assert torch.equal(p, q), n


def test_replayed_body_equals_the_fast_step(plain):
    """Run through CapturedStep with the eager stand-in: the checked iterations, then plain replays of the body on
    its static tensors, give exactly the normal step's losses and weights (with MIC too)."""
    mic, reference = plain
    logs = []
    holder = {}

    def wrap(step):
        holder["capture"] = eager_replay_capture(step)
        return CapturedStep(step, logs.append, capture=holder["capture"])

    run = _run(wrap, _cfg(mic=mic))
    _assert_same(run, reference)
    stepper = run[1]
    assert stepper.disabled is None and stepper.checked == CHECK_ITERS
    assert stepper.replays == len(TS) - 1  # t = 0 stays eager; every later iteration replayed the body
    assert logs == [f"CUDA graphs on: {CHECK_ITERS} captured iterations equal the eager ones; replaying"]


@pytest.mark.slow
def test_replayed_body_equals_the_fast_step_with_regional_compile(monkeypatch):
    """`train.compile: regional` under the stand-in (aot_eager backend: dynamo and AOT autograd without code
    generation, so the test compiles in seconds): the compiled body, DropPath factors as block inputs, replayed on
    its static tensors, passes the self-check and equals the compiled eager step exactly."""
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda *a, **kw: compile_(*a, **{"backend": "aot_eager", **kw}))
    cfg = _cfg(compile="regional")
    reference = _run(lambda s: s, cfg)
    run = _run(lambda s: CapturedStep(s, capture=eager_replay_capture(s)), cfg)
    _assert_same(run, reference)
    assert run[1].disabled is None and run[1].checked == CHECK_ITERS and run[1].replays == len(TS) - 1


def test_mismatch_falls_back_to_the_eager_iteration(plain):
    """A replay that computes something else (here: a weight moved by more than an update could) is caught by the
    first check: one logged reason, the eager iteration's state restored, eager from then on — the run equals the
    eager run exactly."""
    mic, reference = plain
    logs = []

    def wrap(step):
        head_bias = step.student.decode_head.conv_seg.bias

        def corrupt(out):
            with torch.no_grad():
                head_bias.add_(1e-2)

        return CapturedStep(step, logs.append, capture=eager_replay_capture(step, corrupt))

    run = _run(wrap, _cfg(mic=mic))
    _assert_same(run, reference)
    assert len(logs) == 1 and "differs from the eager one" in logs[0] and "decode_head.conv_seg.bias" in logs[0]
    assert run[1].disabled and run[1].replays == 1


def test_capture_error_falls_back(plain):
    mic, reference = plain
    logs = []

    def failing_capture(body, inputs, draws, prepare):
        prepare()
        body(inputs, draws)  # moves the weights, as a warm-up does, before failing
        raise RuntimeError("operation not permitted when stream is capturing")

    run = _run(lambda step: CapturedStep(step, logs.append, capture=failing_capture), _cfg(mic=mic))
    _assert_same(run, reference)
    assert len(logs) == 1 and "operation not permitted" in logs[0]


def test_without_cuda_one_reason_and_eager_steps(plain):
    mic, reference = plain
    logs = []
    run = _run(lambda step: CapturedStep(step, logs.append), _cfg(mic=mic))
    _assert_same(run, reference)
    assert logs == ["CUDA graphs off: train.cuda_graphs needs a CUDA device; running eager steps"]
    _, step, _ = build_training(_cfg(cuda_graphs=True), "cpu")  # the builder wraps the step when asked
    assert isinstance(step, CapturedStep) and step.disabled


class DeviceDataDetector(HostReadDetector):
    """Also records ops fed a tensor that did not come from the tracked ("device") state: a tensor made from host
    data inside the body, which a graph would freeze at its capture-time value."""

    def __init__(self) -> None:
        super().__init__()
        self.host_data: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tensors = [t for t in tree_leaves((args, kwargs or {})) if isinstance(t, torch.Tensor)]
        untracked = [t for t in tensors if not self._on_device(t) and t.untyped_storage().nbytes()]
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if not tensors:  # a factory (zeros, full, arange, empty): made on the device from Python scalars
            self.track(tree_leaves(out))
        elif untracked:
            import traceback

            where = [f for f in traceback.extract_stack() if "daformer_fast" in f.filename]
            self.host_data.append(f"{func} at {where[-1].filename}:{where[-1].lineno}" if where else str(func))
        return out


@pytest.mark.parametrize("mic", [False, True], ids=["daformer", "mic"])
def test_body_reads_no_host_value_and_no_host_data(mic):
    """The body run on tracked static tensors: no op waits for a value (host read), and no op is fed a tensor made
    outside the tracked state (host data)."""
    torch.manual_seed(0)
    _, step, opt = build_training(_cfg(mic=mic), "cpu")
    step(BATCHES[0], 0)  # t = 0 (a copy of the teacher) stays eager
    inputs, t = step.inputs(BATCHES[1]), 1
    draws = step.prepare(t, B, (H, W)).on_device(torch.device("cpu"))
    opt.zero_grad(set_to_none=True)
    detector = DeviceDataDetector()
    state = [*step.student.parameters(), *step.student.buffers(), *step.teacher.parameters(),
             *step.teacher.buffers(), *step.imnet.parameters(), *step.imnet.buffers()]
    state += [v for v in vars(step).values() if isinstance(v, torch.Tensor)]  # made once: mean, std, FD classes
    state += [v for s in opt.state.values() for v in s.values()] + [g["lr"] for g in opt.param_groups]
    # The normalisation constants: made once per device and cached (before any capture), not per iteration.
    state += [_inv_std(torch.device("cpu")), *_norm_stats(torch.device("cpu"))]
    detector.track([*tree_leaves(inputs), *tree_leaves(tuple(draws)), *state])
    with detector:
        out = step.body(inputs, draws)
    assert detector.reads == [] and detector.host_data == []
    assert out["loss_mix"] > 0 and out["skipped"] == 0


def test_forced_kernels_that_cannot_run_fall_back_once(monkeypatch):
    """`kernels.impl: triton` where no kernel can run (CPU tensors without Triton's interpreter): the first
    iteration's check logs one reason and the run continues on `auto`, equal to an `auto` run."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    logs = []
    torch.manual_seed(0)
    student, step, _ = build_training(_cfg(), "cpu")
    checked = KernelCheck(step, logs.append)
    step.impl = "triton"
    outs = [checked(b, t) for t, b in zip(TS[:2], BATCHES)]
    reference = _run(lambda s: s, _cfg())
    for x, y in zip(outs, reference[2]):
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert len(logs) == 1 and logs[0].startswith("kernels.impl=triton off:") and step.impl == "auto"
    assert "ValueError" in logs[0]  # the reason names what refused


@pytest.mark.slow
def test_ddp_capture_reduces_gradients_like_ddp(torchrun_check):
    """Under DDP (2 CPU processes) the captured form — the plain student, gradients averaged by hand between the
    graphs — equals the DDP-wrapped eager step bit for bit on every rank (tests/ddp_graphs_check.py)."""
    torchrun_check("ddp_graphs_check.py")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("mic", [False, True], ids=["daformer", "mic"])
def test_cuda_capture_equals_eager(mic):
    """On a GPU: the real capture passes its own first-use check and then replays iterations that match the eager
    step's losses and weights (fp32, TF32 off) over the run; weights within the self-check's slack per iteration
    (AdamW moves a weight by about lr·sign(g), which the GPU's non-deterministic backward kernels can flip where a
    gradient is near zero)."""
    logs = []

    def run(wrap):
        torch.manual_seed(0)
        student, step, _ = build_training(_cfg(mic=mic), "cuda")
        stepper = wrap(step)
        outs = [{k: v.float().cpu() for k, v in stepper(b, t).items()} for t, b in zip(TS, BATCHES)]
        return student, stepper, outs

    eager = run(lambda s: s)
    captured = run(lambda s: CapturedStep(s, logs.append))
    assert captured[1].disabled is None, logs
    assert captured[1].replays == len(TS) - 1
    for a, b in zip(eager[2], captured[2], strict=True):
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=k)
    slack = 2 * len(TS) * max(float(g["lr"]) for g in captured[1].optimizer.param_groups)
    for (n, p), q in zip(eager[0].state_dict().items(), captured[0].state_dict().values(), strict=True):
        if p.is_floating_point():
            assert float((p - q).abs().max()) <= 1e-5 * float(p.abs().max()) + slack, n


def test_gradient_errors_show_in_the_optimizer_moments(plain):
    """A replay whose gradients are wrong (here: doubled) moves AdamW's weights by about the same lr·sign(g), within
    the weights' slack, but not its first moment: the check catches it there."""
    mic, reference = plain
    logs = []

    def wrap(step):
        def double_grads():
            for g in step.optimizer.param_groups:
                for p in g["params"]:
                    if p.grad is not None:
                        p.grad.mul_(2)

        def capture(body, inputs, draws, prepare):
            out = {}

            def replay():
                step.optimizer.zero_grad(set_to_none=True)
                step.grad_sync = double_grads
                try:
                    out.update(body(inputs, draws))
                finally:
                    step.grad_sync = None

            return replay, out

        return CapturedStep(step, logs.append, capture=capture)

    run = _run(wrap, _cfg(mic=mic))
    _assert_same(run, reference)
    assert len(logs) == 1 and "optimizer state exp_avg" in logs[0], logs
