"""DeepLabV2, DeepLabV3+, UPerNet and the SegFormer-adapter neck against docs/architectures.md: parameter counts, the official
key lists and shapes (strict loading), a plain functional re-statement of each forward, output strides, init."""

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from daformer_fast.models.deeplab import DepthwiseSeparableASPPHead, DLV2Head, SegFormerAdapter
from daformer_fast.models.upernet import UPerHead

R101 = (256, 512, 1024, 2048)
MIT_B5 = (64, 128, 320, 512)
K = 19


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# ---- the official key lists, written from docs/architectures.md (prefix `decode_head.`; each entry is a conv "site") ----------


def _dlv3p_sites(cin: int, c1_in: int) -> dict[str, tuple[int, ...]]:
    sites = {
        "conv_seg": (K, 512, 1, 1),
        "image_pool.1.conv": (512, cin, 1, 1),
        "aspp_modules.0.conv": (512, cin, 1, 1),
        "bottleneck.conv": (512, 2560, 3, 3),
        "c1_bottleneck.conv": (48, c1_in, 1, 1),
        "sep_bottleneck.0.depthwise_conv.conv": (560, 1, 3, 3),
        "sep_bottleneck.0.pointwise_conv.conv": (512, 560, 1, 1),
        "sep_bottleneck.1.depthwise_conv.conv": (512, 1, 3, 3),
        "sep_bottleneck.1.pointwise_conv.conv": (512, 512, 1, 1),
    }
    for i in (1, 2, 3):
        sites[f"aspp_modules.{i}.depthwise_conv.conv"] = (cin, 1, 3, 3)
        sites[f"aspp_modules.{i}.pointwise_conv.conv"] = (512, cin, 1, 1)
    return sites


def _uper_sites(C: int) -> dict[str, tuple[int, ...]]:
    sites = {
        "conv_seg": (K, C, 1, 1),
        "bottleneck.conv": (C, 512 + 4 * C, 3, 3),
        "fpn_bottleneck.conv": (C, 4 * C, 3, 3),
    }
    for j in range(4):
        sites[f"psp_modules.{j}.1.conv"] = (C, 512, 1, 1)
    for i, c in enumerate((64, 128, 320)):
        sites[f"lateral_convs.{i}.conv"] = (C, c, 1, 1)
        sites[f"fpn_convs.{i}.conv"] = (C, C, 3, 3)
    return sites


def official_keys(sites: dict[str, tuple[int, ...]], bn: bool) -> dict[str, tuple[int, ...]]:
    """Expand conv sites into state-dict entries: no norm → `.weight` + `.bias`; BN → the conv's `.weight` and the
    sibling `bn` quintuple. `conv_seg` is a plain Conv2d with a bias either way."""
    keys = {}
    for site, shape in sites.items():
        keys[f"decode_head.{site}.weight"] = shape
        if not bn or site == "conv_seg":
            keys[f"decode_head.{site}.bias"] = shape[:1]
        else:
            bn_site = site[: -len(".conv")] + ".bn"
            for leaf in ("weight", "bias", "running_mean", "running_var"):
                keys[f"decode_head.{bn_site}.{leaf}"] = shape[:1]
            keys[f"decode_head.{bn_site}.num_batches_tracked"] = ()
    return keys


def shapes(m: nn.Module) -> dict[str, tuple[int, ...]]:
    return {f"decode_head.{k}": tuple(v.shape) for k, v in m.state_dict().items()}


@pytest.fixture(scope="module")
def dlv3p_nodbn():
    return DepthwiseSeparableASPPHead(R101, K, norm=False)


@pytest.fixture(scope="module")
def uper512():
    return UPerHead(MIT_B5, K)


@pytest.fixture(scope="module")
def dlv2red():
    return DLV2Head(R101, K)


def test_param_counts_match_the_original(dlv2red, dlv3p_nodbn, uper512):
    assert n_params(dlv2red) == 700_454
    assert n_params(DLV2Head(R101, K, dilations=(6, 12, 18, 24))) == 1_400_908
    assert n_params(dlv3p_nodbn) == 17_686_563
    assert n_params(DepthwiseSeparableASPPHead(R101, K)) == 17_697_923
    # sfa: the neck's output (MiT F4, 512 ch) is the ASPP input, MiT F1 (64 ch) the low-level input.
    assert n_params(DepthwiseSeparableASPPHead(MIT_B5, K, norm=False)) == 13_699_107
    assert n_params(uper512) == 29_644_307
    assert n_params(UPerHead(MIT_B5, K, channels=256)) == 8_334_099


