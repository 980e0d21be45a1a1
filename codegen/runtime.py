"""Which implementation a sparsify custom op runs: the Triton kernel or its torch reference.

On CUDA tensors the Triton kernel runs. On CPU tensors the torch reference runs, unless kernels are
forced (`force_triton()` or SPARSIFY_KERNELS=triton with TRITON_INTERPRET=1), which is how the Triton
code is exercised on a machine without a GPU. `force_reference()` does the opposite on any device,
for debugging a suspected kernel bug.
"""
from __future__ import annotations

import contextlib
import os
import threading

_state = threading.local()
_CHOICES = ("auto", "triton", "reference")


def _mode() -> str:
    mode = getattr(_state, "mode", None) or os.environ.get("SPARSIFY_KERNELS", "auto")
    if mode not in _CHOICES:
        raise ValueError(f"SPARSIFY_KERNELS={mode!r}: expected one of {_CHOICES}")
    return mode


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(device) -> bool:
    """True when an op whose tensors live on `device` should launch its Triton kernel."""
    mode = _mode()
    if mode == "reference":
        return False
    is_cuda = getattr(device, "type", device) == "cuda"
    if is_cuda:
        return True
    if mode == "triton":
        if not interpreter_on():
            raise RuntimeError("SPARSIFY_KERNELS=triton on CPU tensors needs TRITON_INTERPRET=1 "
                               "(set before triton is imported)")
        return True
    return False


@contextlib.contextmanager
def _using(mode: str):
    previous = getattr(_state, "mode", None)
    _state.mode = mode
    try:
        yield
    finally:
        _state.mode = previous


def force_triton():
    """Run Triton kernels even on CPU tensors (needs TRITON_INTERPRET=1)."""
    return _using("triton")


def force_reference():
    """Run the torch references even on CUDA tensors."""
    return _using("reference")
