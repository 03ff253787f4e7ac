"""MiT + heads against the original's key table, parameter counts, shapes, init, param groups, attention switch."""

import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from daformer_fast.config import ModelConfig, OptimConfig
from daformer_fast.models import MIT_SIZES, build_segmentor, mit, param_groups
from daformer_fast.models.mit import MixFFN, _feature_shapes, from_segformer_mit
from daformer_fast.ops import attention, attention_ref
from daformer_fast.ops.dispatch import using_impl
from daformer_fast.step import _teacher_inference_mode


@pytest.fixture(scope="module")
def b5():
    return mit("b5")


@pytest.fixture(scope="module")
def daformer_b5():
    return build_segmentor(ModelConfig())


def test_mit_b5_counts_match_spec(b5):
    sd = b5.state_dict()
    assert sum(p.numel() for p in b5.parameters()) == 81_443_008
    assert len(sd) == 1052


def test_mit_b5_key_table(b5):
    sd = b5.state_dict()
    C = (64, 128, 320, 512)
    assert sd["patch_embed1.proj.weight"].shape == (64, 3, 7, 7)
    assert sd["patch_embed2.proj.weight"].shape == (128, 64, 3, 3)
    assert sd["patch_embed3.proj.weight"].shape == (320, 128, 3, 3)
    assert sd["patch_embed4.proj.weight"].shape == (512, 320, 3, 3)
    for i, (c, depth, r) in enumerate(zip(C, (3, 6, 40, 3), (8, 4, 2, 1)), start=1):
        assert sd[f"patch_embed{i}.norm.weight"].shape == (c,)
        assert sd[f"norm{i}.bias"].shape == (c,)
        assert f"block{i}.{depth - 1}.mlp.fc2.weight" in sd and f"block{i}.{depth}.mlp.fc2.weight" not in sd
        p = f"block{i}.0."
        assert sd[p + "attn.q.weight"].shape == (c, c) and sd[p + "attn.q.bias"].shape == (c,)
        assert sd[p + "attn.kv.weight"].shape == (2 * c, c) and sd[p + "attn.kv.bias"].shape == (2 * c,)
        assert sd[p + "attn.proj.weight"].shape == (c, c)
        assert sd[p + "mlp.fc1.weight"].shape == (4 * c, c)
        assert sd[p + "mlp.dwconv.dwconv.weight"].shape == (4 * c, 1, 3, 3)
        assert sd[p + "mlp.fc2.weight"].shape == (c, 4 * c)
        assert sd[p + "norm1.weight"].shape == (c,) and sd[p + "norm2.bias"].shape == (c,)
        if r > 1:
            assert sd[p + "attn.sr.weight"].shape == (c, c, r, r) and sd[p + "attn.norm.weight"].shape == (c,)
        else:
            assert p + "attn.sr.weight" not in sd and p + "attn.norm.weight" not in sd
    pattern = re.compile(
        r"(patch_embed[1-4]\.(proj|norm)|norm[1-4]|block[1-4]\.\d+\."
        r"(norm1|norm2|attn\.(q|kv|proj|sr|norm)|mlp\.(fc1|fc2|dwconv\.dwconv)))\.(weight|bias)"
    )
    assert all(pattern.fullmatch(k) for k in sd), [k for k in sd if not pattern.fullmatch(k)][:5]


def test_layernorm_eps_gelu_and_drop_path(b5):
    assert b5.patch_embed1.norm.eps == 1e-5 and b5.block1[0].attn.norm.eps == 1e-5
    assert b5.block3[7].norm1.eps == 1e-6 and b5.block3[7].norm2.eps == 1e-6 and b5.norm4.eps == 1e-6
    blocks = [blk for i in range(1, 5) for blk in getattr(b5, f"block{i}")]
    assert len(blocks) == 52
    assert isinstance(blocks[0].drop_path, nn.Identity)
    rates = [0.0] + [blk.drop_path.p for blk in blocks[1:]]
    assert rates == pytest.approx([0.1 * i / 51 for i in range(52)], abs=1e-7)


