"""N:M structured-sparse conv2d by implicit GEMM: y = epilogue(conv2d(x, W)) with W stored N:M-compressed.

The convolution is the GEMM of bsr_conv2d.py over output pixels,

    out[P, O] = patches[P, Kred] @ Wmat[O, Kred]^T,   P = N * Hout * Wout,  Kred = kh * kw * Cp,

with the same reduction order (kh, kw, C), channels fastest, the same NHWC gather straight from x
(no im2col in memory, zero padding by load masks) and the same output memory format rules. What
changes is W: every row of Wmat is n:m sparse along Kred and stored in nm_linear.py's compressed
format, expanded to a dense tile in registers right before each `tl.dot`, as `_nm_linear_kernel` does.

Channel padding: C is padded per tap to Cp = ceil(C / m) * m (zeros), so an n:m group is m
consecutive channels of one (kh, kw) tap and never straddles two taps; the kernel masks the x
channels past C. The groups of a tap are then its channel groups, the last one partial when
C % m != 0 (keeping min(n, its size), as nm_linear's partial last group). `nm_conv_mask` builds
masks with exactly these groups.

Layout of the packed weight (`pack_nm_conv`, an `NMConvWeight`): `pack_nm(Wmat, n, m)` of
Wmat = weight.permute(0, 2, 3, 1) zero-padded to [O, kh, kw, Cp] and viewed as [O, kh * kw * Cp],
i.e. `values` [O, kh * kw * Cp / m * n] and `meta` uint8 [O, meta_cols(kh * kw * Cp, n, m)] in
nm_linear's layout (see its docstring), so `unpack_nm` and every nm_linear format helper apply.
Group g of a row is channels ((g % (Cp / m)) * m ..) of tap g // (Cp / m), tap = r * kw + s.

Memory format: as bsr_conv2d.py. x is a logical NCHW tensor read as NHWC through its strides (copied
to channels-last once when its channels are not unit-stride); the output has x's memory format; the
residual has the output's logical shape [N, O, Hout, Wout] and is read as [P, O].

groups=1 only (grouped / depthwise convs are handled by channel pruning), rejected by name.

Entry points: `nm_conv_mask` / `nm_conv_weight_matrix` / `pack_nm_conv` / `unpack_nm_conv` (host-side
weight handling), `nm_conv2d_host` with its two implementations `nm_conv2d_triton` (Triton launch) and
`nm_conv2d_reference` (torch), `nm_conv2d` (through the `sparsify::nm_conv2d` custom op, which works
under torch.compile and torch.export), and `SPEC`, the kernel's entry in the registry.
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
                                              check_out, check_tensors, check_tiles, conv_output, describe,
                                              resolve_out_dtype)
from sparsify.codegen.kernels._common import (KERNEL_DTYPES, REFERENCE_DTYPES, SMEM_BUDGET, IntPair, acc_dtype,
                                              cdiv, conv_epilogue_reference, conv_layer_static, conv_out_like,
                                              conv_out_shape, conv_pairs, epilogue_operands, resolve_impl)
# The implicit-GEMM pixel walk is the block-sparse conv's; the weight format is nm_linear's.
from sparsify.codegen.kernels.bsr_conv2d import output_pixels
from sparsify.codegen.kernels.nm_linear import (NMWeight, _check_nm, _unpack, expand_nm_tile, meta_bits,
                                                 meta_cols, nm_mask, num_groups, pack_nm)
from sparsify.codegen.spec import KernelSpec
from sparsify.patterns import NM
from sparsify.state import Prepared

# Part of the cost-cache key: bump when the kernel's code, the layout or launch heuristics change.
KERNEL_VERSION = "nm_conv2d-1"


# ----------------------------------------------------------------------------------------------
# Packing
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, eq=False)
class NMConvWeight:
    """A conv weight [o, c, kh, kw], n:m sparse over (kh, kw, C) groups; see the module docstring.

    eq=False: a generated __eq__ would compare tensors elementwise and raise on `==`.
    """

    values: torch.Tensor  # [o, kh * kw * cp / m * n], the weight's dtype
    meta: torch.Tensor    # uint8 [o, meta_cols(kh * kw * cp, n, m)]
    o: int
    c: int
    kh: int
    kw: int
    n: int
    m: int

    @property
    def cp(self) -> int:
        """Channels per tap after padding to a multiple of m."""
        return padded_channels(self.c, self.m)

    @property
    def k(self) -> int:
        """Length of the GEMM reduction, kh * kw * cp."""
        return self.kh * self.kw * self.cp

    @property
    def matrix(self) -> NMWeight:
        """The same buffers as nm_linear's [o, k] compressed GEMM matrix."""
        return NMWeight(values=self.values, meta=self.meta, n=self.n, m=self.m, k=self.k)

    @property
    def nbytes(self) -> int:
        """Bytes the kernel reads for W: what the cost model compares with the dense o * c * kh * kw."""
        return self.matrix.nbytes


