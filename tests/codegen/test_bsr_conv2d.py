"""Block-sparse conv2d (implicit GEMM): Triton (interpreter on CPU) against float64 torch conv2d."""
import dataclasses
import zlib

import pytest
import torch
import triton

from kernel_utils import DTYPES, TOLERANCE, conv_f64, poison, randn, rel_l2
from sparsify.codegen import runtime
from sparsify.codegen.epilogue import ACTIVATIONS, activation_reference
from sparsify.codegen.kernels.bsr_conv2d import (
    KERNEL_VERSION, BSRConvWeight, _config_for, bsr_conv2d, bsr_conv2d_reference, bsr_conv2d_triton,
    conv_weight_matrix, pack_bsr_conv, unpack_bsr_conv,
)
from sparsify.codegen.kernels.bsr_linear import block_mask_from_scores

N, H, W = 2, 7, 9      # odd spatial sizes: every tile has ragged pixel edges
CL = torch.channels_last


@pytest.fixture
def gen(request):
    """A generator per test, seeded from its id: fresh inputs per test, reproducible on rerun."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def make_weight(o, c, kh, kw, block, density, gen, dtype, device, empty_row=None):
    """Random [o, c, kh, kw] weight whose nonzero blocks (over the (kh, kw, C) GEMM view) follow a random
    block mask of the given density. empty_row: a block-row (output-channel block) left with no block."""
    nbr = triton.cdiv(o, block)
    scores = conv_weight_matrix(torch.rand(o, c, kh, kw, generator=gen), block)
    mask = block_mask_from_scores(scores, block, density)
    if empty_row is not None:
        mask[empty_row] = False
        if not mask.any():                       # keep some work for the kernel to do
            mask[(empty_row + 1) % nbr, 0] = True
    cp = triton.cdiv(c, block) * block
    dense_mask = mask.repeat_interleave(block, 0).repeat_interleave(block, 1)[:o]     # [o, kh*kw*cp]
    dense_mask = dense_mask.reshape(o, kh, kw, cp)[..., :c].permute(0, 3, 1, 2)
    w = randn(o, c, kh, kw, generator=gen) / (c * kh * kw) ** 0.5 * dense_mask
    return w.to(device=device, dtype=dtype), mask



def run_and_check(x, bsr, stride=1, padding=0, dilation=1, bias=None, residual=None, activation="none",
                  out_format=None, **launch):
    """Launch into a NaN-poisoned buffer (x's memory format unless out_format) and compare with the
    float64 conv2d of the unpacked weight."""
    ref = conv_f64(x, unpack_bsr_conv(bsr), bias, stride, padding, dilation, residual, activation)
    fmt = out_format or (CL if x.is_contiguous(memory_format=CL) and not x.is_contiguous()
                         else torch.contiguous_format)
    out = poison(torch.empty(ref.shape, dtype=x.dtype, device=x.device, memory_format=fmt))
    with runtime.force_triton():
        got = bsr_conv2d_triton(x, bsr.values, bsr.row_ptr, bsr.col_idx, bsr.o, bsr.kh, bsr.kw, stride,
                                padding, dilation, bias, residual, activation, out=out, **launch)
    assert got is out
    err = rel_l2(got, ref)
    assert err <= TOLERANCE[x.dtype], f"rel_l2 {err:.3g} > {TOLERANCE[x.dtype]} for {x.dtype}"
    return got, ref


def make_x(c, gen, dtype, device, channels_last=False, n=N, h=H, w=W):
    x = randn(n, c, h, w, dtype=dtype, device=device, generator=gen)
    return x.contiguous(memory_format=CL) if channels_last else x


# ------------------------------------------------------------------------------------------------
# Numerics
# ------------------------------------------------------------------------------------------------

# (C, O, (kh, kw), stride, padding, dilation, density, channels_last input)
GEOMETRIES = [
    (16, 16, (1, 1), 1, 0, 1, 1.0, False),
    (32, 48, (3, 3), 1, 1, 1, 0.5, True),
    (16, 48, (3, 3), 2, 1, 1, 0.3, False),
    (32, 16, (3, 3), 2, 0, 1, 0.7, True),
    (16, 48, (3, 3), 1, 2, 2, 0.5, False),     # dilation 2
    (32, 48, (1, 1), 2, 0, 1, 0.5, True),      # strided 1x1: a ResNet downsample shortcut
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("geom", GEOMETRIES, ids=lambda g: "C{}-O{}-k{}x{}-s{}-p{}-d{}-dens{}-{}".format(
    g[0], g[1], *g[2], *g[3:7], "cl" if g[7] else "nchw"))
def test_geometries(geom, dtype, gen, device):
    c, o, (kh, kw), stride, padding, dilation, density, channels_last = geom
    nbr = triton.cdiv(o, 16)
    w, _ = make_weight(o, c, kh, kw, 16, density, gen, dtype, device, empty_row=1 if nbr > 1 else None)
    bsr = pack_bsr_conv(w, 16)
    x = make_x(c, gen, dtype, device, channels_last)
    got, ref = run_and_check(x, bsr, stride, padding, dilation)
    assert got.shape == ref.shape
    assert got.is_contiguous(memory_format=CL if channels_last else torch.contiguous_format)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("density", [0.1, 0.4, 1.0])
def test_densities(density, dtype, gen, device):
    c, o, block = 32, 48, 16
    w, mask = make_weight(o, c, 3, 3, block, density, gen, dtype, device, empty_row=1)
    bsr = pack_bsr_conv(w, block)
    assert bsr.density == pytest.approx(mask.float().mean().item())
    assert int(bsr.row_ptr[2] - bsr.row_ptr[1]) == 0
    x = make_x(c, gen, dtype, device, channels_last=True)
    run_and_check(x, bsr, 1, 1, 1)


EPILOGUES = ([dict(bias=True)]
             + [dict(bias=True, activation=a) for a in ACTIVATIONS if a != "none"]
             + [dict(activation="relu"), dict(residual=True),
                dict(bias=True, activation="relu", residual=True)])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("epi", EPILOGUES, ids=lambda e: "+".join(f"{k}={v}" for k, v in e.items()))
def test_epilogues(epi, dtype, gen, device):
    c, o = 16, 48
    w, _ = make_weight(o, c, 3, 3, 16, 0.5, gen, dtype, device, empty_row=0)
    bsr = pack_bsr_conv(w, 16)
    x = make_x(c, gen, dtype, device, channels_last=True)
    bias = randn(o, dtype=dtype, device=device, generator=gen) if epi.get("bias") else None
    residual = None
    if epi.get("residual"):
        residual = randn(N, o, 4, 5, dtype=dtype, device=device, generator=gen).contiguous(memory_format=CL)
    run_and_check(x, bsr, 2, 1, 1, bias, residual, epi.get("activation", "none"))


@pytest.mark.parametrize("x_cl", [False, True], ids=["x_nchw", "x_cl"])
@pytest.mark.parametrize("res_layout", ["nchw", "cl", "strided"])
def test_residual_layouts(res_layout, x_cl, gen, device):
    """The residual has the output's logical shape in any layout; the kernel reads it as [P, O]."""
    c, o = 32, 48
    w, _ = make_weight(o, c, 3, 3, 16, 0.5, gen, torch.float32, device)
    bsr = pack_bsr_conv(w, 16)
    x = make_x(c, gen, torch.float32, device, x_cl)
    residual = randn(N, o, H, W, device=device, generator=gen)
    if res_layout == "cl":
        residual = residual.contiguous(memory_format=CL)
    elif res_layout == "strided":
        residual = randn(N, o, H, 2 * W, device=device, generator=gen)[..., ::2]
    bias = randn(o, device=device, generator=gen)
    run_and_check(x, bsr, 1, 1, 1, bias, residual, "silu")


def test_empty_block_row_is_epilogue_of_zero(gen, device):
    """A block-row with no stored block runs zero loop iterations: its channels are epilogue(0)."""
    c, o, block = 16, 48, 16
    w, _ = make_weight(o, c, 3, 3, block, 1.0, gen, torch.float32, device, empty_row=1)
    bsr = pack_bsr_conv(w, block)
    assert int(bsr.row_ptr[2] - bsr.row_ptr[1]) == 0
    x = make_x(c, gen, torch.float32, device)
    bias = randn(o, device=device, generator=gen)
    residual = randn(N, o, H, W, device=device, generator=gen)
    got, _ = run_and_check(x, bsr, 1, 1, 1, bias, residual, "gelu")
    chans = slice(block, 2 * block)
    expected = activation_reference(bias[chans], "gelu")[None, :, None, None] + residual[:, chans]
    torch.testing.assert_close(got[:, chans], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_all_zero_weight(dtype, gen, device):
    bsr = pack_bsr_conv(torch.zeros(48, 16, 3, 3, dtype=dtype, device=device), 16)
    assert bsr.nnzb == 0 and bsr.density == 0.0
    x = make_x(16, gen, dtype, device)
    bias = randn(48, dtype=dtype, device=device, generator=gen)
    run_and_check(x, bsr, 1, 1, 1, bias=bias, activation="relu")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("c,o", [(20, 40), (8, 24)], ids=["C20-O40", "C8-O24"])
def test_channels_off_block(c, o, dtype, gen, device):
    """C and O not multiples of the block: C is padded per tap and masked, O masked at the store."""
    w, _ = make_weight(o, c, 3, 3, 16, 0.6, gen, dtype, device)
    bsr = pack_bsr_conv(w, 16)
    assert bsr.n_block_cols == 9 * triton.cdiv(c, 16)
    x = make_x(c, gen, dtype, device, channels_last=(c == 20))
    bias = randn(o, dtype=dtype, device=device, generator=gen)
    run_and_check(x, bsr, 1, 1, 1, bias=bias, activation="relu")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_channel_slice_read_in_place(dtype, gen, device):
    """x = the first 20 channels of a channels-last tensor whose other channels are NaN: read in place
    (unit channel stride), so the kernel must mask the channels past C, not rely on zero weights."""
    c, o = 20, 32
    w, _ = make_weight(o, c, 3, 3, 16, 1.0, gen, dtype, device)
    bsr = pack_bsr_conv(w, 16)
    big = poison(torch.empty(N, 32, H, W, dtype=dtype, device=device, memory_format=CL))
    big[:, :c] = make_x(c, gen, dtype, device)
    x = big[:, :c]
    assert x.stride(1) == 1 and not x.is_contiguous(memory_format=CL)
    got, _ = run_and_check(x, bsr, 1, 1, 1)
    assert got.is_contiguous()
    cropped = make_x(32, gen, dtype, device, channels_last=True, h=H + 2)[:, :, 1:-1]   # spatial crop
    run_and_check(cropped, pack_bsr_conv(make_weight(o, 32, 3, 3, 16, 0.5, gen, dtype, device)[0], 16),
                  2, 1, 1)


def test_rectangular_kernel_and_asymmetric_params(gen, device):
    c, o = 32, 32
    w, _ = make_weight(o, c, 3, 1, 16, 0.7, gen, torch.float16, device)
    bsr = pack_bsr_conv(w, 16)
    x = make_x(c, gen, torch.float16, device, channels_last=True, h=9, w=7)
    run_and_check(x, bsr, (2, 1), (1, 0), (1, 2))
    w2, _ = make_weight(o, c, 1, 3, 16, 0.7, gen, torch.float32, device)
    run_and_check(make_x(c, gen, torch.float32, device), pack_bsr_conv(w2, 16), [1, 2], [0, 1], [2, 1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_block_32(dtype, gen, device):
    c, o = 32, 48                       # O is off the 32-block
    w, _ = make_weight(o, c, 3, 3, 32, 0.6, gen, dtype, device)
    bsr = pack_bsr_conv(w, 32)
    x = make_x(c, gen, dtype, device, channels_last=True)
    bias = randn(o, dtype=dtype, device=device, generator=gen)
    run_and_check(x, bsr, 2, 1, 1, bias=bias, activation="silu")


def test_memory_formats_and_out(gen, device):
    """NCHW in -> NCHW out, channels-last in -> channels-last out; `out` may be either layout; a
    non-contiguous x is read correctly."""
    c, o = 16, 32
    w, _ = make_weight(o, c, 3, 3, 16, 0.5, gen, torch.float32, device)
    bsr = pack_bsr_conv(w, 16)
    x = make_x(c, gen, torch.float32, device)
    args = (bsr.values, bsr.row_ptr, bsr.col_idx, o, 3, 3, 1, 1, 1)
    with runtime.force_triton():
        y = bsr_conv2d_triton(x, *args)
        y_cl = bsr_conv2d_triton(x.contiguous(memory_format=CL), *args)
    assert y.is_contiguous() and y_cl.is_contiguous(memory_format=CL) and not y_cl.is_contiguous()
    torch.testing.assert_close(y, y_cl)
    run_and_check(x, bsr, 1, 1, 1, out_format=CL)
    run_and_check(x.contiguous(memory_format=CL), bsr, 1, 1, 1, out_format=torch.contiguous_format)
    x_strided = randn(N, c, H, 2 * W, device=device, generator=gen)[..., 1::2]
    run_and_check(x_strided, bsr, 1, 1, 1)


def test_launch_overrides_and_ieee(gen, device):
    c, o = 32, 48
    w, _ = make_weight(o, c, 3, 3, 16, 0.5, gen, torch.float32, device)
    bsr = pack_bsr_conv(w, 16)
    x = make_x(c, gen, torch.float32, device, channels_last=True)
    run_and_check(x, bsr, 1, 1, 1, block_p=32, num_warps=2, num_stages=2, input_precision="ieee")


def test_empty_batch(gen, device):
    w, _ = make_weight(32, 16, 3, 3, 16, 1.0, gen, torch.float32, device)
    bsr = pack_bsr_conv(w, 16)
    x = torch.empty(0, 16, H, W, device=device)
    with runtime.force_triton():
        y = bsr_conv2d_triton(x, bsr.values, bsr.row_ptr, bsr.col_idx, 32, 3, 3, 1, 1)
        assert y.shape == (0, 32, H, W)
        assert bsr_conv2d(x, bsr, stride=2).shape == (0, 32, 3, 4)


def test_reference_matches_conv2d(gen, device):
    """bsr_conv2d_reference (fp64 in, fp64 out) is torch conv2d + the epilogue, in x's memory format."""
    c, o = 20, 40
    w, _ = make_weight(o, c, 3, 3, 16, 0.5, gen, torch.float64, device)
    bsr = pack_bsr_conv(w, 16)
    x = make_x(c, gen, torch.float64, device, channels_last=True)
    bias = randn(o, dtype=torch.float64, device=device, generator=gen)
    residual = randn(N, o, 4, 5, dtype=torch.float64, device=device, generator=gen)
    got = bsr_conv2d_reference(x, bsr.values, bsr.row_ptr, bsr.col_idx, o, 3, 3, 2, 1, 1, bias, residual,
                               "gelu")
    assert got.is_contiguous(memory_format=CL)
    torch.testing.assert_close(got, conv_f64(x, w, bias, 2, 1, 1, residual, "gelu"))
    out = poison(torch.empty(N, o, 4, 5, dtype=torch.float64, device=device))
    assert bsr_conv2d_reference(x, bsr.values, bsr.row_ptr, bsr.col_idx, o, 3, 3, 2, 1, 1, bias,
                                residual, "gelu", out=out) is out
    torch.testing.assert_close(out, got)


def test_config_for():
    assert [_config_for(p, 16, torch.float16)[0] for p in (1, 16, 17, 32, 33, 64, 65, 4096)] == \
        [16, 16, 32, 32, 64, 64, 128, 128]
    for p in (1, 100, 4096):
        for block in (16, 32, 64, 128):
            for dtype in DTYPES:
                _, warps, stages = _config_for(p, block, dtype)
                assert warps in (2, 4, 8) and stages in (1, 3)


# ------------------------------------------------------------------------------------------------
# Packing
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES + (torch.float64,), ids=str)
@pytest.mark.parametrize("shape", [(48, 32, 3, 3, 16), (40, 20, 3, 1, 16), (48, 16, 1, 1, 32)],
                         ids=lambda s: "O{}-C{}-k{}x{}-b{}".format(*s))
def test_pack_unpack_round_trip(shape, dtype, gen):
    o, c, kh, kw, block = shape
    w, mask = make_weight(o, c, kh, kw, block, 0.5, gen, dtype, "cpu", empty_row=0)
    bsr = pack_bsr_conv(w, block)
    assert torch.equal(unpack_bsr_conv(bsr), w)
    assert bsr.values.dtype == dtype and bsr.values.shape[1:] == (block, block)
    assert bsr.values.is_contiguous()
    assert bsr.row_ptr.dtype == torch.int32 and bsr.col_idx.dtype == torch.int32
    assert bsr.row_ptr.shape == (triton.cdiv(o, block) + 1,)
    assert (bsr.o, bsr.c, bsr.kh, bsr.kw, bsr.block) == (o, c, kh, kw, block)
    assert bsr.n_block_cols == kh * kw * triton.cdiv(c, block) == mask.shape[1]
    assert bsr.nnzb == int(mask.sum()) == bsr.col_idx.shape[0]
    assert bsr.density == pytest.approx(mask.float().mean().item())
    for r in range(mask.shape[0]):
        cols = bsr.col_idx[bsr.row_ptr[r]:bsr.row_ptr[r + 1]].tolist()
        assert cols == mask[r].nonzero().flatten().tolist()


def test_pack_block_column_order():
    """Block-column = tap * (Cp / block) + channel block, tap = r * kw + s; values are [o_local, c_local]."""
    w = torch.zeros(32, 40, 3, 3)        # Cp = 48: 3 channel blocks per tap
    w[3, 17, 1, 2] = 1.5                 # block-row 0, tap 5, channel block 1 -> col 16
    w[20, 39, 2, 0] = -2.0               # block-row 1, tap 6, channel block 2 -> col 20
    w[31, 0, 0, 0] = float("nan")        # block-row 1, tap 0, channel block 0 -> col 0 (NaN is kept)
    bsr = pack_bsr_conv(w, 16)
    assert bsr.row_ptr.tolist() == [0, 1, 3] and bsr.col_idx.tolist() == [16, 0, 20]
    assert bsr.values[0, 3, 1] == 1.5 and bsr.values[2, 4, 7] == -2.0
    assert torch.isnan(bsr.values[1, 15, 0])
    assert bsr.density == pytest.approx(3 / (2 * 27))
    assert isinstance(bsr, BSRConvWeight)
    with pytest.raises(dataclasses.FrozenInstanceError):
        bsr.o = 3


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------

def _small(gen, dtype=torch.float32, c=32):
    w, _ = make_weight(32, c, 3, 3, 16, 1.0, gen, dtype, "cpu")
    return pack_bsr_conv(w, 16)


def test_groups_rejected(gen):
    with pytest.raises(ValueError, match="groups"):
        pack_bsr_conv(torch.randn(32, 16, 3, 3), 16, groups=2)
    bsr = _small(gen)
    x = make_x(32, gen, torch.float32, "cpu")
    with pytest.raises(ValueError, match="groups"):
        bsr_conv2d(x, bsr, groups=32)
    for fn in (bsr_conv2d_triton, bsr_conv2d_reference):
        with pytest.raises(ValueError, match="groups=2"):
            fn(x, bsr.values, bsr.row_ptr, bsr.col_idx, 32, 3, 3, groups=2)


@pytest.mark.parametrize("block", [0, 24, 256, 8, True])
def test_bad_block(block):
    with pytest.raises(ValueError, match=rf"^block must be .* got {block!r}$"):
        pack_bsr_conv(torch.randn(32, 32, 3, 3), block)


def test_bad_weight_rank():
    for bad in (torch.randn(32, 32), torch.randn(2, 32, 32, 3, 3), "w"):
        with pytest.raises(ValueError, match=r"weight must be a 4-D \[O, C, kh, kw\]"):
            pack_bsr_conv(bad, 16)


def test_channel_mismatch(gen):
    bsr = _small(gen)                       # C = 32: 2 channel blocks per tap
    x = make_x(16, gen, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"C=32"):
        bsr_conv2d(x, bsr)
    for fn in (bsr_conv2d_triton, bsr_conv2d_reference):
        with pytest.raises(ValueError, match=r"x has C=16 channels"):
            fn(x, bsr.values, bsr.row_ptr, bsr.col_idx, 32, 3, 3)
    with pytest.raises(ValueError, match=r"x must be a 4-D"):
        bsr_conv2d_triton(x[0], bsr.values, bsr.row_ptr, bsr.col_idx, 32, 3, 3)


def test_mismatched_dtype(gen):
    bsr = _small(gen)
    x = make_x(32, gen, torch.float16, "cpu")
    args = (bsr.values, bsr.row_ptr, bsr.col_idx, 32, 3, 3)
    with pytest.raises(TypeError, match="values dtype torch.float32 does not match x dtype torch.float16"):
        bsr_conv2d_triton(x, *args)
    with pytest.raises(TypeError, match="x dtype"):
        bsr_conv2d_triton(x.double(), bsr.values.double(), *args[1:])
    with pytest.raises(TypeError, match="col_idx"):
        bsr_conv2d_triton(x.float(), bsr.values, bsr.row_ptr, bsr.col_idx.long(), 32, 3, 3)


def test_mismatched_device(gen):
    bsr = _small(gen)
    x = make_x(32, gen, torch.float32, "cpu")
    with pytest.raises(ValueError, match="values is on meta but x is on cpu"):
        bsr_conv2d_triton(x, bsr.values.to("meta"), bsr.row_ptr, bsr.col_idx, 32, 3, 3)
    with pytest.raises(ValueError, match="bias is on meta"):
        bsr_conv2d_triton(x, bsr.values, bsr.row_ptr, bsr.col_idx, 32, 3, 3,
                          bias=torch.empty(32, device="meta"))


def test_bad_conv_args(gen):
    bsr = _small(gen)
    x = make_x(32, gen, torch.float32, "cpu")
    args = (x, bsr.values, bsr.row_ptr, bsr.col_idx, 32, 3, 3)
    for kwargs, pattern in [
        (dict(stride=0), "stride must be >= 1"),
        (dict(stride=(1, 2, 3)), "stride must be an int or a pair"),
        (dict(padding=-1), "padding must be >= 0"),
        (dict(padding="same"), "padding must be an int or a pair"),
        (dict(dilation=0), "dilation must be >= 1"),
        (dict(dilation=4), "too small for a 3x3 kernel"),
        (dict(bias=torch.randn(31)), "bias must have shape"),
        (dict(residual=torch.randn(N, 32, H, W)), r"residual must have shape \(2, 32, 5, 7\)"),
        (dict(activation="tanh"), "activation"),
        (dict(out=torch.empty(N, 32, 5, 8)), "out must have shape"),
        (dict(out=torch.empty(N, 32, 5, 7, dtype=torch.float16)), "out must be torch.float32"),
        (dict(out=torch.empty(N, 32, 5, 14)[..., ::2]), "out must be contiguous"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            bsr_conv2d_triton(*args, **kwargs)
    with pytest.raises(ValueError, match="row_ptr"):
        bsr_conv2d_triton(x, bsr.values, bsr.row_ptr, bsr.col_idx, 64, 3, 3)
    with pytest.raises(ValueError, match="kh must be a positive int"):
        bsr_conv2d_triton(x, bsr.values, bsr.row_ptr, bsr.col_idx, 32, 0, 3)


# ------------------------------------------------------------------------------------------------
# Custom op, torch.compile, torch.export
# ------------------------------------------------------------------------------------------------

def test_op_dispatch(gen, device):
    """The op runs the kernel under force_triton and the reference otherwise; both agree."""
    bsr = pack_bsr_conv(make_weight(48, 32, 3, 3, 16, 0.5, gen, torch.float32, device)[0], 16)
    x = make_x(32, gen, torch.float32, device, channels_last=True)
    bias = randn(48, device=device, generator=gen)
    with runtime.force_triton():
        a = bsr_conv2d(x, bsr, bias=bias, stride=2, padding=1, activation="relu")
    with runtime.force_reference():
        b = bsr_conv2d(x, bsr, bias=bias, stride=2, padding=1, activation="relu")
    assert a.is_contiguous(memory_format=CL) and b.is_contiguous(memory_format=CL)
    assert rel_l2(a, b) <= TOLERANCE[torch.float32]
    assert KERNEL_VERSION == "bsr_conv2d-1"


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_torch_compile(channels_last, gen, device):
    bsr = pack_bsr_conv(make_weight(32, 16, 3, 3, 16, 0.5, gen, torch.float32, device)[0], 16)
    x = make_x(16, gen, torch.float32, device, channels_last)
    residual = randn(N, 32, H, W, device=device, generator=gen)

    def fn(x, residual):
        return bsr_conv2d(x * 2.0, bsr, padding=1, residual=residual, activation="silu") + 1.0

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    with runtime.force_triton():
        got = compiled(x, residual)
    assert rel_l2(got, fn(x, residual)) <= TOLERANCE[torch.float32]


class _SparseConv(torch.nn.Module):
    def __init__(self, bsr: BSRConvWeight, bias):
        super().__init__()
        self.o, self.kh, self.kw = bsr.o, bsr.kh, bsr.kw
        self.register_buffer("values", bsr.values)
        self.register_buffer("row_ptr", bsr.row_ptr)
        self.register_buffer("col_idx", bsr.col_idx)
        self.register_buffer("bias", bias)

    def forward(self, x):
        return torch.ops.sparsify.bsr_conv2d(x, self.values, self.row_ptr, self.col_idx, self.o, self.kh,
                                             self.kw, [2, 2], [1, 1], [1, 1], self.bias, None, "gelu")


def test_torch_export(gen, device):
    bsr = pack_bsr_conv(make_weight(48, 16, 3, 3, 16, 0.5, gen, torch.float32, device)[0], 16)
    module = _SparseConv(bsr, randn(48, device=device, generator=gen))
    x = make_x(16, gen, torch.float32, device)
    ep = torch.export.export(module, (x,))
    targets = [node.target for node in ep.graph.nodes if node.op == "call_function"]
    assert torch.ops.sparsify.bsr_conv2d.default in targets
    out_meta = [node.meta["val"] for node in ep.graph.nodes
                if node.op == "call_function" and node.target == torch.ops.sparsify.bsr_conv2d.default][0]
    assert tuple(out_meta.shape) == (N, 48, 4, 5)
    with runtime.force_triton():
        got = ep.module()(x)
    assert rel_l2(got, module(x)) <= TOLERANCE[torch.float32]


# ------------------------------------------------------------------------------------------------
# GPU-sized
# ------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("block", [32, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_resnet_layer(block, dtype, gen):
    """A ResNet-50 stage-3 3x3 conv at batch 4, channels-last, with the fused bias + relu + residual."""
    n, c, o, h, w = 4, 256, 256, 28, 28
    weight, _ = make_weight(o, c, 3, 3, block, 0.3, gen, dtype, "cuda", empty_row=2)
    bsr = pack_bsr_conv(weight, block)
    x = randn(n, c, h, w, dtype=dtype, device="cuda", generator=gen).contiguous(memory_format=CL)
    bias = randn(o, dtype=dtype, device="cuda", generator=gen)
    residual = randn(n, o, h, w, dtype=dtype, device="cuda", generator=gen).contiguous(memory_format=CL)
    run_and_check(x, bsr, 1, 1, 1, bias, residual, "relu")
    run_and_check(x, bsr, 2, 1, 1, bias)