def test_daformer_head_keys_and_counts(daformer_b5):
    sd = daformer_b5.decode_head.state_dict()
    assert sum(p.numel() for p in daformer_b5.decode_head.parameters()) == 3_712_275
    assert sum(p.numel() for p in daformer_b5.parameters()) == 85_155_283
    assert sd["conv_seg.weight"].shape == (19, 256, 1, 1)
    for i, c in enumerate((64, 128, 320, 512)):
        assert sd[f"embed_layers.{i}.proj.weight"].shape == (256, c)
    assert sd["fuse_layer.aspp_modules.0.conv.weight"].shape == (256, 1024, 1, 1)
    for j in (1, 2, 3):
        assert sd[f"fuse_layer.aspp_modules.{j}.depthwise_conv.conv.weight"].shape == (1024, 1, 3, 3)
        assert sd[f"fuse_layer.aspp_modules.{j}.depthwise_conv.bn.running_var"].shape == (1024,)
        assert sd[f"fuse_layer.aspp_modules.{j}.pointwise_conv.conv.weight"].shape == (256, 1024, 1, 1)
        d = daformer_b5.decode_head.fuse_layer.aspp_modules[j].depthwise_conv.conv.dilation
        assert d == ((6, 6), (12, 12), (18, 18))[j - 1]
    assert sd["fuse_layer.bottleneck.conv.weight"].shape == (256, 1024, 3, 3)
    assert "fuse_layer.bottleneck.bn.num_batches_tracked" in sd
    assert not any(k.endswith("conv.bias") for k in sd if k.startswith("fuse_layer"))  # ConvModules have no bias
    assert isinstance(daformer_b5.decode_head.dropout, nn.Dropout2d) and daformer_b5.decode_head.dropout.p == 0.1


def test_head_init(daformer_b5):
    head = daformer_b5.decode_head
    w = head.conv_seg.weight
    assert head.conv_seg.bias.abs().max() == 0
    assert 0.008 < w.std().item() < 0.012
    conv = head.fuse_layer.bottleneck.conv.weight  # kaiming fan_out: std = sqrt(2 / (256*3*3))
    assert conv.std().item() == pytest.approx((2 / (256 * 9)) ** 0.5, rel=0.05)
    assert torch.all(head.fuse_layer.bottleneck.bn.weight == 1)


@pytest.mark.parametrize("size", list(MIT_SIZES))
def test_each_size_builds_with_spec_dims(size):
    model = mit(size)
    spec = MIT_SIZES[size]
    for i in range(4):
        assert len(getattr(model, f"block{i + 1}")) == spec.depths[i]
        assert getattr(model, f"norm{i + 1}").normalized_shape == (spec.embed_dims[i],)


def test_forward_shapes_b0_odd_size():
    model = mit("b0").eval()
    x = torch.randn(1, 3, 70, 50)
    outs = model(x)
    assert [tuple(o.shape[1:]) for o in outs] == _feature_shapes("b0", 70, 50)
    assert [tuple(o.shape[1:]) for o in model(torch.randn(1, 3, 64, 64))] == [
        (32, 16, 16), (64, 8, 8), (160, 4, 4), (256, 2, 2)]  # fmt: skip


@pytest.mark.parametrize("decoder", ["daformer_sepaspp", "daformer_conv1", "daformer_aspp", "segformer"])
def test_segmentor_logits_at_stride_4(decoder):
    model = build_segmentor(ModelConfig(backbone="mit_b0", decoder=decoder, num_classes=7))
    model.eval()
    x = torch.randn(2, 3, 64, 96)
    logits = model(x)
    assert logits.shape == (2, 7, 16, 24)
    full = model.predict(x, out_size=(128, 192))
    assert full.shape == (2, 7, 128, 192)


def test_segformer_head_width_and_keys():
    """The head as DAFormer's code defines it: `linear_c` is a ModuleDict keyed "0".."3" (NVlabs' `linear_c1..4`
    and its reversed [c4..c1] concatenation are gone; docs/architectures.md §2.5), so F4's embedding is
    `linear_c.3`."""
    m = build_segmentor(ModelConfig(backbone="mit_b2", decoder="segformer"))
    sd = m.decode_head.state_dict()
    assert sd["linear_c.3.proj.weight"].shape == (768, 512)
    assert sd["linear_fuse.conv.weight"].shape == (768, 3072, 1, 1)
    assert sd["linear_pred.weight"].shape == (19, 768, 1, 1)
    m0 = build_segmentor(ModelConfig(backbone="mit_b0", decoder="segformer"))
    assert m0.decode_head.linear_fuse.conv.weight.shape == (256, 1024, 1, 1)


