"""Unstructured-sparse linear for few tokens: y = epilogue(x @ W^T) with W in sliced ELLPACK (SELL).

The target is decode: M = 1..16 tokens and a weight with 70-98% of its entries zero. Such a GEMV is
memory bound, its time is the time to read W, so the format is chosen for the bytes it reads: one
value plus one 16-bit column index per nonzero (fp16: 4 bytes against CSR's 2 + 4 or 2 + 8, and
against 2 bytes for every entry, zero or not, of the dense weight), laid out so that every load of
the kernel is a rectangular, contiguous tile.

Layout (nn.Linear convention, W is [N_out, K] = [out_features, in_features]), S = `slice_rows`:

- Rows are first reordered: within each window of `sort_window` consecutive rows, by nnz, largest
  first (stable). `perm` int32 [N_out] gives the original row of every sorted position.
- Sorted positions are cut into ceil(N_out / S) slices of S rows (the last one may be short; its
  missing rows count as empty). The width of a slice is the largest nnz among its rows; every row
  of the slice is padded to it with value 0 and column 0, which any x row has, so no load is masked
  per entry.
- `values` [slots], the weight's dtype, and `cols` [slots], int16 when K <= 32767 else int32: the
  slices back to back, each slot-major (column-major): entry j of row r of a slice that starts at
  slot p sits at p + j * S + r. A chunk of BLOCK_K entries of all S rows is then one contiguous run
  of S * BLOCK_K elements. Within a row, entries keep ascending column order.
- `slice_ptr` int64 [n_slices + 1]: slice s owns slots slice_ptr[s] .. slice_ptr[s+1]-1, so its
  width is (slice_ptr[s+1] - slice_ptr[s]) / S. With S >= 8 every slice starts 16-byte aligned.

Padding: slots / nnz - 1 (`SELLWeight.padding_overhead`), measured with `pack_sell` on 4096 x 4096
Bernoulli masks (every entry kept independently with probability `density`: no structure for the
format to exploit), one mask per density:

    density                          0.02    0.1     0.3
    S=32, sort_window=1 (no sort)    23.1%   9.5%    4.8%
    S=32, sort_window=32 * S          1.2%   0.5%    0.2%
    S=32, whole weight (default)      0.3%   0.1%    0.1%
    S=16, no sort / whole weight     19.7% / 0.1%   8.2% / 0.1%   4.2% / 0.0%
    S=64, no sort / whole weight     25.8% / 0.5%  10.7% / 0.3%   5.5% / 0.1%

So sorting is what makes the format pay: unsorted, a 2%-dense slice is as wide as its densest row,
about 1.2x the mean. The default sorts the whole weight: the permuted output store costs the same
whether the rows of a slice are near each other or not (S scattered elements per token either
way), and longest-first is the classic schedule for uneven work (not measured on a GPU here).
Trained weights pruned by magnitude over a whole layer usually spread nnz between rows more than
Bernoulli masks do, which makes the sort matter more.

Kernel: one program per (slice, tile of BLOCK_M tokens). It walks its slice in chunks of BLOCK_K
entries: loads values and cols [S, BLOCK_K], gathers x[m, cols] as [BLOCK_M, S, BLOCK_K],
multiplies and sums over the chunk in float32, giving [BLOCK_M, S]; then the shared epilogue with
the original row numbers from `perm` (bias and residual are indexed by them), and a store through
`perm`. No tl.dot: the gathered x differs per row, and at M <= 16 there would be no MMA tile to fill
anyway. Any M works (the grid covers all token tiles) but larger M re-reads W per tile of 16
tokens; CSR or the dense GEMM is the better choice there, which the cost model finds by timing.

Dtypes: x and values fp16, bf16 or fp32 (the reference also takes float64); the accumulation is
float32 and the output is `out_dtype` (default x's dtype), cast at the store.

Like the dense GEMM (and unlike CSR), a padding slot multiplies x[m, 0] by 0: an inf or NaN in
column 0 of x makes the row's output NaN, as it would the dense product's.

Entry points: `pack_sell` / `unpack_sell` (host-side weight handling), `sell_linear_host` with its
two implementations `sell_linear_triton` (Triton launch) and `sell_linear_reference` (torch),
`sell_linear` (through the `sparsify::sell_linear` custom op, which works under torch.compile and
torch.export), and `SPEC`, the kernel's entry in the registry.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from sparsify.codegen.epilogue import ACTIVATIONS, apply_epilogue
from sparsify.codegen.kernels._checks import (check_dense_weight, check_devices, check_linear_epilogue,
                                              check_linear_input, check_out, check_tensors, is_int,
                                              linear_output, resolve_out_dtype)
from sparsify.codegen.kernels._common import (KERNEL_DTYPES, REFERENCE_DTYPES, acc_dtype, cdiv,
                                              epilogue_operands, linear_out_like, linear_reference,
                                              next_power_of_2, resolve_impl)
from sparsify.codegen.spec import KernelSpec
from sparsify.patterns import Unstructured
from sparsify.state import Prepared

# Part of the cost-cache key: bump when the kernel's code, format or launch heuristics change.
KERNEL_VERSION = "sell_linear-1"

_INDEX_DTYPES = (torch.int16, torch.int32)
_SLICE_ROWS = (8, 16, 32, 64, 128)
_INT16_MAX_K = 32767
DEFAULT_SLICE_ROWS = 32


# ----------------------------------------------------------------------------------------------
# Packing
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, eq=False)
class SELLWeight:
    """An [n_out, k_in] weight in sliced-ELLPACK form; see the module docstring for the layout.

    eq=False: a generated __eq__ would compare tensors elementwise and raise on `==`.
    """

    values: torch.Tensor     # [slots], the weight's dtype
    cols: torch.Tensor       # int16 or int32 [slots]
    slice_ptr: torch.Tensor  # int64 [n_slices + 1]
    perm: torch.Tensor       # int32 [n_out]: original row of each sorted position
    n_out: int
    k_in: int
    slice_rows: int
    nnz: int                 # stored entries that are not padding

    @property
    def n_slices(self) -> int:
        return cdiv(self.n_out, self.slice_rows)

    @property
    def slots(self) -> int:
        """Stored entries, padding included."""
        return self.values.shape[0]

    @property
    def padding_overhead(self) -> float:
        """Padding slots per nonzero: slots / nnz - 1 (0.0 for an all-zero weight)."""
        return (self.slots - self.nnz) / self.nnz if self.nnz else 0.0

    @property
    def nbytes(self) -> int:
        """Bytes the kernel reads for W: what the cost model compares with the dense n_out * k_in."""
        return sum(t.numel() * t.element_size() for t in (self.values, self.cols, self.slice_ptr, self.perm))


def _check_slice_rows(slice_rows) -> int:
    if not is_int(slice_rows) or slice_rows not in _SLICE_ROWS:
        raise ValueError(f"slice_rows must be a power of two in {_SLICE_ROWS}, got {slice_rows!r}")
    return slice_rows


def pack_sell(weight: torch.Tensor, slice_rows: int = DEFAULT_SLICE_ROWS, sort_window: Optional[int] = None,
              index_dtype: Optional[torch.dtype] = None) -> SELLWeight:
    """Pack a dense [N_out, K] weight into SELL form, dropping its zeros (a NaN counts as nonzero).

    slice_rows: rows per slice (S). sort_window: rows sorted by nnz together, 1 (keep the original
    row order) or a positive multiple of slice_rows; default all rows (see the padding table in the
    module docstring). index_dtype: int16 (needs K <= 32767) or int32; default the smallest that fits.
    """
    check_dense_weight(weight, 2, "[N_out, K]")
    s = _check_slice_rows(slice_rows)
    if sort_window is None:
        sort_window = max(cdiv(weight.shape[0], s), 1) * s
    if not is_int(sort_window) or sort_window < 1 or (sort_window != 1 and sort_window % s):
        raise ValueError(f"sort_window must be 1 (no sorting) or a positive multiple of slice_rows={s}, "
                         f"got {sort_window!r}")
    n_out, k_in = weight.shape
    if index_dtype is None:
        index_dtype = torch.int16 if k_in <= _INT16_MAX_K else torch.int32
    if index_dtype not in _INDEX_DTYPES:
        raise TypeError(f"index_dtype must be one of {_INDEX_DTYPES}, got {index_dtype!r}")
    if index_dtype == torch.int16 and k_in > _INT16_MAX_K:
        raise ValueError(f"index_dtype int16 holds columns up to {_INT16_MAX_K}, but k_in={k_in}")

    w = weight.detach()
    dev = w.device
    nonzero = w != 0
    counts = nonzero.sum(dim=1)                                          # [n_out] int64
    rows = torch.arange(n_out, device=dev)
    if sort_window > 1:
        # One stable sort on (window, -nnz): rows of equal nnz keep their order.
        key = (rows // sort_window) * (k_in + 1) + (k_in - counts)
        perm = torch.sort(key, stable=True).indices
    else:
        perm = rows
    sorted_counts = counts[perm]
    n_slices = cdiv(n_out, s)
    padded = torch.nn.functional.pad(sorted_counts, (0, n_slices * s - n_out))
    widths = padded.reshape(n_slices, s).amax(dim=1) if n_slices else padded.new_zeros(0)
    slice_ptr = torch.zeros(n_slices + 1, dtype=torch.int64, device=dev)
    slice_ptr[1:] = torch.cumsum(widths * s, 0)
    slots = int(slice_ptr[-1])

    # nonzero() lists entries by (sorted position, column): the rank within a row is the entry's
    # index minus the row's first index.
    pos, col = nonzero[perm].nonzero(as_tuple=True)
    row_start = torch.cumsum(sorted_counts, 0) - sorted_counts
    rank = torch.arange(pos.shape[0], device=dev) - row_start[pos]
    slot = slice_ptr[pos // s] + rank * s + pos % s
    values = torch.zeros(slots, dtype=w.dtype, device=dev)
    cols = torch.zeros(slots, dtype=index_dtype, device=dev)
    values[slot] = w[perm[pos], col]
    cols[slot] = col.to(index_dtype)
    return SELLWeight(values=values, cols=cols, slice_ptr=slice_ptr, perm=perm.to(torch.int32).contiguous(),
                      n_out=n_out, k_in=k_in, slice_rows=s, nnz=int(pos.shape[0]))


def _unpack(values, cols, slice_ptr, perm, n_out: int, k_in: int, slice_rows: int,
            dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Dense [n_out, k_in] from the SELL buffers. Accumulates rather than assigns, so the padding
    slots (value 0 at column 0) add nothing, whatever the real entry at column 0 is."""
    s = slice_rows
    widths = (slice_ptr[1:] - slice_ptr[:-1]) // s                      # [n_slices]
    slot_slice = torch.repeat_interleave(torch.arange(widths.shape[0], device=values.device), widths * s)
    local = torch.arange(values.shape[0], device=values.device) - slice_ptr[slot_slice]
    pos = slot_slice * s + local % s
    live = pos < n_out                           # the last slice's missing rows hold padding only
    dense = torch.zeros(n_out, k_in, dtype=dtype or values.dtype, device=values.device)
    row = perm.long()[pos[live]]
    dense.index_put_((row, cols[live].long()), values[live].to(dense.dtype), accumulate=True)
    return dense


