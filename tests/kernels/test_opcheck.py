"""Every custom op the kernels register, through `torch.library.opcheck` (schema, fake tensors, autograd
registration, AOT dispatch), and every kernel the op table names exists.

Each case builds small inputs; the op's own test file checks its values. Without a GPU the kernels run in the
Triton interpreter (tests/conftest.py).
"""

import importlib

import pytest
import torch

pytest.importorskip("triton")

import daformer_fast.kernels.attention as ka  # noqa: E402
import daformer_fast.kernels.blur  # noqa: E402, F401 (registers its op)
import daformer_fast.kernels.classmix_aug  # noqa: E402, F401
import daformer_fast.kernels.mixffn  # noqa: E402, F401
import daformer_fast.kernels.pseudo_label  # noqa: E402, F401
import daformer_fast.kernels.seg_ce as kce  # noqa: E402
from helpers import DEVICE  # noqa: E402

from daformer_fast.config import UDAConfig  # noqa: E402
from daformer_fast.data.pipeline import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from daformer_fast.ops.table import OPS  # noqa: E402
from daformer_fast.uda.augment import draw_strong_params  # noqa: E402
from daformer_fast.uda.classmix import chosen_classes, draw_class_keys  # noqa: E402


def _attention_qkv(requires_grad: bool, permuted: bool):
    def make(n):
        t = torch.randn(1, n, 2, 32, device=DEVICE).transpose(1, 2) if permuted else torch.randn(1, 2, n, 32)
        return t.to(DEVICE).requires_grad_(requires_grad)

    return make(20), make(9), make(9)


def _attention_bwd(requires_grad: bool, permuted: bool):
    q, k, v = (t.detach() for t in _attention_qkv(requires_grad, permuted))
    o, lse = ka.attention_fwd(q, k, v, 0.3)
    do = torch.randn(1, 2, 20, 32, device=DEVICE)
    return do, torch.randn_like(lse), q, k, v, o.transpose(1, 2), lse, 0.3


def _dwconv(requires_grad: bool):
    x = torch.randn(1, 12, 8, device=DEVICE)
    weight, bias = 0.3 * torch.randn(8, 1, 3, 3, device=DEVICE), 0.1 * torch.randn(8, device=DEVICE)
    return tuple(t.requires_grad_(requires_grad) for t in (x, weight, bias))


def _dwconv_bwd():
    dy = torch.randn(1, 12, 8, device=DEVICE).transpose(0, 1).contiguous().transpose(0, 1)  # non-contiguous grad
    return (dy, *_dwconv(False), 3, 4)


def _seg_ce_inputs():
    logits = (3 * torch.randn(1, 3, 2, 3, device=DEVICE)).requires_grad_()
    labels = torch.randint(0, 3, (1, 5, 4), device=DEVICE)
    labels[torch.rand(1, 5, 4, device=DEVICE) < 0.1] = 255
    return logits, labels, torch.rand(1, 5, 4, device=DEVICE)


def _seg_ce_bwd():
    logits, labels, weight = _seg_ce_inputs()
    _, lse = kce.seg_ce_fwd(logits.detach(), labels, weight, 255)
    return torch.tensor(0.7, device=DEVICE), logits.detach(), labels, weight, lse, 255


def _classmix(jitter: bool):
    g = torch.Generator().manual_seed(0)
    img, tgt = (1.5 * torch.randn(2, 3, 3, 5, generator=g) for _ in range(2))
    gt, pl = (torch.randint(0, 19, (2, 3, 5), generator=g) for _ in range(2))
    gt[0, :1] = 255
    pw = torch.rand(2, 3, 5, generator=g)
    chosen = chosen_classes(gt, draw_class_keys(gt.shape[0], g))
    params = draw_strong_params(2, g, UDAConfig()).jitter_params
    factors = torch.stack(params[:4], 1) if jitter else None
    order = params.order_B4.to(torch.int32) if jitter else None
    data = (img, tgt, gt, pl, pw, chosen, factors, order, torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD))
    return tuple(None if t is None else t.to(DEVICE) for t in data)


def _blur():
    taps = torch.tensor([[0.25, 0.5, 0.25]], device=DEVICE).expand(2, 3).contiguous()
    return torch.randn(2, 3, 3, 5, device=DEVICE), taps, taps


# (registered op name, its arguments): the variants each op's inputs come in (gradients on or off, strided
# layouts, optional arguments present or not).
CASES = [
    *(pytest.param("attention_fwd", lambda g=g, p=p: (*_attention_qkv(g, p), 0.3), id=f"attention_fwd-grad{g}-perm{p}")
      for g in (False, True) for p in (False, True)),
    *(pytest.param("attention_bwd", lambda g=g, p=p: _attention_bwd(g, p), id=f"attention_bwd-grad{g}-perm{p}")
      for g in (False, True) for p in (False, True)),
    *(pytest.param("dwconv_gelu_fwd", lambda g=g: (*_dwconv(g), 3, 4), id=f"dwconv_gelu_fwd-grad{g}")
      for g in (False, True)),
    pytest.param("dwconv_gelu_bwd", _dwconv_bwd, id="dwconv_gelu_bwd"),
    pytest.param("pseudo_label_fwd", lambda: (torch.randn(1, 6, 3, 4, device=DEVICE), 7, 9, 0.4), id="pseudo_label"),
    pytest.param("seg_ce_fwd", lambda: (*_seg_ce_inputs(), 255), id="seg_ce_fwd"),
    pytest.param("seg_ce_bwd", _seg_ce_bwd, id="seg_ce_bwd"),
    *(pytest.param("classmix_jitter", lambda j=j: _classmix(j), id=f"classmix_jitter-jitter{j}")
      for j in (True, False)),
    pytest.param("gaussian_blur", _blur, id="gaussian_blur"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "make_args"), CASES)
def test_opcheck(name, make_args):
    torch.library.opcheck(getattr(torch.ops.daformer_fast, name).default, make_args())


def test_every_registered_op_has_a_case():
    registered = {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("daformer_fast::")}
    assert registered == {case.values[0] for case in CASES}


@pytest.mark.parametrize("op", OPS.values(), ids=list(OPS))
def test_op_table_names_existing_kernels(op):
    module, function = op.kernel.split(":")
    assert callable(getattr(importlib.import_module(f"daformer_fast.kernels.{module}"), function))
