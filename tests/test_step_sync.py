"""The live fast step reads nothing back from the device (the property CUDA-graph capture and a host that runs ahead
of the GPU both need), and the original path does, where the original does.

On CPU there is no device to wait for, so a dispatch mode stands in for one: every tensor the step's state and the
batch's device-bound inputs (`img`, `gt`, `target_img`) hold is "on the device", and so is every output of an op
that reads one. An op that reads such a tensor's values back to Python — `.item()`/`float()`/`bool()`
(`aten._local_scalar_dense`), or an op whose output size depends on the data (`nonzero`, `unique`, `masked_select`,
boolean indexing, `bincount`, `repeat_interleave` with tensor repeats) — is a host sync on CUDA. Reads of host-side
data (the loader's `valid_hw`, draws of the step's CPU generator) are not. Not visible this way: `.tolist()` and
`.cpu()` of a device tensor, which on CPU are no ops at all; the CUDA variant (`torch.cuda.set_sync_debug_mode`)
catches those.
"""

import os
import sys
from pathlib import Path

import pytest
import torch

from daformer_fast.build import build_training
from daformer_fast.config import parse_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from overhead import HostReadDetector  # noqa: E402  (the detector and its HOST_READS rule live with the benchmark)

DEVICE = torch.device(os.environ.get("DAFORMER_TEST_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))
B, H, W = 2, 64, 64


def _cfg(path: str, mic: dict | None = None):
    return parse_config({
        "model": {"backbone": "mit_b0", "pretrained": None},
        "uda": {"pseudo_threshold": 0.06, "pseudo_weight_ignore_top": 2, "pseudo_weight_ignore_bottom": 8,
                "mic": mic or {}},
        "train": {"max_iters": 4000, "path": path},
    })  # fmt: skip


def _batch(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    gt = torch.randint(0, 19, (B, H // 32, W // 32), generator=g).repeat_interleave(32, 1).repeat_interleave(32, 2)
    gt[:, :4] = 255
    return {
        "img": torch.randint(0, 256, (B, 3, H, W), generator=g, dtype=torch.uint8),
        "target_img": torch.randint(0, 256, (B, 3, H, W), generator=g, dtype=torch.uint8),
        "gt": gt,
        "valid_hw": torch.tensor([[H, W]] * B),
        "target_valid_hw": torch.tensor([[H, W]] * B),
    }


def _host_reads(path: str, mic: dict | None = None) -> list[str]:
    _, step, optimizer = build_training(_cfg(path, mic), DEVICE)
    step(_batch(0), 1600)  # creates the gradients and AdamW's state
    batch = _batch(1)
    detector = HostReadDetector()
    nets = [m for m in (step.student, step.teacher, step.imnet, step.mic_teacher) if m is not None]
    detector.track([*(p for m in nets for p in m.parameters()), *(b for m in nets for b in m.buffers())])
    detector.track([p.grad for p in step.student.parameters() if p.grad is not None])
    detector.track([v for s in optimizer.state.values() for v in s.values()])
    detector.track([batch["img"], batch["gt"], batch["target_img"]])
    with detector:
        out = step(batch, 1601)
    assert torch.isfinite(out["loss_mix"]) and float(out["skipped"]) == 0
    return detector.reads


MIC = {"mode": "separatetrgaug", "block_size": 16}
MIC_SEPARATE = {**MIC, "alpha": 0.9, "pseudo_threshold": None}


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the CPU stand-in for a device; CUDA has its own test below")
@pytest.mark.parametrize("mic", [None, MIC, MIC_SEPARATE], ids=["dacs", "mic", "mic-separate-teacher"])
def test_fast_step_reads_nothing_back(mic):
    reads = _host_reads("fast", mic)
    assert not reads, "host reads in the fast step:\n" + "\n".join(reads)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the CPU stand-in for a device")
def test_detector_sees_the_original_paths_reads():
    """The detector is not blind: the original path reads the pseudo-label weight and runs `unique` (ClassMix)."""
    reads = _host_reads("original")
    assert any("_local_scalar_dense" in r and "step.py" in r for r in reads), reads
    assert any("unique" in r for r in reads), reads


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE.type != "cuda", reason="needs a CUDA device")
@pytest.mark.parametrize("mic", [None, MIC], ids=["dacs", "mic"])
def test_fast_step_is_sync_free_on_cuda(mic):
    _, step, _ = build_training(_cfg("fast", mic), DEVICE)
    step(_batch(0), 1600)  # warm-up outside the debug mode (library handles, allocator, fused AdamW state)
    batch = {k: v.pin_memory() for k, v in _batch(1).items()}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = step(batch, 1601)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(out["loss_mix"])
