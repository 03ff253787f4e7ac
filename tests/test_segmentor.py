"""The segmentor as the step uses it: precision switches, auxiliary-output losses, the neck in the feature distance."""

import pytest
import torch
import torch.nn.functional as F

from daformer_fast.build import build_training
from daformer_fast.config import parse_config
from daformer_fast.uda.losses import seg_ce_loss

B, H, W = 2, 64, 64


def _cfg(model=None, **train):
    return parse_config({
        "model": {"backbone": "mit_b0", "pretrained": None, **(model or {})},
        "uda": {"pseudo_threshold": 0.06},
        "train": {"max_iters": 100, **train},
    })  # fmt: skip


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    gt = torch.randint(11, 19, (B, H // 32, W // 32), generator=g).repeat_interleave(32, 1).repeat_interleave(32, 2)
    return {
        "img": torch.randint(0, 256, (B, 3, H, W), generator=g, dtype=torch.uint8),
        "target_img": torch.randint(0, 256, (B, 3, H, W), generator=g, dtype=torch.uint8),
        "gt": gt,
    }


@pytest.fixture
def _restore_fp32_precision():
    saved = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    yield
    torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = saved


@pytest.mark.usefixtures("_restore_fp32_precision")
@pytest.mark.parametrize(("precision", "mode"), [("fp32", "ieee"), ("tf32", "tf32"), ("bf16", "tf32")])
def test_fp32_precision_is_what_the_step_runs_under(precision, mode):
    """fp32 means IEEE fp32 for matmuls and cuDNN convolutions while the step's forward passes run (torch's
    default would leave cuDNN convolutions in TF32); tf32 turns both on."""
    torch.backends.cudnn.conv.fp32_precision = "tf32" if mode == "ieee" else "ieee"  # the opposite beforehand
    student, step, _ = build_training(_cfg(precision=precision), "cpu")
    seen = []
    student.register_forward_hook(lambda *_: seen.append(
        (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)))
    step(_batch(), 0)
    assert seen and set(seen) == {(mode, mode)}


def test_auxiliary_outputs_sum_their_losses():
    """A tuple of logits (DANet's fused, position and channel outputs) costs the sum of the three losses, each
    upsampled to the labels with the same pixel weights."""
    g = torch.Generator().manual_seed(0)
    logits = tuple(torch.randn(2, 5, 4, 4, generator=g) for _ in range(3))
    labels = torch.randint(0, 5, (2, 16, 16), generator=g)
    labels[0, :3] = 255
    weight = torch.rand(2, 16, 16, generator=g)

    def one(x):
        up = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
        ce = F.cross_entropy(up, labels, ignore_index=255, reduction="none")
        return (ce * weight).mean()

    expected = sum(one(x) for x in logits)
    torch.testing.assert_close(seg_ce_loss(logits, labels, weight, impl="reference"), expected)
    torch.testing.assert_close(seg_ce_loss(logits[0], labels, weight, impl="reference"), one(logits[0]))
