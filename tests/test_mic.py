"""MIC (Masked Image Consistency) on the DAFormer step: the block mask, the masked batch of each mode, the loss, the
unmixed targets, both paths, the separate teacher, resume and DDP."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from daformer_fast.build import build_training
from daformer_fast.checkpoint import read_checkpoint
from daformer_fast.config import ConfigError, parse_config
from daformer_fast.data.synthetic import make_synthetic
from daformer_fast.models import build_segmentor
from daformer_fast.train import main
from daformer_fast.uda.mic import block_keep_mask, draw_block_uniforms, draw_mic_aug, mic_batch, mic_threshold

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import gradient_difference  # noqa: E402
from test_train_step import _batch  # noqa: E402
from tiny_run import write_config  # noqa: E402



def _cfg(path="fast", mode="separatetrgaug", kernels="auto", **mic):
    return parse_config({
        "model": {"backbone": "mit_b0", "pretrained": None},
        "kernels": {"impl": kernels},
        "uda": {"pseudo_threshold": 0.06, "pseudo_weight_ignore_top": 2, "pseudo_weight_ignore_bottom": 8,
                "mic": {"mode": mode, "block_size": 16, **mic}},
        "train": {"max_iters": 4000, "path": path},
    })  # fmt: skip


@pytest.fixture(scope="module")
def base_model():
    torch.manual_seed(0)
    return build_segmentor(_cfg().model)


# ---------------------------------------------------------------------------------------------------------------
# The block mask


def test_grid_size_rounds_half_to_even():
    g = torch.Generator().manual_seed(0)
    assert draw_block_uniforms(2, (512, 512), 32, g).shape == (2, 1, 16, 16)
    assert draw_block_uniforms(1, (64, 40), 16, g).shape == (1, 1, 4, 2)  # 40 / 16 = 2.5 → 2 (half to even)
    assert draw_block_uniforms(1, (56, 72), 16, g).shape == (1, 1, 4, 4)  # 3.5 → 4, 4.5 → 4


def test_keep_mask_is_strict_and_nearest_upsampled():
    u = torch.tensor([[[[0.2, 0.7], [0.71, 0.9]]]])
    keep = block_keep_mask(u, (4, 4), ratio=0.7)
    # Kept iff u > 0.7: 0.7 itself is masked. Each cell becomes a 2×2 block, starting at the top-left corner.
    want = torch.tensor([[0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.float32)
    assert torch.equal(keep[0, 0], want)
    # A grid that does not divide the size: pixel i takes cell floor(i·3/8).
    keep = block_keep_mask(torch.tensor([[[[0.9, 0.1, 0.9]]]]), (1, 8), ratio=0.5)
    assert keep[0, 0, 0].tolist() == [1, 1, 1, 0, 0, 0, 1, 1]


def test_masking_broadcasts_over_channels_and_zeroes_in_normalised_space():
    img = torch.randn(2, 3, 4, 4)
    keep = block_keep_mask(torch.tensor([[[[0.0, 1.0], [1.0, 1.0]]], [[[1.0, 1.0], [1.0, 0.0]]]]), (4, 4), 0.5)
    masked = img * keep
    assert torch.equal(masked[0, :, :2, :2], torch.zeros(3, 2, 2)) and torch.equal(masked[0, :, 2:], img[0, :, 2:])
    assert torch.equal(masked[1, :, 2:, 2:], torch.zeros(3, 2, 2)) and torch.equal(masked[1, :, :2], img[1, :, :2])


def test_mask_ratio_is_the_masked_share():
    u = draw_block_uniforms(64, (512, 512), 32, torch.Generator().manual_seed(1))
    kept = block_keep_mask(u, (512, 512), 0.7).mean().item()
    assert abs(kept - 0.3) < 0.02


# ---------------------------------------------------------------------------------------------------------------
# The masked batch and the augmentation draws


def test_each_modes_batch():
    g = torch.Generator().manual_seed(2)
    img, tgt = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    gt, pl = torch.randint(0, 19, (2, 4, 4), generator=g), torch.randint(0, 19, (2, 4, 4), generator=g)
    pw = torch.full((2, 4, 4), 0.3)
    for mode in ("separatetrg", "separatetrgaug"):
        images, labels, weights = mic_batch(mode, img, gt, tgt, pl, pw)
        assert images is tgt and labels is pl and weights is pw
    for mode in ("separatesrc", "separatesrcaug"):
        images, labels, weights = mic_batch(mode, img, gt, tgt, pl, pw)
        assert images is img and labels is gt and weights is None
    for mode in ("separate", "separateaug"):
        images, labels, weights = mic_batch(mode, img, gt, tgt, pl, pw)
        assert torch.equal(images, torch.stack([img[0], tgt[0]])) and torch.equal(labels, torch.stack([gt[0], pl[0]]))
        assert torch.equal(weights, torch.stack([torch.ones(4, 4), pw[0]]))


def test_aug_draws_share_order_and_sigma_and_ignore_blur_switch():
    from daformer_fast.config import UDAConfig

    cfg = UDAConfig(blur=False)
    blurred = 0
    for seed in range(40):
        p = draw_mic_aug(4, torch.Generator().manual_seed(seed), cfg)
        assert (p.jitter_params.order_B4 == p.jitter_params.order_B4[0]).all() and (p.sigma_B == p.sigma_B[0]).all()
        assert len(set(p.jitter_params.brightness_B.tolist())) == 4  # factors stay per image
        blurred += p.blur
    assert 8 < blurred < 32  # blur is drawn with probability 0.5 although uda.blur is False


def test_threshold_of_a_separate_teacher():
    uda = _cfg().uda
    assert mic_threshold(uda.mic, uda) == uda.pseudo_threshold
    none = _cfg(pseudo_threshold=None).uda
    assert mic_threshold(none.mic, none) == 0.0 and none.mic.separate_teacher  # weight 1: every pixel ≥ 0
    assert _cfg(alpha=0.0).uda.mic.separate_teacher and not _cfg().uda.mic.separate_teacher


def test_config_refuses_what_is_not_implemented():
    with pytest.raises(ConfigError, match="source_only baseline"):
        parse_config({"uda": {"mode": "source_only", "mic": {"mode": "separatesrc"}}})
    with pytest.raises(ConfigError, match="batch_size"):
        parse_config({"data": {"batch_size": 4}, "uda": {"mic": {"mode": "separate"}}})


# ---------------------------------------------------------------------------------------------------------------
# The step


def _run(cfg, model, t=1600, batch_seed=1, debug=False):
    _, step, _ = build_training(cfg, "cpu", initial_state=model.state_dict())
    return step, step(_batch(batch_seed), t, debug=debug)


def test_loss_is_normalised_over_all_pixels(base_model, monkeypatch):
    """Constant logits: CE = log K at every pixel, so L = λ · log K · Σw / (B·H·W) with the zeroed rows counted."""
    import math

    for lam in (1.0, 2.0):
        _, step, _ = build_training(_cfg(mode="separatetrg", ratio=0.0, lambda_=lam), "cpu",
                                    initial_state=base_model.state_dict())  # fmt: skip
        calls = []

        def constant(x, _fwd=step.student_fwd, **kw):
            if kw or len(calls) < 2:  # the source and mix passes run the real student
                calls.append(1)
                return _fwd(x, **kw)
            return torch.zeros(x.shape[0], 19, 16, 16, requires_grad=True)

        monkeypatch.setattr(step, "student_fwd", constant)
        out = step(_batch(1), 1600)
        q = float(out["pseudo_weight"])
        rows = 64 - 2 - 8  # the pseudo-label crop zeroes 2 top and 8 bottom rows of 64
        want = lam * math.log(19) * q * rows / 64
        assert float(out["loss_mic"]) == pytest.approx(want, rel=1e-6)


def test_mic_trains_on_the_unmixed_weights(base_model, monkeypatch):
    """The mixed weights (1 on pasted source pixels) must not reach MIC: it sees q everywhere but the zeroed rows."""
    step, _ = _run(_cfg(mode="separatetrg"), base_model)
    seen = {}
    original = step._mic_pass

    def spy(gen, img, gt, tgt, pl, pw, panels):
        seen["pw"], seen["pl"] = pw.clone(), pl.clone()
        return original(gen, img, gt, tgt, pl, pw, panels)

    monkeypatch.setattr(step, "_mic_pass", spy)
    out = step(_batch(1), 1601, debug=True)
    q = float(out["pseudo_weight"])
    pw, mixed_w = seen["pw"], out["debug"]["pseudo_weight"]
    assert torch.equal(pw[:, 2:-8], torch.full_like(pw[:, 2:-8], q)) and not pw[:, :2].any() and not pw[:, -8:].any()
    assert (mixed_w == 1).any() and not torch.equal(mixed_w, pw)  # mixing wrote its own tensor
    assert torch.equal(out["debug"]["mic_weight"], pw) and torch.equal(out["debug"]["mic_label"], seen["pl"])


@pytest.mark.parametrize("mode", ["separatetrgaug", "separate", "separatesrcaug"])
def test_fast_equals_original_with_mic(base_model, mode):
    ref, ref_out = _run(_cfg("original", mode), base_model, debug=True)
    fast, fast_out = _run(_cfg("fast", mode, kernels="reference"), base_model, debug=True)
    assert set(ref_out) == set(fast_out) and float(ref_out["loss_mic"]) > 0
    for k in ref_out.keys() - {"debug"}:
        torch.testing.assert_close(fast_out[k].float(), ref_out[k].float(), rtol=1e-5, atol=1e-7, msg=k)
    # The masked batch: the batched colour ops against the per-sample ones (a few 1e-7 apart, or equal).
    torch.testing.assert_close(fast_out["debug"]["mic_img"], ref_out["debug"]["mic_img"], rtol=0, atol=1e-6)
    # At this random initialisation the network is steep: the ~5e-7 input differences of `*srcaug` become
    # gradient differences of up to ~1e-3 on an AVX2 CPU (below 1e-5 on AVX-512), where the same masked batch
    # through both paths gives gradients ~1e-12 apart. So the whole gradient is compared; a wrong mask, label,
    # weight or λ is orders of magnitude above this bound.
    assert gradient_difference(ref.student, fast.student) <= 2e-3


def test_mic_changes_the_update_and_is_off_by_default(base_model):
    plain = parse_config({"model": {"backbone": "mit_b0", "pretrained": None},
                          "uda": {"pseudo_threshold": 0.06, "pseudo_weight_ignore_top": 2,
                                  "pseudo_weight_ignore_bottom": 8}, "train": {"max_iters": 4000}})  # fmt: skip
    step_plain, out_plain = _run(plain, base_model)
    step_mic, out_mic = _run(_cfg(), base_model)
    assert "loss_mic" not in out_plain and step_plain.mic is None and step_plain.mic_teacher is None
    for k in ("loss_src", "loss_fd", "loss_mix"):  # MIC runs last: DAFormer's own losses are untouched
        assert torch.equal(out_plain[k], out_mic[k])
    grads = [(a.grad - b.grad).abs().max() for a, b in zip(step_plain.student.parameters(),
                                                            step_mic.student.parameters())]  # fmt: skip
    assert max(grads) > 0


def test_separate_teacher_follows_its_own_alpha(base_model):
    """alpha 0: the MIC teacher is a copy of the current student after every update; DAFormer's teacher is not."""
    _, step, _ = build_training(_cfg(alpha=0.0, pseudo_threshold=None), "cpu", initial_state=base_model.state_dict())
    assert step.mic_teacher is not None and step.mic_teacher is not step.teacher
    step(_batch(1), 1600)
    step(_batch(2), 1601)  # the MIC teacher copies the student as it was after the first update
    moved = [not torch.equal(a, b) for a, b in zip(step.teacher.parameters(), step.mic_teacher.parameters())]
    assert any(moved)
    out = step(_batch(3), 1602)
    assert float(out["loss_mic"]) > 0 and float(out["skipped"]) == 0


