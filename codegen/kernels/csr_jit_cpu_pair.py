"""Two consecutive csr_jit_cpu layers as one op: y = epi(W @ act_a(W_a @ x + b_a)), tile by tile, the
hidden activation kept in L2 (codegen/cpu_jit_pair_source.py says how and why).

Not a planning candidate (devices=()): the lower pass passes/rewrite/fuse_pairs.py makes it from two
planned csr_jit_cpu ops where the first's only use is the second's x, and keeps it only where it
measured faster than the two. Arguments: x [..., k_in] and the first layer's weight ([a_n_out, k_in]
CSR, a_bias, a_activation) as `a_*`; the second's ([n_out, a_n_out] CSR) and the epilogue (bias,
residual, activation, out_dtype) under the names every sparse op uses. fp32 x only (two ops would
round the hidden activation to x's dtype; this keeps it fp32).

Entry points: `csr_jit_cpu_pair_host`, `SPEC`.
"""
from __future__ import annotations

import ctypes
import weakref
from typing import Optional

import torch

from sparsify.codegen import cpu_build, cpu_jit_pair_source
from sparsify.codegen.kernels import csr_jit_cpu
from sparsify.codegen.kernels._checks import check_out
from sparsify.codegen.kernels._common import resolve_impl
from sparsify.codegen.kernels.csr_cpu import _I, _I64, _OUT_DTYPES, _P, _Checked, ptr, scratch
from sparsify.codegen.kernels.csr_linear import _check_args, _check_indices, csr_linear_reference
from sparsify.codegen.spec import KernelSpec

KERNEL_VERSION = f"csr_jit_cpu_pair-1+{csr_jit_cpu.KERNEL_VERSION}+{cpu_jit_pair_source.TEMPLATE_VERSION}"
_DRIVERS: dict[tuple, ctypes._CFuncPtr] = {}
_CHECKED: dict[tuple, _Checked] = {}
_CHECKED_MAX = 1024
_WEIGHTS = ("a_crow", "a_col", "a_values", "a_bias", "crow", "col", "values", "bias")


def driver_for(k, n_mid, n, out_dtype, act_a, act_b, bias_a, bias_b, has_residual):
    return cpu_build.function(
        _DRIVERS, (k, n_mid, n, out_dtype, act_a, act_b, bias_a, bias_b, has_residual),
        lambda: cpu_jit_pair_source.source(k, n_mid, n, "float32", _OUT_DTYPES[out_dtype], act_a, act_b, bias_a,
                                           bias_b, has_residual),
        [_P, _I, _P, _P, _I, _P, _P, _P, _P, _P, _P, _I64, _I, _P])


def generated_sources() -> dict[str, str]:
    """The pair drivers' C sources and a line per emitted program (csr_jit_cpu's, which they run)."""
    programs = {k: v for k, v in csr_jit_cpu.generated_sources().items() if k.startswith("program_")}
    return {**cpu_build.sources(_DRIVERS), **programs}


def _key(x, a_n_out, a_activation, n_out, k_in, residual, activation, out_dtype, tensors) -> tuple:
    return (tuple(id(t) for t in tensors), a_n_out, a_activation, n_out, k_in, activation, out_dtype, x.dtype,
            None if residual is None else residual.dtype)