def test_param_groups_match_the_reference_substring_rule():
    model = build_segmentor(ModelConfig(backbone="mit_b1"))
    groups = param_groups(model, OptimConfig())
    by_name = {g["name"]: g for g in groups}
    assert by_name["head"]["lr"] == pytest.approx(6e-4) and by_name["head"]["weight_decay"] == 0.01
    assert by_name["backbone"]["lr"] == 6e-5 and by_name["backbone"]["weight_decay"] == 0.01
    assert by_name["backbone_norm"]["lr"] == 6e-5 and by_name["backbone_norm"]["weight_decay"] == 0.0
    # Reference rule (mmcv): first matching substring of the full name among pos_block, head, norm.
    expected = {"head": 0, "backbone_norm": 0, "backbone": 0}
    for name, p in model.named_parameters():
        key = "head" if "head" in name else "backbone_norm" if "norm" in name else "backbone"
        expected[key] += p.numel()
    got = {g["name"]: sum(p.numel() for p in g["params"]) for g in groups}
    assert got == expected
    # MiT-b1: 4 stages × (patch norm + stage norm) + 2 blocks × (norm1, norm2 + attn.norm where sr>1), × 2 tensors.
    n_norm_tensors = sum(len(g["params"]) for g in groups if g["name"] == "backbone_norm")
    assert n_norm_tensors == 2 * (4 * 2 + 2 * (2 + 1) * 3 + 2 * 2)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    # Biases of the encoder's Linear/conv layers keep weight decay, as in the reference.
    bias_ids = {id(model.backbone.block1[0].attn.q.bias), id(model.backbone.patch_embed1.proj.bias)}
    assert bias_ids <= {id(p) for p in by_name["backbone"]["params"]}


def test_attention_reference_equals_sdpa():
    q, k, v = torch.randn(2, 5, 37, 64), torch.randn(2, 5, 9, 64), torch.randn(2, 5, 9, 64)
    ref = attention_ref(q, k, v, 0.125)
    manual = torch.softmax(torch.einsum("bmnd,bmld->bmnl", q, k) * 0.125, -1) @ v
    torch.testing.assert_close(ref, manual, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attention(q, k, v, 0.125, impl="auto"), ref, atol=1e-5, rtol=1e-5)


def test_model_reference_and_fast_attention_agree():
    """The model's ops follow the process default (`kernels.impl`): the same weights under auto and reference."""
    torch.manual_seed(1)
    model = mit("b0").eval()
    x = torch.randn(1, 3, 64, 64)
    with using_impl("auto"):
        fast = model(x)
    with using_impl("reference"):
        ref = model(x)
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert not all(torch.equal(a, b) for a, b in zip(fast, ref))  # two implementations really ran


def test_drop_path_factors_train_and_eval():
    enc = mit("b0", drop_path_rate=0.5)
    keep = [1.0 - 0.5 * i / 7 for i in range(8)]
    enc.train()
    torch.testing.assert_close(enc.drop_keep.flatten(), torch.tensor(keep))
    factors = enc.drop_factors(4000)
    assert factors[0] is None  # rate 0: the first block drops nothing
    for k, k32, f in zip(keep[1:], enc.drop_keep.flatten()[1:], factors[1:]):
        assert f.shape == (2, 4000, 1, 1)
        assert torch.all((f == 0) | (f == 1.0 / k32))  # survivors scaled by 1/keep
        kept = (f != 0).float().mean(1).flatten()  # each branch on its own
        assert torch.allclose(kept, torch.tensor([k, k]), atol=0.04), (k, kept)
    assert not torch.equal(factors[5][0], factors[5][1]) and not torch.equal(factors[5], factors[6])
    enc.eval()
    assert all(f is None for f in enc.drop_factors(4))
    enc.train()
    _teacher_inference_mode(enc)  # what the teachers get: DropPath off, the rest in training mode
    assert enc.training and all(f is None for f in enc.drop_factors(4))


