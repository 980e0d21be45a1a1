"""N:M structured-sparse linear: y = epilogue(x @ W^T) with W stored as its kept values plus indices.

N:M sparsity (nn.Linear convention, W is [N_out, K] = [out_features, in_features]): in every group of
m consecutive weights of a row along K, at most n are nonzero. 2:4 is the case GPUs accelerate in
hardware; 1:4, 2:8, ... are the same format with other constants.

Why a compressed format at all: a GEMM with few tokens (M = 1..16) is memory bound, its time is the
time to read W. The compressed form reads n/m of the values plus a few bits of indices (2:4 fp16:
K bytes of values + K/8 bytes of metadata per row, against 2K bytes dense), so it can be faster than
the dense GEMM even though it does the same dense `tl.dot` after expanding W in registers.

Layout, G = ceil(K / m) groups per row:

- `values` [N_out, G * n], the weight's dtype: the n kept values of each group, in position order.
  A group with fewer than n nonzeros is padded with zeros at unused positions, so the n positions of
  a group are always distinct (the kernel may then select by position without caring about order).
- `meta` uint8 [N_out, ceil(G * n / (8 // BITS))]: the position (0..m-1) inside its group of every
  stored value, BITS bits each, where BITS = 1, 2, 4 for m <= 2, 4, 16 (ceil(log2 m) rounded up to a
  power of two so that no index straddles a byte). Index j = g * n + i of a row lives in byte
  j // (8 // BITS) at bit (j % (8 // BITS)) * BITS, lowest bits first. For 2:4 that is 4 bits per
  group, two groups per byte, [N_out, ceil(G / 2)] bytes. For m in 5..8 the 4-bit slots waste one bit
  per index (a 2:8 row carries 1 metadata bit per weight instead of 0.75); the values dominate anyway.

K not a multiple of m: the last group is partial (size s = K - (G-1) * m). `nm_mask` keeps
min(n, s) of it; packing treats the positions >= s as zeros, so a padding slot may point there, and
the kernel never reads x past K. No ValueError for such K: odd in_features are common enough.

Kernels: 2:4 runs `_nm24_linear_kernel`, which reads a W tile with three plain contiguous loads
(values [BLOCK_N, BLOCK_K/2], meta bytes [BLOCK_N, BLOCK_K/8], x) and expands it with shifts and
selects; every other n:m runs the general `_nm_linear_kernel`, which gathers per column (slower).

Entry points: `nm_mask` / `pack_nm` / `unpack_nm` (host-side weight handling), `nm_linear_host`
with its two implementations `nm_linear_triton` (Triton launch) and `nm_linear_reference` (torch),
`nm_linear` (through the `sparsify::nm_linear` custom op, which works under torch.compile and
torch.export), and `SPEC`, the kernel's entry in the registry. For large M on Ampere+ GPUs,
cuSPARSELt's 2:4 GEMM may beat the Triton kernel: cslt_linear.py wraps it, for the cost model to time
against the others.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from sparsify.codegen import runtime
from sparsify.codegen.epilogue import ACTIVATIONS, apply_epilogue
from sparsify.codegen.kernels._checks import (check_devices, check_input_precision, check_linear_epilogue,
                                              check_linear_input, check_out, check_tensors, check_tiles,
                                              describe, linear_output, resolve_out_dtype)
from sparsify.codegen.kernels._common import (KERNEL_DTYPES, REFERENCE_DTYPES, cdiv, epilogue_operands,
                                              linear_out_like, linear_reference, resolve_impl)
from sparsify.codegen.spec import KernelSpec
from sparsify.patterns import NM
from sparsify.state import Prepared

# Part of the cost-cache key: bump when the kernel's code, the layout or launch heuristics change.
KERNEL_VERSION = "nm_linear-2"

MAX_GROUP = 16


# ----------------------------------------------------------------------------------------------
# Format helpers
# ----------------------------------------------------------------------------------------------

def _check_nm(n, m) -> tuple[int, int]:
    for name, v in (("n", n), ("m", m)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"N:M sparsity: {name} must be an int, got {v!r}")
    if not 0 < n < m:
        raise ValueError(f"N:M sparsity {n}:{m}: need 0 < n < m")
    if m > MAX_GROUP:
        raise ValueError(f"N:M sparsity {n}:{m}: m must be <= {MAX_GROUP}")
    return n, m


def meta_bits(m: int) -> int:
    """Bits per stored index: ceil(log2 m) rounded up to 1, 2 or 4 so an index never straddles a byte."""
    return 1 if m <= 2 else 2 if m <= 4 else 4


def num_groups(k: int, m: int) -> int:
    return -(-k // m)


def meta_cols(k: int, n: int, m: int) -> int:
    """Bytes of metadata per row for a K-wide row at n:m."""
    per_byte = 8 // meta_bits(m)
    return -(-(num_groups(k, m) * n) // per_byte)


@dataclasses.dataclass(frozen=True)
class NMWeight:
    """An [n_out, k] weight in N:M-compressed form; see the module docstring for the layout."""

    values: torch.Tensor  # [n_out, ceil(k / m) * n], the weight's dtype
    meta: torch.Tensor    # uint8 [n_out, meta_cols(k, n, m)]
    n: int
    m: int
    k: int

    @property
    def n_out(self) -> int:
        return self.values.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes the kernel reads for W: what the cost model compares with the dense n_out * k."""
        return self.values.numel() * self.values.element_size() + self.meta.numel()


