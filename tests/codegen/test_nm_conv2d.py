"""N:M-sparse conv2d (implicit GEMM): Triton (interpreter on CPU) against float64 torch conv2d."""
import dataclasses
import zlib

import pytest
import torch

from kernel_utils import DTYPES, TOLERANCE, conv_f64, poison, randn, rel_l2
from sparsify.codegen import registry, runtime
from sparsify.codegen.epilogue import ACTIVATIONS
from sparsify.codegen.kernels.nm_conv2d import (
    KERNEL_VERSION, NMConvWeight, _config_for, nm_conv2d, nm_conv2d_reference, nm_conv2d_triton,
    nm_conv_mask, nm_conv_weight_matrix, pack_nm_conv, unpack_nm_conv,
)
from sparsify.codegen.kernels.nm_linear import meta_cols, pack_nm, unpack_nm
from sparsify.patterns import NM

N, H, W = 2, 7, 9      # odd spatial sizes: every pixel tile has ragged edges
CL = torch.channels_last


@pytest.fixture
def gen(request):
    """A generator per test, seeded from its id: fresh inputs per test, reproducible on rerun."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def make_weight(o, c, kh, kw, n, m, gen, dtype=torch.float32, device="cpu"):
    """Random [o, c, kh, kw] weight, n:m sparse over the (kh, kw, C) groups, mask from other random scores."""
    mask = nm_conv_mask(torch.rand(o, c, kh, kw, generator=gen), n, m)
    w = randn(o, c, kh, kw, generator=gen) / max(1, c * kh * kw) ** 0.5 * mask
    return w.to(device=device, dtype=dtype)


def make_x(c, gen, dtype=torch.float32, device="cpu", channels_last=False, n=N, h=H, w=W):
    x = randn(n, c, h, w, dtype=dtype, device=device, generator=gen)
    return x.contiguous(memory_format=CL) if channels_last else x



def run_and_check(x, nmw, stride=1, padding=0, dilation=1, bias=None, residual=None, activation="none",
                  out_format=None, out_dtype=None, **launch):
    """Launch into a NaN-poisoned buffer (x's memory format unless out_format) and compare with the
    float64 conv2d of the unpacked weight."""
    ref = conv_f64(x, unpack_nm_conv(nmw), bias, stride, padding, dilation, residual, activation)
    fmt = out_format or (CL if x.is_contiguous(memory_format=CL) and not x.is_contiguous()
                         else torch.contiguous_format)
    out_dtype = out_dtype or x.dtype
    out = poison(torch.empty(ref.shape, dtype=out_dtype, device=x.device, memory_format=fmt))
    with runtime.force_triton():
        got = nm_conv2d_triton(x, nmw.values, nmw.meta, nmw.o, nmw.c, nmw.kh, nmw.kw, nmw.n, nmw.m, stride,
                               padding, dilation, bias, residual, activation, out_dtype, out=out, **launch)
    assert got is out
    tol = max(TOLERANCE[x.dtype], TOLERANCE[out_dtype])
    err = rel_l2(got, ref)
    assert err <= tol, f"rel_l2 {err:.3g} > {tol} for {x.dtype} -> {out_dtype}"
    return got, ref


# ------------------------------------------------------------------------------------------------
# Numerics
# ------------------------------------------------------------------------------------------------

# (C, O, (kh, kw), stride, padding, dilation, (n, m), channels_last input)
GEOMETRIES = [
    (16, 16, (1, 1), 1, 0, 1, (2, 4), False),
    (19, 23, (3, 3), 1, 1, 1, (2, 4), True),     # C % m != 0: a partial group per tap; odd O
    (10, 33, (3, 3), 2, 1, 1, (1, 4), False),
    (20, 17, (3, 3), 1, 2, 2, (2, 8), True),     # dilation 2; C % 8 = 4
    (48, 48, (3, 3), 2, 0, 1, (2, 4), True),     # in 32-channel chunks (below): a ragged 2nd chunk
    (13, 31, (1, 1), 2, 0, 1, (2, 4), True),     # strided 1x1: a ResNet downsample shortcut
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("geom", GEOMETRIES, ids=lambda g: "C{}-O{}-k{}x{}-s{}-p{}-d{}-{}of{}-{}".format(
    g[0], g[1], *g[2], *g[3:6], *g[6], "cl" if g[7] else "nchw"))
def test_geometries(geom, dtype, gen, device):
    c, o, (kh, kw), stride, padding, dilation, (n, m), channels_last = geom
    nmw = pack_nm_conv(make_weight(o, c, kh, kw, n, m, gen, dtype, device), n, m)
    x = make_x(c, gen, dtype, device, channels_last)
    launch = dict(block_c=32) if c == 48 else {}       # two channel chunks per tap, the second ragged
    got, ref = run_and_check(x, nmw, stride, padding, dilation, **launch)
    assert got.shape == ref.shape
    assert got.is_contiguous(memory_format=CL if channels_last else torch.contiguous_format)


EPILOGUES = ([dict(bias=True)]
             + [dict(bias=True, activation=a) for a in ACTIVATIONS if a != "none"]
             + [dict(activation="relu"), dict(residual=True),
                dict(bias=True, activation="relu", residual=True)])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("epi", EPILOGUES, ids=lambda e: "+".join(f"{k}={v}" for k, v in e.items()))
def test_epilogues(epi, dtype, gen, device):
    c, o = 12, 21
    nmw = pack_nm_conv(make_weight(o, c, 3, 3, 2, 4, gen, dtype, device), 2, 4)
    x = make_x(c, gen, dtype, device, channels_last=True)
    bias = randn(o, dtype=dtype, device=device, generator=gen) if epi.get("bias") else None
    residual = None
    if epi.get("residual"):
        residual = randn(N, o, 4, 5, dtype=dtype, device=device, generator=gen).contiguous(memory_format=CL)
    run_and_check(x, nmw, 2, 1, 1, bias, residual, epi.get("activation", "none"))


@pytest.mark.parametrize("n,m", [(3, 8), (5, 16), (1, 2), (2, 3)])
def test_general_nm(n, m, gen, device):
    """3:8 and 5:16 fetch each index's metadata byte on its own (a group's indices span bytes);
    2:3 has a group size that does not divide the channel tile."""
    c, o = 21, 19
    nmw = pack_nm_conv(make_weight(o, c, 3, 3, n, m, gen, torch.float16, device), n, m)
    x = make_x(c, gen, torch.float16, device)
    bias = randn(o, dtype=torch.float16, device=device, generator=gen)
    residual = randn(N, o, H, W, dtype=torch.float16, device=device, generator=gen)
    run_and_check(x, nmw, 1, 1, 1, bias, residual, "silu")


@pytest.mark.parametrize("x_dtype,out_dtype", [(torch.float16, torch.float32), (torch.float32, torch.bfloat16),
                                               (torch.bfloat16, torch.float16)], ids=str)
def test_out_dtype(x_dtype, out_dtype, gen, device):
    """Accumulate in float32, cast once at the store to out_dtype (the wrapper, the reference and the op)."""
    c, o = 12, 20
    nmw = pack_nm_conv(make_weight(o, c, 3, 3, 2, 4, gen, x_dtype, device), 2, 4)
    x = make_x(c, gen, x_dtype, device, channels_last=True)
    bias = randn(o, dtype=x_dtype, device=device, generator=gen)
    got, ref = run_and_check(x, nmw, 1, 1, 1, bias, None, "gelu", out_dtype=out_dtype)
    assert got.dtype == out_dtype
    y_ref = nm_conv2d_reference(x, nmw.values, nmw.meta, o, c, 3, 3, 2, 4, 1, 1, 1, bias, None, "gelu",
                                out_dtype)
    assert y_ref.dtype == out_dtype and y_ref.is_contiguous(memory_format=CL)
    assert rel_l2(y_ref, ref) <= max(TOLERANCE[x_dtype], TOLERANCE[out_dtype])
    with runtime.force_triton():
        y_op = nm_conv2d(x, nmw, bias, padding=1, activation="gelu", out_dtype=out_dtype)
    assert y_op.dtype == out_dtype
    torch.testing.assert_close(y_op, got)


@pytest.mark.parametrize("res_layout", ["nchw", "cl", "strided"])
def test_residual_layouts(res_layout, gen, device):
    """The residual has the output's logical shape in any layout; the kernel reads it as [P, O]."""
    c, o = 16, 24
    nmw = pack_nm_conv(make_weight(o, c, 3, 3, 2, 4, gen, torch.float32, device), 2, 4)
    x = make_x(c, gen, torch.float32, device, res_layout == "cl")
    residual = randn(N, o, H, W, device=device, generator=gen)
    if res_layout == "cl":
        residual = residual.contiguous(memory_format=CL)
    elif res_layout == "strided":
        residual = randn(N, o, H, 2 * W, device=device, generator=gen)[..., ::2]
    bias = randn(o, device=device, generator=gen)
    run_and_check(x, nmw, 1, 1, 1, bias, residual, "silu")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_channel_slice_read_in_place(dtype, gen, device):
    """x = the first 18 channels of a channels-last tensor whose other channels are NaN: read in place
    (unit channel stride), so the kernel must mask the channels past C, not rely on zero weights."""
    c, o = 18, 20
    nmw = pack_nm_conv(make_weight(o, c, 3, 3, 2, 4, gen, dtype, device), 2, 4)
    big = poison(torch.empty(N, 32, H, W, dtype=dtype, device=device, memory_format=CL))
    big[:, :c] = make_x(c, gen, dtype, device)
    x = big[:, :c]
    assert x.stride(1) == 1 and not x.is_contiguous(memory_format=CL)
    got, _ = run_and_check(x, nmw, 1, 1, 1)
    assert got.is_contiguous()
    cropped = make_x(c, gen, dtype, device, channels_last=True, h=H + 2)[:, :, 1:-1]   # spatial crop
    run_and_check(cropped, nmw, 2, 1, 1)


