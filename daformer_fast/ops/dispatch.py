"""The one dispatch point between the plain-PyTorch reference of an op and its Triton kernel.

Every op is one row (`Op`) of the table in `ops/table.py`, and `dispatch(name, impl, *args)` runs that row:
- impl="reference" runs the reference, the definition of correctness;
- "triton" runs the kernel, or raises `ValueError` listing why it cannot take the inputs;
- "auto" runs the kernel where the row says `auto` uses it, Triton imports, the kernels are on and the inputs suit
  it; the row's non-kernel path (the reference, or SDPA for attention) otherwise;
- None takes the process default: `set_default_impl` (from the config's `kernels.impl`) or a `using_impl` block.
Each decision is logged once per process with its reasons (a forced reference as "<op>: using reference (forced)").

`DAFORMER_FAST_KERNELS=0` in the environment (read at import) turns every kernel off.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from daformer_fast.utils import log_once

Impl = Literal["auto", "reference", "triton"]

__all__ = ["Impl", "Op", "choose_impl", "default_impl", "device_reasons", "dispatch", "dtype_reasons",
           "kernel_reasons", "set_default_impl", "triton_available", "using_impl"]  # fmt: skip

log = logging.getLogger("daformer_fast.ops")

_KERNELS_ENABLED = os.environ.get("DAFORMER_FAST_KERNELS", "1") not in ("0", "false", "False", "off")
_default_impl: Impl = "auto"


@dataclass(frozen=True)
class Op:
    """One op of the table: what `dispatch` needs to choose and run its implementation."""

    name: str
    """The op's name in log lines and errors."""
    reference: Callable
    """The plain-PyTorch definition (`*_ref`), called with the op's arguments."""
    kernel: str
    """"module:function" in `daformer_fast.kernels`, imported only once chosen (importing it imports Triton)."""
    unsupported: Callable[..., list[str]]
    """`unsupported(dtypes, *args)`: why the kernel cannot take these arguments, from static properties only."""
    dtypes: tuple[torch.dtype, ...]
    """The floating dtypes the kernel takes (passed to `unsupported`)."""
    auto_uses_kernel: bool
    """Whether `auto` runs the kernel where it can (ops/table.py says where the value comes from)."""
    on_device: int
    """How many leading arguments are tensors (or None) the kernel reads, which must be on the GPU."""
    fallback: Callable | None = None
    """What `auto` runs when it does not run the kernel; None for the reference."""
    fallback_name: str = "reference"
    """The fallback's name in log lines."""
    kernel_args: Callable[..., tuple] | None = None
    """Maps the op's arguments to the kernel function's; None when they are the same."""


def set_default_impl(impl: Impl) -> None:
    """Set the process-wide implementation used when an op is called with impl=None (from `kernels.impl`)."""
    global _default_impl
    if impl not in ("auto", "reference", "triton"):
        raise ValueError(f"kernels.impl must be auto, reference or triton; got {impl!r}")
    _default_impl = impl


def default_impl() -> Impl:
    """The process-wide implementation of ops called with impl=None."""
    return _default_impl


@contextlib.contextmanager
def using_impl(impl: Impl) -> Iterator[None]:
    """The process default set to `impl` inside the block, restored after: a training step runs its ops with its
    own implementation even when two steps with different ones live in one process (the parity tests)."""
    previous = _default_impl
    set_default_impl(impl)
    try:
        yield
    finally:
        set_default_impl(previous)


_triton_status: tuple[bool, str] | None = None


# Cached by hand, not with functools: Dynamo warns when it traces through a functools cache under torch.compile.
def triton_available() -> tuple[bool, str]:
    """Whether Triton kernels can launch here, and why not."""
    global _triton_status
    if _triton_status is None:
        _triton_status = _probe_triton()
    return _triton_status


def _probe_triton() -> tuple[bool, str]:
    if not _KERNELS_ENABLED:
        return False, "DAFORMER_FAST_KERNELS=0"
    try:
        import triton  # noqa: F401
    except Exception as e:  # ImportError, or a broken install raising at import
        return False, f"triton not importable ({type(e).__name__})"
    return True, ""


