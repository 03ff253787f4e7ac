"""What the kernel tests share: the device they run on and the three-way comparison of low-precision results.

Imported as `helpers` (pytest puts this folder on sys.path for the tests in it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["DEVICE", "assert_three_way"]

# The GPU when there is one; otherwise the CPU, where tests/conftest.py has Triton interpret the kernels.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def assert_three_way(
    names: Sequence[str],
    got: Sequence[torch.Tensor],
    want: Sequence[torch.Tensor],
    base: Sequence[torch.Tensor],
    atol: float = 0.0,
    rel_floor: float = 0.0,
) -> None:
    """Low precision, three ways (flash-attention's test): for each output, the kernel's (`got`) largest error
    against the fp32 reference (`want`) may be at most twice that of the reference run in the same low dtype
    (`base`), plus a floor of `atol` + `rel_floor` times the largest reference value for elements that round
    either way."""
    for name, g, w, b in zip(names, got, want, base, strict=True):
        err, err_base = (g.float() - w).abs().max().item(), (b.float() - w).abs().max().item()
        floor = atol + rel_floor * w.abs().max().item()
        assert err <= 2 * err_base + floor, f"{name}: kernel error {err:.3g} vs {b.dtype} reference {err_base:.3g}"