def unpack_sell(w: SELLWeight) -> torch.Tensor:
    """Dense [n_out, k_in] weight from its SELL form (tests, debugging)."""
    if not isinstance(w, SELLWeight):
        raise TypeError(f"expected a SELLWeight (pack_sell), got {type(w).__name__}")
    return _unpack(w.values, w.cols, w.slice_ptr, w.perm, w.n_out, w.k_in, w.slice_rows)


# ----------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------

@triton.jit
def _sell_linear_kernel(
    x_ptr, v_ptr, col_ptr, slice_ptr_ptr, perm_ptr, bias_ptr, res_ptr, out_ptr,
    M, N,
    stride_xm, stride_xk, stride_rm, stride_rn, stride_om, stride_on,
    SLICE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):
    """One [BLOCK_M tokens, SLICE rows] tile of out = epilogue(x @ W^T), W in SELL form.

    x_ptr: [M, K], strides (stride_xm, stride_xk). v_ptr / col_ptr: [slots] (values, int16/int32
    columns). slice_ptr_ptr: int64 [n_slices + 1]. perm_ptr: int32 [N]. bias_ptr: [N] (read iff
    HAS_BIAS). res_ptr: [M, N], strides (stride_rm, stride_rn) (read iff HAS_RESIDUAL). out_ptr:
    [M, N], strides (stride_om, stride_on). Bias, residual and out are indexed by original row.
    """
    # Token tiles of one slice are adjacent program ids: at larger M they re-read the same W
    # slice while it is still in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    slice_id = pid // num_pid_m
    pid_m = pid % num_pid_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_s = tl.arange(0, SLICE)
    offs_j = tl.arange(0, BLOCK_K)
    # Tokens past M are clamped into range (computed, never stored): no row mask on the gathers.
    # int64 before the stride: M * K can exceed 2^31.
    x_rows = x_ptr + (offs_m % M).to(tl.int64)[:, None, None] * stride_xm

    start = tl.load(slice_ptr_ptr + slice_id)
    end = tl.load(slice_ptr_ptr + slice_id + 1)
    width = (end - start) // SLICE
    # Slot-major slices: the chunk's [SLICE, BLOCK_K] entries are one contiguous run, and a slot is
    # live exactly when it lies before the slice's end.
    slots = start + offs_j[None, :] * SLICE + offs_s[:, None]

    acc = tl.zeros((BLOCK_M, SLICE), dtype=tl.float32)
    for _ in range(0, width, BLOCK_K):
        live = slots < end
        v = tl.load(v_ptr + slots, mask=live, other=0.0).to(tl.float32)
        c = tl.load(col_ptr + slots, mask=live, other=0).to(tl.int64)
        # Dead slots read column 0 (in range for every row) and multiply it by v = 0.
        xg = tl.load(x_rows + c[None, :, :] * stride_xk).to(tl.float32)   # [BLOCK_M, SLICE, BLOCK_K]
        acc += tl.sum(xg * v[None, :, :], axis=2)
        slots += BLOCK_K * SLICE

    pos = slice_id * SLICE + offs_s
    live_n = pos < N
    # Missing rows of a short last slice get row N, which every epilogue and store mask drops.
    offs_n = tl.load(perm_ptr + pos, mask=live_n, other=N)
    offs_m64 = offs_m.to(tl.int64)
    acc = apply_epilogue(acc, offs_m64, offs_n, M, N, bias_ptr, res_ptr, stride_rm, stride_rn,
                         HAS_BIAS, ACTIVATION, HAS_RESIDUAL)
    out_ptrs = out_ptr + offs_m64[:, None] * stride_om + offs_n.to(tl.int64)[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & live_n[None, :])


