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
memory format (bsr_conv2d._out_memory_format) and out_dtype (default x's dtype). groups=1 only, as
for the other sparse convs (grouped/depthwise convs are handled by channel pruning).

Entry points: `pack_csr_conv` (host-side packing), `csr_conv2d_torch` (the torch-CSR path),
`csr_conv2d_reference` (dense torch, same signature), `csr_conv2d` (the `sparsify::csr_conv2d` custom
op, works under torch.compile and torch.export).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from sparsify.codegen.kernels._checks import check_epilogue, check_out, describe, is_int, resolve_out_dtype
# Conv geometry and the shared conv epilogue are bsr_conv2d's; the CSR plumbing is csr_linear's.
from sparsify.codegen.kernels.bsr_conv2d import (_out_memory_format, conv_epilogue_reference,
                                                 conv_out_shape, conv_output_like, conv_pairs)
from sparsify.codegen.kernels.csr_linear import _check_indices, _csr_tensor, check_csr_buffers, pack_csr

# Part of the cost-cache key: bump when the computation or its checks change.
KERNEL_VERSION = "csr_conv2d-1"

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INDEX_DTYPES = (torch.int32, torch.int64)

IntPair = Union[int, Sequence[int]]


def pack_csr_conv(weight: torch.Tensor) -> torch.Tensor:
    """A dense conv weight [O, C, kh, kw] as a torch sparse CSR tensor of weight.reshape(O, C * kh * kw)
    (columns ordered (C, kh, kw), F.unfold's row order; zeros dropped, a NaN is kept)."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        raise ValueError(f"weight must be a 4-D [O, C, kh, kw] tensor, got {describe(weight)}")
    if weight.layout != torch.strided:
        raise ValueError(f"weight must be a dense (strided) tensor, got layout {weight.layout}")
    o, c, kh, kw = weight.shape
    return pack_csr(weight.detach().reshape(o, c * kh * kw))


def _check_args(x, crow, col, values, o, kh, kw, stride, padding, dilation, bias, residual, activation,
                out_dtype, kernel_dtypes: bool):
    """Shared argument checks of the wrapper and the reference.

    Returns (out_dtype, (stride, padding, dilation) as pairs, output shape)."""
    for name, t in (("x", x), ("crow", crow), ("col", col), ("values", values)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must be a 4-D [N, C, H, W] tensor, got {tuple(x.shape)}")
    for name, v in (("o", o), ("kh", kh), ("kw", kw)):
        if not is_int(v) or v < (0 if name == "o" else 1):
            raise ValueError(f"{name} must be a {'non-negative' if name == 'o' else 'positive'} int, "
                             f"got {v!r}")
    stride2, padding2, dilation2 = pairs = conv_pairs(stride, padding, dilation)
    allowed = _DTYPES if kernel_dtypes else _DTYPES + (torch.float64,)
    if x.dtype not in allowed:
        raise TypeError(f"x dtype must be one of {allowed}, got {x.dtype}")
    if values.dtype != x.dtype:
        raise TypeError(f"values dtype {values.dtype} does not match x dtype {x.dtype}")
    check_csr_buffers(x, crow, col, values, o, "o", " (one row per output channel)")
    out_shape = conv_out_shape(x, o, kh, kw, pairs)
    check_epilogue(x, o, out_shape, "the output's: N, O, Hout, Wout", bias, residual, activation)
    return resolve_out_dtype(x, out_dtype), (stride2, padding2, dilation2), out_shape


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


def csr_conv2d_torch(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor,
                     o: int, kh: int, kw: int, stride: IntPair = 1, padding: IntPair = 0,
                     dilation: IntPair = 1, bias: Optional[torch.Tensor] = None,
                     residual: Optional[torch.Tensor] = None, activation: str = "none",
                     out_dtype: Optional[torch.dtype] = None, out: Optional[torch.Tensor] = None, *,
                     check_indices: Optional[bool] = None) -> torch.Tensor:
    """y[N, o, Hout, Wout] = epilogue(conv2d(x[N, C, H, W], W)) with W [o, C, kh, kw] = CSR(crow, col,
    values) of weight.reshape(o, C * kh * kw) (`pack_csr_conv`); im2col + one CSR matmul. C is x.shape[1].

    stride / padding / dilation: an int or an (h, w) pair, as F.conv2d (numeric padding only).
    The result has x's memory format (see bsr_conv2d._out_memory_format). `out`, if given, is written
    and returned: shape (N, o, Hout, Wout), out_dtype (default x's dtype), contiguous or channels-last.
    check_indices: validate crow/col contents (default: on CPU only; cached per unchanged buffers).
    """
    out_dtype, (stride2, padding2, dilation2), out_shape = _check_args(
        x, crow, col, values, o, kh, kw, stride, padding, dilation, bias, residual, activation, out_dtype,
        kernel_dtypes=True)
    _check_conv_indices(x, crow, col, kh, kw, check_indices)
    check_out(out, out_shape, out_dtype, x.device, channels_last_ok=True)
    n, c, h, w = x.shape
    _, _, hout, wout = out_shape
    if n == 0 or o == 0:
        if out is not None:
            return out
        return torch.empty(out_shape, dtype=out_dtype, device=x.device, memory_format=_out_memory_format(x))
    # See the module docstring: MKL has no half-precision CSR kernels.
    compute = x.dtype if (x.is_cuda or x.dtype == torch.float32) else torch.float32
    k, l_out = c * kh * kw, hout * wout
    if k == 0:
        # No input channels (F.unfold rejects C=0): the conv is zero, only the epilogue remains.
        acc = torch.zeros(out_shape, dtype=compute, device=x.device)
    else:
        if kh == kw == 1 and stride2 == (1, 1) and padding2 == (0, 0):
            # 1x1, unit stride, no padding: x is already the im2col matrix (dilation is moot). The
            # [N, C, H * W] view needs NCHW; the upcast (if any) and that copy are one copy.
            cols = x.to(compute, memory_format=torch.contiguous_format).reshape(n, c, h * w)
        else:
            # Upcast before unfold: x is kh * kw times smaller than its im2col matrix.
            cols = F.unfold(x.to(compute), (kh, kw), dilation=dilation2, padding=padding2, stride=stride2)
        wt = _csr_tensor(crow, col, values, compute, o, k)
        if n == 1:
            acc = torch.mm(wt, cols[0]).view(1, o, hout, wout)                      # [O, L] is [1, O, Hout, Wout]
        else:
            # Batch folded into the columns: one matmul; [O, N * L] comes back as [N, O, L] (a view).
            acc = torch.mm(wt, cols.transpose(0, 1).reshape(k, n * l_out))
            acc = acc.view(o, n, hout, wout).permute(1, 0, 2, 3)
    if bias is None and residual is None and activation == "none":
        fmt = _out_memory_format(x)
        if out is None and acc.dtype == out_dtype and acc.is_contiguous(memory_format=fmt):
            return acc                                  # batch 1, NCHW, float32: no copy at all
        if out is None:
            out = torch.empty(out_shape, dtype=out_dtype, device=x.device, memory_format=fmt)
        return out.copy_(acc)                           # cast and layout in one copy
    if acc.dtype != torch.float32:
        acc = acc.float()
    return conv_epilogue_reference(acc, x, bias, residual, activation, out_dtype, out)


def _dense_weight(crow, col, values, o: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """W2 [o, k] from its CSR parts (duplicate entries add up, as in the matmul)."""
    counts = (crow[1:] - crow[:-1]).long()
    row_of = torch.repeat_interleave(torch.arange(o, device=crow.device), counts)
    w = torch.zeros(o, k, dtype=dtype, device=values.device)
    w.index_put_((row_of, col.long()), values.to(dtype), accumulate=True)
    return w


def csr_conv2d_reference(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor,
                         o: int, kh: int, kw: int, stride: IntPair = 1, padding: IntPair = 0,
                         dilation: IntPair = 1, bias: Optional[torch.Tensor] = None,
                         residual: Optional[torch.Tensor] = None, activation: str = "none",
                         out_dtype: Optional[torch.dtype] = None, out: Optional[torch.Tensor] = None, *,
                         check_indices: Optional[bool] = None) -> torch.Tensor:
    """Dense torch version of `csr_conv2d_torch` (same signature): densify W, F.conv2d in float32
    (float64 for float64 inputs, which the tests use as ground truth), apply the shared conv epilogue."""
    out_dtype, (stride2, padding2, dilation2), out_shape = _check_args(
        x, crow, col, values, o, kh, kw, stride, padding, dilation, bias, residual, activation, out_dtype,
        kernel_dtypes=False)
    _check_conv_indices(x, crow, col, kh, kw, check_indices)
    check_out(out, out_shape, out_dtype, x.device, channels_last_ok=True)
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    c = x.shape[1]
    weight = _dense_weight(crow, col, values, o, c * kh * kw, acc_dtype).reshape(o, c, kh, kw)
    acc = F.conv2d(x.to(acc_dtype), weight, None, stride2, padding2, dilation2)
    return conv_epilogue_reference(acc, x, bias, residual, activation, out_dtype, out)


# ----------------------------------------------------------------------------------------------
# Custom op: what models call, so torch.compile / torch.export see one opaque node
# ----------------------------------------------------------------------------------------------

@torch.library.custom_op("sparsify::csr_conv2d", mutates_args=())
def _csr_conv2d_op(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor,
                   o: int, kh: int, kw: int, stride: list[int], padding: list[int], dilation: list[int],
                   bias: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None,
                   activation: str = "none", out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    # No Triton kernel for this family: every device runs im2col + torch's CSR matmul.
    return csr_conv2d_torch(x, crow, col, values, o, kh, kw, stride, padding, dilation, bias, residual,
                            activation, out_dtype)


@_csr_conv2d_op.register_fake
def _(x, crow, col, values, o, kh, kw, stride, padding, dilation, bias=None, residual=None,
      activation="none", out_dtype=None):
    return conv_output_like(x, o, kh, kw, stride, padding, dilation, out_dtype)


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
