"""Block-sparse (BSR) linear: y = epilogue(x @ W^T) with W stored as its nonzero [block, block] blocks.

Layout (nn.Linear convention, W is [N, K] = [out_features, in_features]):

- `values`  [nnzb, block, block]: the nonzero blocks, row-major inside a block, sorted by (block-row,
  block-column). Sorted storage lets the kernel walk a block-row's blocks with a pointer increment
  instead of an index multiply, and keeps every block one contiguous, vector-loadable chunk.
- `row_ptr` int32 [ceil(N/block) + 1]: block-row r owns blocks row_ptr[r] .. row_ptr[r+1]-1.
- `col_idx` int32 [nnzb]: the block-column of each block.

N and K that are not multiples of `block` are zero-padded at packing time; the kernel masks the
x loads past K and the stores past N, so the padding never reaches the result.

Entry points: `pack_bsr` / `unpack_bsr` / `block_mask_from_scores` (host-side weight handling),
`bsr_linear_host` with its two implementations `bsr_linear_triton` (Triton launch) and
`bsr_linear_reference` (torch), `bsr_linear` (through the `sparsify::bsr_linear` custom op, which works
under torch.compile and torch.export), and `SPEC`, the kernel's entry in the registry.
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
from sparsify.codegen.kernels._checks import (check_devices, check_input_dtypes, check_input_precision,
                                              check_linear_epilogue, check_out, check_tensors, describe,
                                              linear_output, resolve_out_dtype)
from sparsify.codegen.kernels._common import (KERNEL_DTYPES, REFERENCE_DTYPES, SMEM_BUDGET, cdiv,
                                              epilogue_operands, linear_out_like, linear_reference, resolve_impl)
from sparsify.codegen.spec import KernelSpec
from sparsify.patterns import Block
from sparsify.state import Prepared

# Part of the cost-cache key: bump when the kernel's code or launch heuristics change.
KERNEL_VERSION = "bsr_linear-2"

_BLOCK_SIZES = (16, 32, 64, 128)


# ----------------------------------------------------------------------------------------------
# Packing
# ----------------------------------------------------------------------------------------------

class BlockGridStats:
    """nnzb and density for any BSR weight that defines n_block_rows / n_block_cols."""

    @property
    def nnzb(self) -> int:
        return self.values.shape[0]

    @property
    def density(self) -> float:
        """Fraction of the (padded) block grid that is stored."""
        total = self.n_block_rows * self.n_block_cols
        return self.nnzb / total if total else 0.0


@dataclasses.dataclass(frozen=True, eq=False)
class BSRWeight(BlockGridStats):
    """A [n, k] weight in block-sparse-row form; see the module docstring for the layout.

    eq=False: a generated __eq__ would compare tensors elementwise and raise on `==`.
    """

    values: torch.Tensor   # [nnzb, block, block], the weight's dtype
    row_ptr: torch.Tensor  # int32 [ceil(n / block) + 1]
    col_idx: torch.Tensor  # int32 [nnzb]
    n: int
    k: int
    block: int

    @property
    def n_block_rows(self) -> int:
        return cdiv(self.n, self.block)

    @property
    def n_block_cols(self) -> int:
        return cdiv(self.k, self.block)


def _check_block(block, name: str = "block") -> int:
    if isinstance(block, bool) or not isinstance(block, int) or block not in _BLOCK_SIZES:
        raise ValueError(f"{name} must be a power of two in 16..128 {_BLOCK_SIZES}, got {block!r}")
    return block


def _block_grid(t: torch.Tensor, block: int) -> torch.Tensor:
    """[N, K] -> [ceil(N/b), ceil(K/b), b, b] view of the zero-padded matrix."""
    n, k = t.shape
    nbr, nbc = cdiv(n, block), cdiv(k, block)
    padded = torch.nn.functional.pad(t, (0, nbc * block - k, 0, nbr * block - n))
    return padded.reshape(nbr, block, nbc, block).permute(0, 2, 1, 3)


def pack_bsr(weight: torch.Tensor, block: int) -> BSRWeight:
    """Pack a dense [N, K] weight, dropping every all-zero block (a NaN counts as nonzero)."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D [N, K] tensor, got {describe(weight)}")
    _check_block(block)
    n, k = weight.shape
    blocks = _block_grid(weight.detach(), block)
    keep = (blocks != 0).flatten(2).any(-1)                  # [nbr, nbc]
    values = blocks[keep].contiguous()                       # row-major over (r, c): sorted
    counts = keep.sum(dim=1, dtype=torch.int32)
    row_ptr = torch.zeros(keep.shape[0] + 1, dtype=torch.int32, device=weight.device)
    row_ptr[1:] = torch.cumsum(counts, 0)
    col_idx = keep.nonzero()[:, 1].to(torch.int32).contiguous()
    return BSRWeight(values=values, row_ptr=row_ptr, col_idx=col_idx, n=n, k=k, block=block)


