"""The fused epilogue shared by every GEMM-like kernel: bias, activation, residual add, cast.

The graph-level fusion pass (passes/rewrite) finds the elementwise ops that follow a matmul and
describes them as an `Epilogue`; each kernel receives its fields as constexprs, so Triton compiles one
specialised kernel per distinct fused subgraph (the specialisation is the code generation; the kernel
cache key is the constexpr set). The same `Epilogue` has a torch implementation, `apply_reference`,
that the references and the CPU path use, so both sides compute exactly the same function.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import triton
import triton.language as tl

# Activation codes passed to kernels as a constexpr. Order is part of the kernel ABI: append only.
ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh", "silu")

# The arguments every fusible op's schema ends with, in this order: the epilogue fusion pass folds
# following ops into any op whose schema ends so, whatever family made it.
EPILOGUE_ARGS = ("bias", "residual", "activation", "out_dtype")


@dataclasses.dataclass(frozen=True)
class Epilogue:
    """What follows the matmul, in order: (+ bias) -> activation -> (+ residual) -> cast to out dtype."""

    has_bias: bool = False
    activation: str = "none"
    has_residual: bool = False

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"Epilogue: unknown activation {self.activation!r}; known: {ACTIVATIONS}")

    @property
    def activation_code(self) -> int:
        return ACTIVATIONS.index(self.activation)

    def describe(self) -> str:
        parts = ["matmul"]
        if self.has_bias:
            parts.append("bias")
        if self.activation != "none":
            parts.append(self.activation)
        if self.has_residual:
            parts.append("residual")
        return "+".join(parts)


def activation_reference(y: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "none":
        return y
    if activation == "relu":
        return torch.relu(y)
    if activation == "gelu":
        return torch.nn.functional.gelu(y)
    if activation == "gelu_tanh":
        return torch.nn.functional.gelu(y, approximate="tanh")
    if activation == "silu":
        return torch.nn.functional.silu(y)
    raise ValueError(f"unknown activation {activation!r}; known: {ACTIVATIONS}")


def activation_inplace(y: torch.Tensor, activation: str) -> torch.Tensor:
    """`activation_reference` written into y itself (no second output-sized tensor)."""
    if activation == "relu":
        return y.relu_()
    if activation in ("gelu", "gelu_tanh"):
        return torch.ops.aten.gelu_(y, approximate="tanh" if activation == "gelu_tanh" else "none")
    if activation == "silu":
        return torch.nn.functional.silu(y, inplace=True)
    if activation != "none":
        raise ValueError(f"unknown activation {activation!r}; known: {ACTIVATIONS}")
    return y


def apply_reference(acc: torch.Tensor, epilogue: Epilogue, bias=None, residual=None,
                    out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Torch version of `apply_epilogue`: acc is the matmul result in the accumulation dtype."""
    if epilogue.has_bias != (bias is not None) or epilogue.has_residual != (residual is not None):
        raise ValueError(f"epilogue {epilogue.describe()} does not match the given bias/residual tensors")
    y = acc
    if bias is not None:
        y = y + bias.to(y.dtype)
    y = activation_reference(y, epilogue.activation)
    if residual is not None:
        y = y + residual.to(y.dtype)
    return y if out_dtype is None else y.to(out_dtype)


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


@triton.jit
def _tanh(x):
    # tanh through exp keeps to primitives the interpreter and every backend have.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, t, -t)


@triton.jit
def apply_epilogue(acc, offs_m, offs_n, M, N, bias_ptr, res_ptr, stride_rm, stride_rn,
                   HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    """acc: [BLOCK_M, BLOCK_N] float32 tile at rows offs_m, columns offs_n of an M x N output.

    bias_ptr: [N]; res_ptr: [M, N] with strides (stride_rm, stride_rn). Returns the float32 tile.
    """
    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        acc = acc + b[None, :]
    if ACTIVATION == 1:
        acc = tl.maximum(acc, 0.0)
    elif ACTIVATION == 2:
        acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
    elif ACTIVATION == 3:
        acc = 0.5 * acc * (1.0 + _tanh(0.7978845608028654 * (acc + 0.044715 * acc * acc * acc)))
    elif ACTIVATION == 4:
        acc = acc / (1.0 + tl.exp(-acc))
    if HAS_RESIDUAL:
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        r = tl.load(res_ptr + offs_m[:, None] * stride_rm + offs_n[None, :] * stride_rn, mask=mask, other=0.0)
        acc = acc + r.to(tl.float32)
    return acc
