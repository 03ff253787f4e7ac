"""Checkpoint loading (SegFormer mit_b*.pth, official DAFormer, HF nvidia/mit-b*, our own) and atomic saving.

All files are synthesised from random MiT-B0 / DAFormer-head state dicts, so every loaded tensor can be compared
exactly with its source.
"""

import os
import random
import warnings

import pytest
import torch
from safetensors.torch import save_file

from daformer_fast import checkpoint as ckpt
from daformer_fast.checkpoint import CheckpointError, load_weights, save_checkpoint
from daformer_fast.config import Config, ModelConfig, config_to_dict
from daformer_fast.models.mit import mit
from daformer_fast.models.segmentor import build_segmentor


class CustomMeta:
    """Not a tensor or plain value: makes torch.load(weights_only=True) refuse the file."""

    def __init__(self) -> None:
        self.note = "from a trusted run"


def _seg():
    return build_segmentor(ModelConfig(backbone="mit_b0", pretrained=None))


def _random_state(module: torch.nn.Module, offset: float = 0.0) -> dict[str, torch.Tensor]:
    """A state dict of the module's keys/shapes with fresh random values (ints kept but changed)."""
    out = {}
    for k, v in module.state_dict().items():
        out[k] = torch.randn_like(v) + offset if v.is_floating_point() else v + 7
    return out


def _assert_equal_state(model_state: dict, expected: dict, prefix: str = "") -> None:
    assert expected, "nothing to compare"
    for k, v in expected.items():
        assert torch.equal(model_state[prefix + k], v), k


# Our MiT names -> HF transformers SegformerEncoder names (written independently of the loader's mapping).
_TO_HF_SUB = {
    "norm1": "layer_norm_1", "norm2": "layer_norm_2", "attn.q": "attention.self.query", "attn.sr": "attention.self.sr",
    "attn.norm": "attention.self.layer_norm", "attn.proj": "attention.output.dense", "mlp.fc1": "mlp.dense1",
    "mlp.dwconv.dwconv": "mlp.dwconv.dwconv", "mlp.fc2": "mlp.dense2",
}  # fmt: skip


def _to_hf(enc_state: dict, prefix: str = "segformer.") -> dict[str, torch.Tensor]:
    out = {}
    for k, v in enc_state.items():
        parts = k.split(".")
        head, param = parts[0], parts[-1]
        if head.startswith("patch_embed"):
            i = int(head[-1]) - 1
            sub = {"proj": "proj", "norm": "layer_norm"}[parts[1]]
            out[f"{prefix}encoder.patch_embeddings.{i}.{sub}.{param}"] = v
        elif head.startswith("norm"):
            out[f"{prefix}encoder.layer_norm.{int(head[-1]) - 1}.{param}"] = v
        else:
            i, j, sub = int(head[-1]) - 1, parts[1], ".".join(parts[2:-1])
            base = f"{prefix}encoder.block.{i}.{j}."
            if sub == "attn.kv":
                key, value = v.chunk(2, dim=0)
                out[base + f"attention.self.key.{param}"] = key.clone()
                out[base + f"attention.self.value.{param}"] = value.clone()
            else:
                out[base + f"{_TO_HF_SUB[sub]}.{param}"] = v
    return out


# ---------------------------------------------------------------------------------------------------------------
# SegFormer mit_b*.pth


def test_segformer_mit_into_encoder(tmp_path):
    enc_state = _random_state(mit("b0"))
    head = {"head.weight": torch.randn(1000, 256), "head.bias": torch.randn(1000)}
    path = tmp_path / "mit_b0.pth"
    torch.save({**enc_state, **head}, path)
    model, lines = mit("b0"), []
    report = load_weights(model, path, log=lines.append)
    _assert_equal_state(model.state_dict(), enc_state)
    assert report.format == "segformer-mit" and report.loaded == len(enc_state)
    assert sorted(report.ignored) == ["head.bias", "head.weight"]
    assert not (report.missing or report.unexpected or report.mismatched)
    assert len(lines) == 1 and f"{len(enc_state)}/{len(enc_state)} encoder tensors" in lines[0]
    assert "mit_b0.pth (segformer-mit)" in lines[0]