def test_key_lists_and_shapes(dlv2red, dlv3p_nodbn, uper512):
    dlv2 = {"aspp_modules.0.conv": (K, 2048, 3, 3), "aspp_modules.1.conv": (K, 2048, 3, 3)}
    assert shapes(dlv2red) == official_keys(dlv2, bn=False)
    assert len(dlv3p_nodbn.state_dict()) == 30
    assert shapes(dlv3p_nodbn) == official_keys(_dlv3p_sites(2048, 256), bn=False)
    with_bn = DepthwiseSeparableASPPHead(R101, K)
    assert shapes(with_bn) == official_keys(_dlv3p_sites(2048, 256), bn=True)
    assert len(with_bn.state_dict()) == 2 + 14 * 6
    sfa = DepthwiseSeparableASPPHead(MIT_B5, K, norm=False)
    assert shapes(sfa) == official_keys(_dlv3p_sites(512, 64), bn=False)
    assert len(uper512.state_dict()) == 74
    assert shapes(uper512) == official_keys(_uper_sites(512), bn=True)
    assert shapes(UPerHead(MIT_B5, K, channels=256)) == official_keys(_uper_sites(256), bn=True)


def test_strict_load_of_the_official_keys(dlv3p_nodbn, uper512, dlv2red):
    for head, keys in (
        (dlv2red, official_keys({f"aspp_modules.{i}.conv": (K, 2048, 3, 3) for i in (0, 1)}, bn=False)),
        (dlv3p_nodbn, official_keys(_dlv3p_sites(2048, 256), bn=False)),
        (uper512, official_keys(_uper_sites(512), bn=True)),
    ):
        sd = {}
        for k, shape in keys.items():
            name = k.removeprefix("decode_head.")
            sd[name] = torch.tensor(7) if name.endswith("num_batches_tracked") else torch.randn(shape)
        head = copy.deepcopy(head)  # the fixtures are shared with the init test
        head.load_state_dict(sd, strict=True)
        got = head.state_dict()
        assert all(torch.equal(got[k], v) for k, v in sd.items())


# ---- init ---------------------------------------------------------------------------------------------------------


def _std_close(w: torch.Tensor, std: float, rel: float = 0.04) -> bool:
    return abs(w.float().std().item() / std - 1) < rel and abs(w.float().mean().item()) < 4 * std / math.sqrt(w.numel())