# ---------------------------------------------------------------------------------------------------------------
# Training runs: resume, logging, DDP


@pytest.fixture(scope="module")
def syn(tmp_path_factory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("syn"), n_source=12, n_target=6, n_val=3, size=(128, 64), quiet=True)


MIC_SET = ["--set", "uda.mic.mode=separatetrgaug", "uda.mic.block_size=16", "uda.pseudo_threshold=0.06"]


@pytest.mark.parametrize("separate", [False, True], ids=["shared-teacher", "separate-teacher"])
def test_resume_with_mic_is_exact(tmp_path, syn, separate):
    extra = MIC_SET + (["uda.mic.alpha=0.9", "uda.mic.pseudo_threshold=null"] if separate else [])
    train = {"max_iters": 4, "log_interval": 2, "eval_interval": 4, "checkpoint_interval": 2}
    full = write_config(tmp_path / "a", syn, {**train, "keep_checkpoints": 2}, debug_img_interval=3)
    assert main([str(full), *extra]) == 0
    resumed = write_config(tmp_path / "b", syn, train)
    (tmp_path / "b" / "work").mkdir(parents=True)
    shutil.copy(tmp_path / "a" / "work" / "iter_000002.pth", tmp_path / "b" / "work")
    assert main([str(resumed), *extra, "--resume", "auto"]) == 0
    a = read_checkpoint(tmp_path / "a" / "work" / "iter_000004.pth")
    b = read_checkpoint(tmp_path / "b" / "work" / "iter_000004.pth")
    parts = ("student", "teacher", "mic_teacher") if separate else ("student", "teacher")
    assert ("mic_teacher" in a) == separate
    for part in parts:
        for k, v in a[part].items():
            assert torch.equal(v, b[part][k]), f"{part}.{k}"
    rows = [json.loads(line) for line in (tmp_path / "a" / "work" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss_mic"] > 0 for r in rows if "loss_src" in r)
    grids = sorted((tmp_path / "a" / "work" / "class_mix_debug").glob("*.png"))
    assert grids  # the masked image, its mask, target and weight are panels of the grid


def test_resume_without_the_mic_teacher_is_a_short_error(tmp_path, syn, capsys):
    train = {"max_iters": 2, "log_interval": 2, "eval_interval": 2, "checkpoint_interval": 2}
    cfg = write_config(tmp_path, syn, train)
    assert main([str(cfg), *MIC_SET]) == 0
    more = write_config(tmp_path, syn, {**train, "max_iters": 4})
    assert main([str(more), *MIC_SET, "uda.mic.alpha=0.5", "--resume", "auto"]) == 2
    assert "no MIC teacher" in capsys.readouterr().err
    assert read_checkpoint(tmp_path / "work" / "iter_000002.pth")["iteration"] == 2  # the checkpoint is intact


@pytest.mark.slow
def test_separate_teacher_is_identical_on_every_ddp_rank(torchrun_check):
    torchrun_check("ddp_mic_check.py")
