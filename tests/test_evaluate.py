"""End-to-end evaluate/predict CLIs on a tiny generated Cityscapes-layout dataset with a random MiT-B0 student."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from daformer_fast.checkpoint import save_checkpoint
from daformer_fast.config import parse_config
from daformer_fast.data.datasets import Sample
from daformer_fast.evaluate import main as evaluate_main
from daformer_fast.inference import TRAIN_ID_TO_LABEL_ID, iter_predictions
from daformer_fast.models import build_segmentor
from daformer_fast.predict import main as predict_main

W, H, SCALE = 96, 48, (64, 32)  # images are resized to 64x32 for the network, evaluated at 96x48
STEMS = ["frankfurt/frankfurt_000000_000001", "frankfurt/frankfurt_000000_000002", "lindau/lindau_000000_000001"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    root = tmp / "cityscapes"
    rng = np.random.default_rng(0)
    for stem in STEMS:
        img_path = root / f"leftImg8bit/val/{stem}_leftImg8bit.png"
        lbl_path = root / f"gtFine/val/{stem}_gtFine_labelTrainIds.png"
        img_path.parent.mkdir(parents=True, exist_ok=True)
        lbl_path.parent.mkdir(parents=True, exist_ok=True)
        # Smooth images, so that a random network's predictions vary over the image but not per pixel.
        base = rng.integers(0, 256, (6, 12, 3), dtype=np.uint8)
        Image.fromarray(cv2.resize(base, (W, H), interpolation=cv2.INTER_CUBIC)).save(img_path)
        lbl = rng.integers(0, 19, (H, W), dtype=np.uint8)
        lbl[:5] = 255
        Image.fromarray(lbl).save(lbl_path)
    overrides = [
        "model.backbone=mit_b0",
        "model.pretrained=null",
        f"data.val.root={root}",
        f"data.val.scale=[{SCALE[0]},{SCALE[1]}]",
        f"train.work_dir={tmp / 'work'}",
        "train.device=cpu",
    ]
    cfg = parse_config({}, overrides)
    torch.manual_seed(0)
    model = build_segmentor(cfg.model).eval()
    ckpt = tmp / "ckpt.pth"
    save_checkpoint(ckpt, student=model, teacher=model, iteration=7, config=cfg)
    config_file = tmp / "cfg.yaml"
    config_file.write_text("data:\n  val: {name: cityscapes, split: val}\n", encoding="utf-8")
    return {"tmp": tmp, "root": root, "overrides": overrides, "model": model, "ckpt": ckpt, "config": config_file}


def _reference_predictions(setup) -> list[tuple[np.ndarray, np.ndarray]]:
    """(pred, label) per image, computed here independently of evaluate.py: cv2 resize, numpy normalisation,
    forward at stride 4, bilinear upsample to the network input, then to the original size."""
    mean, std = np.array([123.675, 116.28, 103.53]), np.array([58.395, 57.12, 57.375])
    out = []
    for stem in STEMS:
        bgr = cv2.imread(str(setup["root"] / f"leftImg8bit/val/{stem}_leftImg8bit.png"))
        img = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        small = cv2.resize(img, SCALE, interpolation=cv2.INTER_LINEAR)
        x = torch.from_numpy(((small - mean) / std).astype(np.float32)).permute(2, 0, 1)[None]
        with torch.no_grad():
            logits = setup["model"](x)
            logits = F.interpolate(logits, size=(SCALE[1], SCALE[0]), mode="bilinear", align_corners=False)
            logits = F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False)
        label = np.asarray(Image.open(setup["root"] / f"gtFine/val/{stem}_gtFine_labelTrainIds.png"))
        out.append((logits.argmax(1)[0].numpy(), label))
    return out


def _reference_miou(preds: list[tuple[np.ndarray, np.ndarray]], k: int = 19) -> float:
    conf = np.zeros((k, k), dtype=np.int64)
    for pred, label in preds:
        valid = label != 255
        np.add.at(conf, (label[valid].astype(np.int64), pred[valid]), 1)
    inter, union = np.diag(conf), conf.sum(0) + conf.sum(1) - np.diag(conf)
    return float(np.mean(inter[union > 0] / union[union > 0]) * 100)


def _args(setup, *extra: str) -> list[str]:
    return [str(setup["config"]), "--checkpoint", str(setup["ckpt"]), *extra, "--set", *setup["overrides"]]


@pytest.mark.parametrize("extra", [[], ["--batch-size", "2", "--workers", "0"]], ids=["bs1", "bs2-noworkers"])
def test_metrics_json_matches_independent_miou(setup, extra, capsys):
    out = setup["tmp"] / f"out{len(extra)}"
    assert evaluate_main(_args(setup, "--out", str(out), *extra)) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"mIoU", "mAcc", "aAcc", "IoU", "Acc", "num_images", "checkpoint"} <= set(metrics)
    assert "mIoU16" not in metrics  # source is GTA
    assert metrics["num_images"] == 3 and len(metrics["IoU"]) == 19
    preds = _reference_predictions(setup)
    assert len({int(v) for p, _ in preds for v in np.unique(p)}) > 1  # a degenerate constant model would test little
    assert metrics["mIoU"] == pytest.approx(_reference_miou(preds), abs=1e-9)
    assert "mIoU" in capsys.readouterr().out


def test_default_out_dir_limit_and_synthia_subsets(setup):
    extra = ["--limit", "2", "--set", "data.source.name=synthia"]
    assert evaluate_main(_args(setup, *extra)) == 0
    metrics = json.loads((setup["tmp"] / "work/eval/metrics.json").read_text())
    assert metrics["num_images"] == 2 and "mIoU16" in metrics and "mIoU13" in metrics


def test_format_only_train_ids_and_label_ids(setup):
    out = setup["tmp"] / "fmt"
    assert evaluate_main(_args(setup, "--out", str(out), "--format-only")) == 0
    assert evaluate_main(_args(setup, "--out", str(out), "--format-only", "--label-ids")) == 0
    preds = _reference_predictions(setup)
    for stem, (ref_pred, _) in zip(STEMS, preds):
        name = Path(stem).name + "_leftImg8bit.png"
        train = Image.open(out / "labelTrainIds" / name)
        assert train.mode == "P" and train.size == (W, H)
        train_ids = np.asarray(train)
        assert train_ids.max() < 19
        np.testing.assert_array_equal(train_ids, ref_pred)
        label = Image.open(out / "labelIds" / name)
        assert label.mode == "L"
        lut = np.array([TRAIN_ID_TO_LABEL_ID[i] for i in range(19)], dtype=np.uint8)
        np.testing.assert_array_equal(np.asarray(label), lut[train_ids])


def test_test_split_without_labels_needs_format_only(setup, capsys):
    root = setup["tmp"] / "cs_test"
    img = root / "leftImg8bit/test/berlin/berlin_000000_000019_leftImg8bit.png"
    img.parent.mkdir(parents=True)
    Image.fromarray(np.zeros((H, W, 3), dtype=np.uint8)).save(img)
    args = _args(setup, "--split", "test", "--out", str(setup["tmp"] / "t")) + [f"data.val.root={root}"]
    assert evaluate_main(args) == 2
    assert "--format-only" in capsys.readouterr().err
    assert evaluate_main(args + ["--format-only"]) == 0
    assert (setup["tmp"] / "t/labelTrainIds/berlin_000000_000019_leftImg8bit.png").is_file()


def test_errors_exit_2_with_one_line(setup, capsys):
    args = [str(setup["config"]), "--checkpoint", str(setup["tmp"] / "missing.pth"), "--set", *setup["overrides"]]
    assert evaluate_main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing.pth" in err and len(err.strip().splitlines()) == 1
    assert evaluate_main(_args(setup) + [f"data.val.root={setup['tmp'] / 'nowhere'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no images found") and len(err.strip().splitlines()) == 1
    assert evaluate_main(_args(setup) + ["model.backbon=mit_b1"]) == 2
    assert "did you mean model.backbone" in capsys.readouterr().err


def test_predict_folder_with_two_sizes(setup, capsys):
    inputs = setup["tmp"] / "photos"
    (inputs / "sub").mkdir(parents=True)
    rng = np.random.default_rng(1)
    cv2.imwrite(str(inputs / "wide.jpg"), rng.integers(0, 256, (30, 50, 3), dtype=np.uint8))
    Image.fromarray(rng.integers(0, 256, (70, 40, 3), dtype=np.uint8)).save(inputs / "sub/tall.png")
    out = setup["tmp"] / "pred"
    # No --config: the model config comes from the checkpoint (mit_b0), the scale from --scale.
    assert predict_main(["--checkpoint", str(setup["ckpt"]), str(inputs), "--out", str(out), "--scale", "64", "32",
                         "--device", "cpu"]) == 0  # fmt: skip
    assert "config stored in" in capsys.readouterr().out
    for name, size in (("wide", (50, 30)), ("sub/tall", (40, 70))):
        pred = Image.open(out / f"{name}_pred.png")
        assert pred.mode == "P" and pred.size == size and np.asarray(pred).max() < 19
        assert Image.open(out / f"{name}_overlay.jpg").size == size
    assert predict_main(["--checkpoint", str(setup["tmp"] / "nope.pth"), str(inputs), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1


class _Recorder(torch.nn.Module):
    """Stands in for a segmentor: records the network input, predicts class 0 everywhere."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs: list[torch.Tensor] = []

    def predict(self, x_B3HW: torch.Tensor, out_size) -> torch.Tensor:
        self.inputs.append(x_B3HW.clone())
        return torch.zeros(x_B3HW.shape[0], 2, *out_size)


def test_inference_normalises_as_mmcv(tmp_path):
    # All 256 values in every channel, at the network size already (the keep-ratio resize is then the identity).
    img = np.stack([np.arange(256, dtype=np.uint8).reshape(16, 16)] * 3, axis=-1)
    img[..., 1] = img[..., 1].T
    Image.fromarray(img).save(tmp_path / "a.png")
    model = _Recorder().train()
    preds = list(iter_predictions(model, [Sample(tmp_path / "a.png", None, "a")], (16, 16), "cpu", with_labels=False))
    assert len(preds) == 1 and model.training  # eval mode only for the duration
    x = model.inputs[0]
    assert x.dtype == torch.float32 and x.shape == (1, 3, 16, 16) and x.is_contiguous()
    # mmcv: (x - mean) * (1/std), the reciprocal computed in float64 and rounded to float32, all in float32.
    mean = np.array([123.675, 116.28, 103.53], np.float32)
    inv_std = (1.0 / np.array([58.395, 57.12, 57.375], np.float64)).astype(np.float32)
    expected = ((img.astype(np.float32) - mean) * inv_std).transpose(2, 0, 1)[None]
    np.testing.assert_array_equal(x.numpy(), expected)
