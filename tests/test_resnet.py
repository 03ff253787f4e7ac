"""CNN encoders (timm ResNetV1c / ResNeSt / ResNeXt at output stride 8) against an independent plain-PyTorch
definition written from the mmseg structure, their parameter counts, strides, and the OpenMMLab checkpoint layout.

The reference below uses the original's (mmseg) module names, so its state dict is an OpenMMLab-layout file; it is
mapped with `from_mmseg_resnet` and loaded strictly into our encoder before the outputs are compared.
"""

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from daformer_fast.checkpoint import CheckpointError, load_weights
from daformer_fast.models.mit import mit
from daformer_fast.models.resnet import CNN_ENCODERS, cnn_encoder, from_mmseg_resnet, guess_cnn
from daformer_fast.models.segmentor import Segmentor

# ---------------------------------------------------------------------------------------------------------------
# Independent reference (mmseg structure and names; strides (1, 2, 1, 1), dilations (1, 1, 2, 4), the first block of
# a dilated stage at half the dilation)

# name -> (kind, stem width, full-depth blocks), written from the paper configs, not read from CNN_ENCODERS
_REF = {
    "resnet50_v1c": ("v1c", 64, (3, 4, 6, 3)),
    "resnet101_v1c": ("v1c", 64, (3, 4, 23, 3)),
    "resnest50": ("resnest", 64, (3, 4, 6, 3)),
    "resnest101": ("resnest", 128, (3, 4, 23, 3)),
    "resnest200": ("resnest", 128, (3, 24, 36, 3)),
    "resnext50_32x4d": ("resnext", 64, (3, 4, 6, 3)),
    "resnext101_32x4d": ("resnext", 64, (3, 4, 23, 3)),
}
_SMALL = (1, 2, 2, 2)  # every block kind: strided, dilation-1 first of a dilated stage, fully dilated