def _interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (the test setup sets this when there is no GPU)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def device_reasons(tensors: Sequence[torch.Tensor | None], impl: Impl | None) -> list[str]:
    """["tensor not on CUDA"] unless every tensor (None entries skipped) is on CUDA.

    Under the Triton interpreter (TRITON_INTERPRET=1) kernels run on CPU tensors too, but only when forced with
    impl="triton": `auto` never sends CPU tensors to the interpreter, which is about a thousand times slower.
    """
    if all(t.is_cuda for t in tensors if t is not None) or ((impl or _default_impl) == "triton" and _interpreting()):
        return []
    return ["tensor not on CUDA"]


_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def dtype_reasons(
    what: str, tensors: Sequence[torch.Tensor], dtypes: Sequence[torch.dtype], same: bool = False
) -> list[str]:
    """[reason] when a tensor's dtype is not among `dtypes` (or, with `same`, the tensors' dtypes differ); else []."""
    got = [t.dtype for t in tensors]
    if all(d in dtypes for d in got) and not (same and len(set(got)) > 1):
        return []
    need = "/".join(_DTYPE_NAMES.get(d, str(d)) for d in dtypes)
    return [f"{what} {', '.join(map(str, got))} (need one of {need})"]


def _log(msg: str) -> None:
    log_once(log, msg)


def _import_kernel(module: str) -> None:
    importlib.import_module(module)


# Under torch.compile a logging call inside traced code is a graph break, and Dynamo cannot trace `importlib`.
# Marked as constant results (the marker is set by hand for the reason `utils.log_once` gives), both run in Python
# while Dynamo traces: the decision is logged then, and the traced code then finds the kernel module in sys.modules.
# They take strings only, which Dynamo can pass as constants (not the logger `log_once` takes). tests/test_ops.py
# checks that torch still uses this marker.
_log._dynamo_marked_constant = True  # type: ignore[attr-defined]
_import_kernel._dynamo_marked_constant = True  # type: ignore[attr-defined]


def choose_impl(
    op: str, impl: Impl | None, reasons: Sequence[str] = (), fallback: str = "reference"
) -> Literal["reference", "triton"]:
    """Resolve `impl` for one call of `op`: "triton" or "reference" (the op's non-kernel path, logged as `fallback`).

    `reasons`: why the kernel cannot run (it then runs only where forced, which raises instead).
    """
    impl = impl or _default_impl
    reasons = tuple(reasons)
    if impl == "reference":
        _log(f"{op}: using reference (forced)")
        return "reference"
    ok, why = triton_available()
    if impl == "triton":
        if reasons or not ok:
            raise ValueError(f"{op}: triton implementation cannot run: {'; '.join(reasons + ((why,) if why else ()))}")
        _log(f"{op}: using triton")
        return "triton"
    if impl != "auto":
        raise ValueError(f"{op}: impl must be auto, reference or triton; got {impl!r}")
    if reasons or not ok:
        _log(f"{op}: using {fallback} ({'; '.join(reasons + ((why,) if why else ()))})")
        return "reference"
    _log(f"{op}: using triton")
    return "triton"


def _table() -> dict[str, Op]:
    # Imported here, not at the top: the table imports the op modules, which import this one.
    from daformer_fast.ops.table import OPS

    return OPS


def kernel_reasons(name: str, impl: Impl | None, *args) -> list[str]:
    """Every reason the kernel of op `name` cannot take `args` under `impl`: device first, then static ones."""
    op = _table()[name]
    return device_reasons(args[: op.on_device], impl) + op.unsupported(op.dtypes, *args)


def dispatch(name: str, impl: Impl | None, *args):
    """Run op `name` of the table on `args` with implementation `impl` (None: the process default)."""
    op = _table()[name]
    impl = impl or _default_impl
    reasons = [] if impl == "reference" else kernel_reasons(name, impl, *args)
    if impl == "auto" and not op.auto_uses_kernel:
        instead = "the reference" if op.fallback is None else op.fallback_name
        reasons.append(f"auto uses {instead} until a GPU measurement shows the kernel faster")
    if choose_impl(name, impl, reasons, op.fallback_name) == "triton":
        module, function = op.kernel.split(":")
        module = f"daformer_fast.kernels.{module}"
        _import_kernel(module)
        kernel = getattr(sys.modules[module], function)  # looked up per call: tests replace kernels
        return kernel(*(args if op.kernel_args is None else op.kernel_args(*args)))
    if impl == "auto" and op.fallback is not None:
        return op.fallback(*args)
    return op.reference(*args)