def test_init_statistics(dlv2red, dlv3p_nodbn, uper512):
    for m in dlv2red.aspp_modules:
        assert _std_close(m.conv.weight, 0.01, rel=0.02) and not m.conv.bias.any()
    for head in (dlv3p_nodbn, uper512):
        assert _std_close(head.conv_seg.weight, 0.01) and not head.conv_seg.bias.any()
    h = dlv3p_nodbn
    # Kaiming-normal fan_out (ReLU gain): std = sqrt(2 / (out_channels · kh · kw)); groups are not divided out.
    kaiming = {
        h.bottleneck.conv: 512 * 9,
        h.aspp_modules[1].depthwise_conv.conv: 2048 * 9,
        h.aspp_modules[2].pointwise_conv.conv: 512,
        h.c1_bottleneck.conv: 48,
        h.sep_bottleneck[0].depthwise_conv.conv: 560 * 9,
        uper512.fpn_bottleneck.conv: 512 * 9,
        uper512.lateral_convs[0].conv: 512,
    }
    for conv, fan_out in kaiming.items():
        assert _std_close(conv.weight, math.sqrt(2 / fan_out)), conv
    # nodbn: no BatchNorm anywhere, a (zero) bias on every conv; with BN: no conv bias but conv_seg, BN 1/0, stats 0/1.
    assert not any(isinstance(m, nn.BatchNorm2d) for m in h.modules())
    convs = [m for m in h.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 15 and all(c.bias is not None and not c.bias.any() for c in convs)
    bns = [m for m in uper512.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 12
    assert all((b.weight == 1).all() and not b.bias.any() and not b.running_mean.any() for b in bns)
    assert all((b.running_var == 1).all() for b in bns)
    assert all(c.bias is None for c in uper512.modules() if isinstance(c, nn.Conv2d) and c is not uper512.conv_seg)


def test_uper_lateral_and_fpn_relus_are_not_in_place(uper512):
    assert all(not m.activate.inplace for m in [*uper512.lateral_convs, *uper512.fpn_convs])
    assert uper512.bottleneck.activate.inplace and uper512.psp_modules[0][1].activate.inplace


# ---- forward: an independent functional re-statement of each head -------------------------------------------------

# Stride-matched tiny maps for a 65×65 input: ResNet d8 gives 17 (stride 4) then 9 for F2–F4; MiT gives 17, 9, 5, 3.
RES_SIZES, MIT_SIZES = (17, 9, 9, 9), (17, 9, 5, 3)
RES_C, MIT_C = (8, 12, 16, 24), (6, 10, 14, 20)


def feats_of(channels, sizes, B=2):
    return [torch.randn(B, c, s, s) for c, s in zip(channels, sizes)]


def randomise(head: nn.Module) -> nn.Module:
    """Non-trivial BN affine/statistics and conv biases, so that the comparison exercises every term."""
    with torch.no_grad():
        for m in head.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.normal_(0, 0.2)
                m.running_mean.normal_(0, 0.2), m.running_var.uniform_(0.5, 2.0)
            elif isinstance(m, nn.Conv2d) and m.bias is not None:
                m.bias.normal_(0, 0.2)
    return head


def up(x, size):
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def cm(x, m, train, *, pad=0, dil=1, groups=1, relu=True):
    """ConvModule as docs/architectures.md §0 states it: conv → BN (when there is one) → ReLU."""
    y = F.conv2d(x, m.conv.weight, m.conv.bias, padding=pad, dilation=dil, groups=groups)
    if hasattr(m, "bn"):
        b = m.bn
        y = F.batch_norm(y, b.running_mean.clone(), b.running_var.clone(), b.weight, b.bias, train, 0.1, 1e-5)
    return F.relu(y) if relu else y


def dw(x, m, train, d):
    """Depthwise 3×3 (pad = dilation = d) ConvModule, then a pointwise one; each with its own norm and ReLU."""
    return cm(cm(x, m.depthwise_conv, train, pad=d, dil=d, groups=x.shape[1]), m.pointwise_conv, train)


def classify(x, head, train, p):
    return F.conv2d(F.dropout2d(x, p, train), head.conv_seg.weight, head.conv_seg.bias)


def adaptive_avg(x, s):
    """PyTorch's adaptive-pool bins, written out: bin i covers [⌊i·n/s⌋, ⌈(i+1)·n/s⌉)."""
    H, W = x.shape[-2:]
    rows = [(i * H // s, -(-(i + 1) * H // s)) for i in range(s)]
    cols = [(j * W // s, -(-(j + 1) * W // s)) for j in range(s)]
    return torch.stack([torch.stack([x[..., a:b, c:d].mean((-2, -1)) for c, d in cols], -1) for a, b in rows], -2)


def dlv2_ref(head, feats, dilations):
    x = feats[3]
    outs = [cm(x, m, False, pad=d, dil=d, relu=False) for m, d in zip(head.aspp_modules, dilations)]
    return sum(outs[1:], outs[0])


def dlv3p_ref(head, feats, train, dilations, p):
    x, c1 = feats[3], feats[0]
    pooled = cm(x.mean((2, 3), keepdim=True), head.image_pool[1], train)
    branches = [up(pooled, x.shape[-2:])]
    for m, d in zip(head.aspp_modules, dilations):
        branches.append(cm(x, m, train) if d == 1 else dw(x, m, train, d))
    y = cm(torch.cat(branches, 1), head.bottleneck, train, pad=1)
    c = cm(c1, head.c1_bottleneck, train)
    y = torch.cat([up(y, c.shape[-2:]), c], 1)  # [ASPP output, reduced C1]
    y = dw(dw(y, head.sep_bottleneck[0], train, 1), head.sep_bottleneck[1], train, 1)
    return classify(y, head, train, p)


def uper_ref(head, feats, train, pool_scales, p):
    top = feats[3]
    ppm = [cm(adaptive_avg(top, s), head.psp_modules[j][1], train) for j, s in enumerate(pool_scales)]
    ppm = [up(q, top.shape[-2:]) for q in ppm]
    lat = [cm(feats[i], head.lateral_convs[i], train) for i in range(3)]
    lat.append(cm(torch.cat([top, *ppm], 1), head.bottleneck, train, pad=1))  # [F4, ppm_1, ..., ppm_S]
    lat[2] = lat[2] + up(lat[3], lat[2].shape[-2:])  # cumulative: each level adds the already-summed one above
    lat[1] = lat[1] + up(lat[2], lat[1].shape[-2:])
    lat[0] = lat[0] + up(lat[1], lat[0].shape[-2:])
    P = [cm(lat[i], head.fpn_convs[i], train, pad=1) for i in range(3)] + [lat[3]]  # no fpn conv on the PPM level
    y = cm(torch.cat([P[0]] + [up(q, P[0].shape[-2:]) for q in P[1:]], 1), head.fpn_bottleneck, train, pad=1)
    return classify(y, head, train, p)


def _compare(head, ref, feats, p):
    """Eval mode; train mode (batch statistics, and dropout with the same mask drawn from the same seed)."""
    head.eval()
    with torch.no_grad():
        torch.testing.assert_close(head(feats), ref(False, 0.0))
    head.train()
    torch.manual_seed(3)
    expected = ref(True, p).detach()
    torch.manual_seed(3)
    out = head(feats)
    torch.testing.assert_close(out, expected)
    out.square().mean().backward()  # the train graph differentiates (no in-place write on a saved activation)
    assert all(q.grad is not None for q in head.parameters())
    return out


@pytest.mark.parametrize("dilations", [(6, 12), (1, 2, 3)])
def test_dlv2_forward_is_the_sum_of_dilated_convs(dilations):
    feats = feats_of(RES_C, RES_SIZES)
    head = randomise(DLV2Head(RES_C, 5, dilations=dilations))
    out = _compare(head, lambda train, p: dlv2_ref(head, feats, dilations), feats, 0.0)
    assert out.shape == (2, 5, 9, 9)  # the stride of feats[3]


@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("dilations", [(1, 12, 24, 36), (1, 2, 3)])
def test_dlv3p_forward_matches_functional(norm, dilations):
    feats = feats_of(RES_C, RES_SIZES)
    for p in (0.0, 0.1):
        head = randomise(
            DepthwiseSeparableASPPHead(RES_C, 5, norm=norm, channels=16, c1_channels=4, dilations=dilations, dropout=p)
        )
        out = _compare(head, lambda train, q: dlv3p_ref(head, feats, train, dilations, q), feats, p)
        assert out.shape == (2, 5, 17, 17)  # the stride of feats[0]


@pytest.mark.parametrize("norm", [True, False])
def test_uper_forward_matches_functional(norm):
    feats = feats_of(MIT_C, MIT_SIZES)
    for p in (0.0, 0.1):
        head = randomise(UPerHead(MIT_C, 5, channels=8, norm=norm, dropout=p))
        out = _compare(head, lambda train, q: uper_ref(head, feats, train, (1, 2, 3, 6), q), feats, p)
        assert out.shape == (2, 5, 17, 17)


def test_adaptive_pool_bins_are_torchs():
    # The reference's written-out bins (overlapping on a 5×5 map at 3 bins, repeating at 6) equal torch's pool.
    x = torch.randn(1, 2, 5, 5)
    for s in (1, 2, 3, 6):
        torch.testing.assert_close(adaptive_avg(x, s), nn.AdaptiveAvgPool2d(s)(x))
    assert torch.allclose(adaptive_avg(x, 3)[..., 1, 1], x[..., 1:4, 1:4].mean((-2, -1)))


# ---- the neck --------------------------------------------------------------------------------------------------------


def test_neck_upsamples_f4_only_and_leaves_the_input_alone():
    feats = feats_of(MIT_C, MIT_SIZES)
    before = list(feats)
    out = SegFormerAdapter()(feats)
    assert out is not feats and len(feats) == 4 and all(a is b for a, b in zip(feats, before))
    assert all(out[i] is feats[i] for i in range(3))
    assert out[3].shape == (2, 20, 12, 12)  # ×4 of the 3×3 map
    torch.testing.assert_close(out[3], up(feats[3], (12, 12)))


def test_neck_bilinear_values_by_hand():
    x = torch.tensor([[[[0.0, 4.0], [8.0, 12.0]]]])
    out = SegFormerAdapter(out_layers=(0,), scales=(2,))([x])[0]
    # align_corners=False: output pixel centres sit at -1/4, 1/4, 3/4, 5/4 of the input grid (clamped at the edges).
    row = torch.tensor([0.0, 1.0, 3.0, 4.0])
    col = torch.tensor([0.0, 2.0, 6.0, 8.0])
    torch.testing.assert_close(out[0, 0], col[:, None] + row[None, :])


def test_neck_concatenates_listed_levels_in_order():
    feats = [torch.randn(2, c, s, s) for c, s in zip(MIT_C, (24, 12, 6, 3))]
    out = SegFormerAdapter(out_layers=(2, 3), scales=(2, 4))(feats)
    torch.testing.assert_close(out[3], torch.cat([up(feats[2], (12, 12)), up(feats[3], (12, 12))], 1))
    same = SegFormerAdapter(scales=(1,))(feats)
    assert same[3] is not feats[3] and torch.equal(same[3], feats[3])
    with pytest.raises(ValueError):
        SegFormerAdapter(out_layers=(3, 3), scales=(4, 4))


def test_sfa_dlv3p_pipeline_output_stride():
    feats = feats_of(MIT_C, MIT_SIZES)
    head = DepthwiseSeparableASPPHead(MIT_C, 5, norm=False, channels=16, c1_channels=4).eval()
    with torch.no_grad():
        out = head(SegFormerAdapter()(feats))
    assert out.shape == (2, 5, 17, 17)
