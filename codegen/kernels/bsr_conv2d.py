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
`bsr_conv2d_host` with its two implementations `bsr_conv2d_triton` (Triton launch) and
`bsr_conv2d_reference` (torch), `bsr_conv2d` (through the `sparsify::bsr_conv2d` custom op, which
works under torch.compile and torch.export), and `SPEC`, the kernel's entry in the registry. The conv
geometry and the reference epilogue shared by the sparse convs are in _common.py.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from sparsify.codegen import runtime
from sparsify.codegen.epilogue import ACTIVATIONS, apply_epilogue
from sparsify.codegen.kernels._checks import (check_conv_input, check_conv_weight, check_devices, check_epilogue,
                                              check_groups, check_input_dtypes, check_input_precision,
                                              check_out, check_tensors, conv_output, resolve_out_dtype)
from sparsify.codegen.kernels._common import (KERNEL_DTYPES, REFERENCE_DTYPES, SMEM_BUDGET, IntPair, acc_dtype,
                                              cdiv, conv_epilogue_reference, conv_layer_static, conv_out_like,
                                              conv_out_shape, conv_pairs, epilogue_operands, resolve_impl)
# The conv weight is an ordinary BSR matrix; its packing and unpacking are bsr_linear's.
from sparsify.codegen.kernels.bsr_linear import BlockGridStats, _block_grid, _check_block, _unpack
from sparsify.codegen.spec import KernelSpec
from sparsify.patterns import Block
from sparsify.state import Prepared

# Part of the cost-cache key: bump when the kernel's code or launch heuristics change.
KERNEL_VERSION = "bsr_conv2d-1"


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


def conv_weight_matrix(weight: torch.Tensor, block: int) -> torch.Tensor:
    """The GEMM view of a conv weight: [O, C, kh, kw] -> [O, kh * kw * Cp], columns ordered (kh, kw, C)
    with C zero-padded to Cp = ceil(C / block) * block. Block masks for `pack_bsr_conv` are taken over
    this matrix (e.g. `block_mask_from_scores(conv_weight_matrix(scores, b), b, density)`)."""
    check_conv_weight(weight, 1)
    _check_block(block)
    o, c, kh, kw = weight.shape
    cp = cdiv(c, block) * block
    w = weight.permute(0, 2, 3, 1)                                  # [O, kh, kw, C]
    w = F.pad(w, (0, cp - c))
    return w.reshape(o, kh * kw * cp)


def pack_bsr_conv(weight: torch.Tensor, block: int, groups: int = 1) -> BSRConvWeight:
    """Pack a dense conv weight [O, C, kh, kw], dropping every all-zero block (a NaN counts as nonzero)."""
    check_conv_weight(weight, groups)
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
    num_stages = 3 if 3 * per_stage <= SMEM_BUDGET else 1
    return block_p, num_warps, num_stages


# ----------------------------------------------------------------------------------------------
# Host function: checks, then the kernel or the reference
# ----------------------------------------------------------------------------------------------

def _check_args(x, values, row_ptr, col_idx, o, kh, kw, stride, padding, dilation, bias, residual,
                activation, groups, kernel_dtypes: bool):
    """Argument checks of both implementations.

    Returns (block, (stride, padding, dilation) as pairs, output shape)."""
    check_groups(groups)
    check_tensors(x=x, values=values, row_ptr=row_ptr, col_idx=col_idx)
    check_conv_input(x, o=o, kh=kh, kw=kw)
    if values.dim() != 3 or values.shape[1] != values.shape[2]:
        raise ValueError(f"values must be [nnzb, block, block], got {tuple(values.shape)}")
    block = _check_block(values.shape[-1], "values block size (values.shape[-1])")
    pairs = conv_pairs(stride, padding, dilation)
    check_input_dtypes(x, values, KERNEL_DTYPES if kernel_dtypes else REFERENCE_DTYPES)
    for name, t in (("row_ptr", row_ptr), ("col_idx", col_idx)):
        if t.dtype != torch.int32 or t.dim() != 1:
            raise TypeError(f"{name} must be a 1-D int32 tensor, got {t.dtype} {tuple(t.shape)}")
    nbr = cdiv(o, block)
    if row_ptr.shape[0] != nbr + 1:
        raise ValueError(f"row_ptr has {row_ptr.shape[0]} entries, expected ceil(o / block) + 1 = "
                         f"{nbr + 1} for o={o}, block={block}")
    if col_idx.shape[0] != values.shape[0]:
        raise ValueError(f"col_idx has {col_idx.shape[0]} entries but values has {values.shape[0]} blocks")
    check_devices(x, values=values, row_ptr=row_ptr, col_idx=col_idx)
    out_shape = conv_out_shape(x, o, kh, kw, pairs)
    check_epilogue(x, o, out_shape, "the output's: N, O, Hout, Wout", bias, residual, activation)
    return block, pairs, out_shape


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