class RefSplitAttention(nn.Module):
    """ResNeSt's split-attention 3x3 conv, radix 2, cardinality 1, reduction factor 4."""

    def __init__(self, width: int, dilation: int, radix: int = 2) -> None:
        super().__init__()
        self.radix = radix
        inter = max(width * radix // 4, 32)
        self.conv = nn.Conv2d(width, width * radix, 3, 1, dilation, dilation, groups=radix, bias=False)
        self.bn0 = nn.BatchNorm2d(width * radix)
        self.fc1 = nn.Conv2d(width, inter, 1)
        self.bn1 = nn.BatchNorm2d(inter)
        self.fc2 = nn.Conv2d(inter, width * radix, 1)

    def forward(self, x):
        x = F.relu(self.bn0(self.conv(x)))
        n, r = x.shape[0], self.radix
        splits = x.view(n, r, -1, *x.shape[2:])  # (N, R, W, h, w)
        gap = splits.sum(1).mean(dim=(2, 3), keepdim=True)
        logits = self.fc2(F.relu(self.bn1(self.fc1(gap))))  # (N, R*W, 1, 1), channel = r*W + w
        attn = torch.softmax(logits.view(n, r, -1), dim=1)  # softmax across the radix
        return (attn.view(n, r, -1, 1, 1) * splits).sum(1)


class RefBottleneck(nn.Module):
    def __init__(self, kind: str, cin: int, planes: int, stride: int, dilation: int, first: bool) -> None:
        super().__init__()
        self.kind = kind
        width = planes * 4 // 64 * 32 if kind == "resnext" else planes
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        if kind == "resnest":
            self.conv2 = RefSplitAttention(width, dilation)  # stride moves to the avd pool after it
            self.avd_layer = nn.AvgPool2d(3, stride, padding=1) if stride > 1 else None
        else:
            groups = 32 if kind == "resnext" else 1
            self.conv2 = nn.Conv2d(width, width, 3, stride, dilation, dilation, groups=groups, bias=False)
            self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = None
        if first:
            if kind == "resnest":  # avg-down: kernel = stride pool (1x1 at stride 1), then a stride-1 conv
                pool = nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False)
                conv = nn.Conv2d(cin, planes * 4, 1, bias=False)
                self.downsample = nn.Sequential(pool, conv, nn.BatchNorm2d(planes * 4))
            else:
                conv = nn.Conv2d(cin, planes * 4, 1, stride, bias=False)
                self.downsample = nn.Sequential(conv, nn.BatchNorm2d(planes * 4))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        if self.kind == "resnest":
            out = self.conv2(out)
            if self.avd_layer is not None:
                out = self.avd_layer(out)
        else:
            out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class RefResNet(nn.Module):
    def __init__(self, kind: str, stem: int, blocks: tuple[int, ...]) -> None:
        super().__init__()
        if kind == "resnext":  # plain 7x7 stem
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
        else:
            h = stem // 2
            self.stem = nn.Sequential(
                nn.Conv2d(3, h, 3, 2, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU(),
                nn.Conv2d(h, h, 3, 1, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU(),
                nn.Conv2d(h, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU(),
            )  # fmt: skip
        self.kind = kind
        cin = 64 if kind == "resnext" else stem
        for i, (n, stride, dil) in enumerate(zip(blocks, (1, 2, 1, 1), (1, 1, 2, 4), strict=True)):
            planes = 64 * 2**i
            layer = [RefBottleneck(kind, cin, planes, stride, dil // 2 if dil > 1 else dil, True)]
            layer += [RefBottleneck(kind, planes * 4, planes, 1, dil, False) for _ in range(n - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*layer))
            cin = planes * 4

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x))) if self.kind == "resnext" else self.stem(x)
        x = F.max_pool2d(x, 3, 2, 1)
        outs = []
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
            outs.append(x)
        return outs


def _ref(name: str, blocks=None) -> RefResNet:
    kind, stem, full = _REF[name]
    return RefResNet(kind, stem, blocks or full)


def _randomise(model: nn.Module) -> dict[str, torch.Tensor]:
    """Random weights and BN statistics (well-scaled, so deep stacks stay finite); returns the state dict."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.normal_(0, 0.1, generator=gen)
                m.running_mean.normal_(0, 0.1, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
                m.num_batches_tracked.fill_(3)
            elif isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.normal_(0, (2.0 / fan_in) ** 0.5, generator=gen)
                if m.bias is not None:
                    m.bias.normal_(0, 0.1, generator=gen)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _ours_from_ref(name: str, ref: RefResNet, blocks=None):
    ours = cnn_encoder(name, layers=blocks)
    state, ignored = from_mmseg_resnet(ref.state_dict())
    ours.load_state_dict(state, strict=True)  # the same key set and shapes
    assert ignored == []
    return ours


# ---------------------------------------------------------------------------------------------------------------
# Outputs against the reference


@pytest.mark.parametrize("name", ["resnet50_v1c", "resnest50", "resnest101", "resnext50_32x4d"])
def test_stage_outputs_match_the_reference_eval_and_train(name):
    ref = _ref(name, _SMALL)
    _randomise(ref)
    ours = _ours_from_ref(name, ref, _SMALL)
    x = torch.randn(2, 3, 41, 38)  # odd sizes exercise the ceil-mode shortcut pool at the image edge
    for mode in ("eval", "train"):
        getattr(ref, mode)(), getattr(ours, mode)()
        with torch.no_grad():
            want, got = ref(x), ours(x)
        assert isinstance(got, list) and len(got) == 4
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert g.shape == w.shape, (mode, i)
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5, msg=f"{mode} stage {i + 1}")
    # Train mode updated the BN statistics identically (norm_eval False).
    mapped, _ = from_mmseg_resnet(ref.state_dict())
    for k, v in ours.state_dict().items():
        torch.testing.assert_close(v, mapped[k], atol=1e-6, rtol=1e-5, msg=k)
    assert int(ours.layer4[0].bn3.num_batches_tracked) == 4


def test_unpatched_timm_resnest_differs_from_the_reference_in_layers_3_and_4():
    """The shortcut pool replacement is what makes ResNeSt match: timm's own model differs there."""
    ref = _ref("resnest50", _SMALL)
    _randomise(ref)
    raw = timm.create_model("resnest50d", num_classes=0, global_pool="", output_stride=8, layers=list(_SMALL))
    state, _ = from_mmseg_resnet(ref.state_dict())
    raw.load_state_dict(state, strict=False)  # only fc is missing
    ref.eval(), raw.eval()
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        want = ref(x)
        got = [raw.layer1(raw.maxpool(raw.act1(raw.bn1(raw.conv1(x)))))]
        for layer in (raw.layer2, raw.layer3, raw.layer4):
            got.append(layer(got[-1]))
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got[2], want[2], atol=1e-3) and not torch.allclose(got[3], want[3], atol=1e-3)


# ---------------------------------------------------------------------------------------------------------------
# Sizes at full depth


_PARAMS = {
    "resnet50_v1c": 23_527_264, "resnet101_v1c": 42_519_392, "resnest50": 25_434_240, "resnest101": 46_226_016,
    "resnest200": 68_152_544, "resnext50_32x4d": 22_979_904, "resnext101_32x4d": 42_128_704,
}  # fmt: skip
_ENTRIES = {"resnet50_v1c": 330, "resnet101_v1c": 636, "resnest50": 474, "resnest101": 933, "resnest200": 1824}


@pytest.mark.parametrize("name", list(_PARAMS))
def test_full_depth_counts_and_keys_equal_the_reference(name):
    ours, ref = cnn_encoder(name), _ref(name)
    assert sum(p.numel() for p in ours.parameters()) == _PARAMS[name]
    assert sum(p.numel() for p in ref.parameters()) == _PARAMS[name]
    state = ours.state_dict()
    if name in _ENTRIES:
        assert len(state) == _ENTRIES[name]
    mapped, _ = from_mmseg_resnet(ref.state_dict())
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in mapped.items()}
    assert not any(k.startswith("fc.") for k in state) and ours.out_channels == (256, 512, 1024, 2048)
    assert guess_cnn(state) == name and ours.name == name
    assert not any(type(m).__name__ == "DropPath" for m in ours.modules())  # drop path 0 builds none