def test_rectangular_kernel_and_asymmetric_params(gen, device):
    c, o = 12, 16
    nmw = pack_nm_conv(make_weight(o, c, 3, 1, 2, 4, gen, torch.float16, device), 2, 4)
    x = make_x(c, gen, torch.float16, device, channels_last=True, h=9, w=7)
    run_and_check(x, nmw, (2, 1), (1, 0), (1, 2))
    nmw2 = pack_nm_conv(make_weight(o, c, 1, 3, 1, 4, gen, torch.float32, device), 1, 4)
    run_and_check(make_x(c, gen, torch.float32, device), nmw2, [1, 2], [0, 1], [2, 1])


def test_memory_formats_and_out(gen, device):
    """NCHW in -> NCHW out, channels-last in -> channels-last out; `out` may be either layout; a
    non-contiguous x is read correctly."""
    c, o = 16, 20
    nmw = pack_nm_conv(make_weight(o, c, 3, 3, 2, 4, gen, torch.float32, device), 2, 4)
    x = make_x(c, gen, torch.float32, device)
    args = (nmw.values, nmw.meta, o, c, 3, 3, 2, 4, 1, 1, 1)
    with runtime.force_triton():
        y = nm_conv2d_triton(x, *args)
        y_cl = nm_conv2d_triton(x.contiguous(memory_format=CL), *args)
    assert y.is_contiguous() and y_cl.is_contiguous(memory_format=CL) and not y_cl.is_contiguous()
    torch.testing.assert_close(y, y_cl)
    run_and_check(x, nmw, 1, 1, 1, out_format=CL)
    run_and_check(x.contiguous(memory_format=CL), nmw, 1, 1, 1, out_format=torch.contiguous_format)
    x_strided = randn(N, c, H, 2 * W, device=device, generator=gen)[..., 1::2]
    run_and_check(x_strided, nmw, 1, 1, 1)


