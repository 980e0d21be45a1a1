"""What the kernel files share: dtype tables, launch budgets, host integer helpers, conv geometry, the
fake outputs of the sparse ops, the choice between a kernel and its torch reference, the epilogue
operands of a launch and the torch references' epilogue.

triton.cdiv and triton.next_power_of_2 are @triton.jit functions: called from Python each one goes
through JITFunction.__call__ and costs ~1.5 us (measured, triton 3.9), and a launch wrapper calls
several. Host code uses the plain versions here; kernels keep tl.cdiv.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

from sparsify.codegen import runtime
from sparsify.codegen.epilogue import Epilogue, apply_reference

# What every sparse kernel computes in; the torch references also take float64, the tests' ground truth.
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
REFERENCE_DTYPES = KERNEL_DTYPES + (torch.float64,)
# tl.dot's input_precision choices for fp32 operands.
INPUT_PRECISIONS = ("tf32", "tf32x3", "ieee")
# Shared memory one program may use for its load buffers: fits A100 (164 KB) and H100/H200 (227 KB).
SMEM_BUDGET = 160 * 1024

IntPair = Union[int, Sequence[int]]

# Activation layouts a linear op may take and give. "row": token-major [..., K] -> [..., N], what
# the graph has. "feature": features first, [K, M] -> [N, M], what a sparse-weight-times-dense kernel
# computes without transposing (W @ x^T); consecutive sparse layers hand it on (assign_layouts).
# The two ends of such a chain, for a kernel that transposes on its own way in or out:
# "row_to_feature" ([..., K] -> [N, M]) and "feature_to_row" ([K, M] -> [M, N]). A kernel spec
# lists the layouts its op takes (KernelSpec.layouts).
CHAIN_LAYOUTS = ("row", "feature")
LAYOUTS = CHAIN_LAYOUTS + ("row_to_feature", "feature_to_row")


def check_layout(layout, allowed: tuple = LAYOUTS) -> None:
    if layout not in allowed:
        raise ValueError(f"layout must be one of {allowed}, got {layout!r}")


def layout_ends(layout: str) -> tuple[bool, bool]:
    """(x is feature-major, y is feature-major) of a layout."""
    check_layout(layout)
    return layout in ("feature", "feature_to_row"), layout in ("feature", "row_to_feature")


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


def acc_dtype(x: torch.Tensor) -> torch.dtype:
    """What a torch reference accumulates in: float64 for float64 inputs (the tests' ground truth),
    else float32, as the kernels do."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def epilogue_operands(bias, residual, out: torch.Tensor) -> tuple:
    """(bias, residual, stride_rm, stride_rn) launch arguments of the fused epilogue, the residual viewed
    as the GEMM's [rows, cols] output: `out` is that [rows, cols] output (linear) or [N, O, Hout, Wout]
    (conv: the residual read as [N * Hout * Wout, O], a view if channels-last, else a copy).
    Unused pointer slots get a live tensor (out): the constexpr flags keep the kernel from reading them."""
    bias_arg = bias.contiguous() if bias is not None else out
    if residual is None:
        return bias_arg, out, 0, 0
    if out.dim() == 4:
        res2 = residual.permute(0, 2, 3, 1).reshape(-1, out.shape[1])
    else:
        res2 = residual.reshape(out.shape)
    return (bias_arg, res2) + tuple(res2.stride())


def linear_reference(x: torch.Tensor, weight: torch.Tensor, bias, residual, activation: str,
                     out_dtype: torch.dtype, out: Optional[torch.Tensor]) -> torch.Tensor:
    """The linear kernels' torch reference: x @ weight^T (weight dense [n_out, k]) in `acc_dtype`, then
    the shared torch epilogue; written into `out` when given."""
    dtype = acc_dtype(x)
    acc = x.to(dtype) @ weight.to(dtype).t()
    epi = Epilogue(has_bias=bias is not None, activation=activation, has_residual=residual is not None)
    y = apply_reference(acc, epi, bias=bias, residual=residual, out_dtype=out_dtype)
    return y if out is None else out.copy_(y)


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


def conv_empty(x: torch.Tensor, out_shape: tuple, out_dtype: torch.dtype) -> torch.Tensor:
    """A new sparse-conv output [N, O, Hout, Wout] in x's memory format."""
    return torch.empty(out_shape, dtype=out_dtype, device=x.device, memory_format=conv_out_memory_format(x))


def conv_epilogue_reference(acc: torch.Tensor, x: torch.Tensor, bias, residual, activation: str,
                            out_dtype: torch.dtype, out: Optional[torch.Tensor]) -> torch.Tensor:
    """The sparse convs' reference epilogue: acc [N, O, Hout, Wout] (accumulation dtype) through the
    shared torch epilogue over channels-last [N, Hout, Wout, O], stored in x's memory format or `out`."""
    epi = Epilogue(has_bias=bias is not None, activation=activation, has_residual=residual is not None)
    res_nhwc = None if residual is None else residual.permute(0, 2, 3, 1)
    y = apply_reference(acc.permute(0, 2, 3, 1), epi, bias=bias, residual=res_nhwc, out_dtype=out_dtype)
    y = y.permute(0, 3, 1, 2)
    if out is None:
        return y.contiguous(memory_format=conv_out_memory_format(x))
    return out.copy_(y)


# ---- fake outputs (KernelSpec.out_like): the bound op arguments -> an empty output ---------------
def linear_out_like(a: dict) -> torch.Tensor:
    """[..., n_out] in out_dtype (default x's); [n_out, M] for an op that stores feature-major, [M, n_out]
    for one that reads feature-major x [K, M] and stores token-major."""
    x = a["x"]
    x_feature, y_feature = layout_ends(a.get("layout", "row"))
    lead = (x.shape[1],) if x_feature else tuple(x.shape[:-1])
    if y_feature:
        return x.new_empty((a["n_out"], math.prod(lead)), dtype=a["out_dtype"] or x.dtype)
    return x.new_empty(lead + (a["n_out"],), dtype=a["out_dtype"] or x.dtype)


def conv_out_like(a: dict) -> torch.Tensor:
    """[N, O, Hout, Wout] in x's memory format and out_dtype (default x's)."""
    x = a["x"]
    shape = conv_out_shape(x, a["o"], a["kh"], a["kw"], conv_pairs(a["stride"], a["padding"], a["dilation"]))
    return conv_empty(x, shape, a["out_dtype"] or x.dtype)


def conv_layer_static(layer: Optional[dict]) -> dict:
    """The conv parameters a packed conv weight bakes into its op call, from the layer's LayerInfo."""
    if layer is None:
        raise ValueError("a conv kernel's pack needs the layer's stride / padding / dilation")
    return {"stride": list(layer["stride"]), "padding": list(layer["padding"]), "dilation": list(layer["dilation"])}
