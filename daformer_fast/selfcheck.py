"""First-use checks of paths no CPU test can prove (CUDA graphs, forced Triton kernels): the training state as a
snapshot that can be compared and restored in place, and the tolerances an iteration must meet.

    before = StateSnapshot(step)        # student/teacher parameters and buffers, optimizer state
    expected = step(batch, t)           # the validated path
    after = StateSnapshot(step)
    before.restore()                    # copy_ back into the same tensors (a captured graph keeps its addresses)
    got = candidate(batch, t)
    problem = compare_outputs(got, expected, tolerances(bf16)) or after.compare(step)

Tolerances are the parity tests' (tests/test_train_step.py): 1e-5 relative in fp32, where both paths run the same
arithmetic in another launch order or fusion; bf16 rounds every product to 8 bits, 1e-2.
"""

from __future__ import annotations

import torch

__all__ = ["StateSnapshot", "compare_outputs", "tolerances"]


def tolerances(bf16: bool) -> tuple[float, float]:
    """(rtol, atol) for losses; parameters are compared against rtol × their tensor's largest magnitude + atol."""
    return (1e-2, 1e-4) if bf16 else (1e-5, 1e-7)


def _named_state(step) -> list[tuple[str, torch.Tensor]]:
    nets = {"student": step.student, "teacher": step.teacher, "mic_teacher": getattr(step, "mic_teacher", None)}
    return [(f"{label}.{name}", t) for label, m in nets.items() if m is not None
            for name, t in (*m.named_parameters(), *m.named_buffers())]  # fmt: skip


class StateSnapshot:
    """Copies of everything an iteration changes: the networks' parameters and buffers and the optimizer's state
    tensors (AdamW moments and step counts; a parameter without state is recorded as such, and restoring it zeroes
    whatever state it has since acquired — which is how a fresh AdamW starts)."""

    def __init__(self, step) -> None:
        self.step = step
        self.names, self.tensors = zip(*_named_state(step)) if _named_state(step) else ((), ())
        self.values = [t.detach().clone() for t in self.tensors]
        opt = step.optimizer
        self.params = [p for g in opt.param_groups for p in g["params"]]
        self.opt_state = [{k: v.detach().clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}
                          if p in opt.state else None for p in self.params]  # fmt: skip

    @torch.no_grad()
    def restore(self) -> None:
        for t, v in zip(self.tensors, self.values, strict=True):
            t.copy_(v)
        opt = self.step.optimizer
        for p, saved in zip(self.params, self.opt_state, strict=True):
            for k, v in opt.state.get(p, {}).items():
                if isinstance(v, torch.Tensor):
                    v.copy_(saved[k]) if saved is not None and k in saved else v.zero_()

    def compare(self, step) -> str | None:
        """None if the step's current state equals this snapshot within the fp32/bf16 tolerance, else which tensor
        differs and by how much.

        Weights get a slack of twice the largest learning rate on top of the relative bound: AdamW's first steps move
        a weight by about lr·sign(g), and the run-to-run noise of non-deterministic GPU kernels (atomic adds in
        backward passes) can flip the sign of a near-zero gradient element between two correct runs. The optimizer's
        moments carry no such slack (they are proportional to the gradients, so a gradient that is wrong, doubled or
        not averaged shows there), nor do the buffers."""
        rtol, atol = tolerances(step.bf16)
        opt = step.optimizer
        slack = 2 * max(float(g["lr"]) for g in opt.param_groups)  # a host read per group, during the check only
        params = {id(p) for m in (step.student, step.teacher, getattr(step, "mic_teacher", None)) if m is not None
                  for p in m.parameters()}  # fmt: skip
        for name, t, v in zip(self.names, self.tensors, self.values, strict=True):
            if not t.is_floating_point():
                if not torch.equal(t, v):
                    return f"integer state tensor {name} differs"
                continue
            err = (t.detach().float() - v.float()).abs().max()
            bound = rtol * v.float().abs().max() + atol + (slack if id(t) in params else 0.0)
            if not bool(err <= bound):  # a host read, once per checked iteration
                return f"state tensor {name} {tuple(t.shape)}: max error {float(err):.3g} > {float(bound):.3g}"
        for i, (p, saved) in enumerate(zip(self.params, self.opt_state, strict=True)):
            now = opt.state.get(p, {})
            for k, v in (saved or {}).items():
                if k not in now:
                    return f"optimizer state {k} of parameter {i} is missing"
                err = (now[k].float() - v.float()).abs().max()
                if not bool(err <= rtol * v.float().abs().max()):
                    return f"optimizer state {k} of parameter {i} {tuple(v.shape)}: max error {float(err):.3g}"
        return None


def compare_outputs(got: dict, expected: dict, tol: tuple[float, float]) -> str | None:
    """None if every tensor output of `got` equals `expected`'s within (rtol, atol), else the first difference."""
    rtol, atol = tol
    if set(k for k, v in got.items() if isinstance(v, torch.Tensor)) != \
            set(k for k, v in expected.items() if isinstance(v, torch.Tensor)):  # fmt: skip
        return f"outputs {sorted(got)} vs {sorted(expected)}"
    for k, v in expected.items():
        if not isinstance(v, torch.Tensor):
            continue
        a, b = got[k].detach().float(), v.detach().float()
        if not torch.allclose(a, b, rtol=rtol, atol=atol, equal_nan=True):
            return f"{k}: {a.tolist()} vs {b.tolist()}"
    return None
