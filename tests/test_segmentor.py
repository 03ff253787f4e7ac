"""The segmentor as the step uses it: precision switches, auxiliary-output losses, the neck in the feature distance."""

import pytest
import torch
import torch.nn.functional as F

from daformer_fast.build import build_training
from daformer_fast.checkpoint import _convert
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


# Trainable parameters per (architecture, backbone) of the experiment names, 19 classes: docs/architectures.md §5.
PARAMS = {
    ("dlv2red", "r101v1c"): 43_219_846, ("dlv2red", "r50v1c"): 24_227_718, ("dlv2red", "s50"): 26_134_694,
    ("dlv2red", "s101"): 46_926_470, ("dlv2red", "s200"): 68_852_998, ("dlv2red", "x50-32"): 23_680_358,
    ("dlv2red", "x101-32"): 42_829_158, ("da_nodbn", "r101v1c"): 66_471_963, ("isa_nodbn", "r101v1c"): 54_330_739,
    ("dlv3p_nodbn", "r101v1c"): 60_205_955, ("segformer", "mitb5"): 84_610_406, ("segformer", "mitb4"): 64_010_086,
    ("segformer", "mitb3"): 47_239_526, ("segformer", "r101v1c"): 47_849_478,
    ("sfa_dlv3p_nodbn", "mitb5-del"): 95_142_115, ("upernet", "mitb5"): 111_087_315,
    ("upernet_ch256", "mitb5"): 89_777_107, ("daformer_conv1", "mitb5"): 81_973_715,
    ("daformer_isa", "mitb5"): 82_501_587, ("daformer_sepaspp_bottleneck", "mitb5"): 84_606_163,
    ("daformer_aspp", "mitb5"): 91_412_947, ("daformer_sepaspp", "mitb5"): 85_155_283,
}  # fmt: skip


@pytest.mark.slow  # 22 networks at full size, up to 111M parameters each
def test_every_experiment_network_builds_with_the_original_parameter_count():
    """Each network the paper's experiment sets name, built from its generated config at full size: the parameter
    count of the original (the SegFormer head's unused classifier included), a forward at the head's stride, and
    its official DAFormer-format checkpoint layout loading strictly."""
    from daformer_fast.experiments import build_config, experiment_runs
    from daformer_fast.models import build_segmentor

    runs = {(r.architecture, r.backbone): r for e in (1, 2, 3, 4, 5, 6, 7, 8, 100, 101) for r in experiment_runs(e)}
    assert set(runs) == set(PARAMS)
    x = torch.randn(2, 3, 64, 64)
    for key, run in runs.items():
        cfg = build_config(run).model
        model = build_segmentor(cfg)
        assert sum(p.numel() for p in model.parameters()) == PARAMS[key], key
        with torch.no_grad():
            out = model.eval()(x)
        stride = 8 if cfg.decoder in ("dlv2red", "danet", "isanet") else 4
        assert out.shape == (2, 19, 64 // stride, 64 // stride), key
        # The same network as an official DAFormer training checkpoint (the encoder in mmseg's names) maps onto
        # it strictly: every key present, none left over, every tensor where it belongs.
        official = {"model." + k: v + 1 for k, v in _mmseg_names(model.state_dict()).items()}
        fmt, state, ignored = _convert({"state_dict": official}, "auto")
        assert (fmt, ignored) == ("daformer", []), key
        model.load_state_dict(state, strict=True)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items()), key


def _mmseg_names(state: dict) -> dict:
    """Our keys → the original's: only a CNN encoder's deep stem is named differently (mmseg's `stem.0..7` for
    timm's `conv1.{0,1,3,4,6}` and `bn1`; the 7×7 stem of ResNeXt is `conv1`/`bn1` in both; docs/architectures.md
    §1)."""
    deep = "backbone.conv1.0.weight" in state
    out = {}
    for k, v in state.items():
        if deep and k.startswith("backbone.conv1."):
            k = "backbone.stem." + k.removeprefix("backbone.conv1.")
        elif deep and k.startswith("backbone.bn1."):
            k = "backbone.stem.7." + k.removeprefix("backbone.bn1.")
        out[k] = v
    return out
