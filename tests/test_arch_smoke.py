"""Every architecture the experiment sets add beyond MiT + DAFormer head trains end to end on CPU.

Each pair runs three iterations (t = 0, 1, 2) of the full DACS step with the ImageNet feature distance, built by
`build_training` from a config as a training run builds it, on 64×64 crops, batch 2 + 2, random images and block
labels. The encoders are smaller than the paper's so that the file stays at a few minutes on two cores: ResNet-50
V1c, ResNeSt-50 and ResNeXt-50 stand in for ResNet-101 V1c / ResNeSt-101/200 / ResNeXt-101, MiT-b0 for MiT-B5;
the decoders are full size. The depth does not change the wiring under test (which stage feeds the head, what the
feature distance sees, the heads' outputs); full-size parameter counts are tested in tests/test_segmentor.py.

Then one supervised baseline (`target_only`, PhotoMetricDistortion on) through the training CLI in a subprocess on a
small synthetic benchmark: a CNN model, a few iterations, an evaluation and a checkpoint at the end; and the
pair list and counts of benchmarks/arch_table.py. The file took 4 min 20 s on a busy 2-core host (load 3-5).
"""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import daformer_fast.step as step_module
from daformer_fast.build import build_training
from daformer_fast.checkpoint import read_checkpoint
from daformer_fast.config import parse_config
from daformer_fast.data.pipeline import normalize
from daformer_fast.data.synthetic import make_synthetic
from daformer_fast.step import step_seed

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
B, H, W = 2, 64, 64
DEVICE = torch.device("cpu")

# (decoder, backbone, decoder_norm, stride of the map the feature distance compares): the CNN encoders end at
# stride 8; the SegFormer adapter upsamples MiT's stride-32 F4 ×4 (sfa_dlv3p) or ×8 (the bottleneck variant).
ARCHS = [
    ("dlv2red", "resnet50_v1c", True, 8),
    ("dlv2red", "resnest50", True, 8),
    ("dlv2red", "resnext50_32x4d", True, 8),
    ("danet", "resnet50_v1c", False, 8),
    ("isanet", "resnet50_v1c", False, 8),
    ("dlv3p", "resnet50_v1c", False, 8),
    ("segformer", "resnet50_v1c", True, 8),
    ("sfa_dlv3p", "mit_b0", False, 8),
    ("upernet", "mit_b0", True, 32),
    ("upernet_ch256", "mit_b0", True, 32),
    ("daformer_isa", "mit_b0", True, 32),
    ("daformer_sepaspp_bottleneck", "mit_b0", True, 4),
]


def _cfg(decoder: str, backbone: str, norm: bool):
    return parse_config({
        "model": {"backbone": backbone, "decoder": decoder, "decoder_norm": norm, "pretrained": None},
        # A low threshold so that a random teacher gives a non-zero pseudo-label weight; PL crop scaled to 64 rows.
        # No warmup: the first updates are large enough to see (the warmup's first lr is 1e-6 of the base lr).
        "uda": {"mode": "dacs", "pseudo_threshold": 0.06, "pseudo_weight_ignore_top": 2,
                "pseudo_weight_ignore_bottom": 8},
        "schedule": {"warmup": "none"},
        "train": {"max_iters": 100},
    })  # fmt: skip


