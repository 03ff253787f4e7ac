"""Triton kernels, importable as `daformer_fast.kernels` (this folder is mapped there by setup.py).

Nothing here is imported by the package at import time: `daformer_fast.ops` imports a kernel module only after the
dispatch point (`daformer_fast.ops._dispatch.choose_impl`) has chosen the Triton path.
"""
