"""Test setup: run Triton kernels in the interpreter when there is no GPU; keep CPU tests deterministic."""

import os

import torch

if not torch.cuda.is_available():
    # Must be set before any @triton.jit decorator runs (i.e. before kernel modules are imported).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