def unpack_bsr(bsr: BSRWeight) -> torch.Tensor:
    """Dense [n, k] weight from its BSR form (tests, debugging, the torch reference)."""
    return _unpack(bsr.values, bsr.row_ptr, bsr.col_idx, bsr.n, bsr.k)


def _unpack(values, row_ptr, col_idx, n: int, k: int) -> torch.Tensor:
    block = values.shape[-1]
    nbr, nbc = cdiv(n, block), cdiv(k, block)
    counts = (row_ptr[1:] - row_ptr[:-1]).long()
    rows = torch.repeat_interleave(torch.arange(nbr, device=values.device), counts)
    grid = values.new_zeros(nbr, nbc, block, block)
    grid[rows, col_idx.long()] = values
    return grid.permute(0, 2, 1, 3).reshape(nbr * block, nbc * block)[:n, :k]


def block_mask_from_scores(scores: torch.Tensor, block: int, density: float) -> torch.Tensor:
    """Bool [ceil(N/b), ceil(K/b)] keeping the round(density * total) blocks (at least 1) whose summed
    |score| is largest. Rows may end up with no block at all; the kernel handles empty block-rows.
    Ties are broken arbitrarily (torch.topk)."""
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
        raise ValueError(f"scores must be a 2-D [N, K] tensor, got {describe(scores)}")
    _check_block(block)
    if not (0.0 <= float(density) <= 1.0):
        raise ValueError(f"density must be in [0, 1], got {density!r}")
    totals = _block_grid(scores.detach().abs().float(), block).sum(dim=(2, 3))
    n_keep = max(1, round(float(density) * totals.numel()))
    mask = torch.zeros(totals.numel(), dtype=torch.bool, device=scores.device)
    mask[torch.topk(totals.flatten(), n_keep).indices] = True
    return mask.reshape(totals.shape)


# ----------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------

