"""DANet, ISANet, the DAFormer head's ISA and context-only-at-F4 fusions, and the SegFormer head as DAFormer defines it:
key tables, parameter counts and init against docs/architectures.md §0, §2.3–§2.5 and §2.8; forwards against a
plain-PyTorch functional re-statement written here (explicit bmm for PAM/CAM, explicit per-group loops for ISA's
interlaced partition), in float64 and eval mode with randomised BatchNorm statistics."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from daformer_fast.models.attention_heads import (
    ChannelAttention,
    DAHead,
    ISAHead,
    PositionAttention,
    interlaced_relations,
)
from daformer_fast.models.heads import DAFormerHead, SegFormerHead
from daformer_fast.ops.dispatch import using_impl

MIT = (64, 128, 320, 512)
R101 = (256, 512, 1024, 2048)
TINY = (4, 8, 12, 24)


def _count(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _table(m: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(v.shape)) for k, v in m.state_dict().items()]


def _conv(name, shape):  # a plain conv (or a norm-free ConvModule's `.conv`): weight and bias
    return [(f"{name}.weight", shape), (f"{name}.bias", (shape[0],))]


def _cm_bn(name, shape):  # a ConvModule with BatchNorm: no conv bias, a `bn` quintuple
    c = shape[0]
    bn = [(f"{name}.bn.{t}", (c,)) for t in ("weight", "bias", "running_mean", "running_var")]
    return [(f"{name}.conv.weight", shape), *bn, (f"{name}.bn.num_batches_tracked", ())]


# ---------------------------------------------------------------------------------------------------------------
# Key tables and parameter counts (19 classes)


@pytest.fixture(scope="module")
def danet_nodbn():
    return DAHead(R101, 19, norm=False)


@pytest.fixture(scope="module")
def isanet_nodbn():
    return ISAHead(R101, 19, norm=False)


def test_danet_nodbn_key_table_and_counts(danet_nodbn):
    expected = [
        *_conv("conv_seg", (19, 512, 1, 1)), *_conv("pam_in_conv.conv", (512, 2048, 3, 3)),
        *_conv("pam.key_project", (64, 512, 1, 1)), *_conv("pam.query_project", (64, 512, 1, 1)),
        *_conv("pam.value_project", (512, 512, 1, 1)), ("pam.gamma.scale", ()),
        *_conv("pam_out_conv.conv", (512, 512, 3, 3)), *_conv("pam_conv_seg", (19, 512, 1, 1)),
        *_conv("cam_in_conv.conv", (512, 2048, 3, 3)), ("cam.gamma.scale", ()),
        *_conv("cam_out_conv.conv", (512, 512, 3, 3)), *_conv("cam_conv_seg", (19, 512, 1, 1)),
    ]  # fmt: skip
    assert _table(danet_nodbn) == expected and len(expected) == 22
    assert _count(danet_nodbn) == 23_952_571
    assert _count(DAHead(R101, 19)) == 23_954_619  # with BN: each of the 4 ConvModules −512 bias +1024 BN affine


def test_isanet_nodbn_key_table_and_counts(isanet_nodbn):
    expected = [*_conv("conv_seg", (19, 512, 1, 1)), *_conv("in_conv.conv", (512, 2048, 3, 3))]
    for r in ("global_relation", "local_relation"):
        for p in ("key_project", "query_project"):
            expected += _conv(f"{r}.{p}.0.conv", (256, 512, 1, 1)) + _conv(f"{r}.{p}.1.conv", (256, 256, 1, 1))
        expected += _conv(f"{r}.value_project", (512, 512, 1, 1)) + _conv(f"{r}.output_project.conv", (512, 512, 1, 1))
    expected += _conv("out_conv.conv", (512, 1024, 1, 1))
    assert _table(isanet_nodbn) == expected and len(expected) == 30
    assert _count(isanet_nodbn) == 11_811_347
    with_bn = ISAHead(R101, 19)
    assert _count(with_bn) == 11_815_443
    assert "in_conv.bn.running_var" in with_bn.state_dict() and "in_conv.conv.bias" not in with_bn.state_dict()


def _embeds(last):
    out = [e for i, c in enumerate(MIT[:3]) for e in _conv(f"embed_layers.{i}.proj", (256, c))]
    return out + last


def test_daformer_isa_key_table():
    head = DAFormerHead(MIT, 19, fusion="isa")
    expected = _embeds(_conv("embed_layers.3.proj", (256, 512))) + _cm_bn("fuse_layer.in_conv", (256, 1024, 1, 1))
    for r in ("global_relation", "local_relation"):
        f = f"fuse_layer.{r}"
        expected += _cm_bn(f"{f}.key_project", (256, 256, 1, 1)) + _cm_bn(f"{f}.query_project", (256, 256, 1, 1))
        expected += _conv(f"{f}.value_project", (256, 256, 1, 1)) + _cm_bn(f"{f}.output_project", (256, 256, 1, 1))
    expected += _conv("conv_seg", (19, 256, 1, 1))
    assert dict(_table(head)) == dict(expected) and len(expected) == 56
    assert head.fuse_layer.out_conv is None  # no residual concat


def test_daformer_sepaspp_bottleneck_key_table():
    head = DAFormerHead(MIT, 19, fusion="sepaspp_bottleneck")
    a = "embed_layers.3.1.aspp_modules"
    last = _conv("embed_layers.3.0", (256, 512, 1, 1)) + _cm_bn(f"{a}.0", (256, 256, 1, 1))
    for i in (1, 2, 3):
        last += _cm_bn(f"{a}.{i}.depthwise_conv", (256, 1, 3, 3)) + _cm_bn(f"{a}.{i}.pointwise_conv", (256, 256, 1, 1))
    last += _cm_bn("embed_layers.3.1.bottleneck", (256, 1024, 3, 3))
    expected = _embeds(last) + _cm_bn("fuse_layer", (256, 1024, 1, 1)) + _conv("conv_seg", (19, 256, 1, 1))
    assert dict(_table(head)) == dict(expected) and len(expected) == 64
    dilations = [m.depthwise_conv.conv.dilation for m in head.embed_layers[3][1].aspp_modules[1:]]
    assert dilations == [(6, 6), (12, 12), (18, 18)]


@pytest.mark.parametrize(
    "fusion, params",
    [("conv1", 530_707), ("isa", 1_058_579), ("sepaspp_bottleneck", 3_163_155), ("aspp", 9_969_939),
     ("sepaspp", 3_712_275)],
)  # fmt: skip
def test_daformer_head_param_counts(fusion, params):
    assert _count(DAFormerHead(MIT, 19, fusion=fusion)) == params


def test_segformer_head_key_table_and_counts():
    """The original's names (`linear_c` ModuleDict "0".."3") and its dead 128→K `conv_seg`, counted."""
    head = SegFormerHead(MIT, 19, 768)
    expected = _conv("conv_seg", (19, 128, 1, 1))
    expected += [e for i, c in enumerate(MIT) for e in _conv(f"linear_c.{i}.proj", (768, c))]
    expected += _cm_bn("linear_fuse", (768, 3072, 1, 1)) + _conv("linear_pred", (19, 768, 1, 1))
    assert _table(head) == expected and len(expected) == 18
    assert _count(head) == 3_167_398
    assert _count(SegFormerHead(R101, 19, 768)) == 5_330_086