def test_table_facts_and_unknown_name():
    assert set(CNN_ENCODERS) == set(_REF)
    for name, (kind, stem, blocks) in _REF.items():
        spec = CNN_ENCODERS[name]
        assert (spec.kind, spec.stem_channels, spec.blocks) == (kind, stem, blocks)
        assert str(spec.depth) in name and spec.pretrained.endswith(".pth")
    with pytest.raises(ValueError, match="unknown CNN encoder 'resnet18'"):
        cnn_encoder("resnet18")


def _down(n: int, times: int) -> int:
    for _ in range(times):
        n = (n - 1) // 2 + 1  # a 3x3 stride-2 pad-1 step (conv, max-pool, avd pool, or the ceil-mode 2x2 pool)
    return n


@pytest.mark.parametrize("name", ["resnet101_v1c", "resnest101", "resnext101_32x4d"])
@pytest.mark.parametrize("hw", [(40, 40), (41, 37), (33, 50)])
def test_output_strides_and_channels(name, hw):
    enc = cnn_encoder(name, layers=(1, 1, 2, 1)).eval()
    with torch.no_grad():
        feats = enc(torch.randn(1, 3, *hw))
    h4, w4 = _down(hw[0], 2), _down(hw[1], 2)
    h8, w8 = _down(hw[0], 3), _down(hw[1], 3)
    want = [(256, h4, w4), (512, h8, w8), (1024, h8, w8), (2048, h8, w8)]
    assert [tuple(f.shape[1:]) for f in feats] == want
    assert _down(512, 2) == 128 and _down(512, 3) == 64  # the 512x512 crop: /4 and /8


# ---------------------------------------------------------------------------------------------------------------
# Key mapping and checkpoint loading


def test_from_mmseg_resnet_renames_the_deep_stem_only():
    names = ("stem.0.weight", "stem.4.running_var", "stem.7.bias", "layer2.0.downsample.1.weight", "conv1.weight",
             "bn1.weight", "fc.weight", "fc.bias")  # fmt: skip
    t = {k: torch.randn(2) for k in names}
    out, ignored = from_mmseg_resnet(t)
    assert sorted(ignored) == ["fc.bias", "fc.weight"]
    assert out["conv1.0.weight"] is t["stem.0.weight"] and out["conv1.4.running_var"] is t["stem.4.running_var"]
    assert out["bn1.bias"] is t["stem.7.bias"] and out["conv1.weight"] is t["conv1.weight"]
    assert out["layer2.0.downsample.1.weight"] is t["layer2.0.downsample.1.weight"]
    # A BN without its counter (an old torch.save) gets the zero the original's non-strict load leaves.
    assert torch.equal(out["conv1.4.num_batches_tracked"], torch.tensor(0))
    assert len(out) == 7 and not any(k.startswith("stem.") for k in out)


class _Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv_seg = nn.Conv2d(2048, 19, 1)


def _openmmlab_file(tmp_path, name: str, wrap: bool, drop_counters: bool = False):
    state = _randomise(_ref(name, _SMALL))
    if drop_counters:
        state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    state |= {"fc.weight": torch.randn(1000, 2048), "fc.bias": torch.randn(1000)}
    path = tmp_path / CNN_ENCODERS[name].pretrained
    torch.save({"state_dict": state, "meta": {"epoch": 100}} if wrap else state, path)
    return path, state