def _batch(seed: int) -> dict[str, torch.Tensor]:
    """Random images over fixed 32-pixel label blocks: pure cells at every FD stride, thing classes (car 13, train
    16, person 11) for the FD mask, ignored rows on top of the first sample."""
    blocks = torch.tensor([[[13, 0], [8, 2]], [[1, 16], [11, 10]]])
    gt = blocks.repeat_interleave(H // 2, 1).repeat_interleave(W // 2, 2)
    gt[0, :5] = 255
    images = torch.randint(0, 256, (2, B, 3, H, W), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    return {"img": images[0], "target_img": images[1], "gt": gt}


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in model.named_parameters()}


def _ce_original(logits: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """mmseg's cross-entropy, restated: bilinear upsample, per-pixel CE with ignored pixels 0, mean over all pixels."""
    up = F.interpolate(logits, size=gt.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(up, gt, ignore_index=255, reduction="sum") / gt.numel()


@pytest.mark.parametrize(("decoder", "backbone", "norm", "fd_stride"), ARCHS,
                         ids=[f"{d}-{b}" + ("" if n else "-nodbn") for d, b, n, _ in ARCHS])  # fmt: skip
def test_dacs_step_trains(decoder, backbone, norm, fd_stride, monkeypatch):
    cfg = _cfg(decoder, backbone, norm)
    student, step, _ = build_training(cfg, DEVICE)
    fd_shapes = []
    fd = step_module.feature_distance

    def recording_fd(feat_student, feat_imnet, *args):
        fd_shapes.append((tuple(feat_student.shape), tuple(feat_imnet.shape)))
        return fd(feat_student, feat_imnet, *args)

    monkeypatch.setattr(step_module, "feature_distance", recording_fd)
    snapshots = [_params(student)]
    pre_step = copy.deepcopy(student)  # the student as step 0 sees it, for the DANet loss check below
    outs = []
    for t in range(3):
        outs.append(step(_batch(t), t))
        snapshots.append(_params(student))
        teacher = dict(step.teacher.named_parameters())
        if t >= 1:  # the EMA teacher trails the updated student
            assert any(not torch.equal(teacher[k], v) for k, v in snapshots[-1].items()), f"t={t}"
        if t == 1:  # a = min(1 − 1/(t+1), α) = 0.5 at t = 1, applied to the student after step 0
            for k, v in snapshots[1].items():
                torch.testing.assert_close(teacher[k], 0.5 * snapshots[0][k] + 0.5 * v, rtol=0, atol=0, msg=k)

    for t, out in enumerate(outs):
        for key in ("loss_src", "loss_fd", "loss_mix"):
            assert torch.isfinite(out[key]), (t, key, out[key])
        assert out["skipped"].item() == 0, t
        assert out["loss_src"] > 0 and out["loss_mix"] > 0, t
        if t >= 1:  # the student has moved away from the ImageNet copy
            assert out["loss_fd"] > 0, (t, out["loss_fd"])
    # FD compared the student's and the ImageNet model's last map (after the neck) at the expected stride.
    feat = (B, student.backbone.out_channels[-1], H // fd_stride, W // fd_stride)  # the neck keeps the width
    assert fd_shapes == [(feat, feat)] * 3

    # Parameters change: every tensor the last step gave a non-zero gradient, and both encoder and head overall.
    for k, p in student.named_parameters():
        if p.grad is not None and p.grad.abs().sum() > 0:
            assert not torch.equal(snapshots[-1][k], snapshots[-2][k]), k
    for part in ("backbone.", "decode_head."):
        assert any(not torch.equal(v, snapshots[0][k]) for k, v in snapshots[-1].items() if k.startswith(part)), part

    if decoder == "danet":
        # The source loss of step 0 is the sum of the three outputs' losses (pam_cam, pam, cam), each of weight 1:
        # the same forward, with the dropout draws of step 0, computed here with a restated loss.
        batch = _batch(0)
        torch.manual_seed(step_seed(cfg.train.seed, 0, 0))
        logits = pre_step.train()(normalize(batch["img"]))
        assert isinstance(logits, tuple) and len(logits) == 3
        losses = [_ce_original(x, batch["gt"]) for x in logits]
        torch.testing.assert_close(outs[0]["loss_src"], sum(losses), rtol=1e-5, atol=0)
        assert all(loss > 0.1 for loss in losses)  # no output contributes nothing: the sum is not the main loss


def test_baseline_with_photometric_through_cli(tmp_path):
    """target_only with PhotoMetricDistortion, a DeepLabV2 ResNet-50 model, through `python -m daformer_fast.train
    configs/demo.yaml`: three iterations, then the final evaluation and checkpoint."""
    syn = make_synthetic(tmp_path / "syn", n_source=4, n_target=4, n_val=2, size=(128, 64), quiet=True)
    work = tmp_path / "work"
    sets = [
        "model.backbone=resnet50_v1c", "model.decoder=dlv2red", "uda.mode=target_only", "uda.fd_lambda=0",
        "data.photometric=true", "data.rcs.enabled=false", "data.synthetic_root=null", "data.workers=0",
        f"data.source.root={syn / 'source'}", f"data.target.root={syn / 'target'}", f"data.val.root={syn / 'target'}",
        "data.source.scale=[128,64]", "data.target.scale=[128,64]", "data.val.scale=[128,64]", "data.crop=[64,64]",
        "train.max_iters=3", "train.log_interval=1", "train.eval_interval=3", "train.checkpoint_interval=3",
        f"train.work_dir={work}",
    ]  # fmt: skip
    cmd = [sys.executable, "-m", "daformer_fast.train", "configs/demo.yaml", "--set", *sets]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss_src" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    assert all(r["loss_src"] > 0 and "loss_mix" not in r for r in train_rows)
    assert [r for r in rows if "mIoU" in r][-1]["mIoU"] >= 0
    assert f"final mIoU on {syn / 'target'}" in res.stdout
    # The photometric flag reached the loader choice (the torch loader applies it).
    assert "data.photometric is applied by the torch loader only" in (work / "train.log").read_text()
    state = read_checkpoint(work / "latest.pth")
    assert state["iteration"] == 3 and state["config"]["data"]["photometric"] is True
    assert state["config"]["model"]["decoder"] == "dlv2red"
    assert "decode_head.aspp_modules.1.conv.weight" in state["student"]  # DeepLabV2's second branch (dilation 12)


def test_arch_table_counts():
    """benchmarks/arch_table.py: every pair of the sets once, and a decoder FLOP count done by hand."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import arch_table

    pairs = arch_table.experiment_pairs()
    keys = [(p["architecture"], p["backbone_name"]) for p in pairs]
    assert len(keys) == len(set(keys)) == 22  # exp 100 lists every pair of sets 1-8 once
    assert [p["exps"] for p in pairs if p["architecture"] == "dlv2red" and p["backbone_name"] == "r101v1c"] == [
        [1, 4, 5, 100]]  # fmt: skip
    sfa = next(p for p in pairs if p["architecture"] == "sfa_dlv3p_nodbn")
    assert (sfa["backbone"], sfa["decoder"], sfa["decoder_norm"]) == ("mit_b5", "sfa_dlv3p", False)
    r50 = next(p for p in pairs if p["backbone_name"] == "r50v1c")
    row = arch_table.count_model(r50["model"], size=32)
    # DeepLabV2 (6, 12) at stride 8: two 3×3 convs 2048 → 19 over 4×4 positions, 2 FLOPs per multiply-add.
    assert row["flops_decoder"] == 2 * (2 * 19 * 2048 * 9 * 16)
    assert row["flops"] == row["flops_encoder"] + row["flops_decoder"]
    assert (row["params_decoder"], row["params"]) == (700_454, 24_227_718) and row["logits_shape"] == [1, 19, 4, 4]
