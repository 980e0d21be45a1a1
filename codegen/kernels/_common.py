"""What the kernel files share: dtype tables, launch budgets, host integer helpers, conv geometry, the
fake outputs of the sparse ops, and the choice between a kernel and its torch reference.

triton.cdiv and triton.next_power_of_2 are @triton.jit functions: called from Python each one goes
through JITFunction.__call__ and costs ~1.5 us (measured, triton 3.9), and a launch wrapper calls
several. Host code uses the plain versions here; kernels keep tl.cdiv.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from sparsify.codegen import runtime

# What every sparse kernel computes in; the torch references also take float64, the tests' ground truth.
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
REFERENCE_DTYPES = KERNEL_DTYPES + (torch.float64,)
# tl.dot's input_precision choices for fp32 operands.
INPUT_PRECISIONS = ("tf32", "tf32x3", "ieee")
# Shared memory one program may use for its load buffers: fits A100 (164 KB) and H100/H200 (227 KB).
SMEM_BUDGET = 160 * 1024

IntPair = Union[int, Sequence[int]]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def resolve_impl(impl: str, device, choices: tuple = ("triton", "reference")) -> str:
    """The implementation a host function runs: `choices[0]` (the kernel) or "reference". "auto"
    follows codegen.runtime: Triton on CUDA tensors, the reference on CPU tensors unless forced."""
    if impl == "auto":
        if choices[0] != "triton":
            return choices[0]
        return "triton" if runtime.use_triton(device) else "reference"
    if impl not in choices:
        raise ValueError(f"impl must be 'auto' or one of {choices}, got {impl!r}")
    return impl


# ---- conv geometry (F.conv2d's conventions) -----------------------------------------------------
def conv_pair(v, name: str, minimum: int) -> tuple[int, int]:
    """An int or a 1-/2-sequence of ints as an (h, w) pair, each >= minimum."""
    items = [v] if isinstance(v, int) and not isinstance(v, bool) else v
    try:
        items = list(items)
    except TypeError:
        items = None
    if (items is None or len(items) not in (1, 2)
            or any(isinstance(i, bool) or not isinstance(i, int) for i in items)):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    if len(items) == 1:
        items = items * 2
    if any(i < minimum for i in items):
        raise ValueError(f"{name} must be >= {minimum}, got {v!r}")
    return items[0], items[1]


def conv_out_size(size: int, k: int, stride: int, pad: int, dil: int) -> int:
    return (size + 2 * pad - dil * (k - 1) - 1) // stride + 1


def conv_pairs(stride, padding, dilation) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """(stride, padding, dilation) as (h, w) pairs, checked."""
    return conv_pair(stride, "stride", 1), conv_pair(padding, "padding", 0), conv_pair(dilation, "dilation", 1)


def conv_out_shape(x: torch.Tensor, o: int, kh: int, kw: int, pairs) -> tuple[int, int, int, int]:
    """[N, O, Hout, Wout] of a conv of x (4-D) with a kh x kw kernel; raises where it would be empty."""
    (stride2, padding2, dilation2), (n, _, h, w) = pairs, x.shape
    hout = conv_out_size(h, kh, stride2[0], padding2[0], dilation2[0])
    wout = conv_out_size(w, kw, stride2[1], padding2[1], dilation2[1])
    if hout < 1 or wout < 1:
        raise ValueError(f"x spatial size {(h, w)} is too small for a {kh}x{kw} kernel with "
                         f"padding={padding2}, dilation={dilation2}: output would be {(hout, wout)}")
    return n, o, hout, wout


def conv_out_memory_format(x: torch.Tensor) -> torch.memory_format:
    """A sparse conv's output keeps x's memory format: channels-last when x is (and is not also plain
    contiguous, as with C == 1 or H == W == 1), else contiguous NCHW."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


# ---- fake outputs (KernelSpec.out_like): the bound op arguments -> an empty output ---------------
def linear_out_like(a: dict) -> torch.Tensor:
    """[..., n_out] in out_dtype (default x's)."""
    x = a["x"]
    return x.new_empty(tuple(x.shape[:-1]) + (a["n_out"],), dtype=a["out_dtype"] or x.dtype)


def conv_out_like(a: dict) -> torch.Tensor:
    """[N, O, Hout, Wout] in x's memory format and out_dtype (default x's)."""
    x = a["x"]
    shape = conv_out_shape(x, a["o"], a["kh"], a["kw"], conv_pairs(a["stride"], a["padding"], a["dilation"]))
    return torch.empty(shape, dtype=a["out_dtype"] or x.dtype, device=x.device,
                       memory_format=conv_out_memory_format(x))


def conv_layer_static(layer: Optional[dict]) -> dict:
    """The conv parameters a packed conv weight bakes into its op call, from the layer's LayerInfo."""
    if layer is None:
        raise ValueError("a conv kernel's pack needs the layer's stride / padding / dilation")
    return {"stride": list(layer["stride"]), "padding": list(layer["padding"]), "dilation": list(layer["dilation"])}