# ---------------------------------------------------------------------------------------------------------------
# Init (docs/architectures.md §0 and the head sections)


def _assert_kaiming_fan_out(w: torch.Tensor, tol: float = 0.03):
    fan_out = w.shape[0] * w[0, 0].numel()  # mmcv's kaiming: groups not divided out
    assert w.mean().abs() < 4 * math.sqrt(2 / fan_out) / math.sqrt(w.numel())
    assert w.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=tol)


def _assert_torch_default(w: torch.Tensor, b: torch.Tensor, tol: float = 0.05):
    bound = 1 / math.sqrt(w[0].numel())  # kaiming-uniform a=√5 and the bias rule both give U(±1/√fan_in)
    assert w.abs().max() <= bound and w.std().item() == pytest.approx(bound / math.sqrt(3), rel=tol)
    assert b.abs().max() <= bound and (b != 0).all()


def test_danet_init(danet_nodbn):
    h = danet_nodbn
    _assert_kaiming_fan_out(h.pam_in_conv.conv.weight)
    _assert_kaiming_fan_out(h.cam_out_conv.conv.weight)
    assert (h.pam_in_conv.conv.bias == 0).all() and (h.cam_out_conv.conv.bias == 0).all()
    assert h.conv_seg.weight.std().item() == pytest.approx(0.01, rel=0.05) and (h.conv_seg.bias == 0).all()
    for m in (h.pam_conv_seg, h.cam_conv_seg, h.pam.query_project, h.pam.key_project, h.pam.value_project):
        _assert_torch_default(m.weight, m.bias, tol=0.1)  # the auxiliary classifiers do not get N(0, 0.01)
    for g in (h.pam.gamma.scale, h.cam.gamma.scale):
        assert g.shape == () and g.item() == 0.0 and g.requires_grad