def padded_channels(c: int, m: int) -> int:
    return num_groups(c, m) * m


def nm_conv_weight_matrix(weight: torch.Tensor, m: int) -> torch.Tensor:
    """The GEMM view of a conv weight: [O, C, kh, kw] -> [O, kh * kw * Cp], columns ordered (kh, kw, C)
    with C zero-padded per tap to Cp = ceil(C / m) * m, so n:m groups of m columns stay inside a tap."""
    check_conv_weight(weight, 1)
    o, c, kh, kw = weight.shape
    w = F.pad(weight.permute(0, 2, 3, 1), (0, padded_channels(c, m) - c))     # [O, kh, kw, Cp]
    return w.reshape(o, kh * kw * padded_channels(c, m))


def nm_conv_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Bool [O, C, kh, kw] keeping the n largest |scores| of every m consecutive input channels of each
    (output channel, kh, kw) tap: the groups `pack_nm_conv` stores. A tap's last group, when C % m != 0,
    keeps min(n, its size)."""
    check_conv_weight(scores, 1)
    n, m = _check_nm(n, m)
    o, c, kh, kw = scores.shape
    # One nm_mask row per (o, tap): its partial last group is exactly the per-tap channel padding.
    rows = scores.permute(0, 2, 3, 1).reshape(o * kh * kw, c)
    return nm_mask(rows, n, m).reshape(o, kh, kw, c).permute(0, 3, 1, 2)


def pack_nm_conv(weight: torch.Tensor, n: int, m: int, groups: int = 1) -> NMConvWeight:
    """Compress a dense conv weight [O, C, kh, kw] that is n:m sparse over (kh, kw, C) groups (a NaN counts
    as nonzero). Raises ValueError naming the output channel, tap and channels of the first group with
    more than n nonzeros; prune with `weight * nm_conv_mask(weight, n, m)` first."""
    check_conv_weight(weight, groups)
    n, m = _check_nm(n, m)
    if not weight.dtype.is_floating_point:
        raise TypeError(f"weight must be a floating tensor, got {weight.dtype}")
    o, c, kh, kw = weight.shape
    wmat = nm_conv_weight_matrix(weight.detach(), m)
    # Checked here rather than left to pack_nm so the error speaks in conv coordinates.
    counts = (wmat.reshape(o, kh, kw, num_groups(c, m), m) != 0).sum(-1)
    bad = (counts > n).nonzero()
    if bad.numel():
        oc, r, s, g = (int(v) for v in bad[0])
        raise ValueError(
            f"weight is not {n}:{m} sparse along input channels: output channel {oc}, tap (kh={r}, kw={s}), "
            f"channels {g * m}..{min(c, (g + 1) * m) - 1} have {int(counts[oc, r, s, g])} nonzeros "
            f"({int(bad.shape[0])} groups over the limit in all); prune with nm_conv_mask first")
    packed = pack_nm(wmat, n, m)
    return NMConvWeight(values=packed.values, meta=packed.meta, o=o, c=c, kh=kh, kw=kw, n=n, m=m)


def _unpack_conv(values, meta, o: int, c: int, kh: int, kw: int, n: int, m: int) -> torch.Tensor:
    cp = padded_channels(c, m)
    wmat = _unpack(values, meta, kh * kw * cp, n, m)
    return wmat.reshape(o, kh, kw, cp)[..., :c].permute(0, 3, 1, 2)


def unpack_nm_conv(w: NMConvWeight) -> torch.Tensor:
    """Dense [o, c, kh, kw] weight (contiguous) from its compressed form (tests, debugging, the reference)."""
    return _unpack_conv(w.values, w.meta, w.o, w.c, w.kh, w.kw, w.n, w.m).contiguous()


# ----------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------

@triton.jit
def _nm_conv2d_kernel(
    x_ptr, v_ptr, meta_ptr, bias_ptr, res_ptr, out_ptr,
    P, O, C, H, W, HOUT, WOUT, KW, TAPS, GROUPS_PER_TAP,
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_vo, stride_metao,
    stride_on, stride_oc, stride_oh, stride_ow,
    stride_rm, stride_rn,
    STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
    KEEP: tl.constexpr, GROUP: tl.constexpr, BITS: tl.constexpr, ONE_BYTE: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr, EVEN_C: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """One [BLOCK_P, BLOCK_O] tile of out = epilogue(conv2d(x, W)): output pixels of tile program_id(0),
    output channels of tile program_id(1); W in KEEP:GROUP (n:m) compressed form.

    x_ptr: [N, C, H, W] with strides (stride_xn, stride_xc, stride_xh, stride_xw); the host passes
    unit-stride channels, so a patch row is one contiguous run of BLOCK_C channels.
    v_ptr: [O, TAPS * GROUPS_PER_TAP * KEEP], strides (stride_vo, 1). meta_ptr: uint8 [O, meta bytes],
    strides (stride_metao, 1), BITS bits per index (nm_linear's layout over the (kh, kw, Cp) row).
    GROUPS_PER_TAP = Cp / GROUP. bias_ptr: [O] (read iff HAS_BIAS). res_ptr: [P, O] with strides
    (stride_rm, stride_rn) (read iff HAS_RESIDUAL). out_ptr: [N, O, HOUT, WOUT] with strides
    (stride_on, stride_oc, stride_oh, stride_ow).
    ONE_BYTE: a group's KEEP indices share one metadata byte, so one load per group serves them all.
    EVEN_C: C % BLOCK_C == 0, so no x load needs a channel mask.
    UPCAST_DOT: feed tl.dot float32 operands; only for bfloat16 under TRITON_INTERPRET=1 (see
    nm_linear.py, triton-lang/triton#11584). Exact, as a bf16 x bf16 product fits in float32.
    """
    pid_p = tl.program_id(0)
    pid_o = tl.program_id(1)

    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_cb = tl.arange(0, BLOCK_C)
    mask_o = offs_o < O
    n, oh, ow, ih0, iw0 = output_pixels(offs_p, P, HOUT, WOUT, STRIDE_H, STRIDE_W, PAD_H, PAD_W)
    # int64 before the strides: N * C * H * W can exceed 2^31. Negative for pixels whose tap (0, 0)
    # falls in the padding; such addresses are only formed, never loaded (masked below).
    x_pix = x_ptr + (n.to(tl.int64) * stride_xn + ih0.to(tl.int64) * stride_xh
                     + iw0.to(tl.int64) * stride_xw)
    v_rows = v_ptr + offs_o.to(tl.int64)[:, None] * stride_vo
    meta_rows = meta_ptr + offs_o.to(tl.int64)[:, None] * stride_metao

    acc = tl.zeros((BLOCK_P, BLOCK_O), dtype=tl.float32)
    for tap in range(TAPS):
        r = tap // KW
        s = tap - r * KW
        ih = ih0 + r * DIL_H
        iw = iw0 + s * DIL_W
        inside = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)          # [BLOCK_P]: zero padding
        x_tap = x_pix + ((r * DIL_H).to(tl.int64) * stride_xh + (s * DIL_W).to(tl.int64) * stride_xw)
        first_group = tap * GROUPS_PER_TAP
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + offs_cb
            in_c = offs_c < C
            if EVEN_C:
                x_mask = inside[:, None]
            else:
                # The x memory past C is the next pixel's (or not ours): mask it, do not rely on the
                # zero weights of the channel padding.
                x_mask = inside[:, None] & in_c[None, :]
            x_tile = tl.load(x_tap[:, None] + offs_c[None, :] * stride_xc, mask=x_mask, other=0.0)

            # The dense [BLOCK_O, BLOCK_C] W tile: channel c of this tap is position c % GROUP of group
            # first_group + c // GROUP. Channels past C are masked (the last tap's would read past
            # the row; the others' are zero padding anyway).
            w_tile = expand_nm_tile(v_rows, meta_rows, first_group + offs_c // GROUP, offs_c % GROUP,
                                    mask_o[:, None] & in_c[None, :],
                                    tl.zeros((BLOCK_O, BLOCK_C), dtype=x_ptr.dtype.element_ty),
                                    KEEP, BITS, ONE_BYTE)

            if UPCAST_DOT:
                x_tile = x_tile.to(tl.float32)
                w_tile = w_tile.to(tl.float32)
            acc = tl.dot(x_tile, tl.trans(w_tile), acc, input_precision=INPUT_PRECISION)

    offs_p64 = offs_p.to(tl.int64)
    acc = apply_epilogue(acc, offs_p64, offs_o, P, O, bias_ptr, res_ptr, stride_rm, stride_rn,
                         HAS_BIAS, ACTIVATION, HAS_RESIDUAL)
    out_pix = n.to(tl.int64) * stride_on + oh.to(tl.int64) * stride_oh + ow.to(tl.int64) * stride_ow
    out_ptrs = out_ptr + out_pix[:, None] + offs_o[None, :].to(tl.int64) * stride_oc
    mask = (offs_p[:, None] < P) & mask_o[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _config_for(P: int, O: int, C: int, dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """(BLOCK_P, BLOCK_O, BLOCK_C, num_warps, num_stages) for a launch. A hand heuristic, not tuned on a
    GPU yet: each tile side follows its extent so a tiny feature map or a narrow layer does not pay for
    a wide tile (16 is tl.dot's minimum); BLOCK_C stays <= 64 because the W expansion is per column;
    warps grow with the tile; 3 stages where three buffers of (patch tile + W tile) fit the budget.
    """
    block_p = 16 if P <= 16 else 32 if P <= 32 else 64 if P <= 64 else 128
    block_o = 16 if O <= 16 else 32 if O <= 32 else 64
    block_c = 16 if C <= 16 else 32 if C <= 32 else 64
    tile = block_p * block_o
    num_warps = 2 if tile <= 512 else 4 if tile <= 8192 else 8
    elsize = dtype.itemsize
    per_stage = (block_p + block_o) * block_c * elsize
    num_stages = 3 if 3 * per_stage <= SMEM_BUDGET else 1
    return block_p, block_o, block_c, num_warps, num_stages


# ----------------------------------------------------------------------------------------------
# Host function: checks, then the kernel or the reference
# ----------------------------------------------------------------------------------------------

def _check_args(x, values, meta, o, c, kh, kw, n, m, stride, padding, dilation, bias, residual,
                activation, groups, out_dtype, kernel_dtypes: bool):
    """Argument checks of both implementations.

    Returns ((stride, padding, dilation) as pairs, output shape, out_dtype)."""
    check_groups(groups)
    check_tensors(x=x, values=values, meta=meta)
    check_conv_input(x, o=o, c=c, kh=kh, kw=kw)
    n, m = _check_nm(n, m)
    pairs = conv_pairs(stride, padding, dilation)
    check_input_dtypes(x, values, KERNEL_DTYPES if kernel_dtypes else REFERENCE_DTYPES)
    if meta.dtype != torch.uint8:
        raise TypeError(f"meta must be uint8, got {meta.dtype}")
    if x.shape[1] != c:
        raise ValueError(f"x has C={x.shape[1]} channels but the weight was packed for c={c} "
                         f"(x must be [N, {c}, H, W]), got {tuple(x.shape)}")
    k = kh * kw * padded_channels(c, m)
    want_values = (o, num_groups(k, m) * n)
    if tuple(values.shape) != want_values:
        raise ValueError(f"values must be [o, kh*kw*Cp/m*n] = {want_values} for o={o}, c={c}, {kh}x{kw}, "
                         f"{n}:{m}, got {tuple(values.shape)}")
    want_meta = (o, meta_cols(k, n, m))
    if tuple(meta.shape) != want_meta:
        raise ValueError(f"meta must be {want_meta} for o={o}, c={c}, {kh}x{kw}, {n}:{m}, "
                         f"got {tuple(meta.shape)}")
    check_devices(x, values=values, meta=meta)
    out_shape = conv_out_shape(x, o, kh, kw, pairs)
    check_epilogue(x, o, out_shape, "the output's: N, O, Hout, Wout", bias, residual, activation)
    return pairs, out_shape, resolve_out_dtype(x, out_dtype)


def nm_conv2d_host(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, o: int, c: int, kh: int,
                   kw: int, n: int, m: int, stride: IntPair = 1, padding: IntPair = 0,
                   dilation: IntPair = 1, bias: Optional[torch.Tensor] = None,
                   residual: Optional[torch.Tensor] = None, activation: str = "none",
                   out_dtype: Optional[torch.dtype] = None, out: Optional[torch.Tensor] = None, *,
                   impl: str = "auto", groups: int = 1, block_p: Optional[int] = None,
                   block_o: Optional[int] = None, block_c: Optional[int] = None, num_warps: Optional[int] = None,
                   num_stages: Optional[int] = None, input_precision: str = "tf32") -> torch.Tensor:
    """y[N, o, Hout, Wout] = epilogue(conv2d(x[N, c, H, W], W)) with W [o, c, kh, kw] n:m-compressed
    (`pack_nm_conv`: values, meta).

    impl: "triton" (launch the kernel), "reference" (unpack W, F.conv2d in float32, float64 for
    float64 inputs: the tests' ground truth, then the shared epilogue's torch implementation over
    [N, Hout, Wout, O]), or "auto" (see _common.resolve_impl).
    stride / padding / dilation: an int or an (h, w) pair, as F.conv2d (numeric padding only).
    The result has x's memory format (see _common.conv_out_memory_format) and out_dtype (default
    x.dtype; accumulation is float32, cast at the store). `out`, if given, is written and returned:
    shape (N, o, Hout, Wout), out_dtype, contiguous or channels-last. block_p / block_o / block_c /
    num_warps / num_stages override `_config_for` (tiles: powers of two >= 16); input_precision
    applies to fp32 inputs ("tf32" default, "ieee" for exact fp32 products); the reference ignores
    the launch arguments.
    """
    impl = resolve_impl(impl, x.device)
    pairs, out_shape, out_dtype = _check_args(
        x, values, meta, o, c, kh, kw, n, m, stride, padding, dilation, bias, residual, activation, groups,
        out_dtype, kernel_dtypes=impl == "triton")
    check_input_precision(input_precision)
    if impl == "reference":
        check_out(out, out_shape, out_dtype, x.device, channels_last_ok=True)
        return _reference(x, values, meta, o, c, kh, kw, n, m, pairs, out_shape, bias, residual, activation,
                          out_dtype, out)
    cfg = _config_for(out_shape[0] * out_shape[2] * out_shape[3], o, c, x.dtype)
    tiles = block_p or cfg[0], block_o or cfg[1], block_c or cfg[2]
    check_tiles(block_p=tiles[0], block_o=tiles[1], block_c=tiles[2])
    out = conv_output(x, out_shape, out_dtype, out)
    if out.numel() == 0:  # no output pixels or no output channels
        return out
    if c == 0:  # an empty reduction: the epilogue of zeros, no kernel needed
        return _reference(x, values, meta, o, c, kh, kw, n, m, pairs, out_shape, bias, residual, activation,
                          out_dtype, out)
    _launch(x, values, meta, kh, kw, n, m, bias, residual, activation, out, pairs, tiles, num_warps or cfg[3],
            num_stages or cfg[4], input_precision)
    return out


nm_conv2d_triton = functools.partial(nm_conv2d_host, impl="triton")
nm_conv2d_reference = functools.partial(nm_conv2d_host, impl="reference")


def _reference(x, values, meta, o, c, kh, kw, n, m, pairs, out_shape, bias, residual, activation, out_dtype,
               out):
    dtype = acc_dtype(x)
    if c == 0:  # an empty reduction; F.conv2d would also drop the output channels
        acc = torch.zeros(out_shape, dtype=dtype, device=x.device)
    else:
        weight = _unpack_conv(values, meta, o, c, kh, kw, n, m).to(dtype)
        acc = F.conv2d(x.to(dtype), weight, None, *pairs)
    return conv_epilogue_reference(acc, x, bias, residual, activation, out_dtype, out)


def _launch(x, values, meta, kh, kw, n, m, bias, residual, activation, out, pairs, tiles, num_warps,
            num_stages, input_precision) -> None:
    """The kernel on x [N, C, H, W] into out [N, O, Hout, Wout] (launch arguments: `nm_conv2d_host`;
    tiles: (block_p, block_o, block_c), checked)."""
    (batch, c, h, w), (_, o, hout, wout) = x.shape, out.shape
    (stride2, padding2, dilation2), (bp, bo, bc), p = pairs, tiles, batch * hout * wout
    # NHWC for the gather: x is read in place when its channels are unit-stride (channels-last, or a
    # channel slice / crop of a channels-last tensor); anything else is copied to channels-last once.
    xc = x if x.stride(1) == 1 else x.contiguous(memory_format=torch.channels_last)
    values = values.contiguous()
    meta = meta.contiguous()
    bias_arg, res2, stride_rm, stride_rn = epilogue_operands(bias, residual, out)

    bits = meta_bits(m)
    grid = (cdiv(p, bp), cdiv(o, bo))
    upcast = x.dtype == torch.bfloat16 and runtime.interpreter_on()
    _nm_conv2d_kernel[grid](
        xc, values, meta, bias_arg, res2, out,
        p, o, c, h, w, hout, wout, kw, kh * kw, padded_channels(c, m) // m,
        *xc.stride(), values.stride(0), meta.stride(0), *out.stride(), stride_rm, stride_rn,
        stride2[0], stride2[1], padding2[0], padding2[1], dilation2[0], dilation2[1],
        KEEP=n, GROUP=m, BITS=bits, ONE_BYTE=(8 % (n * bits) == 0),
        BLOCK_P=bp, BLOCK_O=bo, BLOCK_C=bc, EVEN_C=(c % bc == 0),
        HAS_BIAS=bias is not None, ACTIVATION=ACTIVATIONS.index(activation),
        HAS_RESIDUAL=residual is not None,
        INPUT_PRECISION="ieee" if upcast else input_precision, UPCAST_DOT=upcast,
        num_warps=num_warps, num_stages=num_stages,
    )


def nm_conv2d(x: torch.Tensor, w: NMConvWeight, bias: Optional[torch.Tensor] = None,
              stride: IntPair = 1, padding: IntPair = 0, dilation: IntPair = 1,
              residual: Optional[torch.Tensor] = None, activation: str = "none",
              groups: int = 1, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """y = epilogue(conv2d(x, W)) for a packed weight, through the `sparsify::nm_conv2d` op."""
    check_groups(groups)
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != w.c:
        raise ValueError(f"x must be [N, C={w.c}, H, W] for this weight (in_channels c={w.c}), "
                         f"got {describe(x)}")
    stride2, padding2, dilation2 = conv_pairs(stride, padding, dilation)
    return torch.ops.sparsify.nm_conv2d(x, w.values, w.meta, w.o, w.c, w.kh, w.kw, w.n, w.m,
                                        list(stride2), list(padding2), list(dilation2),
                                        bias, residual, activation, out_dtype)


# ----------------------------------------------------------------------------------------------
# The spec: what the registry finds; its op is what models call (one opaque node for torch.compile
# and torch.export)
# ----------------------------------------------------------------------------------------------

def _pack(weight: torch.Tensor, pattern, layer: Optional[dict] = None) -> Prepared:
    b = pack_nm_conv(weight, pattern.n, pattern.m)
    return Prepared({"values": b.values, "meta": b.meta},
                    {"o": b.o, "c": b.c, "kh": b.kh, "kw": b.kw, "n": pattern.n, "m": pattern.m,
                     **conv_layer_static(layer)})


SPEC = KernelSpec(
    name="nm_conv_triton", op="sparsify::nm_conv2d",
    schema="(Tensor x, Tensor values, Tensor meta, SymInt o, SymInt c, SymInt kh, SymInt kw, SymInt n, SymInt m, "
           "SymInt[] stride, SymInt[] padding, SymInt[] dilation, Tensor? bias=None, Tensor? residual=None, "
           "str activation='none', ScalarType? out_dtype=None) -> Tensor",
    patterns=(NM,), replaces="conv2d", devices=("cuda",), interpretable=True,
    impl=nm_conv2d_host, pack=_pack, out_like=conv_out_like, version=KERNEL_VERSION, pack_params=("n", "m"))
