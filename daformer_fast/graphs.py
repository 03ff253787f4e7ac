"""CUDA-graph capture of the fast training iteration (`train.cuda_graphs: true`), checked at first use.

The fast step issues ~24k kernels per iteration at MiT-B5 (benchmarks/overhead.py); launched one by one from
Python that is host-bound on any GPU. `UDAStep.body` was written to be captured: it reads no value back to the host,
creates no tensor from host data and branches on nothing drawn, and every per-iteration value (learning rates, EMA
weights, ClassMix keys, augmentation switches and factors, MIC's mask cells) comes from device tensors written before
it runs. So the whole body — EMA, the student/teacher/ImageNet passes and their backward passes, the fused AdamW
with its on-device non-finite skip — is captured once as one graph and replayed:

    step = CapturedStep(step, log)          # the trainer's step: same call, same outputs
    out = step(batch, t)

Per replay, on the host: the batch is copied into static input tensors, `UDAStep.prepare` reseeds the global RNG,
writes the learning rates into the optimizer's lr tensors and draws the iteration's values, which are copied into
static draw tensors; then `graph.replay()`. DropPath and Dropout draw from the default CUDA generator, which torch
registers with every capture (philox seed and offset are read at replay, so reseeding before a replay reseeds the
graph). Gradients live in the graph's memory pool (one graph, one pool). The outputs are cloned, so a caller may keep
them across replays. Warm-up iterations run on a side stream before the capture, as capture requires; the fused
AdamW is switched to `capturable` first.

First-use self-check: nothing here is trusted until it has shown, on the machine it runs on, that it computes what
the eager step computes. For the first `CHECK_ITERS` captured iterations, the state (parameters, buffers,
optimizer state) is snapshotted, the eager step runs, the state is restored, the graph replays the same iteration,
and the losses, every parameter, buffer and optimizer moment must agree within the parity tolerance of the
precision (`selfcheck.StateSnapshot.compare`: weights with a slack of two learning rates, the moments without). A
mismatch, a capture error or any exception logs one reason and falls back to eager for good, with the eager
iteration's state restored — a run never stops because of this module. `KernelCheck` applies the same check to the
forced Triton kernels (`kernels.impl: triton`) against `kernels.impl: auto`.

Iterations that stay eager: t = 0 (the teacher becomes a copy, a different update), debug iterations (the panels
are not graph outputs), and any batch whose shapes differ from the captured ones.

DistributedDataParallel: DDP's gradient hooks cannot run inside a replay, so the captured body runs the plain
student and averages the gradients itself: graph A holds the EMA, the passes, the backward passes and the flatten of
all gradients (each divided by the world size, as DDP's default hook does), the all-reduce of that one buffer runs
between two replays, and graph B copies it back and updates. DDP is built without buffer broadcasts (as the
original's distributed runs), so nothing else crosses ranks inside an iteration. The self-check compares with the
DDP-wrapped eager step, and the ranks keep or drop the graph together. The warm-up iterations (thrown away) and the
capture run no collective, so a failure of either on one rank cannot leave the others waiting in an all-reduce: the
first collective every rank reaches after them is the vote on whether all captures succeeded.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import torch
import torch.distributed as dist

from daformer_fast.selfcheck import StateSnapshot, compare_outputs, tolerances
from daformer_fast.step import StepDraws, UDAStep
from daformer_fast.ops.dispatch import using_impl

__all__ = ["CHECK_ITERS", "WARMUP_ITERS", "CapturedStep", "KernelCheck"]

log = logging.getLogger(__name__)

CHECK_ITERS = 2
"""Captured iterations compared with eager ones before the graph is trusted."""
WARMUP_ITERS = 3
"""Eager iterations on a side stream before the capture (allocator, cuDNN/cuBLAS handles, compiled code)."""
# The loaders keep working while the step is captured (the torch loader's pin-memory thread allocates pinned host
# memory, DALI's threads run their own CUDA work): "global" capture mode would make those threads' calls fail.
_CAPTURE_MODE = "thread_local"


def _copy_into(static, new) -> None:
    """Copy a (nested) tuple of tensors into same-structured static tensors, in place."""
    if isinstance(static, torch.Tensor):
        static.copy_(new, non_blocking=True)
    elif static is not None:
        for s, n in zip(static, new, strict=True):
            _copy_into(s, n)


def _static(x):
    """Fresh, dense copies of a (nested) tuple of tensors: buffers the iterations are copied into (a broadcast view,
    such as MIC's batch-shared op order, cannot be written into)."""
    if isinstance(x, torch.Tensor):
        return x.detach().contiguous().clone()
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        return type(x)(*(_static(v) for v in x))
    return x


def _structure(x):
    """Which fields of a (nested) draw tuple are tensors and their shapes: what must match for a replay."""
    if isinstance(x, torch.Tensor):
        return tuple(x.shape), x.dtype
    if isinstance(x, dict):
        return tuple((k, _structure(v)) for k, v in sorted(x.items()))
    if isinstance(x, tuple | list):
        return tuple(_structure(v) for v in x)
    return type(x).__name__  # None, or a host switch (its value may change between replays)


class CapturedStep:
    """The UDAStep's iteration replayed from a CUDA graph (module docstring); attribute access falls through to the
    wrapped step, so the trainer uses it like the step itself.

    capture: how a graph is made, `(body, inputs, draws) -> (replay, outputs)`; None captures with
    `torch.cuda.graph`. Tests pass their own to exercise the self-check and the fallback without a GPU.
    """

    def __init__(self, step: UDAStep, log_fn: Callable[[str], None] | None = None, *, capture=None,
                 check_iters: int = CHECK_ITERS) -> None:  # fmt: skip
        self.step = step
        self.log = log_fn or log.info
        self.capture = capture or self._cuda_capture
        self.check_iters = check_iters
        self.checked = 0
        self.replays = 0
        self.replay: Callable[[], None] | None = None
        self.static_inputs: dict[str, torch.Tensor] | None = None
        self.static_draws: StepDraws | None = None
        self.static_out: dict[str, torch.Tensor] | None = None
        self.signature = None
        self.disabled: str | None = None
        self.fallback_state: StateSnapshot | None = None  # what a failure mid-check restores
        # Under DDP the captured body runs the plain student and reduces the gradients itself (`_grad_sync`), so
        # that the all-reduce sits between two graphs instead of inside DDP's autograd hooks.
        self.ddp = step.student_fwd is not step.student
        self.flat_grads: torch.Tensor | None = None
        self.split: Callable[[torch.Tensor], None] | None = None  # set while capturing: ends graph A, begins B
        # Set during the warm-up iterations, whose results are thrown away: no all-reduce, so that a warm-up
        # failing on one rank leaves no collective of the others waiting for it (the ranks then agree on the
        # failure in `_all_ranks`, the first collective every rank reaches).
        self.local_grads = False
        if capture is None:
            if step.device.type != "cuda":
                self.disabled = "train.cuda_graphs needs a CUDA device"
            elif step.original:
                self.disabled = "train.cuda_graphs captures the fast path only"
        if self.disabled:
            self.log(f"CUDA graphs off: {self.disabled}; running eager steps")

    def __getattr__(self, name):
        return getattr(self.step, name)

    # ---------------------------------------------------------------------------------------------------------

    def __call__(self, batch: dict[str, torch.Tensor], t: int, debug: bool = False) -> dict[str, torch.Tensor]:
        step = self.step
        if self.disabled or debug or t == 0:
            return step(batch, t, debug)
        # After the capture the batch goes straight into the static inputs (one copy); before it, to the device.
        inputs = step.inputs(batch) if self.static_inputs is None else {k: batch[k] for k in self.static_inputs}
        draws = step.prepare(t, inputs["img"].shape[0], tuple(inputs["img"].shape[-2:]))
        signature = (_structure(inputs), _structure(draws))
        if self.replay is not None and signature != self.signature:
            return step(batch, t, debug)  # another batch shape (a final partial batch): eager, the graph stays
        try:
            with using_impl(step.impl):
                if self.replay is None:
                    return self._first_use(batch, inputs, draws, t, signature)
                if self.checked < self.check_iters:
                    return self._checked_replay(batch, inputs, draws, t)
                return self._replay(inputs, draws)
        except Exception as e:  # noqa: BLE001  (any failure: one reason, eager from here on)
            if self.fallback_state is not None:
                self.fallback_state.restore()
            return self._give_up(f"{type(e).__name__}: {e}", batch, t)

    def _replay(self, inputs, draws: StepDraws) -> dict[str, torch.Tensor]:
        for k, static in self.static_inputs.items():
            static.copy_(inputs[k], non_blocking=True)
        _copy_into(self.static_draws, draws.on_device(self.step.device))
        self.replay()
        self.replays += 1
        return {k: v.clone() for k, v in self.static_out.items()}

    def _eager_reference(self, batch, t):
        """The eager iteration t from the current state, and the state after it; the state is then put back (and
        kept as what a failure restores)."""
        before = self.fallback_state = StateSnapshot(self.step)
        out = {k: v.detach().clone() for k, v in self.step(batch, t).items()}
        after = StateSnapshot(self.step)
        before.restore()
        return out, after

    def _first_use(self, batch, inputs, draws, t, signature):
        step = self.step
        expected, after = self._eager_reference(batch, t)
        before = self.fallback_state
        for group in step.optimizer.param_groups:  # the optimizer's capture health check asks for it
            group["capturable"] = True
        self.static_inputs = {k: v.clone() for k, v in inputs.items()}
        self.static_draws = _static(draws.on_device(step.device))
        self.signature = signature
        failure = None
        try:
            self.replay, self.static_out = self.capture(self._body, self.static_inputs, self.static_draws,
                                                        lambda: step.prepare(t, *self._shape()))  # fmt: skip
        except Exception as e:  # noqa: BLE001  (re-raised below, once the ranks agree)
            failure = e
        if self.ddp and not self._all_ranks(failure is None):
            failure = failure or RuntimeError("another rank's capture failed")
        if failure is not None:
            raise failure
        before.restore()  # the warm-up iterations moved the weights
        step.prepare(t, *self._shape())  # reseed and learning rates of iteration t again
        return self._compare(self._replay(inputs, draws), expected, after, batch, t)

    def _checked_replay(self, batch, inputs, draws, t):
        expected, after = self._eager_reference(batch, t)
        self.step.prepare(t, *self._shape())
        return self._compare(self._replay(inputs, draws), expected, after, batch, t)

    def _compare(self, got, expected, after: StateSnapshot, batch, t):
        problem = compare_outputs(got, expected, tolerances(self.step.bf16)) or after.compare(self.step)
        if self.ddp and not self._all_ranks(problem is None) and problem is None:
            # every rank keeps or drops the graph together (their collectives must pair up)
            problem = "another rank's captured iteration differs from its eager one"
        if problem:
            after.restore()
            return self._give_up(f"the captured iteration {t} differs from the eager one: {problem}", None, t,
                                 out=expected)  # fmt: skip
        self.checked += 1
        self.fallback_state = None
        if self.checked == self.check_iters:
            self.log(f"CUDA graphs on: {self.check_iters} captured iterations equal the eager ones; replaying")
        return got

    def _all_ranks(self, ok: bool) -> bool:
        """Whether `ok` holds on every rank (one all-reduce; a host read, during the first-use check only)."""
        flag = torch.tensor([0.0 if ok else 1.0], device=self.step.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() == 0.0

    def _give_up(self, reason: str, batch, t, out=None):
        self.disabled = reason
        self.replay = self.static_out = None
        self.log(f"CUDA graphs off: {reason}; running eager steps")
        return out if out is not None else self.step(batch, t)

    def _shape(self):
        img = self.static_inputs["img"]
        return img.shape[0], tuple(img.shape[-2:])

    # ---------------------------------------------------------------------------------------------------------

    def _body(self, inputs, draws):
        """`UDAStep.body`; under DDP with the plain student, no `no_sync`, and `_grad_sync` before the update."""
        step = self.step
        if not self.ddp:
            return step.body(inputs, draws)
        saved = step.student_fwd, step.no_sync, step.grad_sync
        step.student_fwd, step.no_sync, step.grad_sync = step.student, contextlib.nullcontext, self._grad_sync
        try:
            return step.body(inputs, draws)
        finally:
            step.student_fwd, step.no_sync, step.grad_sync = saved

    def _grad_sync(self) -> None:
        """DDP's gradient average done by hand: every gradient divided by the world size (DDP's default hook
        divides before it sums), flattened into one buffer, all-reduced, copied back. While capturing, the
        all-reduce is where graph A ends and graph B begins; a replay runs it between the two."""
        opt = self.step.optimizer
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        flat = torch._utils._flatten_dense_tensors(grads).div_(dist.get_world_size())
        if self.split is not None:
            self.flat_grads = flat
            self.split(flat)
        elif not self.local_grads:
            dist.all_reduce(flat)
        torch._foreach_copy_(grads, torch._utils._unflatten_dense_tensors(flat, grads))

    def warm_up(self, body, inputs, draws, prepare, stream: torch.cuda.Stream | None = None) -> None:
        """`WARMUP_ITERS` iterations of `body` before a capture, on `stream` when given (a capture wants them off
        the default stream); thrown away by the caller, which restores the state, so without the gradient
        all-reduce (`local_grads`)."""
        self.local_grads = True
        try:
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                for _ in range(WARMUP_ITERS):
                    prepare()
                    self.step.optimizer.zero_grad(set_to_none=True)
                    body(inputs, draws)
        finally:
            self.local_grads = False

    def _cuda_capture(self, body, inputs, draws, prepare):
        """Warm up on a side stream, capture `body(inputs, draws)` into one graph; (replay, static outputs)."""
        step = self.step
        side = torch.cuda.Stream(step.device)
        side.wait_stream(torch.cuda.current_stream(step.device))
        try:
            self.warm_up(body, inputs, draws, prepare, side)
        finally:  # also when a warm-up fails: the state restore that follows must not race the side stream
            torch.cuda.current_stream(step.device).wait_stream(side)
        prepare()
        step.optimizer.zero_grad(set_to_none=True)  # the graph's backward allocates the gradients in its pool
        if not self.ddp:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode=_CAPTURE_MODE):
                out = body(inputs, draws)
            return graph.replay, out
        # DDP: graph A (EMA, passes, backward, the gradient flatten), the all-reduce, graph B (copy back, update);
        # one memory pool for both.
        graph_a, graph_b = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        capture_stream = torch.cuda.Stream(step.device)
        torch.cuda.synchronize(step.device)

        open_graph = []  # the graph being captured, to end it if the capture fails

        def split(flat):  # no collective here: a replay runs the all-reduce between the two graphs
            graph_a.capture_end()
            open_graph[:] = [graph_b]
            graph_b.capture_begin(pool=graph_a.pool(), capture_error_mode=_CAPTURE_MODE)

        self.split = split
        # DDP holds every parameter's gradient accumulator, made on the default stream; autograd refuses such a stale
        # stream in a capture unless told to use the capturing one (process-wide, so only for this capture).
        torch.autograd.graph.set_override_stale_capture_stream(True)
        try:
            with torch.cuda.stream(capture_stream):
                open_graph[:] = [graph_a]
                graph_a.capture_begin(capture_error_mode=_CAPTURE_MODE)
                out = body(inputs, draws)
                open_graph.clear()
                graph_b.capture_end()
        except BaseException:
            for graph in open_graph:  # a stream left capturing would fail every later CUDA call of this thread
                with contextlib.suppress(Exception):
                    graph.capture_end()
            raise
        finally:
            self.split = None
            torch.autograd.graph.set_override_stale_capture_stream(False)
            torch.cuda.current_stream(step.device).wait_stream(capture_stream)

        def replay():
            graph_a.replay()
            dist.all_reduce(self.flat_grads)
            graph_b.replay()

        return replay, out


class KernelCheck:
    """`kernels.impl: triton` checked at first use: the first iteration runs on the validated ops (`auto`: each op's
    PyTorch path unless a GPU benchmark enabled its kernel) and again, from the same state, with the forced kernels;
    if losses or state differ beyond the self-check's tolerance (or a kernel raises), one logged reason and `auto` from
    then on."""

    def __init__(self, step, log_fn: Callable[[str], None] | None = None) -> None:
        self.step = step
        self.log = log_fn or log.info
        self.checked = False

    def __getattr__(self, name):
        return getattr(self.step, name)

    def __call__(self, batch, t, debug: bool = False):
        if self.checked:
            return self.step(batch, t, debug)
        self.checked = True
        inner = self.step.step if isinstance(self.step, CapturedStep) else self.step
        before = StateSnapshot(inner)
        forced = inner.impl
        inner.impl = "auto"
        try:
            expected = {k: v.detach().clone() for k, v in inner(batch, t).items()}
        finally:
            inner.impl = forced
        after = StateSnapshot(inner)
        before.restore()
        try:
            out = inner(batch, t, debug)
            problem = compare_outputs(out, expected, tolerances(inner.bf16)) or after.compare(inner)
        except Exception as e:  # noqa: BLE001
            problem = f"{type(e).__name__}: {e}"
        if problem:
            after.restore()
            inner.impl = "auto"
            self.log(f"kernels.impl=triton off: the kernels' first iteration differs from the validated ops' "
                     f"({problem}); running kernels.impl=auto")  # fmt: skip
            return expected
        self.log("kernels.impl=triton: the kernels' first iteration equals the validated ops'")
        return out