@pytest.mark.parametrize("wrapper", ["state_dict", "model", None])
def test_segformer_mit_into_segmentor_leaves_head_at_init(tmp_path, wrapper):
    enc_state = _random_state(mit("b0"))
    flat = {**enc_state, "head.weight": torch.randn(1000, 256), "head.bias": torch.randn(1000)}
    path = tmp_path / "mit_b0.pth"
    torch.save({wrapper: flat} if wrapper else flat, path)
    seg, lines = _seg(), []
    head_before = {k: v.clone() for k, v in seg.decode_head.state_dict().items()}
    report = load_weights(seg, path, log=lines.append)
    _assert_equal_state(seg.state_dict(), enc_state, "backbone.")
    _assert_equal_state(seg.decode_head.state_dict(), head_before)
    assert report.missing == [] and report.loaded == len(enc_state)
    assert lines[0].endswith("decode head left at its init; ignored 2 (head.*)")


# ---------------------------------------------------------------------------------------------------------------
# Official DAFormer checkpoints


def _daformer_file(tmp_path, *, published=False):
    student, teacher, imnet = _random_state(_seg()), _random_state(_seg(), 10.0), _random_state(_seg(), -10.0)
    sd = {"model." + k: v for k, v in student.items()}
    if not published:
        sd |= {"ema_model." + k: v for k, v in teacher.items()}
        sd |= {"imnet_model." + k: v for k, v in imnet.items()}
    obj = {"state_dict": sd}
    if not published:
        obj |= {"meta": {"iter": 40000, "CLASSES": ["road"]}, "optimizer": {"state": {}, "param_groups": []}}
    path = tmp_path / "daformer.pth"
    torch.save(obj, path)
    return path, student, teacher


def test_daformer_student_by_default_and_teacher_on_request(tmp_path):
    path, student, teacher = _daformer_file(tmp_path)
    seg, lines = _seg(), []
    report = load_weights(seg, path, log=lines.append)
    _assert_equal_state(seg.state_dict(), student)  # BN buffers included
    assert report.format == "daformer" and report.loaded == len(student)
    assert len(report.ignored) == 2 * len(student)  # ema_model.* and imnet_model.*
    assert "(daformer)" in lines[0] and f"{len(student)}/{len(student)} tensors" in lines[0]

    seg_t = _seg()
    load_weights(seg_t, path, key="teacher", log=lines.append)
    _assert_equal_state(seg_t.state_dict(), teacher)
    assert "teacher" in lines[1]
    assert not torch.equal(seg.backbone.norm4.weight, seg_t.backbone.norm4.weight)


def test_daformer_published_file_and_encoder_target(tmp_path):
    path, student, _ = _daformer_file(tmp_path, published=True)
    enc = mit("b0")
    report = load_weights(enc, path, log=lambda s: None)
    _assert_equal_state(enc.state_dict(), {k[9:]: v for k, v in student.items() if k.startswith("backbone.")})
    assert report.ignored and all(k.startswith("decode_head.") for k in report.ignored)
    with pytest.raises(CheckpointError, match="student only"):
        load_weights(_seg(), path, key="teacher", log=lambda s: None)


def test_daformer_module_prefix_plain_segmentor_keys(tmp_path):
    state = _random_state(_seg())
    path = tmp_path / "ddp.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, path)
    seg = _seg()
    assert load_weights(seg, path, log=lambda s: None).format == "daformer"
    _assert_equal_state(seg.state_dict(), state)


# ---------------------------------------------------------------------------------------------------------------
# HF transformers nvidia/mit-b*