def test_isanet_init():
    h = ISAHead(R101, 19)
    _assert_kaiming_fan_out(h.in_conv.conv.weight)
    _assert_kaiming_fan_out(h.global_relation.key_project[0].conv.weight)
    _assert_kaiming_fan_out(h.local_relation.output_project.conv.weight)
    _assert_torch_default(h.global_relation.value_project.weight, h.global_relation.value_project.bias)
    bns = [m for m in h.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 12 and all((m.weight == 1).all() and (m.bias == 0).all() for m in bns)
    assert h.conv_seg.weight.std().item() == pytest.approx(0.01, rel=0.05) and (h.conv_seg.bias == 0).all()


def test_segformer_init_and_dead_conv_seg():
    h = SegFormerHead(MIT, 19, 768)
    _assert_torch_default(h.linear_pred.weight, h.linear_pred.bias, tol=0.1)  # the live classifier: default init
    _assert_torch_default(h.linear_c["3"].proj.weight, h.linear_c["3"].proj.bias)
    _assert_kaiming_fan_out(h.linear_fuse.conv.weight)
    assert (h.linear_fuse.bn.weight == 1).all() and (h.linear_fuse.bn.bias == 0).all()
    assert h.conv_seg.weight.std().item() == pytest.approx(0.01, rel=0.1) and (h.conv_seg.bias == 0).all()
    assert not any(p.requires_grad for p in h.conv_seg.parameters())
    # Dead: the output ignores it, and every trainable parameter gets a gradient (DDP without unused parameters).
    small = SegFormerHead(TINY, 5, 16).eval()
    feats = _feats(TINY, (8, 8), dtype=torch.float32)
    out = small(feats)
    with torch.no_grad():
        small.conv_seg.weight.add_(1.0)
        small.conv_seg.bias.add_(1.0)
    assert torch.equal(small(feats), out)
    small.train()(feats).square().sum().backward()
    assert all(p.grad is not None for p in small.parameters() if p.requires_grad)


def test_sepaspp_bottleneck_raw_conv_keeps_default_init():
    h = DAFormerHead(MIT, 19, fusion="sepaspp_bottleneck")
    _assert_torch_default(h.embed_layers[3][0].weight, h.embed_layers[3][0].bias)
    _assert_kaiming_fan_out(h.embed_layers[3][1].bottleneck.conv.weight)
    _assert_kaiming_fan_out(h.embed_layers[3][1].aspp_modules[1].depthwise_conv.conv.weight, tol=0.05)


# ---------------------------------------------------------------------------------------------------------------
# Functional re-statement (float64, eval mode)


def _feats(dims, size1, sizes=None, dtype=torch.float64):
    """Encoder maps: level i at size1 / 2^i unless `sizes` gives them."""
    sizes = sizes or [(max(1, size1[0] >> i), max(1, size1[1] >> i)) for i in range(len(dims))]
    return [torch.randn(2, c, *s, dtype=dtype) for c, s in zip(dims, sizes)]


def _prepare(head: nn.Module) -> dict[str, torch.Tensor]:
    """float64, eval, BN statistics and affine randomised, DANet's γ non-zero; returns the state dict."""
    head.double().eval()
    with torch.no_grad():
        for m in head.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.3)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
        for name, p in head.named_parameters():
            if name.endswith("gamma.scale"):
                p.fill_(0.7 if name.startswith("pam") else -0.4)
    return head.state_dict()