def bsr_conv2d_host(x: torch.Tensor, values: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor,
                    o: int, kh: int, kw: int, stride: IntPair = 1, padding: IntPair = 0,
                    dilation: IntPair = 1, bias: Optional[torch.Tensor] = None,
                    residual: Optional[torch.Tensor] = None, activation: str = "none",
                    out_dtype: Optional[torch.dtype] = None, out: Optional[torch.Tensor] = None, *,
                    impl: str = "auto", groups: int = 1, block_p: Optional[int] = None,
                    num_warps: Optional[int] = None, num_stages: Optional[int] = None,
                    input_precision: str = "tf32", check_indices: Optional[bool] = None) -> torch.Tensor:
    """y[N, o, Hout, Wout] = epilogue(conv2d(x[N, C, H, W], W)) with W [o, C, kh, kw] in BSR conv form
    (`pack_bsr_conv`). C is x.shape[1].

    impl: "triton" (launch the kernel), "reference" (unpack W, F.conv2d in float32, float64 for
    float64 inputs: the tests' ground truth, then the shared epilogue's torch implementation over
    [N, Hout, Wout, O]), or "auto" (see _common.resolve_impl).
    stride / padding / dilation: an int or an (h, w) pair, as F.conv2d (numeric padding only).
    The result has x's memory format (see _common.conv_out_memory_format). `out`, if given, is written
    and returned: shape (N, o, Hout, Wout), out_dtype (default x's dtype), contiguous or channels-last
    (the kernel stores through its strides). block_p / num_warps / num_stages override `_config_for`;
    input_precision applies to fp32 inputs ("tf32" default, "ieee" for exact fp32 products); the
    reference ignores the launch arguments.
    """
    impl = resolve_impl(impl, x.device)
    block, pairs, out_shape = _check_args(x, values, row_ptr, col_idx, o, kh, kw, stride, padding, dilation,
                                          bias, residual, activation, groups, kernel_dtypes=impl == "triton")
    check_input_precision(input_precision)
    _check_indices(x, row_ptr, col_idx, values.shape[0], block, kh, kw, check_indices)
    out_dtype = resolve_out_dtype(x, out_dtype)
    if impl == "reference":
        check_out(out, out_shape, out_dtype, x.device, channels_last_ok=True)
        dtype = acc_dtype(x)
        weight = _unpack_conv(values, row_ptr, col_idx, o, x.shape[1], kh, kw).to(dtype)
        acc = F.conv2d(x.to(dtype), weight, None, *pairs)
        return conv_epilogue_reference(acc, x, bias, residual, activation, out_dtype, out)
    out = conv_output(x, out_shape, out_dtype, out)
    if out.numel() == 0:  # no output pixels or no output channels
        return out
    _launch(x, values, row_ptr, col_idx, bias, residual, activation, out, block, kw, pairs, block_p, num_warps,
            num_stages, input_precision)
    return out


bsr_conv2d_triton = functools.partial(bsr_conv2d_host, impl="triton")
bsr_conv2d_reference = functools.partial(bsr_conv2d_host, impl="reference")


def _launch(x, values, row_ptr, col_idx, bias, residual, activation, out, block, kw, pairs, block_p,
            num_warps, num_stages, input_precision) -> None:
    """The kernel on x [N, C, H, W] into out [N, O, Hout, Wout] (launch arguments: `bsr_conv2d_host`)."""
    (n, c, h, w), (_, o, hout, wout) = x.shape, out.shape
    (stride2, padding2, dilation2), p = pairs, n * hout * wout
    # NHWC for the gather: x is read in place when its channels are unit-stride (channels-last, or a
    # channel slice / crop of a channels-last tensor); anything else is copied to channels-last once.
    xc = x if x.stride(1) == 1 else x.contiguous(memory_format=torch.channels_last)
    bias_arg, res2, stride_rm, stride_rn = epilogue_operands(bias, residual, out)

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


def bsr_conv2d(x: torch.Tensor, w: BSRConvWeight, bias: Optional[torch.Tensor] = None,
               stride: IntPair = 1, padding: IntPair = 0, dilation: IntPair = 1,
               residual: Optional[torch.Tensor] = None, activation: str = "none",
               groups: int = 1, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """y = epilogue(conv2d(x, W)) for a packed weight, through the `sparsify::bsr_conv2d` op."""
    check_groups(groups)
    if x.dim() != 4 or x.shape[1] != w.c:
        raise ValueError(f"x must be [N, C={w.c}, H, W] for this weight (in_channels c={w.c}), "
                         f"got {tuple(x.shape)}")
    stride2, padding2, dilation2 = conv_pairs(stride, padding, dilation)
    return torch.ops.sparsify.bsr_conv2d(x, w.values, w.row_ptr, w.col_idx, w.o, w.kh, w.kw,
                                         list(stride2), list(padding2), list(dilation2),
                                         bias, residual, activation, out_dtype)


# ----------------------------------------------------------------------------------------------
# The spec: what the registry finds; its op is what models call (one opaque node for torch.compile
# and torch.export)
# ----------------------------------------------------------------------------------------------

def _pack(weight: torch.Tensor, pattern, layer: Optional[dict] = None) -> Prepared:
    b = pack_bsr_conv(weight, pattern.block)
    return Prepared({"values": b.values, "row_ptr": b.row_ptr, "col_idx": b.col_idx},
                    {"o": b.o, "kh": b.kh, "kw": b.kw, **conv_layer_static(layer)})


SPEC = KernelSpec(
    name="bsr_conv_triton", op="sparsify::bsr_conv2d",
    schema="(Tensor x, Tensor values, Tensor row_ptr, Tensor col_idx, SymInt o, SymInt kh, SymInt kw, "
           "SymInt[] stride, SymInt[] padding, SymInt[] dilation, Tensor? bias=None, Tensor? residual=None, "
           "str activation='none', ScalarType? out_dtype=None) -> Tensor",
    patterns=(Block,), replaces="conv2d", devices=("cuda",), interpretable=True,
    impl=bsr_conv2d_host, pack=_pack, out_like=conv_out_like, version=KERNEL_VERSION, pack_params=("block",))
