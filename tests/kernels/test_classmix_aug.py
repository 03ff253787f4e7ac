"""ClassMix + colour-jitter kernel and Gaussian-blur kernel against their references: every output, odd shapes, each
jitter op order, hue wrap and grey/saturated pixels, dtypes, the public ops under torch.compile and the dispatch
point (opcheck of the registered ops: test_opcheck.py; the references against kornia 0.5.8 and the original's
per-sample order: tests/test_uda_stages.py).

Without a GPU these run in the Triton interpreter (tests/conftest.py) at tiny shapes; neither kernel uses `tl.dot`,
so the interpreter computes what the GPU computes (up to the GPU's fused multiply-adds, see TOLERANCES). With a GPU
the `gpu` case also runs the training shape (B = 2, 3×512²).
"""

import itertools

import pytest
import torch

pytest.importorskip("triton")

import daformer_fast.kernels.blur as kb  # noqa: E402
import daformer_fast.kernels.classmix_aug as kc  # noqa: E402
from helpers import DEVICE  # noqa: E402

from daformer_fast.config import UDAConfig  # noqa: E402
from daformer_fast.data.pipeline import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from daformer_fast.ops.augment import JitterParams, blur_kernel_size  # noqa: E402
from daformer_fast.ops.classmix_aug import (  # noqa: E402
    TOLERANCES,
    gaussian_blur,
    gaussian_blur_ref,
    mix_and_jitter,
    mix_and_jitter_ref,
)
from daformer_fast.uda.augment import draw_strong_params, gaussian_blur_original  # noqa: E402
from daformer_fast.uda.classmix import chosen_classes, draw_class_keys  # noqa: E402
MEAN, STD = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)


