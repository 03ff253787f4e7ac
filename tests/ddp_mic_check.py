"""Run under torchrun (2 CPU processes, gloo) by tests/test_mic.py: three MIC steps with a separate MIC teacher on
different batches per rank, then every rank's student, DAFormer teacher and MIC teacher must be identical.

    torchrun --standalone --nproc_per_node=2 tests/ddp_mic_check.py OUT_DIR
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from daformer_fast.build import build_training
from daformer_fast.config import parse_config
from daformer_fast.distributed import init_distributed, shutdown
from test_train_step import _batch  # this script's folder (tests/) is on sys.path


def _flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def main(out: Path) -> None:
    cfg = parse_config({
        "model": {"backbone": "mit_b0", "pretrained": None, "head_channels": 32},
        "uda": {"pseudo_threshold": 0.06, "pseudo_weight_ignore_top": 2, "pseudo_weight_ignore_bottom": 8,
                "mic": {"mode": "separatetrgaug", "block_size": 16, "alpha": 0.0, "pseudo_threshold": None}},
        "train": {"max_iters": 100, "device": "cpu"},
    })  # fmt: skip
    d = init_distributed("cpu")
    try:
        _, step, _ = build_training(cfg, d.device, rank=d.rank, ddp=True)
        for t in range(3):
            out_t = step(_batch(100 * d.rank + t), t)  # each rank its own batches
            assert float(out_t["loss_mic"]) > 0
        for name, net in (("student", step.student), ("teacher", step.teacher), ("mic_teacher", step.mic_teacher)):
            mine = _flat(net)
            gathered = [torch.empty_like(mine) for _ in range(d.world_size)]
            dist.all_gather(gathered, mine)
            assert all(torch.equal(gathered[0], x) for x in gathered), f"{name} differs between ranks"
        # The MIC teacher is its own network: not DAFormer's teacher, not the student.
        assert not torch.equal(_flat(step.mic_teacher), _flat(step.teacher))
        (out / f"rank{d.rank}.ok").write_text("identical\n")
    finally:
        shutdown(d)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