def _cm(x, sd, name, pad=0, dil=1, groups=1):
    y = F.conv2d(x, sd[f"{name}.conv.weight"], sd.get(f"{name}.conv.bias"), padding=pad, dilation=dil, groups=groups)
    if f"{name}.bn.weight" in sd:
        y = (y - sd[f"{name}.bn.running_mean"][:, None, None]) / torch.sqrt(sd[f"{name}.bn.running_var"] + 1e-5)[
            :, None, None] * sd[f"{name}.bn.weight"][:, None, None] + sd[f"{name}.bn.bias"][:, None, None]  # fmt: skip
    return y.clamp_min(0)


def _plain(x, sd, name):
    return F.conv2d(x, sd[f"{name}.weight"], sd[f"{name}.bias"])


def _pam(x, sd, p):
    n, c, h, w = x.shape
    q = _plain(x, sd, f"{p}.query_project").reshape(n, -1, h * w).permute(0, 2, 1)  # (n, hw, d)
    k = _plain(x, sd, f"{p}.key_project").reshape(n, -1, h * w)  # (n, d, hw)
    v = _plain(x, sd, f"{p}.value_project").reshape(n, c, h * w)
    attn = torch.softmax(torch.bmm(q, k), dim=2)  # no 1/√d
    out = torch.bmm(v, attn.permute(0, 2, 1)).reshape(n, c, h, w)
    return sd[f"{p}.gamma.scale"] * out + x


def _cam(x, sd, p):
    n, c, h, w = x.shape
    X = x.reshape(n, c, h * w)
    energy = torch.bmm(X, X.permute(0, 2, 1))
    attn = torch.softmax(energy.max(dim=2, keepdim=True).values - energy, dim=2)
    return sd[f"{p}.gamma.scale"] * torch.bmm(attn, X).reshape(n, c, h, w) + x


def _danet_ref(feats, sd):
    x = feats[3]
    pam = _cm(_pam(_cm(x, sd, "pam_in_conv", 1), sd, "pam"), sd, "pam_out_conv", 1)
    cam = _cm(_cam(_cm(x, sd, "cam_in_conv", 1), sd, "cam"), sd, "cam_out_conv", 1)
    return _plain(pam + cam, sd, "conv_seg"), _plain(pam, sd, "pam_conv_seg"), _plain(cam, sd, "cam_conv_seg")


def _relation(x, sd, p, num_convs, d):
    def project(name):
        y = x
        for j in range(num_convs):
            y = _cm(y, sd, f"{p}.{name}" + (f".{j}" if num_convs > 1 else ""))
        return y.flatten(2)

    q, k, v = project("query_project"), project("key_project"), _plain(x, sd, f"{p}.value_project").flatten(2)
    attn = torch.softmax(torch.bmm(q.transpose(1, 2), k) / math.sqrt(d), dim=2)
    return _cm(torch.bmm(v, attn.transpose(1, 2)).reshape(x.shape), sd, f"{p}.output_project")


