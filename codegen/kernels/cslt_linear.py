"""2:4 structured-sparse linear through cuSPARSELt (torch._cslt_sparse_mm): the vendor path.

y = epilogue(x @ W^T) with W 2:4 sparse along K (nn.Linear convention, W is [N_out, K]) and compressed
by cuSPARSELt itself (`torch._cslt_compress`: the kept values and its own metadata in one opaque
buffer). For large M on Ampere+ GPUs this GEMM may beat nm_linear.py's Triton kernel; for few tokens
it does not (see the note in `cslt_linear_host`). It runs on CUDA only and has no torch reference of
its own: the tests compare it with nm_linear's.

Shapes and dtypes: fp16 / bf16, both weight sides multiples of 16 (cuSPARSELt's rule for the sparse
operand); the token rows are padded to a multiple of 8 per call (its rule for the dense operand).
The epilogue (bias, activation, residual, cast) runs in float32 through the shared torch epilogue.

Entry points: `semi_structured_available`, `pack_cslt` (host-side packing), `cslt_linear_host` (checks,
then the cuSPARSELt GEMM), `cslt_linear` (through the `sparsify::cslt_linear` custom op, which works
under torch.compile and torch.export), and `SPEC`, the kernel's entry in the registry.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from sparsify.codegen.epilogue import Epilogue, apply_reference
from sparsify.codegen.kernels._checks import check_linear_epilogue, resolve_out_dtype
from sparsify.codegen.kernels._common import linear_out_like
# The 2:4 check (and its error message naming the row and group) is nm_linear's.
from sparsify.codegen.kernels.nm_linear import _check_2d, pack_nm
from sparsify.codegen.spec import KernelSpec
from sparsify.patterns import NM
from sparsify.state import Prepared

# Part of the cost-cache key: bump when the computation or its checks change.
KERNEL_VERSION = "cslt_linear-1"

_CSLT_DTYPES = (torch.float16, torch.bfloat16)
# cuSPARSELt shape rules for fp16/bf16 (torch.sparse.SparseSemiStructuredTensorCUSPARSELT):
# the sparse operand's sides are multiples of 16, the dense operand's of 8 (we pad the token rows).
_CSLT_SPARSE_MULTIPLE = 16
_CSLT_DENSE_MULTIPLE = 8


def semi_structured_available(device=None) -> bool:
    """True when torch can run cuSPARSELt 2:4 GEMMs here: a CUDA device of compute capability >= 8.0
    and a torch build with cuSPARSELt."""
    if not torch.cuda.is_available():
        return False
    cusparselt = getattr(torch.backends, "cusparselt", None)
    if cusparselt is None or not cusparselt.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0)


def pack_cslt(weight: torch.Tensor) -> torch.Tensor:
    """Compress a 2:4-sparse [N_out, K] fp16/bf16 CUDA weight for `cslt_linear` (torch._cslt_compress).

    N_out and K must be multiples of 16. Raises ValueError naming the row and group if the weight is
    not 2:4 sparse, RuntimeError if cuSPARSELt is not available.
    """
    _check_2d(weight, "weight")
    if weight.dtype not in _CSLT_DTYPES:
        raise TypeError(f"cuSPARSELt weights must be one of {_CSLT_DTYPES}, got {weight.dtype}")
    rows, k = weight.shape
    if rows % _CSLT_SPARSE_MULTIPLE or k % _CSLT_SPARSE_MULTIPLE:
        raise ValueError(f"cuSPARSELt needs both weight sides to be multiples of {_CSLT_SPARSE_MULTIPLE}, "
                         f"got {tuple(weight.shape)}")
    pack_nm(weight, 2, 4)  # only for its 2:4 check and error message
    if weight.device.type != "cuda" or not semi_structured_available(weight.device):
        raise RuntimeError(f"cuSPARSELt needs a CUDA device of compute capability >= 8.0 and a torch "
                           f"build with cuSPARSELt; weight is on {weight.device}")
    return torch._cslt_compress(weight.detach().contiguous())


def cslt_linear_host(x: torch.Tensor, compressed: torch.Tensor, n_out: int, bias: Optional[torch.Tensor] = None,
                     residual: Optional[torch.Tensor] = None, activation: str = "none",
                     out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """y[..., n_out] = epilogue(x[..., K] @ W^T) with W from `pack_cslt`; CUDA tensors only."""
    if x.device.type != "cuda" or compressed.device != x.device:
        raise RuntimeError(f"sparsify::cslt_linear: cuSPARSELt needs CUDA tensors; x is on {x.device}, "
                           f"compressed on {compressed.device}")
    if x.dtype not in _CSLT_DTYPES:
        raise TypeError(f"sparsify::cslt_linear: x dtype must be one of {_CSLT_DTYPES}, got {x.dtype}")
    if compressed.dtype != x.dtype:
        raise TypeError(f"compressed dtype {compressed.dtype} does not match x dtype {x.dtype}")
    check_linear_epilogue(x, n_out, bias, residual, activation)
    out_dtype = resolve_out_dtype(x, out_dtype)
    lead = tuple(x.shape[:-1])
    rows, k = math.prod(lead), x.shape[-1]
    if rows == 0:
        return x.new_empty(lead + (n_out,), dtype=out_dtype)
    x2 = x.reshape(rows, k)
    pad = (-rows) % _CSLT_DENSE_MULTIPLE
    if pad:
        x2 = torch.nn.functional.pad(x2, (0, 0, 0, pad))
    # cuSPARSELt computes W @ B with W the sparse operand, B = x^T [k, rows]. B is made contiguous
    # and the [n_out, rows] result transposed back here: with torch 2.11 + cuSPARSELt 0.8 on an H100,
    # passing the transposed view x2.t() (cuSPARSELt's op(B) = TRANSPOSE) with transpose_result=True
    # cost 230-350 ms per call (wall clock, 4096 x 4096 weight, 16 rows), against ~1.2 ms with a
    # contiguous B. Even that is ~50x a dense 0.023 ms GEMM: torch builds and destroys a cuSPARSELt
    # plan on every _cslt_sparse_mm call, so this op only pays off where the GEMM itself takes
    # milliseconds; the cost model measures it like any other kernel.
    y = torch._cslt_sparse_mm(compressed, x2.t().contiguous()).t()[:rows]
    if bias is not None or residual is not None or activation != "none":
        epi = Epilogue(has_bias=bias is not None, activation=activation, has_residual=residual is not None)
        res2 = residual.reshape(rows, n_out) if residual is not None else None
        y = apply_reference(y.float(), epi, bias=bias, residual=res2, out_dtype=out_dtype)
    return y.to(out_dtype).contiguous().reshape(lead + (n_out,))


def cslt_linear(x: torch.Tensor, compressed: torch.Tensor, n_out: int, bias: Optional[torch.Tensor] = None,
                residual: Optional[torch.Tensor] = None, activation: str = "none",
                out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """y = epilogue(x @ W^T) with W from `pack_cslt`, through the `sparsify::cslt_linear` op."""
    return torch.ops.sparsify.cslt_linear(x, compressed, n_out, bias, residual, activation, out_dtype)


# ----------------------------------------------------------------------------------------------
# The spec: what the registry finds; its op is what models call (one opaque node for torch.compile
# and torch.export)
# ----------------------------------------------------------------------------------------------

def cslt_supports(pattern, dtype: torch.dtype, weight_shape: tuple) -> Optional[str]:
    """Why cuSPARSELt cannot serve this weight, or None."""
    if (pattern.n, pattern.m) != (2, 4):
        return "cuSPARSELt serves 2:4 only"
    if dtype not in _CSLT_DTYPES:
        return f"cuSPARSELt path not used for {dtype}"
    n, k = weight_shape
    if n % _CSLT_SPARSE_MULTIPLE or k % _CSLT_SPARSE_MULTIPLE:
        return f"cuSPARSELt needs out and in features divisible by 16, got {n}x{k}"
    return None if semi_structured_available() else "cuSPARSELt is not available in this torch build"


def _pack(weight: torch.Tensor, pattern, layer: Optional[dict] = None) -> Prepared:
    return Prepared({"compressed": pack_cslt(weight)}, {"n_out": weight.shape[0]})


SPEC = KernelSpec(
    name="cslt_2to4", op="sparsify::cslt_linear",
    schema="(Tensor x, Tensor compressed, SymInt n_out, Tensor? bias=None, Tensor? residual=None, "
           "str activation='none', ScalarType? out_dtype=None) -> Tensor",
    patterns=(NM,), replaces="linear", devices=("cuda",), supports=cslt_supports,
    impl=cslt_linear_host, pack=_pack, out_like=linear_out_like, version=KERNEL_VERSION)
