"""The one dispatch point between reference (plain PyTorch) and fast implementations of an op.

`choose_impl(op, impl, reasons)` returns the implementation to run:
- "reference" forces the plain PyTorch definition (the definition of correctness);
- "triton" forces the kernel and raises `ValueError` listing why it cannot run when `reasons` is non-empty;
- "auto" picks the kernel when it has no rejection reasons, Triton imports and the global switch is on; otherwise
  the op's best non-Triton path. Each decision is logged once per (op, choice, reasons).

The global switch: `DAFORMER_FAST_KERNELS=0` in the environment (read at import) or `set_default_impl()` from the
config's `kernels.impl`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Literal

Impl = Literal["auto", "reference", "triton"]

log = logging.getLogger("daformer_fast.ops")

_KERNELS_ENABLED = os.environ.get("DAFORMER_FAST_KERNELS", "1") not in ("0", "false", "False", "off")
_default_impl: Impl = "auto"
_logged: set[tuple] = set()


def set_default_impl(impl: Impl) -> None:
    """Set the process-wide implementation used when an op is called with impl=None (from `kernels.impl`)."""
    global _default_impl
    if impl not in ("auto", "reference", "triton"):
        raise ValueError(f"kernels.impl must be auto, reference or triton; got {impl!r}")
    _default_impl = impl


def default_impl() -> Impl:
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


def _log_once(op: str, choice: str, reasons: tuple[str, ...]) -> None:
    key = (op, choice, reasons)
    if key not in _logged:
        _logged.add(key)
        why = f" ({'; '.join(reasons)})" if reasons else ""
        log.info("%s: using %s%s", op, choice, why)


# Under torch.compile a logging call inside traced code is a graph break (an error with fullgraph=True). Marked as a
# constant result (what `torch.compiler.assume_constant_result` does), the function instead runs in Python while
# Dynamo traces, so the decision is logged then and the graph holds nothing of it. The marker is set directly because
# that function imports torch._dynamo, and with it triton, which importing this package must not do;
# tests/test_ops.py checks that torch still uses this marker.
_log_once._dynamo_marked_constant = True  # type: ignore[attr-defined]


def _interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (the test setup sets this when there is no GPU)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def device_reasons(tensors: tuple, impl: Impl | None) -> list[str]:
    """["tensor not on CUDA"] unless every tensor is on CUDA.

    Under the Triton interpreter (TRITON_INTERPRET=1) kernels run on CPU tensors too, but only when forced with
    impl="triton": `auto` never sends CPU tensors to the interpreter, which is about a thousand times slower.
    """
    if all(t.is_cuda for t in tensors) or ((impl or _default_impl) == "triton" and _interpreting()):
        return []
    return ["tensor not on CUDA"]


def choose_impl(
    op: str, impl: Impl | None, reasons: list[str] | tuple[str, ...] = ()
) -> Literal["reference", "triton"]:
    """Resolve `impl` for one call of `op`; `reasons` are static reasons the Triton path cannot take the inputs."""
    impl = impl or _default_impl
    reasons = tuple(reasons)
    if impl == "reference":
        _log_once(op, "reference", ("forced",))
        return "reference"
    ok, why = triton_available()
    if impl == "triton":
        if reasons or not ok:
            raise ValueError(f"{op}: triton implementation cannot run: {'; '.join(reasons + ((why,) if why else ()))}")
        _log_once(op, "triton", ())
        return "triton"
    if impl != "auto":
        raise ValueError(f"{op}: impl must be auto, reference or triton; got {impl!r}")
    if reasons or not ok:
        _log_once(op, "reference", reasons + ((why,) if why else ()))
        return "reference"
    _log_once(op, "triton", ())
    return "triton"