# Elements of the gathered [BLOCK_M, S, BLOCK_K] x tile one program holds: at 4 warps, 32 fp32
# registers per thread for it, leaving room for the values, columns and addresses of the chunk.
_TILE_ELEMENTS = 4096


def _config_for(M: int, slice_rows: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_K, num_warps). A hand heuristic, untuned (no GPU measurements yet): BLOCK_M
    follows M up to 16 so one token does not pay for sixteen; BLOCK_K fills the tile budget, at
    most 64 (a slice is only ~ density * K entries wide: 82 at 4096 x 0.02)."""
    block_m = min(16, next_power_of_2(max(M, 1)))
    block_k = max(8, min(64, _TILE_ELEMENTS // (block_m * slice_rows)))
    num_warps = 2 if block_m * slice_rows * block_k <= 1024 else 4
    return block_m, block_k, num_warps


# ----------------------------------------------------------------------------------------------
# Host function: checks, then the kernel or the reference
# ----------------------------------------------------------------------------------------------

def _check_args(x, values, cols, slice_ptr, perm, n_out, k_in, slice_rows, bias, residual, activation,
                out_dtype, kernel_dtypes: bool):
    """Argument checks of both implementations; returns out_dtype."""
    check_tensors(x=x, values=values, cols=cols, slice_ptr=slice_ptr, perm=perm)
    check_linear_input(x, values, n_out, k_in, KERNEL_DTYPES if kernel_dtypes else REFERENCE_DTYPES)
    s = _check_slice_rows(slice_rows)
    if cols.dtype not in _INDEX_DTYPES:
        raise TypeError(f"cols must be one of {_INDEX_DTYPES}, got {cols.dtype}")
    if values.dim() != 1 or cols.dim() != 1 or cols.shape[0] != values.shape[0]:
        raise ValueError(f"values and cols must be 1-D of the same length (slots), got {tuple(values.shape)} "
                         f"and {tuple(cols.shape)}")
    want = cdiv(n_out, s) + 1
    if slice_ptr.dtype != torch.int64 or tuple(slice_ptr.shape) != (want,):
        raise ValueError(f"slice_ptr must be int64 [ceil(n_out / slice_rows) + 1] = [{want}], got "
                         f"{slice_ptr.dtype} {tuple(slice_ptr.shape)}")
    if perm.dtype != torch.int32 or tuple(perm.shape) != (n_out,):
        raise ValueError(f"perm must be int32 [n_out] = [{n_out}], got {perm.dtype} {tuple(perm.shape)}")
    check_devices(x, values=values, cols=cols, slice_ptr=slice_ptr, perm=perm)
    check_linear_epilogue(x, n_out, bias, residual, activation)
    return resolve_out_dtype(x, out_dtype)


def _check_indices(values, cols, slice_ptr, perm, n_out: int, k_in: int, slice_rows: int,
                   check: Optional[bool]) -> None:
    """Index contents: the kernel trusts them (a bad column or slice pointer reads out of bounds, a
    bad perm entry writes out of bounds). Reading them syncs a CUDA stream, so by default they are
    checked on CPU only; pass check_indices=True to force it on CUDA while debugging."""
    if check is None:
        check = values.device.type != "cuda"
    if not check:
        return
    slots = values.shape[0]
    steps = slice_ptr[1:] - slice_ptr[:-1]
    if (int(slice_ptr[0]) != 0 or int(slice_ptr[-1]) != slots or bool((steps < 0).any())
            or bool((steps % slice_rows != 0).any())):
        raise ValueError(f"slice_ptr must rise from 0 to slots={slots} in multiples of slice_rows={slice_rows}, "
                         f"got first={int(slice_ptr[0])}, last={int(slice_ptr[-1])}")
    if slots and (int(cols.min()) < 0 or int(cols.max()) >= k_in):
        raise ValueError(f"cols must lie in [0, k_in={k_in}), got [{int(cols.min())}, {int(cols.max())}]")
    if n_out and (int(perm.min()) < 0 or int(perm.max()) >= n_out
                  or bool((torch.bincount(perm.long(), minlength=n_out) != 1).any())):
        raise ValueError(f"perm must be a permutation of range(n_out={n_out})")


def sell_linear_host(x: torch.Tensor, values: torch.Tensor, cols: torch.Tensor, slice_ptr: torch.Tensor,
                     perm: torch.Tensor, n_out: int, k_in: int, slice_rows: int,
                     bias: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None,
                     activation: str = "none", out_dtype: Optional[torch.dtype] = None,
                     out: Optional[torch.Tensor] = None, *, impl: str = "auto", block_m: Optional[int] = None,
                     block_k: Optional[int] = None, num_warps: Optional[int] = None,
                     check_indices: Optional[bool] = None) -> torch.Tensor:
    """y[..., n_out] = epilogue(x[..., k_in] @ W^T), W in SELL form.

    impl: "triton" (launch the kernel, which accumulates in float32 and casts at the store),
    "reference" (unpack W, multiply in float32, float64 for float64 inputs: the tests' ground truth),
    or "auto" (see _common.resolve_impl). `out`, if given, is written and returned (contiguous,
    x.shape[:-1] + (n_out,), out_dtype, which defaults to x.dtype). block_m / block_k / num_warps
    override `_config_for` (powers of two; block_m 1..16, block_k >= 8); the reference ignores them.
    """
    impl = resolve_impl(impl, x.device)
    out_dtype = _check_args(x, values, cols, slice_ptr, perm, n_out, k_in, slice_rows, bias, residual,
                            activation, out_dtype, kernel_dtypes=impl == "triton")
    _check_indices(values, cols, slice_ptr, perm, n_out, k_in, slice_rows, check_indices)
    if impl == "reference":
        check_out(out, tuple(x.shape[:-1]) + (n_out,), out_dtype, x.device)
        return _reference(x, values, cols, slice_ptr, perm, slice_rows, bias, residual, activation, out_dtype,
                          out)
    out, rows = linear_output(x, n_out, out_dtype, out)
    if rows == 0 or n_out == 0:
        return out
    if k_in == 0:  # an empty reduction: the epilogue of zeros, no kernel needed
        return _reference(x, values, cols, slice_ptr, perm, slice_rows, bias, residual, activation, out_dtype,
                          out)
    _launch(x.reshape(rows, k_in), values, cols, slice_ptr, perm, slice_rows, bias, residual, activation,
            out.view(rows, n_out), block_m, block_k, num_warps)
    return out


sell_linear_triton = functools.partial(sell_linear_host, impl="triton")
sell_linear_reference = functools.partial(sell_linear_host, impl="reference")


def _reference(x, values, cols, slice_ptr, perm, slice_rows, bias, residual, activation, out_dtype, out):
    n_out, k_in = perm.shape[0], x.shape[-1]
    w = _unpack(values, cols, slice_ptr, perm, n_out, k_in, slice_rows, acc_dtype(x))
    return linear_reference(x, w, bias, residual, activation, out_dtype, out)


def _launch(x2, values, cols, slice_ptr, perm, slice_rows, bias, residual, activation, out2, block_m,
            block_k, num_warps) -> None:
    """The kernel on x2 [rows, k_in] into out2 [rows, n_out] (launch arguments: `sell_linear_host`)."""
    rows, n_out = out2.shape
    cfg_m, cfg_k, cfg_warps = _config_for(rows, slice_rows)
    bm, bk = block_m or cfg_m, block_k or cfg_k
    if not is_int(bm) or not 1 <= bm <= 16 or bm & (bm - 1):
        raise ValueError(f"block_m must be a power of two in 1..16, got {bm!r}")
    if not is_int(bk) or bk < 8 or bk & (bk - 1):
        raise ValueError(f"block_k must be a power of two >= 8, got {bk!r}")

    bias_arg, res2, stride_rm, stride_rn = epilogue_operands(bias, residual, out2)
    grid = (cdiv(n_out, slice_rows) * cdiv(rows, bm),)
    _sell_linear_kernel[grid](
        x2, values.contiguous(), cols.contiguous(), slice_ptr.contiguous(), perm.contiguous(),
        bias_arg, res2, out2,
        rows, n_out,
        x2.stride(0), x2.stride(1), stride_rm, stride_rn, out2.stride(0), out2.stride(1),
        SLICE=slice_rows, BLOCK_M=bm, BLOCK_K=bk,
        HAS_BIAS=bias is not None, ACTIVATION=ACTIVATIONS.index(activation),
        HAS_RESIDUAL=residual is not None,
        num_warps=num_warps or cfg_warps,
    )


def sell_linear(x: torch.Tensor, w: SELLWeight, bias: Optional[torch.Tensor] = None,
                residual: Optional[torch.Tensor] = None, activation: str = "none",
                out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """y = epilogue(x @ W^T) for a weight from `pack_sell`, through the `sparsify::sell_linear` op."""
    if not isinstance(w, SELLWeight):
        raise TypeError(f"w must be a SELLWeight (pack_sell), got {type(w).__name__}")
    return torch.ops.sparsify.sell_linear(x, w.values, w.cols, w.slice_ptr, w.perm, w.n_out, w.k_in,
                                          w.slice_rows, bias, residual, activation, out_dtype)


# ----------------------------------------------------------------------------------------------
# The spec: what the registry finds; its op is what models call (one opaque node for torch.compile
# and torch.export)
# ----------------------------------------------------------------------------------------------

def _pack(weight: torch.Tensor, pattern, layer: Optional[dict] = None) -> Prepared:
    b = pack_sell(weight)
    return Prepared({"values": b.values, "cols": b.cols, "slice_ptr": b.slice_ptr, "perm": b.perm},
                    {"n_out": b.n_out, "k_in": b.k_in, "slice_rows": b.slice_rows})


SPEC = KernelSpec(
    name="sell_triton", op="sparsify::sell_linear",
    schema="(Tensor x, Tensor values, Tensor cols, Tensor slice_ptr, Tensor perm, SymInt n_out, SymInt k_in, "
           "SymInt slice_rows, Tensor? bias=None, Tensor? residual=None, str activation='none', "
           "ScalarType? out_dtype=None) -> Tensor",
    patterns=(Unstructured,), replaces="linear", devices=("cuda",), interpretable=True,
    impl=sell_linear_host, pack=_pack, out_like=linear_out_like, version=KERNEL_VERSION)