@pytest.mark.parametrize("tiles", [(16, 16, 16), (32, 32, 16), (128, 16, 64)], ids=str)
def test_launch_overrides(tiles, gen, device):
    """Tile overrides: several channel chunks per tap (40 = 16 + 16 + 8) and O split over programs."""
    c, o = 40, 37
    nmw = pack_nm_conv(make_weight(o, c, 3, 3, 2, 4, gen, torch.float32, device), 2, 4)
    x = make_x(c, gen, torch.float32, device, channels_last=True)
    bp, bo, bc = tiles
    run_and_check(x, nmw, 1, 1, 1, block_p=bp, block_o=bo, block_c=bc, num_warps=2, num_stages=2,
                  input_precision="ieee")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_all_zero_weight_is_epilogue_of_zero(dtype, gen, device):
    nmw = pack_nm_conv(torch.zeros(20, 12, 3, 3, dtype=dtype, device=device), 2, 4)
    x = make_x(12, gen, dtype, device)
    bias = randn(20, dtype=dtype, device=device, generator=gen)
    got, _ = run_and_check(x, nmw, 1, 1, 1, bias=bias, activation="relu")
    torch.testing.assert_close(got, torch.relu(bias)[None, :, None, None].expand_as(got))


def test_empty_batch_channels_and_outputs(gen, device):
    nmw = pack_nm_conv(make_weight(12, 8, 3, 3, 2, 4, gen, torch.float32, device), 2, 4)
    with runtime.force_triton():
        y = nm_conv2d(torch.empty(0, 8, H, W, device=device), nmw, stride=2)
        assert y.shape == (0, 12, 3, 4)
        no_out = pack_nm_conv(torch.zeros(0, 8, 3, 3, device=device), 2, 4)
        assert nm_conv2d(make_x(8, gen, device=device), no_out, padding=1).shape == (N, 0, H, W)
        # C = 0: an empty reduction leaves the epilogue of zeros
        no_in = pack_nm_conv(torch.zeros(12, 0, 3, 3, device=device), 2, 4)
        bias = randn(12, device=device, generator=gen)
        y = nm_conv2d(torch.empty(N, 0, H, W, device=device), no_in, bias, padding=1)
    torch.testing.assert_close(y, bias[None, :, None, None].expand(N, 12, H, W))