def _isa_loops(x, sd, p, num_convs, d, factor):
    """Interlaced partition with explicit per-group loops: zero-pad, attend within each strided (global) group in
    place, then within each contiguous (local) block in place, crop."""
    n, c, h, w = x.shape
    Sh, Sw = factor
    H, W = -(-h // Sh) * Sh, -(-w // Sw) * Sw
    top, left = (H - h) // 2, (W - w) // 2
    xp = x.new_zeros(n, c, H, W)
    xp[:, :, top : top + h, left : left + w] = x
    g = torch.empty_like(xp)
    for ly in range(Sh):
        for lx in range(Sw):
            g[:, :, ly::Sh, lx::Sw] = _relation(xp[:, :, ly::Sh, lx::Sw], sd, f"{p}global_relation", num_convs, d)
    out = torch.empty_like(g)
    for gy in range(H // Sh):
        for gx in range(W // Sw):
            blk = (slice(None), slice(None), slice(gy * Sh, (gy + 1) * Sh), slice(gx * Sw, (gx + 1) * Sw))
            out[blk] = _relation(g[blk], sd, f"{p}local_relation", num_convs, d)
    return out[:, :, top : top + h, left : left + w]


def _isanet_ref(feats, sd, d, factor):
    x = _cm(feats[3], sd, "in_conv", 1)
    y = _isa_loops(x, sd, "", 2, d, factor)
    return _plain(_cm(torch.cat([y, x], 1), sd, "out_conv"), sd, "conv_seg")


def _embed(x, sd, name, size):
    """The Linear `proj` on every pixel (as a 1×1 map product), upsampled to `size` when its size differs."""
    e = torch.einsum("nchw,ec->nehw", x, sd[f"{name}.proj.weight"]) + sd[f"{name}.proj.bias"][:, None, None]
    return e if e.shape[-2:] == size else F.interpolate(e, size=size, mode="bilinear", align_corners=False)


IMPLS = ["reference", "auto"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("norm", [False, True])
def test_danet_forward_matches_functional(impl, norm):
    head = DAHead(TINY, 5, norm=norm, channels=16, pam_channels=8)
    sd = _prepare(head)
    feats = _feats(TINY, (24, 28), sizes=[(24, 28), (12, 14), (6, 7), (6, 7)])
    with using_impl(impl):
        out = head(feats)
    assert torch.allclose(out, _danet_ref(feats, sd)[0], rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "size, factor", [((16, 16), (8, 8)), ((10, 13), (8, 8)), ((9, 6), (4, 3)), ((5, 7), (2, 4))]
)  # fmt: skip
def test_isanet_forward_matches_per_group_loops(impl, size, factor):
    head = ISAHead(TINY, 5, channels=16, isa_channels=8, down_factor=factor)
    sd = _prepare(head)
    feats = _feats(TINY, size, sizes=[(2, 2), (2, 2), (2, 2), size])
    with using_impl(impl):
        out = head(feats)
    assert out.shape == (2, 5, *size)
    assert torch.allclose(out, _isanet_ref(feats, sd, 8, factor), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("size, factor", [((10, 13), (8, 8)), ((6, 9), (3, 3)), ((7, 5), (2, 3))])
def test_interlaced_partition_round_trips(size, factor):
    """With identity relations the partition, its inverse and the crop give the map back exactly; with a relation
    that adds its batch index, a pixel (y, x) of the padded map gets global index (b·S_h + l_y)·S_w + l_x plus local
    index (b·G_h + g_y)·G_w + g_x (the original's batch orders)."""
    x = torch.randn(2, 3, *size)
    assert torch.equal(interlaced_relations(x, nn.Identity(), nn.Identity(), factor), x)

    class AddBatchIndex(nn.Module):
        def forward(self, t):
            return t + torch.arange(t.shape[0], dtype=t.dtype)[:, None, None, None]

    (h, w), (Sh, Sw) = size, factor
    Gh, Gw = -(-h // Sh), -(-w // Sw)
    top, left = (Gh * Sh - h) // 2, (Gw * Sw - w) // 2
    got = interlaced_relations(torch.zeros(2, 1, h, w), AddBatchIndex(), AddBatchIndex(), factor)
    for b in range(2):
        for y in range(h):
            for xx in range(w):
                py, px = y + top, xx + left
                glob = (b * Sh + py % Sh) * Sw + px % Sw
                loc = (b * Gh + py // Sh) * Gw + px // Sw
                assert got[b, 0, y, xx].item() == glob + loc


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("size1", [(16, 16), (13, 11)])
def test_daformer_isa_fusion_matches_functional(impl, size1):
    head = DAFormerHead(TINY, 5, channels=16, fusion="isa")
    sd = _prepare(head)
    feats = _feats(TINY, size1)
    with using_impl(impl):
        out = head(feats)
    e = torch.cat([_embed(x, sd, f"embed_layers.{i}", size1) for i, x in enumerate(feats)], 1)
    ref = _isa_loops(_cm(e, sd, "fuse_layer.in_conv"), sd, "fuse_layer.", 1, 256, (8, 8))
    assert torch.allclose(out, _plain(ref, sd, "conv_seg"), rtol=1e-9, atol=1e-10)


def test_daformer_sepaspp_bottleneck_matches_functional():
    """F4 arrives at F1's size (the neck upsampled it ×8): the context-at-F4 embedding runs there, unresized."""
    head = DAFormerHead(TINY, 5, channels=16, fusion="sepaspp_bottleneck")
    sd = _prepare(head)
    feats = _feats(TINY, (20, 20), sizes=[(20, 20), (10, 10), (5, 5), (20, 20)])
    e = [_embed(x, sd, f"embed_layers.{i}", (20, 20)) for i, x in enumerate(feats[:3])]
    r = _plain(feats[3], sd, "embed_layers.3.0")
    a = "embed_layers.3.1.aspp_modules"
    branches = [_cm(r, sd, f"{a}.0")]
    for i, dil in zip((1, 2, 3), (6, 12, 18)):
        branches.append(_cm(_cm(r, sd, f"{a}.{i}.depthwise_conv", dil, dil, 16), sd, f"{a}.{i}.pointwise_conv"))
    e.append(_cm(torch.cat(branches, 1), sd, "embed_layers.3.1.bottleneck", 1))
    ref = _plain(_cm(torch.cat(e, 1), sd, "fuse_layer"), sd, "conv_seg")
    assert torch.allclose(head(feats), ref, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("dims", [TINY, (6, 10, 14, 18)])
def test_segformer_forward_matches_functional(dims):
    """Ascending concatenation [c1, c2, c3, c4]; with the ResNet layout F2–F4 share one size, all upsampled."""
    head = SegFormerHead(dims, 5, 16)
    sd = _prepare(head)
    sizes = None if dims == TINY else [(12, 12), (6, 6), (6, 6), (6, 6)]
    feats = _feats(dims, (12, 12), sizes)
    e = torch.cat([_embed(x, sd, f"linear_c.{i}", (12, 12)) for i, x in enumerate(feats)], 1)
    ref = _plain(_cm(e, sd, "linear_fuse"), sd, "linear_pred")
    assert torch.allclose(head(feats), ref, rtol=1e-9, atol=1e-10)
    swapped = torch.cat([e[:, 48:], e[:, 32:48], e[:, 16:32], e[:, :16]], 1)  # NVlabs' [c4, c3, c2, c1]
    assert not torch.allclose(head(feats), _plain(_cm(swapped, sd, "linear_fuse"), sd, "linear_pred"))


# ---------------------------------------------------------------------------------------------------------------
# DANet's output rule and the attention blocks at init


def test_danet_returns_three_outputs_only_when_training_with_grad():
    head = DAHead(TINY, 5, norm=False, channels=16, pam_channels=8, dropout=0.0)
    feats = _feats(TINY, (12, 12), sizes=[(12, 12), (6, 6), (6, 6), (6, 6)], dtype=torch.float32)
    head.train()
    outs = head(feats)
    assert isinstance(outs, tuple) and len(outs) == 3 and all(o.shape == (2, 5, 6, 6) for o in outs)
    with torch.no_grad():
        teacher = head(feats)  # the EMA teacher: train mode, no autograd
    assert isinstance(teacher, torch.Tensor)
    head.eval()
    evaluated = head(feats)
    assert isinstance(evaluated, torch.Tensor)
    # No dropout and no BN: the single output is the fused (pam_cam) one; the tuple is (pam_cam, pam, cam).
    assert torch.allclose(teacher, outs[0], atol=1e-6) and torch.allclose(evaluated, outs[0], atol=1e-6)
    for got, ref in zip(outs, _danet_ref(feats, head.state_dict())):
        assert torch.allclose(got, ref, atol=1e-5)
    assert not torch.allclose(outs[1], outs[2], atol=1e-3)
    head.train()
    sum(o.square().mean() for o in head(feats)).backward()
    assert all(p.grad is not None for p in head.parameters())  # all three losses reach every parameter


def test_attention_blocks_are_identity_at_init():
    x = torch.randn(2, 16, 5, 7)
    pam, cam = PositionAttention(16, 8), ChannelAttention()
    assert torch.equal(pam(x), x) and torch.equal(cam(x), x)
    head = DAHead(TINY, 5, channels=16, pam_channels=8)
    assert head.pam.gamma.scale.item() == 0.0 and head.cam.gamma.scale.item() == 0.0