@pytest.mark.parametrize("prefix", ["segformer.", ""])
def test_hf_mit_bin(tmp_path, prefix):
    enc_state = _random_state(mit("b0"))
    hf = _to_hf(enc_state, prefix) | {"classifier.weight": torch.randn(1000, 256), "classifier.bias": torch.randn(1000)}
    path = tmp_path / "pytorch_model.bin"
    torch.save(hf, path)
    enc = mit("b0")
    report = load_weights(enc, path, log=lambda s: None)
    _assert_equal_state(enc.state_dict(), enc_state)
    assert report.format == "hf-mit" and report.loaded == len(enc_state)
    assert sorted(report.ignored) == ["classifier.bias", "classifier.weight"]
    # kv = [key; value] stacked along the output dim, checked against the HF tensors directly.
    key_w = hf[f"{prefix}encoder.block.2.1.attention.self.key.weight"]
    value_b = hf[f"{prefix}encoder.block.2.1.attention.self.value.bias"]
    assert torch.equal(enc.block3[1].attn.kv.weight[: key_w.shape[0]], key_w)
    assert torch.equal(enc.block3[1].attn.kv.bias[value_b.shape[0] :], value_b)
    assert torch.equal(enc.patch_embed2.norm.bias, hf[f"{prefix}encoder.patch_embeddings.1.layer_norm.bias"])
    assert torch.equal(enc.norm4.weight, hf[f"{prefix}encoder.layer_norm.3.weight"])


def test_hf_mit_safetensors_into_segmentor(tmp_path):
    enc_state = _random_state(mit("b0"))
    hf = {k: v.contiguous() for k, v in _to_hf(enc_state).items()}
    hf["decode_head.classifier.weight"] = torch.randn(150, 256, 1, 1)  # HF's own head: ignored, not loaded
    path = tmp_path / "model.safetensors"
    save_file(hf, str(path))
    seg, lines = _seg(), []
    conv_seg = seg.decode_head.conv_seg.weight.clone()
    report = load_weights(seg, path, log=lines.append)
    _assert_equal_state(seg.state_dict(), enc_state, "backbone.")
    assert torch.equal(seg.decode_head.conv_seg.weight, conv_seg)
    assert report.ignored == ["decode_head.classifier.weight"] and "decode head left at its init" in lines[0]


# ---------------------------------------------------------------------------------------------------------------
# Strictness


def test_strict_lists_missing_and_unexpected_then_non_strict_loads_the_rest(tmp_path):
    enc_state = _random_state(mit("b0"))
    del enc_state["block2.1.mlp.fc2.weight"]
    enc_state["block9.0.extra.weight"] = torch.zeros(3)
    enc_state["norm1.weight"] = torch.randn(5)  # wrong shape
    path = tmp_path / "mit_b0.pth"
    torch.save(enc_state, path)
    model = mit("b0")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        load_weights(model, path, log=lambda s: None)
    msg = str(err.value)
    assert "missing (1): block2.1.mlp.fc2.weight" in msg and "unexpected (1): block9.0.extra.weight" in msg
    assert "shape mismatch (1): norm1.weight: file (5,) vs model (32,)" in msg and str(path) in msg
    _assert_equal_state(model.state_dict(), before)  # nothing was loaded

    lines = []
    with pytest.warns(UserWarning, match="block2.1.mlp.fc2.weight"):
        report = load_weights(model, path, strict=False, log=lines.append)
    assert report.missing == ["block2.1.mlp.fc2.weight"] and report.unexpected == ["block9.0.extra.weight"]
    assert report.mismatched == ["norm1.weight: file (5,) vs model (32,)"]
    state = model.state_dict()
    assert torch.equal(state["block2.1.mlp.fc2.weight"], before["block2.1.mlp.fc2.weight"])
    assert torch.equal(state["norm1.weight"], before["norm1.weight"])
    good = {k: v for k, v in enc_state.items() if k in before and v.shape == before[k].shape}
    _assert_equal_state(state, good)
    assert report.loaded == len(good) == len(before) - 2 and "1 missing, 1 unexpected, 1 mismatched" in lines[0]


def test_wrong_encoder_size_gets_a_hint(tmp_path):
    path = tmp_path / "mit_b1.pth"
    torch.save(_random_state(mit("b1")), path)
    with pytest.raises(CheckpointError, match="hint: the file holds a mit_b1 encoder, the model is mit_b0"):
        load_weights(mit("b0"), path, log=lambda s: None)


# ---------------------------------------------------------------------------------------------------------------
# Reading safety and errors