def _batch(B, H, W, K, dtype=torch.float32, seed=0, ignore=True, none_chosen=None):
    """Normalised images, labels (255 in sample 0 when `ignore`), pseudo-labels and weights, the class table and
    jitter parameters drawn as the step draws them."""
    g = torch.Generator().manual_seed(seed)
    img, tgt = (1.5 * torch.randn(B, 3, H, W, generator=g) for _ in range(2))
    gt = torch.randint(0, K, (B, H, W), generator=g)
    if ignore:
        gt[0, : max(1, H // 3)] = 255
    pl = torch.randint(0, K, (B, H, W), generator=g)
    pw = torch.rand(B, H, W, generator=g)
    chosen = chosen_classes(gt, draw_class_keys(gt.shape[0], g))
    if none_chosen is not None:
        chosen[none_chosen] = False
    jitter = draw_strong_params(B, g, UDAConfig()).jitter_params
    data = [t.to(DEVICE) for t in (img.to(dtype), tgt.to(dtype), gt, pl, pw, chosen)]
    return data, jitter


def _check(data, jitter, mean=MEAN, std=STD):
    got = mix_and_jitter(*data, jitter, mean, std, impl="triton")
    img, tgt = data[0].float(), data[1].float()
    want = mix_and_jitter_ref(img, tgt, *data[2:], jitter, mean, std)
    dtype = data[0].dtype
    assert [(t.dtype, t.shape) for t in got] == [(dtype, want[0].shape)] + [(t.dtype, t.shape) for t in want[1:]]
    atol, rtol = TOLERANCES[dtype]["image"]
    torch.testing.assert_close(got[0].float(), want[0], atol=atol, rtol=rtol)
    for name, g, w in zip(("label", "weight", "mask"), got[1:], want[1:], strict=True):
        assert torch.equal(g, w), f"{name}: {(g != w).sum()} pixels differ"
    return got, want


# (B, H, W, K, sample choosing nothing): batch 1 with 19 classes; 16 classes over two pixel blocks with a tail
# (35·37 = 1295 > 1024); a sample whose table chooses nothing (all target).
SHAPES = [(1, 5, 7, 19, None), (2, 35, 37, 16, None), (3, 9, 13, 19, 1)]


@pytest.mark.parametrize("jitter", [True, False], ids=["jitter", "no-jitter"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-H{}-W{}-K{}".format(*s[:4]))
def test_mix_and_jitter_matches_reference(shape, jitter):
    B, H, W, K, none_chosen = shape
    data, params = _batch(B, H, W, K, none_chosen=none_chosen)
    (img, lbl, _, mask), _ = _check(data, params if jitter else None)
    assert (lbl == 255).any() and mask.any() and not mask.all()  # 255 present, both sides shown
    if none_chosen is not None:
        assert not mask[none_chosen].any()
        if not jitter:
            assert torch.equal(img[none_chosen], data[1][none_chosen])


def test_every_op_order():
    # One sample per permutation of (brightness, contrast, saturation, hue), with strong factors.
    orders = torch.tensor(list(itertools.permutations(range(4))))
    B = len(orders)
    data, _ = _batch(B, 4, 6, 19, seed=1)
    params = JitterParams(*(torch.full((B,), v) for v in (1.2, 0.8, 1.2, -0.2)), orders)
    _, want = _check(data, params)
    # The order matters: otherwise this test would not tell orders apart.
    assert not torch.allclose(want[0][0], mix_and_jitter_ref(*data, params._replace(order_B4=orders.flip(1)),
                                                             MEAN, STD)[0][0])  # fmt: skip


def _pixels_01():
    """Hand-picked RGB values (0-255): grey, near-grey, black and white, pure and mixed hues on the sector
    boundaries (two channels tied at the max), saturated 0/1 channels."""
    rgb = [(128, 128, 128), (100, 100, 101), (101, 100, 100), (100, 101, 100), (0, 0, 0), (255, 255, 255),
           (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255), (255, 128, 0),
           (10, 0, 5), (1, 0, 0), (254, 255, 255), (200, 200, 0), (0, 200, 200)]  # fmt: skip
    return torch.tensor(rgb, dtype=torch.float32).t()  # (3, N)


# Hue shifts in turns: negative (wraps below 0), exactly ±1/6 and ±1/3 (red/yellow/green land on sector
# boundaries, H + shift may round just below 0 or to 2π), the ±0.5 bounds.
HUES = [-0.5, -1 / 3, -1 / 6, -1e-7, 0.0, 1 / 6, 1 / 3, 0.5]


def test_hue_wrap_grey_and_saturated_pixels():
    x_3N = _pixels_01()
    B, N = len(HUES), x_3N.shape[1]
    # mean 0, std 1: the kernel sees 0-255 values, so ties between channels survive de-normalisation exactly.
    img = x_3N.expand(B, 3, N).reshape(B, 3, 1, N).contiguous()
    gt = torch.zeros(B, 1, N, dtype=torch.long)
    chosen = torch.zeros(B, 256, dtype=torch.bool)
    chosen[:, 0] = True  # every pixel pasted from the source
    data = [t.to(DEVICE) for t in (img, torch.zeros_like(img), gt, gt, torch.rand(B, 1, N), chosen)]
    ones = torch.ones(B)
    hue_first = torch.tensor([3, 2, 0, 1]).expand(B, 4)
    zero, one = torch.zeros(3), torch.ones(3)
    for sat, order in ((1.0, hue_first), (1.2, hue_first.flip(1)), (0.8, torch.tensor([2, 3, 1, 0]).expand(B, 4))):
        params = JitterParams(ones, ones, sat * ones, torch.tensor(HUES), order)
        got, _ = _check(data, params, zero, one)
        assert got[0].min() >= 0 and got[0].max() <= 255
    # Brightness and contrast push channels into the clamps at 0 and 1 before and after the HSV ops.
    order = torch.tensor([0, 3, 1, 2]).expand(B, 4)
    params = JitterParams(1.2 * ones, 0.8 * ones, 1.2 * ones, torch.tensor(HUES), order)
    _check(data, params, zero, one)


def test_bf16_images():
    data, params = _batch(2, 6, 9, 19)
    _check(data, params)
    data16 = [data[0].bfloat16(), data[1].bfloat16(), *data[2:]]
    _check(data16, params)


# ---------------------------------------------------------------------------------------------------------------
# Gaussian blur


# (B, C, H, W): kernel sizes 3×3, 5×5, 7×5 and 3×7 (reflect borders are a third of the taps), and 1×1 (identity).
BLUR_SHAPES = [(2, 3, 25, 23), (1, 3, 45, 41), (2, 3, 64, 45), (1, 3, 23, 64), (1, 1, 8, 12)]


@pytest.mark.parametrize("shape", BLUR_SHAPES, ids=lambda s: "B{}-C{}-H{}-W{}".format(*s))
def test_blur_matches_references(shape):
    B, C, H, W = shape
    x = torch.randn(B, C, H, W, device=DEVICE)
    # The ends of the σ range, the widest first: at σ = 0.15 the outer taps are ~1e-10 and borders hardly matter.
    sigma = torch.linspace(1.15, 0.15, B, dtype=torch.float64)
    got = gaussian_blur(x, sigma, impl="triton")
    atol, rtol = TOLERANCES[torch.float32]["blur"]
    torch.testing.assert_close(got, gaussian_blur_ref(x, sigma), atol=atol, rtol=rtol)
    torch.testing.assert_close(got, gaussian_blur_original(x, sigma.to(DEVICE)), atol=atol, rtol=rtol)
    if blur_kernel_size(H) == blur_kernel_size(W) == 1:
        torch.testing.assert_close(got, x, atol=0, rtol=0)


def test_blur_bf16_and_strided_input():
    x = torch.randn(2, 3, 25, 2 * 23, device=DEVICE)[..., ::2]
    sigma = torch.tensor([0.4, 1.0], dtype=torch.float64)
    want = gaussian_blur_ref(x.bfloat16().float(), sigma)
    got = gaussian_blur(x.bfloat16(), sigma, impl="triton")
    assert got.dtype == torch.bfloat16
    atol, rtol = TOLERANCES[torch.bfloat16]["blur"]
    torch.testing.assert_close(got.float(), want, atol=atol, rtol=rtol)
    torch.testing.assert_close(gaussian_blur(x, sigma, impl="triton"), gaussian_blur_ref(x, sigma),
                               atol=1e-5, rtol=1e-5)  # fmt: skip


def test_blur_rejects_bad_taps():
    x = torch.randn(1, 3, 4, 4, device=DEVICE)
    with pytest.raises(ValueError, match="taps_y must be"):
        kb.gaussian_blur_triton(x, torch.ones(1, 9, device=DEVICE), torch.ones(1, 3, device=DEVICE))  # 9 // 2 ≥ 4


# ---------------------------------------------------------------------------------------------------------------
# Compile, dispatch


@pytest.mark.slow
def test_compile_public_ops():
    data, params = _batch(2, 5, 6, 19)
    sigma = torch.tensor([0.3, 0.9], dtype=torch.float64)

    def mixed_batch(img, tgt, gt, pl, pw, chosen, impl):
        img, lbl, w, mask = mix_and_jitter(img * 1.0, tgt, gt, pl, pw, chosen, params, MEAN, STD, impl=impl)
        return gaussian_blur(img, sigma, impl=impl), lbl, w, mask

    torch._dynamo.reset()
    got = torch.compile(mixed_batch, backend="aot_eager", fullgraph=True)(*data, "triton")
    want = mixed_batch(*data, "reference")
    torch.testing.assert_close(got[0], want[0], atol=2e-5, rtol=1e-5)
    for g, w in zip(got[1:], want[1:], strict=True):
        assert torch.equal(g, w)


def test_auto_on_cpu_uses_reference_and_logs_why(monkeypatch, ops_log):
    monkeypatch.setattr(kc, "classmix_jitter_triton", lambda *a: pytest.fail("auto must not run the kernel on CPU"))
    monkeypatch.setattr(kb, "gaussian_blur_triton", lambda *a: pytest.fail("auto must not run the kernel on CPU"))
    data, params = _batch(1, 3, 4, 19)
    data = [t.cpu() for t in data]
    for g, w in zip(mix_and_jitter(*data, params, MEAN, STD, impl="auto"),
                    mix_and_jitter_ref(*data, params, MEAN, STD), strict=True):  # fmt: skip
        assert torch.equal(g, w)
    sigma = torch.tensor([0.5], dtype=torch.float64)
    assert torch.equal(gaussian_blur(data[0], sigma, impl="auto"), gaussian_blur_ref(data[0], sigma))
    messages = [r.getMessage() for r in ops_log.records]
    for op in ("mix_and_jitter", "gaussian_blur"):
        assert any(m.startswith(f"{op}: using reference (tensor not on CUDA") for m in messages), messages


def test_forced_triton_rejects_unsupported_inputs(monkeypatch):
    data, params = _batch(1, 3, 4, 19)
    img, tgt, gt, pl, pw, chosen = data
    with pytest.raises(ValueError, match=r"mix_and_jitter: triton implementation cannot run: image dtypes"):
        mix_and_jitter(img.double(), tgt.double(), gt, pl, pw, chosen, params, MEAN, STD, impl="triton")
    with pytest.raises(ValueError, match=r"shapes gt"):
        mix_and_jitter(img, tgt, gt[:, :2], pl, pw, chosen, params, MEAN, STD, impl="triton")
    with pytest.raises(ValueError, match=r"chosen torch.uint8"):
        mix_and_jitter(img, tgt, gt, pl, pw, chosen.to(torch.uint8), params, MEAN, STD, impl="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match=r"mix_and_jitter: triton implementation cannot run: tensor not on CUDA"):
            mix_and_jitter(*data, params, MEAN, STD, impl="triton")
        with pytest.raises(ValueError, match=r"gaussian_blur: triton implementation cannot run: tensor not on CUDA"):
            gaussian_blur(img, torch.ones(1, dtype=torch.float64), impl="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_training_shape_on_gpu():
    data, params = _batch(2, 512, 512, 19)
    _check(data, params)
    _check(data, None)
    sigma = torch.tensor([0.2, 1.1], dtype=torch.float64)
    atol, rtol = TOLERANCES[torch.float32]["blur"]
    torch.testing.assert_close(gaussian_blur(data[0], sigma, impl="triton"), gaussian_blur_ref(data[0], sigma),
                               atol=atol, rtol=rtol)  # fmt: skip
