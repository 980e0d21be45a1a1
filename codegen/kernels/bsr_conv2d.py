"""Block-sparse (BSR) conv2d by implicit GEMM: y = epilogue(conv2d(x, W)) with W stored as nonzero blocks.

The convolution is a GEMM over output pixels:

    out[P, O] = patches[P, Kred] @ Wmat[O, Kred]^T,   P = N * Hout * Wout,  Kred = kh * kw * Cp

where `patches` is never materialised (no im2col in memory): the kernel gathers each [BLOCK_P, block]
patch tile straight from x at the tap's shifted positions, zero padding done by load masks.

Reduction order is (kh, kw, C), channels fastest, so a K-block of `block` columns is `block`
consecutive input channels of one (kh, kw) tap: with x channels-last (NHWC) that is one contiguous
`block`-element run per output pixel, and the block's tap is a scalar per block (no per-element
divisions in the gather). C is padded per tap to Cp = ceil(C / block) * block at packing time
(zeros, which pruning never stores); the kernel masks the x channels past C, so any C works. When
C % block == 0 there is no padding and no channel mask (the EVEN_C fast path). A small C (the RGB
stem, C=3) wastes most of each block: leave such layers dense.

Layout of the packed weight (`pack_bsr_conv`, a `BSRConvWeight`): the BSR form (see bsr_linear.py)
of Wmat = weight.permute(0, 2, 3, 1) zero-padded to [O, kh, kw, Cp], viewed as [O, kh * kw * Cp]:

- `values`  [nnzb, block, block]: nonzero blocks sorted by (block-row, block-column); inside a block
  rows are output channels, columns input channels.
- `row_ptr` int32 [ceil(O / block) + 1] over output-channel block-rows.
- `col_idx` int32 [nnzb]: block-column `col` is tap = col // (Cp / block) (tap = r * kw + s for
  kernel position (r, s)) and channels c0 = (col % (Cp / block)) * block .. c0 + block - 1.

Memory format: the kernel reads x as NHWC. Inputs are logical NCHW tensors like F.conv2d's; an input
whose channels are unit-stride (x.stride(1) == 1: channels-last, or a channel slice or spatial crop of
a channels-last tensor) is read in place through its strides, any other layout is copied to
channels-last once per call. The output has x's memory format (channels-last in,
channels-last out; otherwise contiguous NCHW): the kernel stores through the output's strides, so
either costs no extra copy. The residual has the output's logical shape [N, O, Hout, Wout]; the
epilogue reads it as [P, O], free for a channels-last residual, a copy otherwise.

groups=1 only: grouped and depthwise convolutions are handled by channel pruning elsewhere, and a
grouped weight ([O, C / groups, kh, kw]) is rejected with an error naming `groups`.

Entry points: `pack_bsr_conv` / `unpack_bsr_conv` / `conv_weight_matrix` (host-side weight handling),
`bsr_conv2d_triton` (Triton launch), `bsr_conv2d_reference` (torch, same signature), and
`bsr_conv2d` (through the `sparsify::bsr_conv2d` custom op, which works under torch.compile and
torch.export).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from sparsify.codegen import runtime
from sparsify.codegen.kernels._host import cdiv
from sparsify.codegen.epilogue import ACTIVATIONS, Epilogue, apply_epilogue, apply_reference
from sparsify.codegen.kernels._checks import check_epilogue, check_out, describe, resolve_out_dtype
# The conv weight is an ordinary BSR matrix; its packing and unpacking are bsr_linear's.
from sparsify.codegen.kernels.bsr_linear import BlockGridStats, _block_grid, _check_block, _unpack

# Part of the cost-cache key: bump when the kernel's code or launch heuristics change.
KERNEL_VERSION = "bsr_conv2d-1"

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INPUT_PRECISIONS = ("tf32", "tf32x3", "ieee")

IntPair = Union[int, Sequence[int]]


# ----------------------------------------------------------------------------------------------
# Packing
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, eq=False)
class BSRConvWeight(BlockGridStats):
    """A conv weight [o, c, kh, kw] in BSR form over (kh, kw, C); see the module docstring.

    eq=False: a generated __eq__ would compare tensors elementwise and raise on `==`.
    """

    values: torch.Tensor   # [nnzb, block, block], the weight's dtype
    row_ptr: torch.Tensor  # int32 [ceil(o / block) + 1]
    col_idx: torch.Tensor  # int32 [nnzb]
    o: int
    c: int
    kh: int
    kw: int
    block: int

    @property
    def c_blocks(self) -> int:
        """Channel blocks per tap: Cp / block."""
        return cdiv(self.c, self.block)

    @property
    def n_block_rows(self) -> int:
        return cdiv(self.o, self.block)

    @property
    def n_block_cols(self) -> int:
        return self.kh * self.kw * self.c_blocks


def _check_weight(weight, groups) -> None:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        raise ValueError(f"weight must be a 4-D [O, C, kh, kw] tensor, got {describe(weight)}")
    _check_groups(groups)


def _check_groups(groups) -> None:
    if groups != 1:
        raise ValueError(f"groups must be 1 (block-sparse conv2d supports dense channel mixing only; "
                         f"grouped/depthwise convs are handled by channel pruning), got groups={groups!r}")


def conv_weight_matrix(weight: torch.Tensor, block: int) -> torch.Tensor:
    """The GEMM view of a conv weight: [O, C, kh, kw] -> [O, kh * kw * Cp], columns ordered (kh, kw, C)
    with C zero-padded to Cp = ceil(C / block) * block. Block masks for `pack_bsr_conv` are taken over
    this matrix (e.g. `block_mask_from_scores(conv_weight_matrix(scores, b), b, density)`)."""
    _check_weight(weight, 1)
    _check_block(block)
    o, c, kh, kw = weight.shape
    cp = cdiv(c, block) * block
    w = weight.permute(0, 2, 3, 1)                                  # [O, kh, kw, C]
    w = F.pad(w, (0, cp - c))
    return w.reshape(o, kh * kw * cp)


def pack_bsr_conv(weight: torch.Tensor, block: int, groups: int = 1) -> BSRConvWeight:
    """Pack a dense conv weight [O, C, kh, kw], dropping every all-zero block (a NaN counts as nonzero)."""
    _check_weight(weight, groups)
    _check_block(block)
    o, c, kh, kw = weight.shape
    blocks = _block_grid(conv_weight_matrix(weight.detach(), block), block)   # [nbr, nbc, b, b]
    keep = (blocks != 0).flatten(2).any(-1)
    values = blocks[keep].contiguous()                       # row-major over (r, c): sorted
    counts = keep.sum(dim=1, dtype=torch.int32)
    row_ptr = torch.zeros(keep.shape[0] + 1, dtype=torch.int32, device=weight.device)
    row_ptr[1:] = torch.cumsum(counts, 0)
    col_idx = keep.nonzero()[:, 1].to(torch.int32).contiguous()
    return BSRConvWeight(values=values, row_ptr=row_ptr, col_idx=col_idx, o=o, c=c, kh=kh, kw=kw,
                         block=block)


def _unpack_conv(values, row_ptr, col_idx, o: int, c: int, kh: int, kw: int) -> torch.Tensor:
    block = values.shape[-1]
    cp = cdiv(c, block) * block
    wmat = _unpack(values, row_ptr, col_idx, o, kh * kw * cp)
    return wmat.reshape(o, kh, kw, cp)[..., :c].permute(0, 3, 1, 2)


def unpack_bsr_conv(w: BSRConvWeight) -> torch.Tensor:
    """Dense [o, c, kh, kw] weight (contiguous) from its BSR form (tests, debugging, the reference)."""
    return _unpack_conv(w.values, w.row_ptr, w.col_idx, w.o, w.c, w.kh, w.kw).contiguous()


# ----------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------

@triton.jit
def output_pixels(offs_p, P, HOUT, WOUT, STRIDE_H, STRIDE_W, PAD_H, PAD_W):
    """(n, oh, ow, ih0, iw0) of output pixels offs_p of the implicit GEMM (p = (n * HOUT + oh) * WOUT + ow);
    ih0 / iw0: the input row / column of tap (0, 0), negative inside the top / left padding.
    Pixels past P are clamped into range (computed, never stored), so they gather valid addresses."""
    p = offs_p % P
    hw = HOUT * WOUT
    n = p // hw
    rem = p - n * hw
    oh = rem // WOUT
    ow = rem - oh * WOUT
    return n, oh, ow, oh * STRIDE_H - PAD_H, ow * STRIDE_W - PAD_W


@triton.jit
def _bsr_conv2d_kernel(
    x_ptr, w_ptr, row_ptr_ptr, col_idx_ptr, bias_ptr, res_ptr, out_ptr,
    P, O, C, H, W, HOUT, WOUT, C_BLOCKS, KW,
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_on, stride_oc, stride_oh, stride_ow,
    stride_rm, stride_rn,
    STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
    BLOCK_P: tl.constexpr, BLOCK: tl.constexpr, EVEN_C: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """One [BLOCK_P, BLOCK] tile of out = epilogue(conv2d(x, W)): output pixels p = program_id(0) tile,
    output channels of block-row `program_id(1)` of W.

    x_ptr: [N, C, H, W] with strides (stride_xn, stride_xc, stride_xh, stride_xw); the host passes
    unit-stride channels (stride_xc == 1), so a patch row is one contiguous run of BLOCK channels.
    w_ptr: [nnzb, BLOCK, BLOCK] contiguous (the packed values). row_ptr_ptr: int32 [ceil(O/BLOCK) + 1].
    col_idx_ptr: int32 [nnzb], block-column = tap * C_BLOCKS + channel block, tap = r * KW + s.
    bias_ptr: [O] (read iff HAS_BIAS). res_ptr: [P, O] with strides (stride_rm, stride_rn) (read iff
    HAS_RESIDUAL). out_ptr: [N, O, HOUT, WOUT] with strides (stride_on, stride_oc, stride_oh, stride_ow).
    EVEN_C: C % BLOCK == 0, so no x load needs a channel mask.
    UPCAST_DOT: feed tl.dot float32 operands; only for bfloat16 under TRITON_INTERPRET=1 (see
    bsr_linear.py, triton-lang/triton#11584). Exact, as a bf16 x bf16 product fits in float32.
    """
    pid_p = tl.program_id(0)
    block_row = tl.program_id(1)

    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_b = tl.arange(0, BLOCK)
    n, oh, ow, ih0, iw0 = output_pixels(offs_p, P, HOUT, WOUT, STRIDE_H, STRIDE_W, PAD_H, PAD_W)
    # int64 before the strides: N * C * H * W can exceed 2^31. Negative for pixels whose tap (0, 0)
    # falls in the padding; such addresses are only formed, never loaded (masked below).
    x_pix = x_ptr + (n.to(tl.int64) * stride_xn + ih0.to(tl.int64) * stride_xh
                     + iw0.to(tl.int64) * stride_xw)

    start = tl.load(row_ptr_ptr + block_row)
    end = tl.load(row_ptr_ptr + block_row + 1)
    # Blocks of a block-row are consecutive in `values`: walk them by pointer increment.
    w_ptrs = w_ptr + start.to(tl.int64) * (BLOCK * BLOCK) + offs_b[:, None] * BLOCK + offs_b[None, :]

    acc = tl.zeros((BLOCK_P, BLOCK), dtype=tl.float32)
    for i in range(start, end):
        col = tl.load(col_idx_ptr + i)
        tap = col // C_BLOCKS
        c0 = (col - tap * C_BLOCKS) * BLOCK
        r = tap // KW
        s = tap - r * KW
        ih = ih0 + r * DIL_H
        iw = iw0 + s * DIL_W
        inside = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)          # [BLOCK_P]: zero padding
        offs_c = c0 + offs_b
        tap_off = (r * DIL_H).to(tl.int64) * stride_xh + (s * DIL_W).to(tl.int64) * stride_xw
        x_ptrs = x_pix[:, None] + tap_off + offs_c[None, :] * stride_xc
        if EVEN_C:
            mask = inside[:, None]
        else:
            # Only the last channel block of a tap reaches past C: the W padding there is zero, but
            # the x memory past C is the next pixel's (or not ours).
            mask = inside[:, None] & (offs_c[None, :] < C)
        x_tile = tl.load(x_ptrs, mask=mask, other=0.0)                  # [BLOCK_P, BLOCK] patch
        w_block = tl.load(w_ptrs)                                       # [o_local, c_local]
        if UPCAST_DOT:
            x_tile = x_tile.to(tl.float32)
            w_block = w_block.to(tl.float32)
        acc = tl.dot(x_tile, tl.trans(w_block), acc, input_precision=INPUT_PRECISION)
        w_ptrs += BLOCK * BLOCK

    offs_o = block_row * BLOCK + offs_b
    offs_p64 = offs_p.to(tl.int64)
    acc = apply_epilogue(acc, offs_p64, offs_o, P, O, bias_ptr, res_ptr, stride_rm, stride_rn,
                         HAS_BIAS, ACTIVATION, HAS_RESIDUAL)
    out_pix = n.to(tl.int64) * stride_on + oh.to(tl.int64) * stride_oh + ow.to(tl.int64) * stride_ow
    out_ptrs = out_ptr + out_pix[:, None] + offs_o[None, :].to(tl.int64) * stride_oc
    mask = (offs_p[:, None] < P) & (offs_o[None, :] < O)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# Shared memory one program may use for its load buffers: fits A100 (164 KB) and H100/H200 (227 KB).
_SMEM_BUDGET = 160 * 1024


def _config_for(P: int, block: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_P, num_warps, num_stages) for a launch. A hand heuristic, not tuned on a GPU yet:
    BLOCK_P follows P so a tiny feature map does not waste a 128-pixel tile; warps grow with the tile;
    3 stages where three buffers of (patch tile + W block) fit the shared-memory budget, else none.
    """
    block_p = 16 if P <= 16 else 32 if P <= 32 else 64 if P <= 64 else 128
    tile = block_p * block
    num_warps = 2 if tile <= 512 else 4 if tile <= 8192 else 8
    elsize = dtype.itemsize
    per_stage = (block_p * block + block * block) * elsize
    num_stages = 3 if 3 * per_stage <= _SMEM_BUDGET else 1
    return block_p, num_warps, num_stages


# ----------------------------------------------------------------------------------------------
# Host wrapper and reference
# ----------------------------------------------------------------------------------------------

def _pair(v, name: str, minimum: int) -> tuple[int, int]:
    """An int or a 1-/2-sequence of ints (F.conv2d's convention) as an (h, w) pair, each >= minimum."""
    items = [v] if isinstance(v, int) and not isinstance(v, bool) else v
    try:
        items = list(items)
    except TypeError:
        items = None
    if (items is None or len(items) not in (1, 2)
            or any(isinstance(i, bool) or not isinstance(i, int) for i in items)):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    if len(items) == 1:
        items = items * 2
    if any(i < minimum for i in items):
        raise ValueError(f"{name} must be >= {minimum}, got {v!r}")
    return items[0], items[1]


def _out_size(size: int, k: int, stride: int, pad: int, dil: int) -> int:
    return (size + 2 * pad - dil * (k - 1) - 1) // stride + 1


def conv_pairs(stride, padding, dilation) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """(stride, padding, dilation) as (h, w) pairs, checked (F.conv2d's conventions)."""
    return _pair(stride, "stride", 1), _pair(padding, "padding", 0), _pair(dilation, "dilation", 1)


def conv_out_shape(x: torch.Tensor, o: int, kh: int, kw: int, pairs) -> tuple[int, int, int, int]:
    """[N, O, Hout, Wout] of a conv of x (4-D) with a kh x kw kernel; raises where it would be empty."""
    (stride2, padding2, dilation2), (n, _, h, w) = pairs, x.shape
    hout = _out_size(h, kh, stride2[0], padding2[0], dilation2[0])
    wout = _out_size(w, kw, stride2[1], padding2[1], dilation2[1])
    if hout < 1 or wout < 1:
        raise ValueError(f"x spatial size {(h, w)} is too small for a {kh}x{kw} kernel with "
                         f"padding={padding2}, dilation={dilation2}: output would be {(hout, wout)}")
    return n, o, hout, wout


def _out_memory_format(x: torch.Tensor) -> torch.memory_format:
    """The output keeps x's memory format: channels-last when x is (and is not also plain contiguous,
    as with C == 1 or H == W == 1), else contiguous NCHW."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _check_args(x, values, row_ptr, col_idx, o, kh, kw, stride, padding, dilation, bias, residual,
                activation, groups, kernel_dtypes: bool):
    """Shared argument checks of the wrapper and the reference.

    Returns (block, (stride, padding, dilation) as pairs, output shape)."""
    _check_groups(groups)
    for name, t in (("x", x), ("values", values), ("row_ptr", row_ptr), ("col_idx", col_idx)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must be a 4-D [N, C, H, W] tensor, got {tuple(x.shape)}")
    if values.dim() != 3 or values.shape[1] != values.shape[2]:
        raise ValueError(f"values must be [nnzb, block, block], got {tuple(values.shape)}")
    block = _check_block(values.shape[-1], "values block size (values.shape[-1])")
    for name, v in (("o", o), ("kh", kh), ("kw", kw)):
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "o" else 1):
            raise ValueError(f"{name} must be a {'non-negative' if name == 'o' else 'positive'} int, "
                             f"got {v!r}")
    stride2, padding2, dilation2 = pairs = conv_pairs(stride, padding, dilation)
    allowed = _KERNEL_DTYPES if kernel_dtypes else _KERNEL_DTYPES + (torch.float64,)
    if x.dtype not in allowed:
        raise TypeError(f"x dtype must be one of {allowed}, got {x.dtype}")
    if values.dtype != x.dtype:
        raise TypeError(f"values dtype {values.dtype} does not match x dtype {x.dtype}")
    for name, t in (("row_ptr", row_ptr), ("col_idx", col_idx)):
        if t.dtype != torch.int32 or t.dim() != 1:
            raise TypeError(f"{name} must be a 1-D int32 tensor, got {t.dtype} {tuple(t.shape)}")
    nbr = cdiv(o, block)
    if row_ptr.shape[0] != nbr + 1:
        raise ValueError(f"row_ptr has {row_ptr.shape[0]} entries, expected ceil(o / block) + 1 = "
                         f"{nbr + 1} for o={o}, block={block}")
    if col_idx.shape[0] != values.shape[0]:
        raise ValueError(f"col_idx has {col_idx.shape[0]} entries but values has {values.shape[0]} blocks")
    for name, t in (("values", values), ("row_ptr", row_ptr), ("col_idx", col_idx)):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    out_shape = conv_out_shape(x, o, kh, kw, pairs)
    check_epilogue(x, o, out_shape, "the output's: N, O, Hout, Wout", bias, residual, activation)
    return block, (stride2, padding2, dilation2), out_shape


def _check_indices(x, row_ptr, col_idx, nnzb: int, block: int, kh: int, kw: int, check: Optional[bool]):
    """Validate index contents against x's C. This reads device memory (a sync on CUDA), so by default
    it runs only for CPU tensors; pass check_indices=True to force it on CUDA while debugging."""
    if check is None:
        check = x.device.type != "cuda"
    if not check:
        return
    c = x.shape[1]
    n_cols = kh * kw * cdiv(c, block)
    if nnzb:
        max_col = int(col_idx.max())
        if max_col >= n_cols or int(col_idx.min()) < 0:
            raise ValueError(f"x has C={c} channels, too few for the packed weight: col_idx reaches "
                             f"block column {max_col}, but a {kh}x{kw} kernel over C={c} has "
                             f"{n_cols} block columns (block={block})")
    if int(row_ptr[0]) != 0 or int(row_ptr[-1]) != nnzb or bool((row_ptr[1:] < row_ptr[:-1]).any()):
        raise ValueError(f"row_ptr must rise from 0 to nnzb={nnzb}, got first={int(row_ptr[0])}, "
                         f"last={int(row_ptr[-1])}")


def bsr_conv2d_triton(x: torch.Tensor, values: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor,
                      o: int, kh: int, kw: int, stride: IntPair = 1, padding: IntPair = 0,
                      dilation: IntPair = 1, bias: Optional[torch.Tensor] = None,
                      residual: Optional[torch.Tensor] = None, activation: str = "none",
                      out_dtype: Optional[torch.dtype] = None, out: Optional[torch.Tensor] = None, *,
                      groups: int = 1,
                      block_p: Optional[int] = None, num_warps: Optional[int] = None,
                      num_stages: Optional[int] = None, input_precision: str = "tf32",
                      check_indices: Optional[bool] = None) -> torch.Tensor:
    """y[N, o, Hout, Wout] = epilogue(conv2d(x[N, C, H, W], W)) with W [o, C, kh, kw] in BSR conv form
    (`pack_bsr_conv`); launches the Triton kernel. C is x.shape[1].

    stride / padding / dilation: an int or an (h, w) pair, as F.conv2d (numeric padding only).
    The result has x's memory format (see `_out_memory_format`). `out`, if given, is written and
    returned: shape (N, o, Hout, Wout), out_dtype (default x's dtype), contiguous or channels-last (the kernel stores
    through its strides). block_p / num_warps / num_stages override `_config_for`; input_precision
    applies to fp32 inputs ("tf32" default, "ieee" for exact fp32 products).
    """
    block, (stride2, padding2, dilation2), out_shape = _check_args(
        x, values, row_ptr, col_idx, o, kh, kw, stride, padding, dilation, bias, residual, activation,
        groups, kernel_dtypes=True)
    if input_precision not in _INPUT_PRECISIONS:
        raise ValueError(f"input_precision must be one of {_INPUT_PRECISIONS}, got {input_precision!r}")
    _check_indices(x, row_ptr, col_idx, values.shape[0], block, kh, kw, check_indices)
    out_dtype = resolve_out_dtype(x, out_dtype)
    check_out(out, out_shape, out_dtype, x.device, channels_last_ok=True)
    if out is None:
        out = torch.empty(out_shape, dtype=out_dtype, device=x.device, memory_format=_out_memory_format(x))
    n, c, h, w = x.shape
    _, _, hout, wout = out_shape
    p = n * hout * wout
    if p == 0 or o == 0:
        return out

    # NHWC for the gather: x is read in place when its channels are unit-stride (channels-last, or a
    # channel slice / crop of a channels-last tensor); anything else is copied to channels-last once.
    xc = x if x.stride(1) == 1 else x.contiguous(memory_format=torch.channels_last)
    # Unused pointer slots get a live tensor: the constexpr flags keep the kernel from reading them.
    bias_arg = bias.contiguous() if bias is not None else out
    if residual is not None:
        res2 = residual.permute(0, 2, 3, 1).reshape(p, o)       # [P, O]: a view if channels-last
        stride_rm, stride_rn = res2.stride()
    else:
        res2, stride_rm, stride_rn = out, 0, 0

    cfg_p, cfg_warps, cfg_stages = _config_for(p, block, x.dtype)
    block_p = block_p or cfg_p
    grid = (cdiv(p, block_p), cdiv(o, block))
    upcast = x.dtype == torch.bfloat16 and runtime.interpreter_on()
    _bsr_conv2d_kernel[grid](
        xc, values.contiguous(), row_ptr, col_idx, bias_arg, res2, out,
        p, o, c, h, w, hout, wout, cdiv(c, block), kw,
        *xc.stride(), *out.stride(), stride_rm, stride_rn,
        stride2[0], stride2[1], padding2[0], padding2[1], dilation2[0], dilation2[1],
        BLOCK_P=block_p, BLOCK=block, EVEN_C=(c % block == 0),
        HAS_BIAS=bias is not None, ACTIVATION=ACTIVATIONS.index(activation),
        HAS_RESIDUAL=residual is not None,
        INPUT_PRECISION="ieee" if upcast else input_precision, UPCAST_DOT=upcast,
        num_warps=num_warps or cfg_warps, num_stages=num_stages or cfg_stages,
    )
    return out


def bsr_conv2d_reference(x: torch.Tensor, values: torch.Tensor, row_ptr: torch.Tensor,
                         col_idx: torch.Tensor, o: int, kh: int, kw: int, stride: IntPair = 1,
                         padding: IntPair = 0, dilation: IntPair = 1, bias: Optional[torch.Tensor] = None,
                         residual: Optional[torch.Tensor] = None, activation: str = "none",
                         out_dtype: Optional[torch.dtype] = None, out: Optional[torch.Tensor] = None, *,
                         groups: int = 1,
                         block_p: Optional[int] = None, num_warps: Optional[int] = None,
                         num_stages: Optional[int] = None, input_precision: str = "tf32",
                         check_indices: Optional[bool] = None) -> torch.Tensor:
    """Torch version of `bsr_conv2d_triton` (same signature; launch tuning arguments are ignored).

    Unpacks W, convolves with F.conv2d in float32 (float64 for float64 inputs, which the tests use as
    ground truth), then applies the shared epilogue's torch implementation over [N, Hout, Wout, O].
    """
    block, (stride2, padding2, dilation2), out_shape = _check_args(
        x, values, row_ptr, col_idx, o, kh, kw, stride, padding, dilation, bias, residual, activation,
        groups, kernel_dtypes=False)
    _check_indices(x, row_ptr, col_idx, values.shape[0], block, kh, kw, check_indices)
    out_dtype = resolve_out_dtype(x, out_dtype)
    check_out(out, out_shape, out_dtype, x.device, channels_last_ok=True)
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    weight = _unpack_conv(values, row_ptr, col_idx, o, x.shape[1], kh, kw).to(acc_dtype)
    acc = F.conv2d(x.to(acc_dtype), weight, None, stride2, padding2, dilation2)
    return conv_epilogue_reference(acc, x, bias, residual, activation, out_dtype, out)


def conv_epilogue_reference(acc: torch.Tensor, x: torch.Tensor, bias, residual, activation: str,
                            out_dtype: torch.dtype, out: Optional[torch.Tensor]) -> torch.Tensor:
    """The sparse convs' reference epilogue: acc [N, O, Hout, Wout] (accumulation dtype) through the
    shared torch epilogue over channels-last [N, Hout, Wout, O], stored in x's memory format or `out`."""
    epi = Epilogue(has_bias=bias is not None, activation=activation, has_residual=residual is not None)
    res_nhwc = None if residual is None else residual.permute(0, 2, 3, 1)
    y = apply_reference(acc.permute(0, 2, 3, 1), epi, bias=bias, residual=res_nhwc, out_dtype=out_dtype)
    y = y.permute(0, 3, 1, 2)
    if out is None:
        return y.contiguous(memory_format=_out_memory_format(x))
    return out.copy_(y)


# ----------------------------------------------------------------------------------------------
# Custom op: what models call, so torch.compile / torch.export see one opaque node
# ----------------------------------------------------------------------------------------------

@torch.library.custom_op("sparsify::bsr_conv2d", mutates_args=())
def _bsr_conv2d_op(x: torch.Tensor, values: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor,
                   o: int, kh: int, kw: int, stride: list[int], padding: list[int], dilation: list[int],
                   bias: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None,
                   activation: str = "none", out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    impl = bsr_conv2d_triton if runtime.use_triton(x.device) else bsr_conv2d_reference
    return impl(x, values, row_ptr, col_idx, o, kh, kw, stride, padding, dilation, bias, residual,
                activation, out_dtype)


def conv_output_like(x: torch.Tensor, o: int, kh: int, kw: int, stride, padding, dilation,
                     out_dtype: Optional[torch.dtype]) -> torch.Tensor:
    """An empty output of a sparse conv op: [N, O, Hout, Wout] in x's memory format (the fake impls)."""
    return torch.empty(conv_out_shape(x, o, kh, kw, conv_pairs(stride, padding, dilation)),
                       dtype=out_dtype or x.dtype, device=x.device, memory_format=_out_memory_format(x))


@_bsr_conv2d_op.register_fake
def _(x, values, row_ptr, col_idx, o, kh, kw, stride, padding, dilation, bias=None, residual=None,
      activation="none", out_dtype=None):
    return conv_output_like(x, o, kh, kw, stride, padding, dilation, out_dtype)


def bsr_conv2d(x: torch.Tensor, w: BSRConvWeight, bias: Optional[torch.Tensor] = None,
               stride: IntPair = 1, padding: IntPair = 0, dilation: IntPair = 1,
               residual: Optional[torch.Tensor] = None, activation: str = "none",
               groups: int = 1, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """y = epilogue(conv2d(x, W)) for a packed weight, through the `sparsify::bsr_conv2d` op."""
    _check_groups(groups)
    if x.dim() != 4 or x.shape[1] != w.c:
        raise ValueError(f"x must be [N, C={w.c}, H, W] for this weight (in_channels c={w.c}), "
                         f"got {tuple(x.shape)}")
    stride2, padding2, dilation2 = conv_pairs(stride, padding, dilation)
    return torch.ops.sparsify.bsr_conv2d(x, w.values, w.row_ptr, w.col_idx, w.o, w.kh, w.kw,
                                         list(stride2), list(padding2), list(dilation2),
                                         bias, residual, activation, out_dtype)
