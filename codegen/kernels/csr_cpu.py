"""Unstructured-sparse linear on the CPU through a generated kernel: y = epilogue(x @ W^T), W in CSR.

The same packed weight as csr_linear.py (crow, col int32; values in x's dtype). The kernel is C the
CPU code generator emits for this layer's shape, dtypes and fused epilogue (codegen/cpu_csr_source.py)
and the system compiler builds once, cached on disk (codegen/cpu_build.py): tokens along the vector
lanes from a feature-major x^T, threads over output rows balanced by nonzeros, the epilogue applied
to the finished register tile and rounded once at the store. fp32 and bf16 (stored bf16, computed
fp32); another dtype is not a candidate.

Layouts: "feature" (x^T [K, M] in, y^T [N, M] out, between consecutive sparse layers: see
passes/rewrite/assign_layouts.py) or "row" (x [..., K]: transposed into a scratch copy on the way in;
y [..., N] stored token-major by the kernel itself). The residual is token-major in both.

Entry points: `csr_cpu_host` with `csr_cpu_generated` (the generated kernel; what "auto" runs) and
`csr_cpu_reference` (densify and multiply), `kernel_for(...)` (the built ctypes function of a
variant), and `SPEC`.
"""
from __future__ import annotations

import ctypes
import functools
import math
from typing import Optional

import torch

from sparsify.codegen import cpu_build, cpu_csr_source
from sparsify.codegen.kernels._checks import check_out
from sparsify.codegen.kernels._common import LAYOUTS, check_layout, linear_out_like, resolve_impl
from sparsify.codegen.kernels.csr_linear import _check_args, _check_indices, _pack, csr_linear_reference
from sparsify.codegen.spec import KernelSpec
from sparsify.patterns import NM, Block, Unstructured

KERNEL_VERSION = f"csr_cpu-1+{cpu_csr_source.TEMPLATE_VERSION}"
_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}
_FUNCS: dict[tuple, ctypes._CFuncPtr] = {}
_P, _I64, _I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


def kernel_for(n: int, k: int, dtype: torch.dtype, out_dtype: torch.dtype, activation: str, has_bias: bool,
               has_residual: bool, out_row: bool):
    """The generated kernel of a variant, built (or loaded from the disk cache) on first use."""
    key = (n, k, dtype, out_dtype, activation, has_bias, has_residual, out_row)
    fn = _FUNCS.get(key)
    if fn is None:
        src, name = cpu_csr_source.source(n, k, _DTYPES[dtype], _DTYPES[out_dtype], activation, has_bias,
                                          has_residual, out_row)
        fn = getattr(cpu_build.build(src, name), name)
        fn.argtypes = [_P, _P, _P, _P, _P, _P, _P, _I64, _I]
        fn.restype = None
        _FUNCS[key] = fn
    return fn


def csr_cpu_host(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, n_out: int,
                 k_in: int, layout: str = "row", bias: Optional[torch.Tensor] = None,
                 residual: Optional[torch.Tensor] = None, activation: str = "none",
                 out_dtype: Optional[torch.dtype] = None, out: Optional[torch.Tensor] = None, *,
                 impl: str = "auto", check_indices: Optional[bool] = None) -> torch.Tensor:
    """y = epilogue(x @ W^T), W = CSR(crow, col, values) [n_out, k_in]; layouts as csr_linear's.

    impl: "generated" (the generated kernel; what "auto" runs) or "reference" (csr_linear's dense
    reference). `out`, if given, is written and returned."""
    impl = resolve_impl(impl, x.device, ("generated", "reference"))
    if impl == "reference":
        return csr_linear_reference(x, crow, col, values, n_out, k_in, layout, bias, residual, activation,
                                    out_dtype, out, check_indices=check_indices)
    check_layout(layout)
    if x.device.type != "cpu":
        raise ValueError(f"generated CPU kernels take CPU tensors, x is on {x.device}")
    if layout == "feature" and x.dim() != 2:
        raise ValueError(f"layout='feature' takes x as [k_in, M] (2-D), got {tuple(x.shape)}")
    xr = x.t() if layout == "feature" else x
    if layout == "feature" and residual is not None and residual.dim() > 2:
        residual = residual.reshape(-1, n_out)
    out_dtype = _check_args(xr, crow, col, values, n_out, k_in, bias, residual, activation, out_dtype,
                            kernel_dtypes=True)
    if x.dtype not in _DTYPES or out_dtype not in _DTYPES:
        raise TypeError(f"generated CPU kernels take float32 or bfloat16 (x {x.dtype}, out {out_dtype})")
    if crow.dtype != torch.int32:
        raise TypeError(f"generated CPU kernels take int32 indices, got {crow.dtype}")
    _check_indices(crow, col, k_in, check_indices)
    lead = tuple(xr.shape[:-1])
    m = math.prod(lead)
    out_shape = (n_out, m) if layout == "feature" else lead + (n_out,)
    check_out(out, out_shape, out_dtype, x.device)
    y = out if out is not None else torch.empty(out_shape, dtype=out_dtype)
    if m == 0 or n_out == 0:
        return y
    xt = x.contiguous() if layout == "feature" else x.reshape(m, k_in).t().contiguous()
    b = bias.to(x.dtype).contiguous() if bias is not None else None
    r = residual.reshape(m, n_out).to(x.dtype).contiguous() if residual is not None else None
    fn = kernel_for(n_out, k_in, x.dtype, out_dtype, activation, b is not None, r is not None, layout == "row")
    fn(crow.data_ptr(), col.data_ptr(), values.data_ptr(), xt.data_ptr(), b.data_ptr() if b is not None else None,
       r.data_ptr() if r is not None else None, y.data_ptr(), m, torch.get_num_threads())
    return y


csr_cpu_generated = functools.partial(csr_cpu_host, impl="generated")
csr_cpu_reference = functools.partial(csr_cpu_host, impl="reference")


def _supports(pattern, dtype: torch.dtype, weight_shape: tuple) -> str | None:
    why = cpu_build.compiler()
    if why is not None:
        return f"generated CPU kernels need a C compiler: {why}"
    if dtype not in _DTYPES:
        return f"generated CPU kernels take float32 or bfloat16, the layer is {dtype}"
    return None


SPEC = KernelSpec(
    name="csr_cpu", op="sparsify::csr_cpu_linear",
    schema="(Tensor x, Tensor crow, Tensor col, Tensor values, SymInt n_out, SymInt k_in, str layout='row', "
           "Tensor? bias=None, Tensor? residual=None, str activation='none', ScalarType? out_dtype=None) -> Tensor",
    patterns=(Unstructured, NM, Block), replaces="linear", devices=("cpu",), layouts=LAYOUTS, supports=_supports,
    impl=csr_cpu_host, pack=_pack, out_like=linear_out_like, version=KERNEL_VERSION)