def test_block_applies_drop_factors():
    blk = mit("b0", drop_path_rate=0.5).block2[1]
    x, h, w = torch.randn(3, 16, 64), 4, 4
    attn = blk.attn(blk.norm1(x), h, w)
    both = torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 2.0]]).view(2, 3, 1, 1)
    y = blk(x, h, w, both)
    torch.testing.assert_close(y[1], x[1], rtol=0, atol=0)  # both branches dropped: the identity
    torch.testing.assert_close(y[0], (x + attn)[0], rtol=0, atol=0)  # the attention branch alone
    x2 = x + 2 * attn
    torch.testing.assert_close(y[2], (x2 + 2 * blk.mlp(blk.norm2(x2), h, w))[2], rtol=0, atol=0)
    torch.testing.assert_close(blk(x, h, w, torch.ones(2, 3, 1, 1)), blk(x, h, w), rtol=0, atol=0)


def test_mixffn_is_fc1_depthwise_conv_exact_gelu_fc2():
    # The original module path, written out: fc1 → 3×3 depthwise conv on the h×w grid → erf GELU → fc2.
    torch.manual_seed(0)
    ffn = MixFFN(8, 32)
    h, w = 6, 5
    x = torch.randn(2, h * w, 8)
    conv = ffn.dwconv.dwconv
    grid = ffn.fc1(x).transpose(1, 2).reshape(2, 32, h, w)
    mid = F.conv2d(grid, conv.weight, conv.bias, padding=1, groups=32).flatten(2).transpose(1, 2)
    with using_impl("reference"):
        out = ffn(x, h, w)
    torch.testing.assert_close(out, ffn.fc2(F.gelu(mid)), atol=1e-6, rtol=1e-6)
    tanh = ffn.fc2(F.gelu(mid, approximate="tanh"))
    assert (out - tanh).abs().max() > 1e-5  # the tanh approximation would be told apart


def test_segformer_mapping_drops_imagenet_head():
    sd = {"head.weight": torch.zeros(1000, 512), "block1.0.attn.q.weight": torch.zeros(2, 2)}
    state, ignored = from_segformer_mit(sd)
    assert list(state) == ["block1.0.attn.q.weight"] and ignored == ["head.weight"]


def test_unknown_size_error():
    with pytest.raises(ValueError, match="unknown MiT size 'b7'"):
        mit("b7")


class _ConvDtypes(torch.utils._python_dispatch.TorchDispatchMode):
    """(groups, input dtype, weight dtype) of every convolution, forward and backward."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int, torch.dtype, torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.convolution.default, torch.ops.aten.convolution_backward.default):
            x, w = (args[0], args[1]) if func is torch.ops.aten.convolution.default else (args[1], args[2])
            groups = args[8] if func is torch.ops.aten.convolution.default else args[9]
            self.seen.append((groups, x.dtype, w.dtype))
        return func(*args, **(kwargs or {}))


def test_depthwise_convolutions_run_in_fp32_under_cpu_bf16_autocast():
    """The CPU bf16 depthwise convolution backward gave sporadic garbage weight gradients (ops/depthwise.py):
    every depthwise convolution of the model (head ASPP and Mix-FFN) runs in fp32, the others stay in bf16."""
    torch.manual_seed(0)
    model = build_segmentor(ModelConfig(backbone="mit_b0", pretrained=None, head_channels=32)).train()
    x = torch.randn(2, 3, 64, 64)
    with _ConvDtypes() as spy:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x)
        logits.float().square().mean().backward()
    depthwise = [s for s in spy.seen if s[0] > 1]
    dense = [s for s in spy.seen if s[0] == 1]
    # 8 MiT blocks of b0 and 3 dilated ASPP branches, each once forward and once backward.
    assert len(depthwise) == 2 * (sum(MIT_SIZES["b0"].depths) + 3)
    assert all(s[1:] == (torch.float32, torch.float32) for s in depthwise)
    assert dense and all(s[1] == torch.bfloat16 for s in dense)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_depthwise_conv2d_is_f_conv2d():
    from daformer_fast.ops.depthwise import depthwise_conv2d

    x, w, b = torch.randn(2, 6, 9, 7), torch.randn(6, 1, 3, 3), torch.randn(6)
    ref = nn.functional.conv2d(x, w, b, padding=2, dilation=2, groups=6)
    assert torch.equal(depthwise_conv2d(x, w, b, padding=2, dilation=2), ref)
    xb = x.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = depthwise_conv2d(xb, w, b, padding=2, dilation=2)
    assert out.dtype == torch.float32
    assert torch.equal(out, nn.functional.conv2d(xb.float(), w, b, padding=2, dilation=2, groups=6))