@triton.jit
def _bsr_linear_kernel(
    x_ptr, w_ptr, row_ptr_ptr, col_idx_ptr, bias_ptr, res_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_om, stride_rm, stride_rn,
    BLOCK_M: tl.constexpr, BLOCK: tl.constexpr, EVEN_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """One [BLOCK_M, BLOCK] tile of out = epilogue(x @ W^T) for block-row `program_id(1)` of W.

    x_ptr: [M, K] with strides (stride_xm, 1). w_ptr: [nnzb, BLOCK, BLOCK] contiguous (the packed values).
    row_ptr_ptr: int32 [ceil(N/BLOCK) + 1]. col_idx_ptr: int32 [nnzb]. bias_ptr: [N] (read iff HAS_BIAS).
    res_ptr: [M, N] with strides (stride_rm, stride_rn) (read iff HAS_RESIDUAL).
    out_ptr: [M, N] with strides (stride_om, 1).
    EVEN_K: K % BLOCK == 0, so no x load needs a column mask.
    UPCAST_DOT: feed tl.dot float32 operands. Only for bfloat16 under TRITON_INTERPRET=1, whose
    tl.dot multiplies bf16 bit patterns as uint16 (triton-lang/triton#11584, fix not accepted).
    Exact: a bf16 x bf16 product fits in float32, as in the GPU's bf16 MMA with fp32 accumulation.
    """
    pid_m = tl.program_id(0)
    block_row = tl.program_id(1)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_b = tl.arange(0, BLOCK)
    # Rows past M are clamped into range (they are computed, then never stored), which keeps the
    # hot-loop x loads free of a row mask. int64 before the stride: M * K can exceed 2^31.
    rows = (offs_m % M).to(tl.int64)
    x_rows = x_ptr + rows[:, None] * stride_xm

    start = tl.load(row_ptr_ptr + block_row)
    end = tl.load(row_ptr_ptr + block_row + 1)
    # Blocks of a block-row are consecutive in `values`: walk them by pointer increment.
    # int64: nnzb * BLOCK^2 can exceed 2^31 for large weights.
    w_ptrs = w_ptr + start.to(tl.int64) * (BLOCK * BLOCK) + offs_b[:, None] * BLOCK + offs_b[None, :]

    acc = tl.zeros((BLOCK_M, BLOCK), dtype=tl.float32)
    for i in range(start, end):
        offs_k = tl.load(col_idx_ptr + i) * BLOCK + offs_b
        x_ptrs = x_rows + offs_k[None, :]
        if EVEN_K:
            x_tile = tl.load(x_ptrs)
        else:
            # Only the last block-column reaches past K; the W padding there is zero, but the x
            # memory past K is not ours to read.
            x_tile = tl.load(x_ptrs, mask=offs_k[None, :] < K, other=0.0)
        w_block = tl.load(w_ptrs)                              # [n_local, k_local]
        if UPCAST_DOT:
            x_tile = x_tile.to(tl.float32)
            w_block = w_block.to(tl.float32)
        acc = tl.dot(x_tile, tl.trans(w_block), acc, input_precision=INPUT_PRECISION)
        w_ptrs += BLOCK * BLOCK

    offs_n = block_row * BLOCK + offs_b
    offs_m64 = offs_m.to(tl.int64)
    acc = apply_epilogue(acc, offs_m64, offs_n, M, N, bias_ptr, res_ptr, stride_rm, stride_rn,
                         HAS_BIAS, ACTIVATION, HAS_RESIDUAL)
    out_ptrs = out_ptr + offs_m64[:, None] * stride_om + offs_n[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _config_for(M: int, block: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_M, num_warps, num_stages) for a launch. A hand heuristic until GPU tuning replaces it:
    BLOCK_M follows M so tiny M does not waste a 128-row tile; warps grow with the tile.

    Stages: Triton 3.9's pipeliner gives this loop at most two buffers of (x tile + W block), whatever
    num_stages >= 2 says (the x load address hangs off the col_idx load), as the sm_90 compile's
    shared-memory size shows. So 3 stages where two buffers fit the budget, else no pipelining
    (fp32 with 128 x 128 tiles) rather than a launch that runs out of shared memory.
    """
    block_m = 16 if M <= 16 else 32 if M <= 32 else 64 if M <= 64 else 128
    if block == 128 and block_m > 64:
        # H100 fp16 sweep (4096 x 4096, M = 2048 and 8192, densities 0.1 and 0.5): 64-row tiles with
        # 4 warps beat the 128-row, 8-warp default for 128-blocks by 10-18% (e.g. 0.0977 vs 0.119 ms
        # at M = 2048, density 0.5); BLOCK_M = 256 with 8 warps was best at M = 8192 but needs more
        # shared memory than SMEM_BUDGET allows for two buffers.
        return 64, 4, (3 if 2 * (64 * block + block * block) * dtype.itemsize <= SMEM_BUDGET else 1)
    tile = block_m * block
    num_warps = 2 if tile <= 512 else 4 if tile <= 8192 else 8
    per_stage = (block_m * block + block * block) * dtype.itemsize
    num_stages = 3 if 2 * per_stage <= SMEM_BUDGET else 1
    return block_m, num_warps, num_stages


# ----------------------------------------------------------------------------------------------
# Host function: checks, then the kernel or the reference
# ----------------------------------------------------------------------------------------------

def _check_args(x, values, row_ptr, col_idx, n_out, bias, residual, activation, out_dtype,
                kernel_dtypes: bool):
    """Argument checks of both implementations; returns (block, K, out_dtype)."""
    check_tensors(x=x, values=values, row_ptr=row_ptr, col_idx=col_idx)
    if values.dim() != 3 or values.shape[1] != values.shape[2]:
        raise ValueError(f"values must be [nnzb, block, block], got {tuple(values.shape)}")
    block = _check_block(values.shape[-1], "values block size (values.shape[-1])")
    if isinstance(n_out, bool) or not isinstance(n_out, int) or n_out < 0:
        raise ValueError(f"n_out must be a non-negative int, got {n_out!r}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (the K features)")
    check_input_dtypes(x, values, KERNEL_DTYPES if kernel_dtypes else REFERENCE_DTYPES)
    for name, t in (("row_ptr", row_ptr), ("col_idx", col_idx)):
        if t.dtype != torch.int32 or t.dim() != 1:
            raise TypeError(f"{name} must be a 1-D int32 tensor, got {t.dtype} {tuple(t.shape)}")
    nbr = cdiv(n_out, block)
    if row_ptr.shape[0] != nbr + 1:
        raise ValueError(f"row_ptr has {row_ptr.shape[0]} entries, expected ceil(n_out / block) + 1 = "
                         f"{nbr + 1} for n_out={n_out}, block={block}")
    if col_idx.shape[0] != values.shape[0]:
        raise ValueError(f"col_idx has {col_idx.shape[0]} entries but values has {values.shape[0]} blocks")
    check_devices(x, values=values, row_ptr=row_ptr, col_idx=col_idx)
    check_linear_epilogue(x, n_out, bias, residual, activation)
    out_dtype = resolve_out_dtype(x, out_dtype)
    return block, x.shape[-1], out_dtype


def _check_indices(x, row_ptr, col_idx, nnzb: int, block: int, check: Optional[bool]):
    """Validate index contents against x's K. This reads device memory (a sync on CUDA), so by default
    it runs only for CPU tensors; pass check_indices=True to force it on CUDA while debugging."""
    if check is None:
        check = x.device.type != "cuda"
    if not check:
        return
    k = x.shape[-1]
    if nnzb:
        max_col = int(col_idx.max())
        if max_col >= cdiv(k, block) or int(col_idx.min()) < 0:
            raise ValueError(f"x.shape[-1]={k} is too small for the packed weight: col_idx reaches block "
                             f"column {max_col}, which needs K > {max_col * block} (block={block})")
    if int(row_ptr[0]) != 0 or int(row_ptr[-1]) != nnzb or bool((row_ptr[1:] < row_ptr[:-1]).any()):
        raise ValueError(f"row_ptr must rise from 0 to nnzb={nnzb}, got first={int(row_ptr[0])}, "
                         f"last={int(row_ptr[-1])}")


def bsr_linear_host(x: torch.Tensor, values: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor,
                    n_out: int, bias: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None,
                    activation: str = "none", out_dtype: Optional[torch.dtype] = None,
                    out: Optional[torch.Tensor] = None, *, impl: str = "auto", block_m: Optional[int] = None,
                    num_warps: Optional[int] = None, num_stages: Optional[int] = None,
                    input_precision: str = "tf32", check_indices: Optional[bool] = None) -> torch.Tensor:
    """y[..., n_out] = epilogue(x[..., K] @ W^T) with W given in BSR form.

    impl: "triton" (launch the kernel), "reference" (unpack W, multiply in float32, float64 for
    float64 inputs: the tests' ground truth), or "auto" (see _common.resolve_impl). `out`, if given,
    is written and returned (contiguous, x.shape[:-1] + (n_out,), out_dtype). block_m / num_warps /
    num_stages override `_config_for`; input_precision applies to fp32 inputs ("tf32" default,
    "ieee" for exact fp32 products); the reference ignores the launch arguments.
    """
    impl = resolve_impl(impl, x.device)
    block, k, out_dtype = _check_args(x, values, row_ptr, col_idx, n_out, bias, residual, activation,
                                      out_dtype, kernel_dtypes=impl == "triton")
    check_input_precision(input_precision)
    _check_indices(x, row_ptr, col_idx, values.shape[0], block, check_indices)
    if impl == "reference":
        check_out(out, tuple(x.shape[:-1]) + (n_out,), out_dtype, x.device)
        return linear_reference(x, _unpack(values, row_ptr, col_idx, n_out, k), bias, residual, activation,
                                out_dtype, out)
    out, m = linear_output(x, n_out, out_dtype, out)
    if m == 0 or n_out == 0:
        return out
    _launch(x.reshape(m, k), values, row_ptr, col_idx, bias, residual, activation, out.view(m, n_out), block,
            block_m, num_warps, num_stages, input_precision)
    return out


bsr_linear_triton = functools.partial(bsr_linear_host, impl="triton")
bsr_linear_reference = functools.partial(bsr_linear_host, impl="reference")


def _launch(x2, values, row_ptr, col_idx, bias, residual, activation, out2, block, block_m, num_warps,
            num_stages, input_precision) -> None:
    """The kernel on x2 [m, k] into out2 [m, n_out] (launch arguments: `bsr_linear_host`)."""
    (m, k), n_out = x2.shape, out2.shape[1]
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    bias_arg, res2, stride_rm, stride_rn = epilogue_operands(bias, residual, out2)
    cfg_m, cfg_warps, cfg_stages = _config_for(m, block, x2.dtype)
    block_m = block_m or cfg_m
    grid = (cdiv(m, block_m), cdiv(n_out, block))
    upcast = x2.dtype == torch.bfloat16 and runtime.interpreter_on()
    _bsr_linear_kernel[grid](
        x2, values.contiguous(), row_ptr, col_idx, bias_arg, res2, out2,
        m, n_out, k,
        x2.stride(0), out2.stride(0), stride_rm, stride_rn,
        BLOCK_M=block_m, BLOCK=block, EVEN_K=(k % block == 0),
        HAS_BIAS=bias is not None, ACTIVATION=ACTIVATIONS.index(activation),
        HAS_RESIDUAL=residual is not None,
        INPUT_PRECISION="ieee" if upcast else input_precision, UPCAST_DOT=upcast,
        num_warps=num_warps or cfg_warps, num_stages=num_stages or cfg_stages,
    )


def bsr_linear(x: torch.Tensor, bsr: BSRWeight, bias: Optional[torch.Tensor] = None,
               residual: Optional[torch.Tensor] = None, activation: str = "none",
               out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """y = epilogue(x @ W^T) for a packed weight, through the `sparsify::bsr_linear` op."""
    if x.shape[-1] != bsr.k:
        raise ValueError(f"x.shape[-1]={x.shape[-1]} does not match the weight's in_features k={bsr.k}")
    return torch.ops.sparsify.bsr_linear(x, bsr.values, bsr.row_ptr, bsr.col_idx, bsr.n,
                                         bias, residual, activation, out_dtype)


# ----------------------------------------------------------------------------------------------
# The spec: what the registry finds; its op is what models call (one opaque node for torch.compile
# and torch.export)
# ----------------------------------------------------------------------------------------------

def _pack(weight: torch.Tensor, pattern, layer: Optional[dict] = None) -> Prepared:
    b = pack_bsr(weight, pattern.block)
    return Prepared({"values": b.values, "row_ptr": b.row_ptr, "col_idx": b.col_idx}, {"n_out": weight.shape[0]})


SPEC = KernelSpec(
    name="bsr_triton", op="sparsify::bsr_linear",
    schema="(Tensor x, Tensor values, Tensor row_ptr, Tensor col_idx, SymInt n_out, Tensor? bias=None, "
           "Tensor? residual=None, str activation='none', ScalarType? out_dtype=None) -> Tensor",
    patterns=(Block,), replaces="linear", devices=("cuda",), interpretable=True,
    impl=bsr_linear_host, pack=_pack, out_like=linear_out_like, version=KERNEL_VERSION, pack_params=("block",))
