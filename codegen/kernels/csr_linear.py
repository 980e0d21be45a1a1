"""Unstructured-sparse linear through torch's CSR matmul: y = epilogue(x @ W^T), W in CSR form.

This family has no Triton kernel (yet): it is the CPU candidate for highly sparse weights that the
cost model times against dense. torch multiplies a CSR matrix by a dense one with MKL on CPU (and
cuSPARSE on CUDA), so the sparse operand is W itself: y^T = addmm(bias, W_csr, x^T), with the
activation and residual applied in place on y^T. The layout pass lets consecutive sparse layers hand
each other y^T directly (layout "feature"), so only the first and last of a chain transpose.

Measured on the 2-core CI CPU (torch 2.13, fp32, 512 tokens, 1024x256 at 89%): MKL with x^T already
feature-major ran at 1.3-1.6x of dense F.linear; the same multiply with a transposed-view operand
(which MKL copies) or a transposed copy of the result back to token-major fell to 0.5-0.9x. int64
indices cost a cast per call, so they are packed as int32.

Layout (nn.Linear convention, W is [N_out, K] = [out_features, in_features]), what `pack_csr` returns
(`weight.to_sparse_csr()`) taken apart into plain tensors so the op's arguments stay dense:

- `crow` [N_out + 1] int32 or int64: row r owns entries crow[r] .. crow[r+1]-1.
- `col`  [nnz], crow's dtype: the column of each entry, ascending within a row.
- `values` [nnz], x's dtype.

Dtypes: MKL's CSR kernels exist only for float32/float64, so on CPU float16/bfloat16 inputs are
computed in float32 (values and x upcast per call) and the result cast back; that is the float32
accumulation every sparsify linear promises anyway. On CUDA the inputs' dtype goes to cuSPARSE as is.

Entry points: `pack_csr` / `csr_parts` / `unpack_csr`, `csr_linear_host` with `csr_linear_torch`
(the torch-CSR path) and `csr_linear_reference` (dense torch) as its two implementations, `csr_linear`
(through the `sparsify::csr_linear` custom op, which works under torch.compile and torch.export), and
`SPEC`, the kernel's entry in the registry.
"""
from __future__ import annotations

import functools
import math
import warnings
import weakref
from typing import Optional

import torch

from sparsify.codegen.epilogue import Epilogue, activation_inplace, apply_reference
from sparsify.codegen.kernels._checks import (check_dense_weight, check_devices, check_linear_epilogue,
                                              check_linear_input, check_out, check_tensors, resolve_out_dtype)
from sparsify.codegen.kernels._common import (CHAIN_LAYOUTS, KERNEL_DTYPES, REFERENCE_DTYPES, acc_dtype, check_layout,
                                              linear_out_like, resolve_impl)
from sparsify.codegen.spec import KernelSpec
from sparsify.patterns import NM, Block, Unstructured
from sparsify.state import Prepared

# Part of the cost-cache key: bump when the computation or its checks change.
KERNEL_VERSION = "csr_linear-3"

_INDEX_DTYPES = (torch.int32, torch.int64)


def pack_csr(weight: torch.Tensor) -> torch.Tensor:
    """A dense [N_out, K] weight as a torch sparse CSR tensor (zeros dropped; a NaN is kept)."""
    check_dense_weight(weight, 2, "[N_out, K]")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return weight.detach().to_sparse_csr()


