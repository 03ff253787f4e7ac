"""Run under torchrun (2 CPU processes, gloo) by tests/test_graphs.py: the DDP form of a captured step — the plain
student, gradients averaged by hand between the two graphs — through CapturedStep with the eager stand-in for the
capture, against the DDP-wrapped eager step: the self-check passes on every rank, and after several iterations the
outputs and every weight equal the eager DDP run's bit for bit (on each rank, its own batches). Then a capture whose
warm-up fails on rank 1 only: no rank waits in a collective for it, both fall back with a reason and train eager
steps equal to the eager run's.

    torchrun --standalone --nproc_per_node=2 tests/ddp_graphs_check.py OUT_DIR
"""

import sys
from pathlib import Path

import torch

from daformer_fast.build import build_training
from daformer_fast.config import parse_config
from daformer_fast.distributed import init_distributed, shutdown
from daformer_fast.graphs import CHECK_ITERS, CapturedStep
from test_graphs import _batch, eager_replay_capture  # this script's folder (tests/) is on sys.path

ITERS = 5


def warm_up_failing_on_rank1(holder: list, rank: int):
    """A capture stand-in whose warm-up (`CapturedStep.warm_up`) raises in its second iteration on rank 1; rank 0's
    warm-up runs through and its capture succeeds."""

    def capture(body, inputs, draws, prepare):
        calls = []

        def body_(i, d):
            calls.append(1)
            if rank == 1 and len(calls) == 2:
                raise RuntimeError("warm-up failed on rank 1")
            return body(i, d)

        holder[0].warm_up(body_, inputs, draws, prepare)
        return eager_replay_capture(holder[0].step)(body, inputs, draws, prepare)

    return capture


def main(out: Path) -> None:
    cfg = parse_config({
        "model": {"backbone": "mit_b0", "pretrained": None, "head_channels": 32},
        "uda": {"pseudo_threshold": 0.06, "pseudo_weight_ignore_top": 2, "pseudo_weight_ignore_bottom": 8},
        "train": {"max_iters": 100, "device": "cpu"},
    })  # fmt: skip
    d = init_distributed("cpu")
    try:
        runs = {}
        for kind in ("eager", "captured", "failed warm-up"):
            student, step, _ = build_training(cfg, d.device, rank=d.rank, ddp=True)
            logs = []
            if kind == "captured":
                step = CapturedStep(step, logs.append, capture=eager_replay_capture(step))
            elif kind == "failed warm-up":
                holder = []
                step = CapturedStep(step, logs.append, capture=warm_up_failing_on_rank1(holder, d.rank))
                holder.append(step)
            outs = [step(_batch(100 * d.rank + t), t) for t in range(ITERS)]
            runs[kind] = (outs, {k: v.clone() for k, v in student.state_dict().items()}, logs, step)
        (eager, w_eager, _, _), (captured, w_captured, logs, stepper) = runs["eager"], runs["captured"]
        assert stepper.disabled is None and stepper.checked == CHECK_ITERS and stepper.replays == ITERS - 1, logs
        for a, b in zip(eager, captured, strict=True):
            assert all(torch.equal(a[k], b[k]) for k in a), (a, b)
        assert all(torch.equal(w_eager[k], w_captured[k]) for k in w_eager)
        failed, w_failed, logs, stepper = runs["failed warm-up"]
        reason = "warm-up failed on rank 1" if d.rank == 1 else "another rank's capture failed"
        assert stepper.disabled is not None and reason in stepper.disabled and len(logs) == 1, logs
        for a, b in zip(eager, failed, strict=True):
            assert all(torch.equal(a[k], b[k]) for k in a), (a, b)
        assert all(torch.equal(w_eager[k], w_failed[k]) for k in w_eager)
        (out / f"rank{d.rank}.ok").write_text("equal\n")
    finally:
        shutdown(d)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