@pytest.mark.parametrize("name,wrap", [("resnet50_v1c", True), ("resnest101", False), ("resnext50_32x4d", True)])
def test_openmmlab_file_loads_strictly_into_encoder_and_segmentor(tmp_path, name, wrap):
    path, file = _openmmlab_file(tmp_path, name, wrap)
    enc, lines = cnn_encoder(name, layers=_SMALL), []
    report = load_weights(enc, path, log=lines.append)
    n = len(enc.state_dict())
    assert report.format == "mmcv-resnet" and report.loaded == n == len(file) - 2
    assert sorted(report.ignored) == ["fc.bias", "fc.weight"]
    assert lines == [f"loaded {path.name} (mmcv-resnet): {n}/{n} encoder tensors; ignored 2 (fc.*)"]
    # Where the tensors landed, by module (the stem by hand; every other key keeps its name).
    if "stem.0.weight" in file:
        assert torch.equal(enc.conv1[0].weight, file["stem.0.weight"])
        assert torch.equal(enc.conv1[6].weight, file["stem.6.weight"])
        assert torch.equal(enc.bn1.running_var, file["stem.7.running_var"])
        assert torch.equal(enc.conv1[1].bias, file["stem.1.bias"])
    else:
        assert torch.equal(enc.conv1.weight, file["conv1.weight"]) and torch.equal(enc.bn1.weight, file["bn1.weight"])
    own = enc.state_dict()
    for k, v in file.items():
        if not k.startswith(("stem.", "fc.")):
            assert torch.equal(own[k], v), k
    if name == "resnest101":
        assert torch.equal(enc.layer3[1].conv2.fc1.bias, file["layer3.1.conv2.fc1.bias"])
        assert torch.equal(enc.layer2[0].downsample[1].weight, file["layer2.0.downsample.1.weight"])

    seg, lines = Segmentor(cnn_encoder(name, layers=_SMALL), _Head(), 19), []
    head = seg.decode_head.conv_seg.weight.clone()
    report = load_weights(seg, path, log=lines.append)
    assert report.loaded == n and not (report.missing or report.unexpected or report.mismatched)
    for k, v in enc.state_dict().items():
        assert torch.equal(seg.backbone.state_dict()[k], v), k
    assert torch.equal(seg.decode_head.conv_seg.weight, head)
    assert lines == [f"loaded {path.name} (mmcv-resnet): {n}/{n} encoder tensors; decode head left at its init; "
                     "ignored 2 (fc.*)"]  # fmt: skip


def test_file_without_bn_counters_and_our_own_encoder_state(tmp_path):
    path, _ = _openmmlab_file(tmp_path, "resnet50_v1c", wrap=False, drop_counters=True)
    enc = cnn_encoder("resnet50_v1c", layers=_SMALL)
    load_weights(enc, path, log=lambda s: None)  # strict
    assert int(enc.bn1.num_batches_tracked) == 0 and int(enc.layer3[1].bn2.num_batches_tracked) == 0

    # A bare state dict of our encoder (timm's names) is the same layout.
    src = cnn_encoder("resnest50", layers=_SMALL)
    state = _randomise(src)
    own = tmp_path / "encoder.pth"
    torch.save(state, own)
    dst = cnn_encoder("resnest50", layers=_SMALL)
    assert load_weights(dst, own, log=lambda s: None).format == "mmcv-resnet"
    for k, v in state.items():
        assert torch.equal(dst.state_dict()[k], v), k


def test_encoder_family_mismatch_is_one_clear_error(tmp_path):
    mit_file = tmp_path / "mit_b0.pth"
    torch.save({k: torch.randn_like(v.float()) for k, v in mit("b0").state_dict().items()}, mit_file)
    seg = Segmentor(cnn_encoder("resnet50_v1c", layers=_SMALL), _Head(), 19)
    with pytest.raises(CheckpointError) as err:
        load_weights(seg, mit_file, strict=False, log=lambda s: None)
    msg = str(err.value)
    assert msg == (f"checkpoint {mit_file} (segformer-mit) does not fit the model: the file holds a MiT encoder "
                   "(mit_b0), the model has resnet50_v1c")  # fmt: skip

    # The reverse, with a full-depth file so that the hint can name it.
    r50 = tmp_path / "resnet50_v1c.pth"
    torch.save(cnn_encoder("resnet50_v1c").state_dict(), r50)
    with pytest.raises(CheckpointError, match=r"holds a CNN encoder \(resnet50_v1c\), the model has mit_b0$"):
        load_weights(mit("b0"), r50, log=lambda s: None)
    hint = "hint: the file holds a resnet50_v1c encoder, the model is resnet101_v1c"
    with pytest.raises(CheckpointError, match=hint):
        load_weights(cnn_encoder("resnet101_v1c"), r50, log=lambda s: None)