def csr_parts(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(crow, col, values) of a CSR tensor as standalone dense tensors, ready to be module buffers.

    Copies: crow_indices() / values() are views whose base is the sparse tensor, and torch.compile
    cannot trace a view of a sparse base (dynamo gives up on the op call).
    """
    if not isinstance(w, torch.Tensor) or w.layout != torch.sparse_csr:
        raise ValueError(f"expected a torch.sparse_csr tensor, got {getattr(w, 'layout', type(w).__name__)}")
    return w.crow_indices().clone(), w.col_indices().clone(), w.values().clone()


def unpack_csr(w: torch.Tensor) -> torch.Tensor:
    """Dense [N_out, K] weight from a CSR tensor (tests, debugging)."""
    if not isinstance(w, torch.Tensor) or w.layout != torch.sparse_csr:
        raise ValueError(f"expected a torch.sparse_csr tensor, got {getattr(w, 'layout', type(w).__name__)}")
    return w.to_dense()


def check_csr_buffers(x, crow, col, values, rows: int, rows_name: str, why: str = "") -> None:
    """dtypes, shapes and devices of a CSR weight's (crow, col, values) with `rows` rows, for x."""
    if crow.dtype not in _INDEX_DTYPES or col.dtype != crow.dtype:
        raise TypeError(f"crow and col must share an index dtype in {_INDEX_DTYPES}, got "
                        f"{crow.dtype} and {col.dtype}")
    if crow.dim() != 1 or crow.shape[0] != rows + 1:
        raise ValueError(f"crow must be [{rows_name} + 1] = [{rows + 1}]{why}, got {tuple(crow.shape)}")
    if col.dim() != 1 or values.dim() != 1 or col.shape[0] != values.shape[0]:
        raise ValueError(f"col and values must be 1-D of the same length nnz, got {tuple(col.shape)} "
                         f"and {tuple(values.shape)}")
    check_devices(x, crow=crow, col=col, values=values)


def _check_args(x, crow, col, values, n_out, k_in, bias, residual, activation, out_dtype,
                kernel_dtypes: bool) -> torch.dtype:
    """Argument checks of every implementation; returns the output dtype."""
    check_tensors(x=x, crow=crow, col=col, values=values)
    check_linear_input(x, values, n_out, k_in, KERNEL_DTYPES if kernel_dtypes else REFERENCE_DTYPES)
    check_csr_buffers(x, crow, col, values, n_out, "n_out")
    check_linear_epilogue(x, n_out, bias, residual, activation)
    return resolve_out_dtype(x, out_dtype)


# Index tensors already validated, so the per-call check is O(1) for the buffers a model passes
# every time (an O(nnz) scan costs 30-40% of a 2048x2048, 90%-sparse CPU matmul at M <= 16, enough to
# flip the cost model's choice). Keyed by id, confirmed by identity (weakref) and the tensors'
# version counters, which every in-place write bumps: a hit is always the same, unchanged data.
_VALIDATED: dict[tuple, tuple] = {}
_VALIDATED_MAX = 1024


def _check_indices(crow, col, k_in: int, check: Optional[bool]) -> None:
    """Index contents. MKL trusts them (an out-of-range column reads or writes out of bounds), so they
    are checked by default on CPU, once per unchanged (crow, col) pair; on CUDA reading them would
    sync the stream, so only on request."""
    if check is None:
        check = crow.device.type != "cuda"
    if not check:
        return
    key = (id(crow), id(col), k_in)
    hit = _VALIDATED.get(key)
    if hit is not None and hit[0]() is crow and hit[1]() is col and hit[2] == (crow._version, col._version):
        return
    nnz = col.shape[0]
    if int(crow[0]) != 0 or int(crow[-1]) != nnz or bool((crow[1:] < crow[:-1]).any()):
        raise ValueError(f"crow must rise from 0 to nnz={nnz}, got first={int(crow[0])}, "
                         f"last={int(crow[-1])}")
    if nnz and (int(col.min()) < 0 or int(col.max()) >= k_in):
        raise ValueError(f"col indices must lie in [0, k_in={k_in}), got "
                         f"[{int(col.min())}, {int(col.max())}]")
    if len(_VALIDATED) >= _VALIDATED_MAX:
        _VALIDATED.clear()
    _VALIDATED[key] = (weakref.ref(crow), weakref.ref(col), (crow._version, col._version))


# torch warns once per process that sparse CSR is in beta; the filter costs ~2 us per call (as much as
# building the CSR tensor itself), so it is only installed until the first construction has happened.
_BETA_WARNING_SILENCED = [False]


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in dtype; no call at all when it already is (a no-op .to() still costs microseconds per call)."""
    return t if t.dtype == dtype else t.to(dtype)


def _csr_tensor(crow, col, values, compute: torch.dtype, n_out: int, k_in: int) -> torch.Tensor:
    if _BETA_WARNING_SILENCED[0]:
        return torch.sparse_csr_tensor(crow, col, _as(values, compute), size=(n_out, k_in), check_invariants=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        w = torch.sparse_csr_tensor(crow, col, _as(values, compute), size=(n_out, k_in), check_invariants=False)
    _BETA_WARNING_SILENCED[0] = True
    return w


def _epilogue(acc, bias, residual, activation, rows, n_out, out_dtype):
    epi = Epilogue(has_bias=bias is not None, activation=activation, has_residual=residual is not None)
    res2 = residual.reshape(rows, n_out) if residual is not None else None
    return apply_reference(acc, epi, bias=bias, residual=res2, out_dtype=out_dtype)


def csr_linear_host(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor,
                    n_out: int, k_in: int, layout: str = "row", bias: Optional[torch.Tensor] = None,
                    residual: Optional[torch.Tensor] = None, activation: str = "none",
                    out_dtype: Optional[torch.dtype] = None, out: Optional[torch.Tensor] = None, *,
                    impl: str = "auto", check_indices: Optional[bool] = None) -> torch.Tensor:
    """y = epilogue(x @ W^T) with W = CSR(crow, col, values) [n_out, k_in].

    layout "row": x [..., k_in] -> y [..., n_out]. layout "feature" (what consecutive sparse layers hand
    each other, see passes/rewrite/assign_layouts.py): x [k_in, M] -> y [n_out, M], features first, so
    the matmul needs no transposed copies; the residual, if any, is still token-major [M, n_out].
    impl: "torch" (torch's CSR matmul: MKL on CPU, cuSPARSE on CUDA; what "auto" runs) or
    "reference" (densify W and multiply in float32, float64 for float64 inputs: the tests' ground
    truth). `out`, if given, is written and returned (the output's shape, out_dtype, default x's).
    """
    impl = resolve_impl(impl, x.device, ("torch", "reference"))
    check_layout(layout, CHAIN_LAYOUTS)
    xr = x.t() if layout == "feature" and x.dim() == 2 else x      # the token-major view, for the checks
    if layout == "feature":
        if x.dim() != 2:
            raise ValueError(f"layout='feature' takes x as [k_in, M] (2-D), got {tuple(x.shape)}")
        if residual is not None and residual.dim() > 2 and residual.shape[-1] == n_out \
                and math.prod(residual.shape[:-1]) == x.shape[1]:
            residual = residual.reshape(x.shape[1], n_out)   # the tokens of the token-major graph, flattened
    out_dtype = _check_args(xr, crow, col, values, n_out, k_in, bias, residual, activation, out_dtype,
                            kernel_dtypes=impl == "torch")
    _check_indices(crow, col, k_in, check_indices)
    lead = tuple(xr.shape[:-1])
    rows = math.prod(lead)
    out_shape = (n_out, rows) if layout == "feature" else lead + (n_out,)
    check_out(out, out_shape, out_dtype, x.device)
    if impl == "reference":
        acc = _dense_product(xr, crow, col, values, n_out, k_in)
        y = _epilogue(acc, bias, residual, activation, rows, n_out, out_dtype)
        y = y.t().contiguous() if layout == "feature" else y.reshape(out_shape)
    elif rows == 0 or n_out == 0:
        y = x.new_empty(out_shape, dtype=out_dtype)
    else:
        yt = _csr_product_t(x if layout == "feature" else xr.reshape(rows, k_in).t(), crow, col, values, n_out,
                            k_in, bias)
        activation_inplace(yt, activation)
        if residual is not None:
            yt.add_(residual.reshape(rows, n_out).t())
        y = _as(yt, out_dtype) if layout == "feature" else _as(yt.t(), out_dtype).contiguous().reshape(out_shape)
    return out.copy_(y) if out is not None else y


def stack_csr(parts: list[dict]) -> dict:
    """CSR weights [n_i, K] (crow, col, values, bias) stacked into one [sum n_i, K]: the rows of one
    after the other's, row pointers shifted by the nonzeros before them."""
    crows, nnz = [parts[0]["crow"][:1]], 0
    for p in parts:
        crows.append(p["crow"][1:] + nnz)
        nnz += int(p["crow"][-1])
    biases = [p.get("bias") for p in parts]
    bias = None if all(b is None for b in biases) else torch.cat(
        [b if b is not None else torch.zeros(int(p["n_out"]), dtype=parts[0]["values"].dtype)
         for b, p in zip(biases, parts)])
    return {"crow": torch.cat(crows), "col": torch.cat([p["col"] for p in parts]),
            "values": torch.cat([p["values"] for p in parts]), "bias": bias,
            "n_out": sum(int(p["n_out"]) for p in parts)}


csr_linear_torch = functools.partial(csr_linear_host, impl="torch")
csr_linear_reference = functools.partial(csr_linear_host, impl="reference")


def _csr_product_t(xt, crow, col, values, n_out: int, k_in: int, bias) -> torch.Tensor:
    """(x @ W^T + bias)^T = addmm(bias, W_csr, x^T): [n_out, M], computed features first. MKL reads the
    dense operand x^T [k_in, M] row-major: a token-major x is copied into that layout once here."""
    # See the module docstring: MKL has no half-precision CSR kernels.
    compute = xt.dtype if (xt.is_cuda or xt.dtype == torch.float32) else torch.float32
    w = _csr_tensor(crow, col, values, compute, n_out, k_in)
    xt = _as(xt, compute).contiguous()
    if bias is None:
        return torch.mm(w, xt)
    return torch.addmm(_as(bias, compute)[:, None], w, xt)


def _dense_product(x, crow, col, values, n_out: int, k_in: int) -> torch.Tensor:
    """x @ W^T with W densified, in float32 (float64 for float64 x)."""
    dtype = acc_dtype(x)
    return x.reshape(-1, k_in).to(dtype) @ _dense_weight(crow, col, values, n_out, k_in, dtype).t()


def _dense_weight(crow, col, values, rows: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """W [rows, k] from its CSR parts (duplicate entries add up, as in the matmul)."""
    counts = (crow[1:] - crow[:-1]).long()
    row_of = torch.repeat_interleave(torch.arange(rows, device=crow.device), counts)
    w = torch.zeros(rows, k, dtype=dtype, device=values.device)
    w.index_put_((row_of, col.long()), values.to(dtype), accumulate=True)
    return w


def csr_linear(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor] = None,
               residual: Optional[torch.Tensor] = None, activation: str = "none",
               out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """y = epilogue(x @ W^T) for a CSR weight from `pack_csr`, through the `sparsify::csr_linear` op."""
    if not isinstance(w, torch.Tensor) or w.layout != torch.sparse_csr:
        raise ValueError(f"w must be a torch.sparse_csr tensor (pack_csr), got "
                         f"{getattr(w, 'layout', type(w).__name__)}")
    n_out, k_in = w.shape
    return torch.ops.sparsify.csr_linear(x, w.crow_indices(), w.col_indices(), w.values(), n_out, k_in,
                                         bias=bias, residual=residual, activation=activation, out_dtype=out_dtype)


# ----------------------------------------------------------------------------------------------
# The spec: what the registry finds; its op is what models call (one opaque node for torch.compile
# and torch.export)
# ----------------------------------------------------------------------------------------------

def _pack(weight: torch.Tensor, pattern, layer: Optional[dict] = None) -> Prepared:
    crow, col, values = csr_parts(pack_csr(weight))  # owned tensors, not views: they become buffers
    if col.numel() < 2 ** 31:   # MKL takes int32 indices as they are; int64 ones cost a cast per call
        crow, col = crow.int(), col.int()
    return Prepared({"crow": crow, "col": col, "values": values},
                    {"n_out": weight.shape[0], "k_in": weight.shape[1]})


SPEC = KernelSpec(
    name="csr_torch", op="sparsify::csr_linear",
    schema="(Tensor x, Tensor crow, Tensor col, Tensor values, SymInt n_out, SymInt k_in, str layout='row', "
           "Tensor? bias=None, Tensor? residual=None, str activation='none', ScalarType? out_dtype=None) -> Tensor",
    patterns=(Unstructured, NM, Block), replaces="linear", devices=("cpu", "cuda"), layouts=CHAIN_LAYOUTS, stack_rows=stack_csr,
    impl=csr_linear_torch, pack=_pack, out_like=linear_out_like, version=KERNEL_VERSION)