def csr_jit_cpu_pair_host(x: torch.Tensor, a_crow: torch.Tensor, a_col: torch.Tensor, a_values: torch.Tensor,
                          a_n_out: int, a_bias: Optional[torch.Tensor], a_activation: str, crow: torch.Tensor,
                          col: torch.Tensor, values: torch.Tensor, n_out: int, k_in: int,
                          bias: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None,
                          activation: str = "none", out_dtype: Optional[torch.dtype] = None,
                          out: Optional[torch.Tensor] = None, *, impl: str = "auto") -> torch.Tensor:
    """y [..., n_out] = the second layer's epilogue of (W @ h), h = a_activation(W_a @ x + a_bias) in fp32.
    impl: "generated" (what "auto" runs) or "reference" (both layers by csr_linear's reference).
    `out`, if given, is written and returned."""
    tensors = (a_crow, a_col, a_values, a_bias, crow, col, values, bias)
    key = _key(x, a_n_out, a_activation, n_out, k_in, residual, activation, out_dtype, tensors)
    hit = _CHECKED.get(key) if impl == "auto" else None
    lead = tuple(x.shape[:-1])
    m = x.numel() // k_in if k_in else 0
    if out is None and hit is not None and hit.holds(tensors) and x.device.type == "cpu" and x.shape[-1] == k_in and m and (
            residual is None or (residual.device.type == "cpu" and tuple(residual.shape) == lead + (n_out,))):
        return hit.fn(x, m, residual, torch.empty(lead + (n_out,), dtype=out_dtype or x.dtype))
    impl = resolve_impl(impl, x.device, ("generated", "reference"))
    # both layers' checks, the second's on a stand-in for the hidden activation (an expanded view: no memory)
    hidden = torch.empty(1, dtype=x.dtype, device=x.device).expand(lead + (a_n_out,)) if x.dim() else x
    _check_args(x, a_crow, a_col, a_values, a_n_out, k_in, a_bias, None, a_activation, None, kernel_dtypes=True)
    y_dtype = _check_args(hidden, crow, col, values, n_out, a_n_out, bias, residual, activation, out_dtype,
                          kernel_dtypes=True)
    check_out(out, lead + (n_out,), y_dtype, x.device)
    if impl == "reference":
        h = csr_linear_reference(x, a_crow, a_col, a_values, a_n_out, k_in, "row", a_bias, None, a_activation)
        return csr_linear_reference(h, crow, col, values, n_out, a_n_out, "row", bias, residual, activation,
                                    out_dtype, out)
    if x.device.type != "cpu" or x.dtype != torch.float32 or y_dtype not in _OUT_DTYPES:
        raise TypeError(f"csr_jit_cpu_pair takes float32 CPU x and stores {sorted(map(str, _OUT_DTYPES))}, got x "
                        f"{x.dtype} on {x.device}, out {y_dtype}")
    for name, t in zip(_WEIGHTS, tensors):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"csr_jit_cpu_pair: {name} must be contiguous")
    if a_crow.dtype != torch.int32 or crow.dtype != torch.int32:
        raise TypeError(f"csr_jit_cpu_pair takes int32 indices, got {a_crow.dtype} and {crow.dtype}")
    _check_indices(a_crow, a_col, k_in, True)
    _check_indices(crow, col, a_n_out, True)
    y = out if out is not None else torch.empty(lead + (n_out,), dtype=y_dtype)
    if m == 0 or n_out == 0:
        return y
    fn = driver_for(k_in, a_n_out, n_out, y_dtype, a_activation, activation, a_bias is not None, bias is not None,
                    residual is not None)
    csr_jit_cpu.program_for(a_crow, a_col, a_values, a_n_out, k_in)   # emitted now, not inside a timed call
    csr_jit_cpu.program_for(crow, col, values, n_out, a_n_out)
    call = _bound(fn, tensors, k_in, a_n_out, n_out)
    if len(_CHECKED) >= _CHECKED_MAX:
        _CHECKED.clear()
    _CHECKED[key] = _Checked(tensors, call)
    return call(x, m, residual, y)


def _bound(fn, tensors, k_in, a_n_out, n_out):
    """The call (x, m, residual, y) -> y of checked weights. It holds no tensor (the cache entry it is
    kept in must not keep a weight alive): the programs are found per call, a dict lookup."""
    refs = [weakref.ref(t) if t is not None else None for t in tensors]

    def call(x, m, residual, y):
        a_crow, a_col, a_values, a_bias, crow, col, values, bias = [r() if r is not None else None for r in refs]
        p1 = csr_jit_cpu.program_for(a_crow, a_col, a_values, a_n_out, k_in)
        p2 = csr_jit_cpu.program_for(crow, col, values, n_out, a_n_out)
        xc = x.reshape(m, k_in).contiguous()
        r = residual.reshape(m, n_out).contiguous() if residual is not None else None
        threads = torch.get_num_threads()
        work = scratch(cpu_jit_pair_source.scratch_floats(k_in, a_n_out, n_out, threads, m))
        fn(p1.table.data_ptr(), p1.segments, p1.values.data_ptr(), p2.table.data_ptr(), p2.segments,
           p2.values.data_ptr(), xc.data_ptr(), ptr(a_bias), ptr(bias), ptr(r), y.data_ptr(), m, threads,
           work.data_ptr())
        return y
    return call


def _supports(pattern, dtype: torch.dtype, weight_shape: tuple) -> str | None:
    why = csr_jit_cpu._supports(pattern, dtype, weight_shape)
    return why if why is not None else (None if dtype == torch.float32 else f"csr_jit_cpu_pair takes float32, not {dtype}")


def _out_like(a: dict) -> torch.Tensor:
    x = a["x"]
    return x.new_empty(tuple(x.shape[:-1]) + (a["n_out"],), dtype=a["out_dtype"] or x.dtype)


def _never_packed(*_):
    raise TypeError("csr_jit_cpu_pair is made from two planned csr_jit_cpu ops (passes/rewrite/fuse_pairs.py), "
                    "not planned for a layer: it has no pack")


SPEC = KernelSpec(
    name="csr_jit_cpu_pair", op="sparsify::csr_jit_cpu_pair",
    schema="(Tensor x, Tensor a_crow, Tensor a_col, Tensor a_values, SymInt a_n_out, Tensor? a_bias, "
           "str a_activation, Tensor crow, Tensor col, Tensor values, SymInt n_out, SymInt k_in, "
           "Tensor? bias=None, Tensor? residual=None, str activation='none', ScalarType? out_dtype=None) -> Tensor",
    patterns=(), replaces="linear_pair", devices=(), impl=csr_jit_cpu_pair_host, pack=_never_packed,
    out_like=_out_like, version=KERNEL_VERSION, supports=_supports, fuses=("csr_jit_cpu", "csr_jit_cpu"))