def test_custom_pickled_object_needs_trust(tmp_path):
    enc_state = _random_state(mit("b0"))
    path = tmp_path / "custom.pth"
    torch.save({"state_dict": enc_state, "meta": CustomMeta()}, path)
    with pytest.raises(CheckpointError, match="needs full unpickling.*trust=True.*--trust-checkpoint"):
        load_weights(mit("b0"), path, log=lambda s: None)
    enc = mit("b0")
    assert load_weights(enc, path, trust=True, log=lambda s: None).loaded == len(enc_state)
    _assert_equal_state(enc.state_dict(), enc_state)


def test_corrupt_missing_and_truncated_files(tmp_path):
    bad = tmp_path / "bad.pth"
    rng = random.Random(0)
    for _ in range(50):  # random bytes make torch.load raise many different exception types
        bad.write_bytes(rng.randbytes(rng.choice([3, 100, 4096])))
        with pytest.raises(CheckpointError) as err:
            load_weights(mit("b0"), bad, trust=True, log=lambda s: None)
        assert str(err.value) == f"cannot read checkpoint {bad}: not a torch checkpoint or corrupt"

    missing = tmp_path / "nope.pth"
    with pytest.raises(CheckpointError, match=f"cannot read checkpoint {missing}: no such file"):
        load_weights(mit("b0"), missing, log=lambda s: None)

    good = tmp_path / "good.pth"
    torch.save(_random_state(mit("b0")), good)
    trunc = tmp_path / "trunc.pth"
    trunc.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="cannot read checkpoint") as err:
        load_weights(mit("b0"), trunc, log=lambda s: None)
    assert str(trunc) in str(err.value)


def test_unknown_layout_and_teacher_from_encoder_file(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(CheckpointError, match="unrecognised checkpoint layout; first keys: fc.weight"):
        load_weights(mit("b0"), path, log=lambda s: None)
    torch.save(_random_state(mit("b0")), path)
    with pytest.raises(CheckpointError, match="teacher"):
        load_weights(_seg(), path, key="teacher", log=lambda s: None)
    with pytest.raises(ValueError, match="key must be"):
        load_weights(_seg(), path, key="ema", log=lambda s: None)


# ---------------------------------------------------------------------------------------------------------------
# Our own format


def test_save_checkpoint_round_trip(tmp_path):
    student, teacher = _seg(), _seg()
    student.load_state_dict(_random_state(student))
    teacher.load_state_dict(_random_state(teacher, 5.0))
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    for p in student.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    cfg = Config()
    path = tmp_path / "run" / "iter_100.pth"
    save_checkpoint(path, student=student, teacher=teacher, optimizer=opt, iteration=100, config=cfg, extra={"a": 1})
    assert sorted(os.listdir(path.parent)) == ["iter_100.pth"]  # no .tmp left behind

    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["format"] == "daformer_fast" and raw["iteration"] == 100 and raw["extra"] == {"a": 1}
    assert raw["config"] == config_to_dict(cfg)
    assert len(raw["optimizer"]["state"]) == len(list(student.parameters()))

    for key, src in (("auto", student), ("teacher", teacher)):
        seg = _seg()
        report = load_weights(seg, path, key=key, log=lambda s: None)
        assert report.format == "daformer_fast" and report.loaded == len(src.state_dict())
        _assert_equal_state(seg.state_dict(), src.state_dict())


def test_save_checkpoint_is_atomic_and_plain(tmp_path, monkeypatch):
    path = tmp_path / "latest.pth"
    first = _seg()
    save_checkpoint(path, student=first)
    with pytest.raises(TypeError, match="extra\\['meta'\\] is a CustomMeta"):
        save_checkpoint(path, student=_seg(), extra={"meta": CustomMeta()})

    def crash(obj, f):  # a write that dies half-way
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, student=_seg())
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["latest.pth"]
    seg = _seg()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_weights(seg, path, log=lambda s: None)
    _assert_equal_state(seg.state_dict(), first.state_dict())
    with pytest.raises(CheckpointError, match="no teacher weights"):
        load_weights(_seg(), path, key="teacher", log=lambda s: None)
