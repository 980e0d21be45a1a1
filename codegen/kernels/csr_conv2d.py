"""Unstructured-sparse conv2d through torch's CSR matmul: y = epilogue(conv2d(x, W)), W in CSR form.

The conv twin of csr_linear.py, and like it the CPU candidate for highly sparse weights that the cost
model times against dense (MKL-DNN) conv; there is no Triton kernel. A conv is a GEMM over the im2col
matrix, and torch multiplies a CSR matrix by a dense one (MKL on CPU, cuSPARSE on CUDA) with the sparse
operand on the left, so W is that operand:

    acc[O, N * L] = W_csr[O, K] @ cols[K, N * L],   K = C * kh * kw,  L = Hout * Wout

where cols is F.unfold(x) (its rows ordered (C, kh, kw), which is exactly the column order of
weight.reshape(O, K)). A 1x1 kernel with stride 1 and no padding needs no unfold: cols is x itself,
viewed [N, C, H * W] (x copied to NCHW first if it is channels-last, as the view needs NCHW).
The batch is folded into the matmul's columns (one MKL call, not one per image): at batch 1 cols[0]
is used in place, at batch > 1 cols is transposed to [K, N * L] (one copy), and acc comes back
[O, N, L], viewed [N, O, Hout, Wout] through a permute. On this CPU the path beats dense conv from
about 90% sparsity on late-stage and 1x1 convs (512->512 3x3 at 7x7, batch 1: 1.36x at 90%;
256->1024 1x1 at 14x14: 1.41x); early layers with large L and few channels stay dense.

Layout: the weight [O, C, kh, kw] flattened to W2 = weight.reshape(O, C * kh * kw) in CSR form, what
`pack_csr_conv` returns (a torch sparse CSR tensor), taken apart (csr_linear.csr_parts) into
plain tensors so the op's arguments stay dense:

- `crow` [O + 1] int32 or int64: output channel r owns entries crow[r] .. crow[r+1]-1.
- `col`  [nnz], crow's dtype: column c * kh * kw + i * kw + j for tap (i, j) of input channel c.
- `values` [nnz], x's dtype.

The CSR form does not record K, so C is x.shape[1]: the index check (on CPU by default, cached per
unchanged buffers, see csr_linear._check_indices) rejects a column outside [0, C * kh * kw).

Dtypes: as csr_linear: float16/bfloat16 are computed in float32 on CPU (MKL has no half-precision CSR
kernels), the result cast back; on CUDA the input dtype goes to cuSPARSE as is. The output has x's
memory format (_common.conv_out_memory_format) and out_dtype (default x's dtype). groups=1 only, as
for the other sparse convs (grouped/depthwise convs are handled by channel pruning).

Entry points: `pack_csr_conv` (host-side packing), `csr_conv2d_host` with `csr_conv2d_torch` (the
torch-CSR path) and `csr_conv2d_reference` (dense torch) as its two implementations, `csr_conv2d`
(through the `sparsify::csr_conv2d` custom op, which works under torch.compile and torch.export), and
`SPEC`, the kernel's entry in the registry.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from sparsify.codegen.kernels._checks import (check_conv_input, check_dense_weight, check_epilogue,
                                              check_input_dtypes, check_out, check_tensors, describe, is_int,
                                              resolve_out_dtype)
from sparsify.codegen.kernels._common import (KERNEL_DTYPES, REFERENCE_DTYPES, IntPair, acc_dtype,
                                              conv_empty, conv_epilogue_reference, conv_layer_static,
                                              conv_out_like, conv_out_memory_format, conv_out_shape, conv_pairs,
                                              resolve_impl)
# The CSR plumbing is csr_linear's.
from sparsify.codegen.kernels.csr_linear import (_check_indices, _csr_tensor, _dense_weight, check_csr_buffers,
                                                 csr_parts, pack_csr)
from sparsify.codegen.spec import KernelSpec
from sparsify.patterns import NM, Block, Unstructured
from sparsify.state import Prepared

# Part of the cost-cache key: bump when the computation or its checks change.
KERNEL_VERSION = "csr_conv2d-1"


def pack_csr_conv(weight: torch.Tensor) -> torch.Tensor:
    """A dense conv weight [O, C, kh, kw] as a torch sparse CSR tensor of weight.reshape(O, C * kh * kw)
    (columns ordered (C, kh, kw), F.unfold's row order; zeros dropped, a NaN is kept)."""
    check_dense_weight(weight, 4, "[O, C, kh, kw]")
    o, c, kh, kw = weight.shape
    return pack_csr(weight.detach().reshape(o, c * kh * kw))


def _check_args(x, crow, col, values, o, kh, kw, stride, padding, dilation, bias, residual, activation,
                out_dtype, kernel_dtypes: bool):
    """Argument checks of both implementations.

    Returns (out_dtype, (stride, padding, dilation) as pairs, output shape)."""
    check_tensors(x=x, crow=crow, col=col, values=values)
    check_conv_input(x, o=o, kh=kh, kw=kw)
    pairs = conv_pairs(stride, padding, dilation)
    check_input_dtypes(x, values, KERNEL_DTYPES if kernel_dtypes else REFERENCE_DTYPES)
    check_csr_buffers(x, crow, col, values, o, "o", " (one row per output channel)")
    out_shape = conv_out_shape(x, o, kh, kw, pairs)
    check_epilogue(x, o, out_shape, "the output's: N, O, Hout, Wout", bias, residual, activation)
    return resolve_out_dtype(x, out_dtype), pairs, out_shape


def _check_conv_indices(x, crow, col, kh: int, kw: int, check: Optional[bool]) -> None:
    """csr_linear's index check with K = C * kh * kw; C comes from x, so a column past K means x has
    fewer channels than the packed weight, and the error says so."""
    c = x.shape[1]
    try:
        _check_indices(crow, col, c * kh * kw, check)
    except ValueError as e:
        if "col indices" not in str(e):
            raise
        raise ValueError(f"{e}: k_in = C * kh * kw with C={c} from x.shape[1], kh={kh}, kw={kw}; "
                         f"does x have the weight's in_channels?") from None


def csr_conv2d_host(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor,
                    o: int, kh: int, kw: int, stride: IntPair = 1, padding: IntPair = 0,
                    dilation: IntPair = 1, bias: Optional[torch.Tensor] = None,
                    residual: Optional[torch.Tensor] = None, activation: str = "none",
                    out_dtype: Optional[torch.dtype] = None, out: Optional[torch.Tensor] = None, *,
                    impl: str = "auto", check_indices: Optional[bool] = None) -> torch.Tensor:
    """y[N, o, Hout, Wout] = epilogue(conv2d(x[N, C, H, W], W)) with W [o, C, kh, kw] = CSR(crow, col,
    values) of weight.reshape(o, C * kh * kw) (`pack_csr_conv`). C is x.shape[1].

    impl: "torch" (im2col + one CSR matmul; what "auto" runs on every device) or "reference"
    (densify W, F.conv2d in float32, float64 for float64 inputs: the tests' ground truth, then the
    shared conv epilogue).
    stride / padding / dilation: an int or an (h, w) pair, as F.conv2d (numeric padding only).
    The result has x's memory format (see _common.conv_out_memory_format). `out`, if given, is written
    and returned: shape (N, o, Hout, Wout), out_dtype (default x's dtype), contiguous or channels-last.
    check_indices: validate crow/col contents (default: on CPU only; cached per unchanged buffers).
    """
    impl = resolve_impl(impl, x.device, ("torch", "reference"))
    out_dtype, pairs, out_shape = _check_args(
        x, crow, col, values, o, kh, kw, stride, padding, dilation, bias, residual, activation, out_dtype,
        kernel_dtypes=impl == "torch")
    _check_conv_indices(x, crow, col, kh, kw, check_indices)
    check_out(out, out_shape, out_dtype, x.device, channels_last_ok=True)
    if impl == "reference":
        dtype = acc_dtype(x)
        c = x.shape[1]
        weight = _dense_weight(crow, col, values, o, c * kh * kw, dtype).reshape(o, c, kh, kw)
        acc = F.conv2d(x.to(dtype), weight, None, *pairs)
        return conv_epilogue_reference(acc, x, bias, residual, activation, out_dtype, out)
    if x.shape[0] == 0 or o == 0:
        return out if out is not None else conv_empty(x, out_shape, out_dtype)
    acc = _csr_conv(x, crow, col, values, o, kh, kw, pairs, out_shape)
    if bias is None and residual is None and activation == "none":
        if out is None and acc.dtype == out_dtype and acc.is_contiguous(memory_format=conv_out_memory_format(x)):
            return acc                                  # batch 1, NCHW, float32: no copy at all
        if out is None:
            out = conv_empty(x, out_shape, out_dtype)
        return out.copy_(acc)                           # cast and layout in one copy
    if acc.dtype != torch.float32:
        acc = acc.float()
    return conv_epilogue_reference(acc, x, bias, residual, activation, out_dtype, out)


csr_conv2d_torch = functools.partial(csr_conv2d_host, impl="torch")
csr_conv2d_reference = functools.partial(csr_conv2d_host, impl="reference")


def _csr_conv(x, crow, col, values, o: int, kh: int, kw: int, pairs, out_shape) -> torch.Tensor:
    """acc [N, O, Hout, Wout] = conv2d(x, W) through im2col and torch's CSR matmul, in x's dtype on CUDA
    and float32 for CPU half-precision inputs (see the module docstring)."""
    (n, c, h, w), (_, _, hout, wout) = x.shape, out_shape
    stride2, padding2, dilation2 = pairs
    # See the module docstring: MKL has no half-precision CSR kernels.
    compute = x.dtype if (x.is_cuda or x.dtype == torch.float32) else torch.float32
    k, l_out = c * kh * kw, hout * wout
    if k == 0:
        # No input channels (F.unfold rejects C=0): the conv is zero, only the epilogue remains.
        return torch.zeros(out_shape, dtype=compute, device=x.device)
    if kh == kw == 1 and stride2 == (1, 1) and padding2 == (0, 0):
        # 1x1, unit stride, no padding: x is already the im2col matrix (dilation is moot). The
        # [N, C, H * W] view needs NCHW; the upcast (if any) and that copy are one copy.
        cols = x.to(compute, memory_format=torch.contiguous_format).reshape(n, c, h * w)
    else:
        # Upcast before unfold: x is kh * kw times smaller than its im2col matrix.
        cols = F.unfold(x.to(compute), (kh, kw), dilation=dilation2, padding=padding2, stride=stride2)
    wt = _csr_tensor(crow, col, values, compute, o, k)
    if n == 1:
        return torch.mm(wt, cols[0]).view(1, o, hout, wout)                      # [O, L] is [1, O, Hout, Wout]
    # Batch folded into the columns: one matmul; [O, N * L] comes back as [N, O, L] (a view).
    acc = torch.mm(wt, cols.transpose(0, 1).reshape(k, n * l_out))
    return acc.view(o, n, hout, wout).permute(1, 0, 2, 3)


def csr_conv2d(x: torch.Tensor, w_csr: torch.Tensor, kh: int, kw: int, bias: Optional[torch.Tensor] = None,
               stride: IntPair = 1, padding: IntPair = 0, dilation: IntPair = 1,
               residual: Optional[torch.Tensor] = None, activation: str = "none",
               out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """y = epilogue(conv2d(x, W)) for a CSR weight from `pack_csr_conv`, through the
    `sparsify::csr_conv2d` op. kh / kw: the kernel size (the CSR matrix only knows C * kh * kw)."""
    if not isinstance(w_csr, torch.Tensor) or w_csr.layout != torch.sparse_csr:
        raise ValueError(f"w_csr must be a torch.sparse_csr tensor (pack_csr_conv), got "
                         f"{getattr(w_csr, 'layout', type(w_csr).__name__)}")
    for name, v in (("kh", kh), ("kw", kw)):
        if not is_int(v) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    o, k = w_csr.shape
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] * kh * kw != k:
        raise ValueError(f"x must be [N, C, H, W] with C * kh * kw = {k} (the weight's columns; "
                         f"kh={kh}, kw={kw}), got {describe(x)}")
    stride2, padding2, dilation2 = conv_pairs(stride, padding, dilation)
    return torch.ops.sparsify.csr_conv2d(x, w_csr.crow_indices(), w_csr.col_indices(), w_csr.values(), o,
                                         kh, kw, list(stride2), list(padding2), list(dilation2),
                                         bias, residual, activation, out_dtype)


# ----------------------------------------------------------------------------------------------
# The spec: what the registry finds; its op is what models call (one opaque node for torch.compile
# and torch.export). No Triton kernel for this family: every device runs im2col + torch's CSR matmul.
# ----------------------------------------------------------------------------------------------

def _pack(weight: torch.Tensor, pattern, layer: Optional[dict] = None) -> Prepared:
    crow, col, values = csr_parts(pack_csr_conv(weight))  # owned tensors, not views: they become buffers
    o, _, kh, kw = weight.shape
    return Prepared({"crow": crow, "col": col, "values": values},
                    {"o": o, "kh": kh, "kw": kw, **conv_layer_static(layer)})


SPEC = KernelSpec(
    name="csr_conv_torch", op="sparsify::csr_conv2d",
    schema="(Tensor x, Tensor crow, Tensor col, Tensor values, SymInt o, SymInt kh, SymInt kw, "
           "SymInt[] stride, SymInt[] padding, SymInt[] dilation, Tensor? bias=None, Tensor? residual=None, "
           "str activation='none', ScalarType? out_dtype=None) -> Tensor",
    patterns=(Unstructured, NM, Block), replaces="conv2d", devices=("cpu", "cuda"),
    impl=csr_conv2d_torch, pack=_pack, out_like=conv_out_like, version=KERNEL_VERSION)