def test_reference_matches_conv2d(gen, device):
    """nm_conv2d_reference (fp64 in, fp64 out) is torch conv2d + the epilogue, in x's memory format."""
    c, o = 19, 21
    w = make_weight(o, c, 3, 3, 2, 4, gen, torch.float64, device)
    nmw = pack_nm_conv(w, 2, 4)
    x = make_x(c, gen, torch.float64, device, channels_last=True)
    bias = randn(o, dtype=torch.float64, device=device, generator=gen)
    residual = randn(N, o, 4, 5, dtype=torch.float64, device=device, generator=gen)
    args = (nmw.values, nmw.meta, o, c, 3, 3, 2, 4, 2, 1, 1, bias, residual, "gelu")
    got = nm_conv2d_reference(x, *args)
    assert got.is_contiguous(memory_format=CL)
    torch.testing.assert_close(got, conv_f64(x, w, bias, 2, 1, 1, residual, "gelu"))
    out = poison(torch.empty(N, o, 4, 5, dtype=torch.float64, device=device))
    assert nm_conv2d_reference(x, *args, out=out) is out
    torch.testing.assert_close(out, got)


def test_config_for():
    assert [_config_for(p, 48, 48, torch.float16)[0] for p in (1, 16, 17, 32, 33, 64, 65, 4096)] == \
        [16, 16, 32, 32, 64, 64, 128, 128]
    assert [_config_for(100, o, 3, torch.float16)[1] for o in (1, 16, 17, 33, 512)] == [16, 16, 32, 64, 64]
    assert [_config_for(100, 8, c, torch.float16)[2] for c in (1, 16, 17, 33, 512)] == [16, 16, 32, 64, 64]
    for p in (1, 100, 4096):
        for dtype in DTYPES:
            *_, warps, stages = _config_for(p, 256, 256, dtype)
            assert warps in (2, 4, 8) and stages in (1, 3)


