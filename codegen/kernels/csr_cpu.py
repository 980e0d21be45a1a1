"""Unstructured-sparse linear on the CPU through a generated kernel: y = epilogue(x @ W^T), W in CSR.

The same packed weight as csr_linear.py (crow, col int32; values in x's dtype). The kernel is C the
CPU code generator emits for this layer's shape, dtypes and fused epilogue (codegen/cpu_csr_source.py)
and the system compiler builds once, cached on disk (codegen/cpu_build.py): tokens along the vector
lanes from a feature-major x^T, threads over output rows balanced by nonzeros, the epilogue applied
to the finished register tile and rounded once at the store. fp32 and bf16 (stored bf16, computed
fp32); another dtype is not a candidate.

Layouts: "feature" (x^T [K, M] in, y^T [N, M] out, between consecutive sparse layers: see
passes/rewrite/assign_layouts.py) or "row" (x [..., K] and y [..., N]: the kernel transposes x into a
scratch [K, M] itself, and stores y token-major). The residual is token-major in both.

Entry points: `csr_cpu_host` with `csr_cpu_generated` (the generated kernel; what "auto" runs) and
`csr_cpu_reference` (densify and multiply), `kernel_for(...)` (the built ctypes function of a
variant), and `SPEC`.
"""
from __future__ import annotations

import ctypes
import functools
import math
import threading
import weakref
from typing import Optional

import torch

from sparsify.codegen import cpu_build, cpu_csr_source
from sparsify.codegen.kernels._checks import check_out
from sparsify.codegen.kernels._common import LAYOUTS, check_layout, layout_ends, linear_out_like, resolve_impl
from sparsify.codegen.kernels.csr_linear import _check_args, _check_indices, _pack, csr_linear_reference, stack_csr
from sparsify.codegen.spec import KernelSpec
from sparsify.patterns import NM, Block, Unstructured

KERNEL_VERSION = f"csr_cpu-1+{cpu_csr_source.TEMPLATE_VERSION}"
_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}
_OUT_DTYPES = {**_DTYPES, torch.float16: "float16"}
_FUNCS: dict[tuple, ctypes._CFuncPtr] = {}
_P, _I64, _I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


def kernel_for(n: int, k: int, dtype: torch.dtype, out_dtype: torch.dtype, activation: str, has_bias: bool,
               has_residual: bool, in_row: bool, out_row: bool):
    """The generated kernel of a variant, built (or loaded from the disk cache) on first use."""
    return cpu_build.function(
        _FUNCS, (n, k, dtype, out_dtype, activation, has_bias, has_residual, in_row, out_row),
        lambda: cpu_csr_source.source(n, k, _DTYPES[dtype], _OUT_DTYPES[out_dtype], activation, has_bias,
                                      has_residual, in_row, out_row),
        [_P, _P, _P, _P, _P, _P, _P, _I64, _I, _P])


def generated_sources() -> dict[str, str]:
    """Variant name -> C source of every kernel built in this process (sm.kernel_sources())."""
    return cpu_build.sources(_FUNCS)


class _Checked:
    """A call whose weight-side arguments passed every check: the same tensors, unchanged, skip them.

    In a compiled graph the packed weight and bias never change between calls, and the full checks
    (~40 us of Python) cost as much as the kernel of a small 90%-sparse layer."""

    __slots__ = ("refs", "versions", "fn")

    def __init__(self, tensors, fn):
        self.refs = [weakref.ref(t) if t is not None else None for t in tensors]
        self.versions = [t._version if t is not None else None for t in tensors]
        self.fn = fn

    def holds(self, tensors) -> bool:
        for ref, version, t in zip(self.refs, self.versions, tensors):
            if t is None:
                if ref is not None:
                    return False
            elif ref is None or ref() is not t or t._version != version:
                return False
        return True


_CHECKED: dict[tuple, _Checked] = {}
_CHECKED_MAX = 4096


