"""Triton kernels, importable as `daformer_fast.kernels` (this folder is mapped there by setup.py).

Nothing here is imported by the package at import time: `daformer_fast.ops.dispatch` imports a kernel module (named
in the op table, `daformer_fast/ops/table.py`) only once it has chosen the Triton path.
"""