# ------------------------------------------------------------------------------------------------
# Mask and packing
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 8)])
@pytest.mark.parametrize("c", [16, 13])
def test_mask_keeps_largest_n_of_every_tap_group(n, m, c, gen):
    scores = randn(5, c, 3, 2, generator=gen)
    mask = nm_conv_mask(scores, n, m)
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    for c0 in range(0, c, m):   # groups are consecutive channels of one (o, kh, kw), never across taps
        s = scores[:, c0:c0 + m].abs()
        kept = mask[:, c0:c0 + m]
        assert (kept.sum(1) == min(n, s.shape[1])).all()
        if kept.shape[1] > n:
            assert (s.masked_fill(~kept, float("inf")).amin(1) >= s.masked_fill(kept, float("-inf")).amax(1)).all()


@pytest.mark.parametrize("dtype", DTYPES + (torch.float64,), ids=str)
@pytest.mark.parametrize("shape", [(24, 16, 3, 3, 2, 4), (17, 13, 3, 1, 1, 4), (9, 20, 1, 1, 2, 8),
                                   (7, 11, 2, 3, 3, 8)], ids=lambda s: "O{}-C{}-k{}x{}-{}of{}".format(*s))
def test_pack_unpack_round_trip(shape, dtype, gen):
    o, c, kh, kw, n, m = shape
    w = make_weight(o, c, kh, kw, n, m, gen, dtype)
    nmw = pack_nm_conv(w, n, m)
    assert torch.equal(unpack_nm_conv(nmw), w)
    assert unpack_nm_conv(nmw).is_contiguous()
    cp = -(-c // m) * m
    assert (nmw.o, nmw.c, nmw.kh, nmw.kw, nmw.n, nmw.m, nmw.cp, nmw.k) == (o, c, kh, kw, n, m, cp, kh * kw * cp)
    assert nmw.values.dtype == dtype and nmw.values.shape == (o, kh * kw * cp // m * n)
    assert nmw.meta.dtype == torch.uint8 and nmw.meta.shape == (o, meta_cols(nmw.k, n, m))
    # The buffers are nm_linear's format of the padded (kh, kw, C) GEMM matrix.
    wmat = nm_conv_weight_matrix(w, m)
    assert wmat.shape == (o, nmw.k)
    ref = pack_nm(wmat, n, m)
    assert torch.equal(nmw.values, ref.values) and torch.equal(nmw.meta, ref.meta)
    assert torch.equal(unpack_nm(nmw.matrix), wmat)
    assert nmw.nbytes == nmw.values.numel() * nmw.values.element_size() + nmw.meta.numel()


def test_weight_matrix_column_order():
    """Column = tap * Cp + channel, tap = r * kw + s; C is zero-padded per tap to a multiple of m."""
    w = torch.zeros(2, 6, 3, 3)          # m = 4: Cp = 8
    w[1, 5, 2, 1] = 1.5                  # tap 7 -> column 7 * 8 + 5
    w[0, 0, 0, 1] = -2.0                 # tap 1 -> column 8
    w[0, 3, 1, 0] = float("nan")         # a NaN counts as nonzero and is kept
    wmat = nm_conv_weight_matrix(w, 4)
    assert wmat.shape == (2, 72)
    assert wmat[1, 61] == 1.5 and wmat[0, 8] == -2.0 and torch.isnan(wmat[0, 27])
    nmw = pack_nm_conv(w, 2, 4)
    assert torch.isnan(unpack_nm_conv(nmw)[0, 3, 1, 0])
    assert isinstance(nmw, NMConvWeight)
    with pytest.raises(dataclasses.FrozenInstanceError):
        nmw.o = 3


def test_pack_rejects_non_nm_naming_channel_and_tap(gen):
    w = make_weight(6, 10, 3, 3, 2, 4, gen)
    w[4, 8:10, 2, 1] = 1.0               # the partial group of tap (2, 1): channels 8..9, 2 allowed
    pack_nm_conv(w, 2, 4)
    w[3, 4:8, 1, 2] = 1.0                # 4 nonzeros in a group of 4
    with pytest.raises(ValueError, match=r"not 2:4 sparse along input channels: output channel 3, "
                                         r"tap \(kh=1, kw=2\), channels 4\.\.7 have 4 nonzeros"):
        pack_nm_conv(w, 2, 4)
    nan = torch.zeros(2, 4, 1, 1)
    nan[1, :3, 0, 0] = torch.tensor([1.0, float("nan"), 1.0])   # a NaN counts as a nonzero
    with pytest.raises(ValueError, match=r"output channel 1, tap \(kh=0, kw=0\), channels 0\.\.3 have 3"):
        pack_nm_conv(nan, 2, 4)


def test_pack_errors():
    for bad in (torch.randn(8, 8), torch.randn(2, 8, 8, 3, 3), "w"):
        with pytest.raises(ValueError, match=r"weight must be a 4-D \[O, C, kh, kw\]"):
            pack_nm_conv(bad, 2, 4)
    with pytest.raises(ValueError, match="groups"):
        pack_nm_conv(torch.zeros(8, 4, 3, 3), 2, 4, groups=2)
    with pytest.raises(ValueError, match="N:M sparsity 4:4"):
        pack_nm_conv(torch.zeros(8, 4, 3, 3), 4, 4)
    with pytest.raises(TypeError, match="floating"):
        pack_nm_conv(torch.zeros(8, 4, 3, 3, dtype=torch.int32), 2, 4)
    with pytest.raises(ValueError, match="N:M sparsity 2:32"):
        nm_conv_mask(torch.zeros(8, 4, 3, 3), 2, 32)


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------

def _small(gen, dtype=torch.float32, c=12, o=16):
    return pack_nm_conv(make_weight(o, c, 3, 3, 2, 4, gen, dtype), 2, 4)


def test_groups_rejected(gen):
    nmw = _small(gen)
    x = make_x(12, gen)
    with pytest.raises(ValueError, match="groups"):
        nm_conv2d(x, nmw, groups=12)
    for fn in (nm_conv2d_triton, nm_conv2d_reference):
        with pytest.raises(ValueError, match="groups=2"):
            fn(x, nmw.values, nmw.meta, 16, 12, 3, 3, 2, 4, groups=2)


def test_channel_mismatch(gen):
    nmw = _small(gen)                       # C = 12
    x = make_x(11, gen)                     # same Cp = 12 for m = 4: must still be refused
    with pytest.raises(ValueError, match=r"C=12"):
        nm_conv2d(x, nmw)
    for fn in (nm_conv2d_triton, nm_conv2d_reference):
        with pytest.raises(ValueError, match=r"x has C=11 channels but the weight was packed for c=12"):
            fn(x, nmw.values, nmw.meta, 16, 12, 3, 3, 2, 4)
    with pytest.raises(ValueError, match=r"x must be a 4-D"):
        nm_conv2d_triton(x[0], nmw.values, nmw.meta, 16, 12, 3, 3, 2, 4)
    with pytest.raises(ValueError, match=r"values must be \[o, kh\*kw\*Cp/m\*n\]"):
        nm_conv2d_triton(make_x(16, gen), nmw.values, nmw.meta, 16, 16, 3, 3, 2, 4)


def test_mismatched_dtypes(gen):
    nmw = _small(gen)
    x = make_x(12, gen, torch.float16)
    args = (nmw.values, nmw.meta, 16, 12, 3, 3, 2, 4)
    with pytest.raises(TypeError, match="values dtype torch.float32 does not match x dtype torch.float16"):
        nm_conv2d_triton(x, *args)
    with pytest.raises(TypeError, match="x dtype must be one of"):
        nm_conv2d_triton(x.double(), nmw.values.double(), *args[1:])
    with pytest.raises(TypeError, match="meta must be uint8"):
        nm_conv2d_triton(x.float(), nmw.values, nmw.meta.to(torch.int32), *args[2:])
    with pytest.raises(TypeError, match="out_dtype must be a floating torch.dtype"):
        nm_conv2d_triton(x.float(), *args, out_dtype=torch.int32)
    with pytest.raises(TypeError, match="bias must be a floating tensor"):
        nm_conv2d_triton(x.float(), *args, bias=torch.zeros(16, dtype=torch.int64))


def test_mismatched_device(gen):
    nmw = _small(gen)
    x = make_x(12, gen)
    with pytest.raises(ValueError, match="values is on meta but x is on cpu"):
        nm_conv2d_triton(x, nmw.values.to("meta"), nmw.meta, 16, 12, 3, 3, 2, 4)
    with pytest.raises(ValueError, match="bias is on meta"):
        nm_conv2d_triton(x, nmw.values, nmw.meta, 16, 12, 3, 3, 2, 4, bias=torch.empty(16, device="meta"))


def test_bad_conv_args(gen):
    nmw = _small(gen)
    x = make_x(12, gen)
    args = (x, nmw.values, nmw.meta, 16, 12, 3, 3, 2, 4)
    for kwargs, pattern in [
        (dict(stride=0), "stride must be >= 1"),
        (dict(stride=(1, 2, 3)), "stride must be an int or a pair"),
        (dict(padding=-1), "padding must be >= 0"),
        (dict(padding="same"), "padding must be an int or a pair"),
        (dict(dilation=0), "dilation must be >= 1"),
        (dict(dilation=4), "too small for a 3x3 kernel"),
        (dict(bias=torch.randn(15)), r"bias must have shape \(16,\)"),
        (dict(residual=torch.randn(N, 16, H, W)), r"residual must have shape \(2, 16, 5, 7\)"),
        (dict(activation="tanh"), "activation must be one of"),
        (dict(out=torch.empty(N, 16, 5, 8)), "out must have shape"),
        (dict(out=torch.empty(N, 16, 5, 7, dtype=torch.float16)), "out must be torch.float32"),
        (dict(out=torch.empty(N, 16, 5, 14)[..., ::2]), "out must be contiguous"),
        (dict(block_c=24), "block_c must be a power of two >= 16"),
        (dict(block_o=8), "block_o must be a power of two >= 16"),
        (dict(input_precision="fp8"), "input_precision must be one of"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            nm_conv2d_triton(*args, **kwargs)
    with pytest.raises(ValueError, match="meta must be"):
        nm_conv2d_triton(x, nmw.values, nmw.meta[:, :-1], 16, 12, 3, 3, 2, 4)
    with pytest.raises(ValueError, match="kh must be a positive int"):
        nm_conv2d_triton(x, nmw.values, nmw.meta, 16, 12, 0, 3, 2, 4)
    with pytest.raises(ValueError, match="N:M sparsity 4:4"):
        nm_conv2d_triton(x, nmw.values, nmw.meta, 16, 12, 3, 3, 4, 4)


# ------------------------------------------------------------------------------------------------
# Custom op and the kernel registry
# ------------------------------------------------------------------------------------------------

def test_op_dispatch_and_schema(gen, device):
    """The op runs the kernel under force_triton and the reference otherwise; both agree. Its schema
    ends with (activation, out_dtype), as every sparse op's."""
    nmw = pack_nm_conv(make_weight(24, 12, 3, 3, 2, 4, gen, torch.float32, device), 2, 4)
    x = make_x(12, gen, torch.float32, device, channels_last=True)
    bias = randn(24, device=device, generator=gen)
    with runtime.force_triton():
        a = nm_conv2d(x, nmw, bias=bias, stride=2, padding=1, activation="relu")
    with runtime.force_reference():
        b = nm_conv2d(x, nmw, bias=bias, stride=2, padding=1, activation="relu")
    assert a.is_contiguous(memory_format=CL) and b.is_contiguous(memory_format=CL)
    assert rel_l2(a, b) <= TOLERANCE[torch.float32]
    names = [arg.name for arg in torch.ops.sparsify.nm_conv2d.default._schema.arguments]
    assert names[-2:] == ["activation", "out_dtype"]
    assert KERNEL_VERSION == "nm_conv2d-1"


def test_fake_impl_and_opcheck(gen):
    nmw = pack_nm_conv(make_weight(20, 12, 3, 3, 2, 4, gen), 2, 4)
    x = make_x(12, gen, channels_last=True)
    residual = randn(N, 20, 4, 5, generator=gen)
    args = (x, nmw.values, nmw.meta, 20, 12, 3, 3, 2, 4, [2, 2], [1, 1], [1, 1], None, residual, "silu",
            torch.float16)
    torch.library.opcheck(torch.ops.sparsify.nm_conv2d.default, args,
                          test_utils=("test_schema", "test_faketensor"))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake_args = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
        y = torch.ops.sparsify.nm_conv2d(*fake_args)
    assert y.shape == (N, 20, 4, 5) and y.dtype == torch.float16 and y.is_contiguous(memory_format=CL)


def test_registry_offers_and_runs_it(gen, device):
    k = registry.get("nm_conv_triton")
    assert k.replaces == "conv2d" and k.interpretable and k.op == "sparsify::nm_conv2d" and k.version == KERNEL_VERSION
    w = make_weight(20, 12, 3, 3, 2, 4, gen, torch.float32, device)
    with runtime.force_triton():
        ok, _ = registry.kernels_for(NM(2, 4), torch.device(device), torch.float32, tuple(w.shape),
                                     replaces="conv2d")
        assert k in ok
        packed = k.pack(w, NM(2, 4), {"stride": (2, 1), "padding": (1, 0), "dilation": (1, 1)})
        x = make_x(12, gen, torch.float32, device)
        bias = randn(20, device=device, generator=gen)
        got = k.call(x, packed, bias)
    assert rel_l2(got, conv_f64(x, w, bias, (2, 1), (1, 0), 1, None, "none")) <= TOLERANCE[torch.float32]
    assert registry.kernels_for(NM(2, 4), torch.device(device), torch.float32, tuple(w.shape),
                                replaces="linear")[0].count(k) == 0


# ------------------------------------------------------------------------------------------------
# GPU-sized
# ------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("nm", [(2, 4), (1, 4)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_resnet_layer(nm, dtype, gen):
    """A ResNet-50 stage-3 3x3 conv at batch 4, channels-last, with the fused bias + relu + residual."""
    n, m = nm
    batch, c, o, h, w = 4, 256, 256, 28, 28
    nmw = pack_nm_conv(make_weight(o, c, 3, 3, n, m, gen, dtype, "cuda"), n, m)
    x = randn(batch, c, h, w, dtype=dtype, device="cuda", generator=gen).contiguous(memory_format=CL)
    bias = randn(o, dtype=dtype, device="cuda", generator=gen)
    residual = randn(batch, o, h, w, dtype=dtype, device="cuda", generator=gen).contiguous(memory_format=CL)
    run_and_check(x, nmw, 1, 1, 1, bias, residual, "relu")
    run_and_check(x, nmw, 2, 1, 1, bias)