def _groups(t: torch.Tensor, m: int, fill: float) -> torch.Tensor:
    """[R, K] -> [R, G, m], the last group padded with `fill`."""
    r, k = t.shape
    g = num_groups(k, m)
    if g * m != k:
        t = torch.nn.functional.pad(t, (0, g * m - k), value=fill)
    return t.reshape(r, g, m)


def _check_2d(t, name: str) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 2:
        raise ValueError(f"{name} must be a 2-D [N_out, K] tensor, got {describe(t)}")


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Bool [N_out, K] keeping the n largest |scores| of every group of m consecutive columns.

    The last group, when K is not a multiple of m, keeps min(n, its size). Ties are broken
    arbitrarily (torch.topk); NaN scores count as largest.
    """
    _check_2d(scores, "scores")
    n, m = _check_nm(n, m)
    r, k = scores.shape
    # -inf padding is never preferred over a real column, and is sliced away afterwards.
    grouped = _groups(scores.detach().abs().float(), m, float("-inf"))
    keep = torch.topk(grouped, n, dim=-1).indices
    mask = torch.zeros_like(grouped, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.reshape(r, grouped.shape[1] * m)[:, :k]


def _pack_meta(positions: torch.Tensor, m: int) -> torch.Tensor:
    """int64 [R, L] positions in 0..m-1 -> uint8 [R, ceil(L / per_byte)] (layout in module docstring)."""
    bits = meta_bits(m)
    per_byte = 8 // bits
    r, length = positions.shape
    padded = torch.nn.functional.pad(positions, (0, (-length) % per_byte))
    shifts = torch.arange(per_byte, device=positions.device) * bits
    packed = (padded.reshape(r, padded.shape[1] // per_byte, per_byte) << shifts).sum(-1)
    return packed.to(torch.uint8)


def _unpack_meta(meta: torch.Tensor, length: int, m: int) -> torch.Tensor:
    """Inverse of `_pack_meta`: uint8 [R, B] -> int64 [R, length]."""
    bits = meta_bits(m)
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, device=meta.device) * bits
    idx = (meta.long()[..., None] >> shifts) & ((1 << bits) - 1)
    return idx.reshape(meta.shape[0], meta.shape[1] * per_byte)[:, :length]


def pack_nm(weight: torch.Tensor, n: int, m: int) -> NMWeight:
    """Compress a dense [N_out, K] weight that is n:m sparse (a NaN counts as nonzero).

    Raises ValueError naming the first row and group with more than n nonzeros; prune with
    `weight * nm_mask(weight, n, m)` first.
    """
    _check_2d(weight, "weight")
    n, m = _check_nm(n, m)
    if not weight.dtype.is_floating_point:
        raise TypeError(f"weight must be a floating tensor, got {weight.dtype}")
    r, k = weight.shape
    grouped = _groups(weight.detach(), m, 0.0)                       # [R, G, m]
    nonzero = grouped != 0
    counts = nonzero.sum(-1)
    bad = (counts > n).nonzero()
    if bad.numel():
        row, group = (int(v) for v in bad[0])
        raise ValueError(
            f"weight is not {n}:{m} sparse: row {row}, group {group} (columns {group * m}.."
            f"{min(k, (group + 1) * m) - 1}) has {int(counts[row, group])} nonzeros "
            f"({int(bad.shape[0])} groups over the limit in all); prune with nm_mask first")
    # Rank nonzeros first, then the lowest unused positions, so every group gets n distinct
    # positions; then sort the chosen positions so values are stored in position order.
    pos = torch.arange(m, device=weight.device)
    key = nonzero.float() * (2 * m) + (m - 1 - pos).float()
    positions = torch.topk(key, n, dim=-1).indices.sort(dim=-1).values  # [R, G, n]
    # Explicit sizes rather than -1: a weight with no rows is legal and -1 is ambiguous for it.
    g = grouped.shape[1]
    values = torch.gather(grouped, -1, positions).reshape(r, g * n).contiguous()
    meta = _pack_meta(positions.reshape(r, g * n), m).contiguous()
    return NMWeight(values=values, meta=meta, n=n, m=m, k=k)


def _unpack(values: torch.Tensor, meta: torch.Tensor, k: int, n: int, m: int) -> torch.Tensor:
    r = values.shape[0]
    g = num_groups(k, m)
    positions = _unpack_meta(meta, g * n, m).reshape(r, g, n)
    dense = values.new_zeros(r, g, m)
    dense.scatter_(-1, positions, values.reshape(r, g, n))
    return dense.reshape(r, g * m)[:, :k]


def unpack_nm(w: NMWeight) -> torch.Tensor:
    """Dense [n_out, k] weight from its compressed form (tests, debugging, the torch reference)."""
    return _unpack(w.values, w.meta, w.k, w.n, w.m)


# ----------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------

@triton.jit
def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program in grouped order (Triton tutorial 03): consecutive programs
    share x rows and W columns in L2. A 1-D grid also has no 65535 limit on the M dimension."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_size, (pid % per_group) // group_size


@triton.jit
def expand_nm_tile(v_rows, meta_rows, g, pos, w_mask, w_tile,
                   KEEP: tl.constexpr, BITS: tl.constexpr, ONE_BYTE: tl.constexpr):
    """Expand compressed n:m weights to the dense tile `w_tile` (zeros, [rows, cols]) in registers.

    Column c of the tile lies in group g[c] at position pos[c]; it is the stored value of g whose
    index equals pos, or zero. v_rows / meta_rows: [rows, 1] row pointers into the values and the
    uint8 metadata (nm_linear's layout, BITS bits per index). The KEEP candidates of a group are
    adjacent in memory, so these gathers hit the same cache lines. ONE_BYTE: a group's KEEP indices
    share one metadata byte, so one load per group serves them all.
    """
    PER_BYTE: tl.constexpr = 8 // BITS
    IDX_MASK: tl.constexpr = (1 << BITS) - 1
    first = g * KEEP
    if ONE_BYTE:
        byte = tl.load(meta_rows + (first // PER_BYTE)[None, :], mask=w_mask, other=0).to(tl.int32)
    for i in tl.static_range(KEEP):
        j = first + i
        if not ONE_BYTE:
            byte = tl.load(meta_rows + (j // PER_BYTE)[None, :], mask=w_mask, other=0).to(tl.int32)
        idx = (byte >> ((j % PER_BYTE) * BITS)[None, :]) & IDX_MASK
        val = tl.load(v_rows + j[None, :], mask=w_mask, other=0.0)
        w_tile = tl.where(idx == pos[None, :], val, w_tile)
    return w_tile


@triton.jit
def _nm_linear_kernel(
    x_ptr, v_ptr, meta_ptr, bias_ptr, res_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_vn, stride_metan, stride_rm, stride_rn, stride_om, stride_on,
    KEEP: tl.constexpr, GROUP: tl.constexpr, BITS: tl.constexpr, ONE_BYTE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] tile of out = epilogue(x @ W^T), W in KEEP:GROUP (n:m) compressed form.

    x_ptr: [M, K], strides (stride_xm, stride_xk). v_ptr: [N, ceil(K/GROUP)*KEEP], strides
    (stride_vn, 1). meta_ptr: uint8 [N, meta bytes], strides (stride_metan, 1), BITS bits per index.
    bias_ptr: [N] (read iff HAS_BIAS). res_ptr: [M, N], strides (stride_rm, stride_rn) (read iff
    HAS_RESIDUAL). out_ptr: [M, N], strides (stride_om, stride_on).
    ONE_BYTE: a group's KEEP indices share one metadata byte (2:4, 1:4, 2:8, ...), so one load per
    group serves them all; otherwise each index is fetched on its own.
    UPCAST_DOT: feed tl.dot float32 tiles; set only for bfloat16 under TRITON_INTERPRET, whose tl.dot
    multiplies bfloat16 bit patterns (triton-lang/triton#11584, "not supported yet"). bf16 x bf16
    products are exact in float32, so the result is what the GPU's bf16 dot computes.
    """
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # int64 before the strides: M * K and N * K can exceed 2^31.
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    v_rows = v_ptr + offs_n.to(tl.int64)[:, None] * stride_vn
    meta_rows = meta_ptr + offs_n.to(tl.int64)[:, None] * stride_metan

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x_tile = tl.load(x_rows + offs_k[None, :] * stride_xk,
                         mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w_tile = expand_nm_tile(v_rows, meta_rows, offs_k // GROUP, offs_k % GROUP,
                                mask_n[:, None] & mask_k[None, :],
                                tl.zeros((BLOCK_N, BLOCK_K), dtype=x_ptr.dtype.element_ty),
                                KEEP, BITS, ONE_BYTE)

        if UPCAST_DOT:
            x_tile = x_tile.to(tl.float32)
            w_tile = w_tile.to(tl.float32)
        acc = tl.dot(x_tile, tl.trans(w_tile), acc, input_precision=INPUT_PRECISION)

    offs_m64 = offs_m.to(tl.int64)
    acc = apply_epilogue(acc, offs_m64, offs_n, M, N, bias_ptr, res_ptr, stride_rm, stride_rn,
                         HAS_BIAS, ACTIVATION, HAS_RESIDUAL)
    out_ptrs = out_ptr + offs_m64[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _nm24_linear_kernel(
    x_ptr, v_ptr, meta_ptr, bias_ptr, res_ptr, out_ptr,
    M, N, K, V_COLS, META_COLS,
    stride_xm, stride_xk, stride_vn, stride_metan, stride_rm, stride_rn, stride_om, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PERMUTE_X: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """The 2:4 case of `_nm_linear_kernel`, with a cheap expansion: plain contiguous tile loads only.

    Per K step it loads x [BLOCK_M, BLOCK_K], the values tile [BLOCK_N, BLOCK_K/2] and the metadata
    tile [BLOCK_N, BLOCK_K/8] (one byte = two groups = four 2-bit indices), splits the values into the
    first and second kept value of each group (v0, v1) and the bytes into the two indices (i0, i1),
    and builds the four columns of every group, w_p = v0 if i0 == p, v1 if i1 == p, else 0, each
    [BLOCK_N, BLOCK_K/4]. Then either (PERMUTE_X=False) interleaves them back into the dense
    [BLOCK_N, BLOCK_K] tile for one tl.dot, or (PERMUTE_X=True, BLOCK_K >= 64) splits x the same way
    into x_p (columns p, p+4, ...) and accumulates the four x_p @ w_p^T: the sum over K does not care
    about the order of K, so nothing is interleaved. V_COLS / META_COLS: the row widths of values
    and meta (the masks past the row end; past K the values are zero and x is masked).
    """
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    QK: tl.constexpr = BLOCK_K // 4
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = tl.arange(0, BLOCK_K // 2)
    offs_b = tl.arange(0, BLOCK_K // 8)
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :] * stride_xk
    v_ptrs = v_ptr + offs_n.to(tl.int64)[:, None] * stride_vn + offs_v[None, :]
    meta_ptrs = meta_ptr + offs_n.to(tl.int64)[:, None] * stride_metan + offs_b[None, :]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x_tile = tl.load(x_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < K - k0), other=0.0)
        vals = tl.load(v_ptrs, mask=mask_n[:, None] & (offs_v[None, :] < V_COLS - k0 // 2), other=0.0)
        byte = tl.load(meta_ptrs, mask=mask_n[:, None] & (offs_b[None, :] < META_COLS - k0 // 8),
                       other=0).to(tl.int32)
        # Byte b holds groups 2b (low nibble) and 2b+1; a nibble is i0 | i1 << 2.
        nib = tl.reshape(tl.join(byte & 15, byte >> 4), (BLOCK_N, QK))
        i0 = nib & 3
        i1 = nib >> 2
        v0, v1 = tl.split(tl.reshape(vals, (BLOCK_N, QK, 2)))
        zero = tl.zeros_like(v0)
        w0 = tl.where(i0 == 0, v0, tl.where(i1 == 0, v1, zero))
        w1 = tl.where(i0 == 1, v0, tl.where(i1 == 1, v1, zero))
        w2 = tl.where(i0 == 2, v0, tl.where(i1 == 2, v1, zero))
        w3 = tl.where(i0 == 3, v0, tl.where(i1 == 3, v1, zero))
        if UPCAST_DOT:
            x_tile = x_tile.to(tl.float32)
            w0 = w0.to(tl.float32)
            w1 = w1.to(tl.float32)
            w2 = w2.to(tl.float32)
            w3 = w3.to(tl.float32)
        if PERMUTE_X:
            # [m, g, j, i] holds column 4g + 2j + i: split i, then j.
            xa, xb = tl.split(tl.reshape(x_tile, (BLOCK_M, QK, 2, 2)))
            x0, x2 = tl.split(xa)
            x1, x3 = tl.split(xb)
            acc = tl.dot(x0, tl.trans(w0), acc, input_precision=INPUT_PRECISION)
            acc = tl.dot(x1, tl.trans(w1), acc, input_precision=INPUT_PRECISION)
            acc = tl.dot(x2, tl.trans(w2), acc, input_precision=INPUT_PRECISION)
            acc = tl.dot(x3, tl.trans(w3), acc, input_precision=INPUT_PRECISION)
        else:
            # join(join(w0, w2), join(w1, w3)) is [n, g, j, i] = w_{2j + i}: flat 4g + 2j + i = column.
            w_tile = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), (BLOCK_N, BLOCK_K))
            acc = tl.dot(x_tile, tl.trans(w_tile), acc, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        v_ptrs += BLOCK_K // 2
        meta_ptrs += BLOCK_K // 8

    offs_m64 = offs_m.to(tl.int64)
    acc = apply_epilogue(acc, offs_m64, offs_n, M, N, bias_ptr, res_ptr, stride_rm, stride_rn,
                         HAS_BIAS, ACTIVATION, HAS_RESIDUAL)
    out_ptrs = out_ptr + offs_m64[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _config_for(M: int, N: int, K: int, dtype: torch.dtype, n: int = 2,
                m: int = 4) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for an n:m launch (default 2:4).

    2:4 (`_nm24_linear_kernel`), from a sweep on an H100 (fp16, K = 4096, N = 4096 and 14336):
    few tokens are memory bound, so a 16-row tile (tl.dot's minimum), BLOCK_N = 16 for enough
    programs to keep every SM streaming W (N / 16 >= 256 programs; 32 past N = 8192), a long
    BLOCK_K = 256 and 2 warps with 4 stages won (about 1.2x dense cuBLAS at M = 1..16, against 0.1x
    for the gather-based kernel). Large M: 128 x 64 x 64 with 4 warps was the best tile tried
    (still about 0.4x dense: the register expansion costs more than the halved reads save there).
    Other n:m (`_nm_linear_kernel`): the earlier hand heuristic, untuned.
    """
    if (n, m) == (2, 4):
        if M <= 16:
            return 16, (16 if N <= 8192 else 32), 256, 2, 4
        if M <= 64:
            return (32 if M <= 32 else 64), 64, 128, 4, 3
        return 128, 64, 64, 4, 3
    if M <= 16:
        return 16, (32 if N <= 8192 else 64), 128, 4, 3
    if M <= 64:
        return (32 if M <= 32 else 64), 64, 64, 4, 3
    return 128, 128, 32, 8, 3


def _permute_x_for(block_n: int, block_k: int) -> bool:
    """2:4 kernel variant. The re-interleaving one (False) was as fast or faster wherever it compiled,
    but Triton 3.6 failed to compile it ("PassManager::run failed") for BLOCK_N >= 128 with 4 warps
    and for 128 x 256 tiles with 8 warps, so wide tiles take the permuted-x one (needs BLOCK_K >= 64)."""
    return block_n >= 128 and block_k >= 64


# ----------------------------------------------------------------------------------------------
# Host function: checks, then the kernel or the reference
# ----------------------------------------------------------------------------------------------

def _check_args(x, values, meta, n_out, k_in, n, m, bias, residual, activation, out_dtype,
                kernel_dtypes: bool):
    """Argument checks of both implementations; returns out_dtype."""
    check_tensors(x=x, values=values, meta=meta)
    n, m = _check_nm(n, m)
    check_linear_input(x, values, n_out, k_in, KERNEL_DTYPES if kernel_dtypes else REFERENCE_DTYPES)
    if meta.dtype != torch.uint8:
        raise TypeError(f"meta must be uint8, got {meta.dtype}")
    want_values = (n_out, num_groups(k_in, m) * n)
    if tuple(values.shape) != want_values:
        raise ValueError(f"values must be [n_out, ceil(k_in/m)*n] = {want_values} for {n}:{m}, "
                         f"got {tuple(values.shape)}")
    want_meta = (n_out, meta_cols(k_in, n, m))
    if tuple(meta.shape) != want_meta:
        raise ValueError(f"meta must be {want_meta} for n_out={n_out}, k_in={k_in}, {n}:{m}, "
                         f"got {tuple(meta.shape)}")
    check_devices(x, values=values, meta=meta)
    check_linear_epilogue(x, n_out, bias, residual, activation)
    return resolve_out_dtype(x, out_dtype)


def nm_linear_host(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, n_out: int, k_in: int,
                   n: int, m: int, bias: Optional[torch.Tensor] = None,
                   residual: Optional[torch.Tensor] = None, activation: str = "none",
                   out_dtype: Optional[torch.dtype] = None, out: Optional[torch.Tensor] = None, *,
                   impl: str = "auto", block_m: Optional[int] = None, block_n: Optional[int] = None,
                   block_k: Optional[int] = None, num_warps: Optional[int] = None,
                   num_stages: Optional[int] = None, input_precision: str = "tf32",
                   permute_x: Optional[bool] = None) -> torch.Tensor:
    """y[..., n_out] = epilogue(x[..., k_in] @ W^T), W n:m-compressed (values, meta).

    impl: "triton" (launch the kernel), "reference" (unpack W, multiply in float32, float64 for
    float64 inputs: the tests' ground truth), or "auto" (see _common.resolve_impl). `out`, if given,
    is written and returned (contiguous, x.shape[:-1] + (n_out,), out_dtype, which defaults to
    x.dtype). The keyword-only tile arguments override `_config_for` (powers of two, >= 16);
    input_precision applies to fp32 inputs ("tf32" default, "ieee" for exact fp32 products).
    2:4 with block_k >= 64 runs `_nm24_linear_kernel` (permute_x picks its variant, default
    `_permute_x_for`); smaller block_k and every other n:m run the general `_nm_linear_kernel`.
    The reference ignores the launch arguments.
    """
    impl = resolve_impl(impl, x.device)
    out_dtype = _check_args(x, values, meta, n_out, k_in, n, m, bias, residual, activation, out_dtype,
                            kernel_dtypes=impl == "triton")
    check_input_precision(input_precision)
    if impl == "reference":
        check_out(out, tuple(x.shape[:-1]) + (n_out,), out_dtype, x.device)
        return linear_reference(x, _unpack(values, meta, k_in, n, m), bias, residual, activation, out_dtype,
                                out)
    out, rows = linear_output(x, n_out, out_dtype, out)
    if rows == 0 or n_out == 0:
        return out
    if k_in == 0:  # an empty reduction: the epilogue of zeros, no kernel needed
        return linear_reference(x, _unpack(values, meta, k_in, n, m), bias, residual, activation, out_dtype,
                                out)
    _launch(x.reshape(rows, k_in), values, meta, n, m, bias, residual, activation, out.view(rows, n_out),
            block_m, block_n, block_k, num_warps, num_stages, input_precision, permute_x)
    return out


nm_linear_triton = functools.partial(nm_linear_host, impl="triton")
nm_linear_reference = functools.partial(nm_linear_host, impl="reference")


def _launch(x2, values, meta, n, m, bias, residual, activation, out2, block_m, block_n, block_k, num_warps,
            num_stages, input_precision, permute_x) -> None:
    """The kernel on x2 [rows, k_in] into out2 [rows, n_out] (launch arguments: `nm_linear_host`)."""
    (rows, k_in), n_out = x2.shape, out2.shape[1]
    values = values.contiguous()
    meta = meta.contiguous()
    bias_arg, res2, stride_rm, stride_rn = epilogue_operands(bias, residual, out2)

    cfg = _config_for(rows, n_out, k_in, x2.dtype, n, m)
    bm, bn, bk = block_m or cfg[0], block_n or cfg[1], block_k or cfg[2]
    check_tiles(block_m=bm, block_n=bn, block_k=bk)
    grid = (cdiv(rows, bm) * cdiv(n_out, bn),)
    warps, stages = num_warps or cfg[3], num_stages or cfg[4]
    upcast = x2.dtype == torch.bfloat16 and runtime.interpreter_on()
    if (n, m) == (2, 4) and bk >= 64:
        # BLOCK_K < 64 goes to the general kernel: the 2:4 kernel's tiny join/split shapes there
        # (BLOCK_K/8 = 2 bytes per row) gave wrong fp32 results on an H100 (16 x 16 x 16 tile).
        permute = _permute_x_for(bn, bk) if permute_x is None else bool(permute_x)

        def launch(permute):
            _nm24_linear_kernel[grid](
                x2, values, meta, bias_arg, res2, out2,
                rows, n_out, k_in, values.shape[1], meta.shape[1],
                x2.stride(0), x2.stride(1), values.stride(0), meta.stride(0), stride_rm, stride_rn,
                out2.stride(0), out2.stride(1),
                BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, PERMUTE_X=permute,
                HAS_BIAS=bias is not None, ACTIVATION=ACTIVATIONS.index(activation),
                HAS_RESIDUAL=residual is not None, INPUT_PRECISION=input_precision, UPCAST_DOT=upcast,
                num_warps=warps, num_stages=stages,
            )

        try:
            launch(permute)
        except RuntimeError as e:
            # Triton's MLIR pipeline rejects some (variant, tile, warps) combinations (see
            # `_permute_x_for`); the other variant computes the same thing.
            if "PassManager" not in str(e):
                raise
            launch(not permute)
        return
    bits = meta_bits(m)
    _nm_linear_kernel[grid](
        x2, values, meta, bias_arg, res2, out2,
        rows, n_out, k_in,
        x2.stride(0), x2.stride(1), values.stride(0), meta.stride(0), stride_rm, stride_rn,
        out2.stride(0), out2.stride(1),
        KEEP=n, GROUP=m, BITS=bits, ONE_BYTE=(8 % (n * bits) == 0),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
        HAS_BIAS=bias is not None, ACTIVATION=ACTIVATIONS.index(activation),
        HAS_RESIDUAL=residual is not None, INPUT_PRECISION=input_precision,
        UPCAST_DOT=upcast, num_warps=warps, num_stages=stages,
    )


def nm_linear(x: torch.Tensor, w: NMWeight, bias: Optional[torch.Tensor] = None,
              residual: Optional[torch.Tensor] = None, activation: str = "none",
              out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """y = epilogue(x @ W^T) for a packed weight, through the `sparsify::nm_linear` op."""
    return torch.ops.sparsify.nm_linear(x, w.values, w.meta, w.n_out, w.k, w.n, w.m,
                                        bias, residual, activation, out_dtype)


# The cuSPARSELt 2:4 path has its own file, cslt_linear.py. benchmarks/bench_linear.py (being rewritten
# elsewhere) still reads semi_structured_available / pack_cslt / cslt_linear from this module: they
# resolve here lazily, so this module never imports cslt_linear (which imports this one).
_CSLT_NAMES = ("semi_structured_available", "pack_cslt", "cslt_linear")


def __getattr__(name: str):
    if name in _CSLT_NAMES:
        from sparsify.codegen.kernels import cslt_linear

        return getattr(cslt_linear, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------------------------
# The spec: what the registry finds; its op is what models call (one opaque node for torch.compile
# and torch.export)
# ----------------------------------------------------------------------------------------------

def _pack(weight: torch.Tensor, pattern, layer: Optional[dict] = None) -> Prepared:
    b = pack_nm(weight, pattern.n, pattern.m)
    return Prepared({"values": b.values, "meta": b.meta},
                    {"n_out": weight.shape[0], "k_in": weight.shape[1], "n": pattern.n, "m": pattern.m})


SPEC = KernelSpec(
    name="nm_triton", op="sparsify::nm_linear",
    schema="(Tensor x, Tensor values, Tensor meta, SymInt n_out, SymInt k_in, SymInt n, SymInt m, "
           "Tensor? bias=None, Tensor? residual=None, str activation='none', ScalarType? out_dtype=None) -> Tensor",
    patterns=(NM,), replaces="linear", devices=("cuda",), interpretable=True,
    impl=nm_linear_host, pack=_pack, out_like=linear_out_like, version=KERNEL_VERSION, pack_params=("n", "m"))