def csr_cpu_host(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, n_out: int,
                 k_in: int, layout: str = "row", bias: Optional[torch.Tensor] = None,
                 residual: Optional[torch.Tensor] = None, activation: str = "none",
                 out_dtype: Optional[torch.dtype] = None, out: Optional[torch.Tensor] = None, *,
                 impl: str = "auto", check_indices: Optional[bool] = None, engine=None) -> torch.Tensor:
    """y = epilogue(x @ W^T), W = CSR(crow, col, values) [n_out, k_in]; layouts as csr_linear's.

    impl: "generated" (the generated kernel; what "auto" runs) or "reference" (csr_linear's dense
    reference). `out`, if given, is written and returned. engine: what runs the product
    (`CSR_ENGINE`, the generated CSR kernel, by default; csr_jit_cpu.py passes its emitted program)."""
    engine = engine or CSR_ENGINE
    if impl == "auto" and out is None and isinstance(x, torch.Tensor):
        y = _fast_call(engine, x, crow, col, values, n_out, k_in, layout, bias, residual, activation, out_dtype)
        if y is not None:
            return y
    requested_out_dtype = out_dtype   # the fast path's key: what the next call will pass
    impl = resolve_impl(impl, x.device, ("generated", "reference"))
    check_layout(layout)
    if impl == "reference":
        return _reference(x, crow, col, values, n_out, k_in, layout, bias, residual, activation, out_dtype, out,
                          check_indices)
    x_feature, y_feature = layout_ends(layout)
    if x.device.type != "cpu":
        raise ValueError(f"generated CPU kernels take CPU tensors, x is on {x.device}")
    if x_feature and x.dim() != 2:
        raise ValueError(f"layout={layout!r} takes x as [k_in, M] (2-D), got {tuple(x.shape)}")
    xr = x.t() if x_feature else x
    res = residual.reshape(-1, n_out) if x_feature and residual is not None and residual.dim() > 2 else residual
    out_dtype = _check_args(xr, crow, col, values, n_out, k_in, bias, res, activation, out_dtype,
                            kernel_dtypes=True)
    if x.dtype not in _DTYPES or out_dtype not in _OUT_DTYPES:
        raise TypeError(f"generated CPU kernels take float32 or bfloat16 and store those or float16 "
                        f"(x {x.dtype}, out {out_dtype})")
    if crow.dtype != torch.int32:
        raise TypeError(f"generated CPU kernels take int32 indices, got {crow.dtype}")
    for name, t in (("crow", crow), ("col", col), ("values", values)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (the kernel reads it as a flat array)")
    _check_indices(crow, col, k_in, check_indices)
    m, lead, out_shape = _shapes(x, x_feature, y_feature, k_in, n_out)
    check_out(out, out_shape, out_dtype, x.device)
    y = out if out is not None else torch.empty(out_shape, dtype=out_dtype)
    if m == 0 or n_out == 0:
        return y
    fn = engine.bind(n_out, k_in, x.dtype, out_dtype, activation, bias is not None, residual is not None,
                     not x_feature, not y_feature, crow, col, values)
    if check_indices is not False:
        if len(_CHECKED) >= _CHECKED_MAX:
            _CHECKED.clear()
        key = _key(engine, x, n_out, k_in, layout, bias, residual, activation, requested_out_dtype, crow, col,
                   values)
        _CHECKED[key] = _Checked((crow, col, values, bias), fn)
    return fn(x, crow, col, values, n_out, k_in, m, not x_feature, bias, residual, y)


def _reference(x, crow, col, values, n_out, k_in, layout, bias, residual, activation, out_dtype, out, check_indices):
    """csr_linear's reference; a chain end ("row_to_feature", "feature_to_row") as the row layout
    with the transposes around it."""
    x_feature, y_feature = layout_ends(layout)
    if x_feature == y_feature:
        return csr_linear_reference(x, crow, col, values, n_out, k_in, layout, bias, residual, activation,
                                    out_dtype, out, check_indices=check_indices)
    if x_feature and x.dim() != 2:
        raise ValueError(f"layout={layout!r} takes x as [k_in, M] (2-D), got {tuple(x.shape)}")
    xr = x.t() if x_feature else x
    if x_feature and residual is not None:
        residual = residual.reshape(-1, n_out)
    y = csr_linear_reference(xr, crow, col, values, n_out, k_in, "row", bias, residual, activation, out_dtype,
                             check_indices=check_indices)
    y = y.reshape(-1, n_out).t().contiguous() if y_feature else y
    return out.copy_(y) if out is not None else y


def _key(engine, x, n_out, k_in, layout, bias, residual, activation, out_dtype, crow, col, values) -> tuple:
    return (engine.name, id(crow), id(col), id(values), id(bias), n_out, k_in, layout, activation, out_dtype,
            x.dtype, None if residual is None else residual.dtype)


def _fast_call(engine, x, crow, col, values, n_out, k_in, layout, bias, residual, activation, out_dtype):
    """The kernel, if these weight-side arguments were checked before; None sends the call through
    the full checks. What changes per call (x's device and shape, the residual's) is checked here."""
    hit = _CHECKED.get(_key(engine, x, n_out, k_in, layout, bias, residual, activation, out_dtype, crow, col,
                            values))
    if hit is None or x.device.type != "cpu" or not hit.holds((crow, col, values, bias)):
        return None
    x_feature, y_feature = layout_ends(layout)
    dims_ok = x.dim() == 2 if x_feature else x.dim() >= 1
    if not dims_ok or (x.shape[0] if x_feature else x.shape[-1]) != k_in:
        return None
    m, lead, shape = _shapes(x, x_feature, y_feature, k_in, n_out)
    if m == 0 or (residual is not None and (residual.device.type != "cpu" or residual.numel() != m * n_out
                                            or residual.shape[-1] != n_out
                                            or (not x_feature and tuple(residual.shape) != lead + (n_out,)))):
        return None
    y = torch.empty(shape, dtype=out_dtype or x.dtype)
    return hit.fn(x, crow, col, values, n_out, k_in, m, not x_feature, bias, residual, y)


def _shapes(x, x_feature: bool, y_feature: bool, k_in: int, n_out: int):
    """(tokens M, their shape, the output's shape) of an x that passed the shape checks."""
    lead = (x.shape[1],) if x_feature else tuple(x.shape[:-1])
    m = math.prod(lead)
    return m, lead, (n_out, m) if y_feature else lead + (n_out,)


def kernel_inputs(x, n_out, k_in, m, row, bias, residual):
    """(x, bias, residual) as a kernel reads them: contiguous, in x's dtype, x [m, k] or [k, m]."""
    xc = x.reshape(m, k_in).contiguous() if row else x.contiguous()
    b = bias.to(x.dtype).contiguous() if bias is not None else None
    r = residual.reshape(m, n_out).to(x.dtype).contiguous() if residual is not None else None
    return xc, b, r


def ptr(t: Optional[torch.Tensor]):
    return t.data_ptr() if t is not None else None


_SCRATCH = threading.local()


def scratch(floats: int) -> torch.Tensor:
    """A float32 work buffer of at least `floats`, kept per thread and reused: a fresh one per call
    (6-25 MB for x's packed tiles at 2048 tokens) cost its page faults every call, a third of a
    768 -> 768 layer's time at 90%. It grows to the largest call's size and stays."""
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.numel() < floats:
        buf = _SCRATCH.buf = torch.empty(max(floats, 1), dtype=torch.float32)
    return buf


def _launch(fn, x, crow, col, values, n_out, k_in, m, row, bias, residual, y):
    xc, b, r = kernel_inputs(x, n_out, k_in, m, row, bias, residual)
    # the kernel packs x into token tiles here (one token needs none)
    tiles = scratch(k_in * m) if m > 1 else None   # fp32 tiles, any x dtype
    fn(crow.data_ptr(), col.data_ptr(), values.data_ptr(), xc.data_ptr(), ptr(b), ptr(r), y.data_ptr(), m,
       torch.get_num_threads(), ptr(tiles))
    return y


class _CsrEngine:
    """The generated CSR kernel (cpu_csr_source.py): reads the weight's arrays at run time."""

    name = "csr"

    def bind(self, n, k, dtype, out_dtype, activation, has_bias, has_residual, in_row, out_row, crow, col, values):
        """The call y = fn(x, crow, col, values, n_out, k_in, m, row, bias, residual, y) of this variant
        (it holds no tensor: the checked-call cache must not keep a weight alive)."""
        fn = kernel_for(n, k, dtype, out_dtype, activation, has_bias, has_residual, in_row, out_row)
        return functools.partial(_launch, fn)


CSR_ENGINE = _CsrEngine()


csr_cpu_generated = functools.partial(csr_cpu_host, impl="generated")
csr_cpu_reference = functools.partial(csr_cpu_host, impl="reference")


def _supports(pattern, dtype: torch.dtype, weight_shape: tuple) -> str | None:
    return cpu_build.unsupported(dtype, _DTYPES, "CPU")


SPEC = KernelSpec(
    name="csr_cpu", op="sparsify::csr_cpu_linear",
    schema="(Tensor x, Tensor crow, Tensor col, Tensor values, SymInt n_out, SymInt k_in, str layout='row', "
           "Tensor? bias=None, Tensor? residual=None, str activation='none', ScalarType? out_dtype=None) -> Tensor",
    patterns=(Unstructured, NM, Block), replaces="linear", devices=("cpu",), layouts=LAYOUTS, supports=_supports,
    impl=csr_cpu_host, pack=_pack, out_like=linear_out_like, version=KERNEL_VERSION, stack_rows=stack_csr)
