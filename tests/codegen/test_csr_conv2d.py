"""CSR conv2d (im2col + torch sparse CSR matmul): packing, vs float64 conv2d, checks, custom op."""
import zlib

import pytest
import torch

from kernel_utils import DTYPES, TOLERANCE, conv_f64, poison, randn, rel_l2
from sparsify.codegen.epilogue import ACTIVATIONS
from sparsify.codegen.kernels.csr_conv2d import (
    KERNEL_VERSION, csr_conv2d, csr_conv2d_reference, csr_conv2d_torch, pack_csr_conv,
)
from sparsify.codegen.kernels.csr_linear import csr_parts

CL = torch.channels_last
C, O, H, W = 5, 7, 9, 11          # odd on purpose: no size lines up with anything

EPILOGUES = [(b, a, r) for b in (False, True) for a in ACTIVATIONS for r in (False, True)]


@pytest.fixture
def gen(request):
    """A generator seeded from the test id: fresh inputs per test, reproducible across runs."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def _sparse_weight(o, c, kh, kw, sparsity, dtype, device, gen):
    """Random [o, c, kh, kw] weight with a random mask zeroing about `sparsity` of it."""
    w = randn(o, c, kh, kw, generator=gen) / (c * kh * kw) ** 0.5
    keep = torch.rand(o, c, kh, kw, generator=gen) >= sparsity
    return (w * keep).to(device=device, dtype=dtype)


def _make_x(n, c, h, w, dtype, device, gen, channels_last=False):
    x = randn(n, c, h, w, dtype=dtype, device=device, generator=gen)
    return x.contiguous(memory_format=CL) if channels_last else x


def _fmt(x):
    return CL if x.is_contiguous(memory_format=CL) and not x.is_contiguous() else torch.contiguous_format



def _run_and_check(x, w, stride=1, padding=0, dilation=1, bias=None, residual=None, activation="none",
                   out_dtype=None, out_format=None, index_dtype=None):
    """csr_conv2d_torch into a NaN-poisoned `out` (x's memory format unless out_format) against the
    float64 conv2d of the dense weight; also the result without `out` (layout and values)."""
    crow, col, values = csr_parts(pack_csr_conv(w))
    if index_dtype is not None:
        crow, col = crow.to(index_dtype), col.to(index_dtype)
    o, _, kh, kw = w.shape
    ref = conv_f64(x, w, bias, stride, padding, dilation, residual, activation)
    dtype = out_dtype or x.dtype
    out = poison(torch.empty(ref.shape, dtype=dtype, device=x.device, memory_format=out_format or _fmt(x)))
    args = (x, crow, col, values, o, kh, kw, stride, padding, dilation, bias, residual, activation, out_dtype)
    got = csr_conv2d_torch(*args, out=out)
    assert got is out
    err = rel_l2(got, ref)
    tol = max(TOLERANCE[x.dtype], TOLERANCE.get(dtype, 0.0))
    assert err <= tol, f"rel_l2 {err:.2e} > {tol:.0e} for {x.dtype} -> {dtype}"
    fresh = csr_conv2d_torch(*args)
    assert fresh.dtype == dtype and fresh.shape == ref.shape
    assert fresh.is_contiguous(memory_format=_fmt(x))
    torch.testing.assert_close(fresh, got, rtol=0, atol=0, equal_nan=False)
    return got, ref


# ------------------------------------------------------------------------------------------------
# Numerics
# ------------------------------------------------------------------------------------------------

# ((kh, kw), stride, padding, dilation, channels_last input)
GEOMETRIES = [
    ((1, 1), 1, 0, 1, False),        # the no-unfold path
    ((1, 1), 1, 0, 1, True),         # no-unfold path from channels-last (copied to NCHW)
    ((1, 1), 2, 0, 1, False),        # strided 1x1: a ResNet downsample shortcut, through unfold
    ((1, 1), 1, 1, 1, True),         # padded 1x1, through unfold
    ((3, 3), 1, 1, 1, False),
    ((3, 3), 2, 1, 1, True),
    ((3, 5), 2, 2, 1, False),
    ((3, 3), 1, 2, 2, True),         # dilation 2
    ((3, 5), (2, 1), (1, 2), (2, 1), False),   # asymmetric pairs
]


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("geom", GEOMETRIES, ids=lambda g: "k{}x{}-s{}-p{}-d{}-{}".format(
    *g[0], *g[1:4], "cl" if g[4] else "nchw"))
def test_geometries(geom, dtype, n, gen, device):
    (kh, kw), stride, padding, dilation, channels_last = geom
    sparsity = (0.6, 0.75, 0.9)[zlib.crc32(repr(geom).encode()) % 3]
    w = _sparse_weight(O, C, kh, kw, sparsity, dtype, device, gen)
    x = _make_x(n, C, H, W, dtype, device, gen, channels_last)
    _run_and_check(x, w, stride, padding, dilation)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("has_bias,activation,has_residual", EPILOGUES)
def test_every_epilogue(has_bias, activation, has_residual, dtype, device, gen):
    w = _sparse_weight(O, C, 3, 3, 0.75, dtype, device, gen)
    x = _make_x(3, C, H, W, dtype, device, gen, channels_last=has_bias)
    bias = randn(O, dtype=dtype, device=device, generator=gen) if has_bias else None
    residual = randn(3, O, 5, 6, dtype=dtype, device=device, generator=gen) if has_residual else None
    _run_and_check(x, w, 2, 1, 1, bias, residual, activation)


@pytest.mark.parametrize("x_dtype,out_dtype", [(torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                                               (torch.float32, torch.float16), (torch.float32, torch.bfloat16),
                                               (torch.float16, torch.bfloat16)], ids=str)
@pytest.mark.parametrize("epilogue", [False, True], ids=["plain", "bias+gelu+res"])
def test_out_dtype(x_dtype, out_dtype, epilogue, gen, device):
    w = _sparse_weight(O, C, 3, 5, 0.6, x_dtype, device, gen)
    x = _make_x(1, C, H, W, x_dtype, device, gen)
    bias = randn(O, dtype=x_dtype, device=device, generator=gen) if epilogue else None
    residual = randn(1, O, H, W - 4, dtype=out_dtype, device=device, generator=gen) if epilogue else None
    _run_and_check(x, w, 1, (1, 0), 1, bias, residual, "gelu" if epilogue else "none", out_dtype=out_dtype)


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("kernel", [(1, 1), (3, 3)], ids=["1x1", "3x3"])
def test_memory_formats_and_out(kernel, n, gen, device):
    """NCHW in -> NCHW out, channels-last in -> channels-last out, on both im2col paths; `out` may be
    either layout; a non-contiguous x (a strided slice) is read correctly."""
    kh, kw = kernel
    pad = kh // 2
    w = _sparse_weight(O, C, kh, kw, 0.7, torch.float32, device, gen)
    crow, col, values = csr_parts(pack_csr_conv(w))
    x = _make_x(n, C, H, W, torch.float32, device, gen)
    y = csr_conv2d_torch(x, crow, col, values, O, kh, kw, 1, pad)
    y_cl = csr_conv2d_torch(x.contiguous(memory_format=CL), crow, col, values, O, kh, kw, 1, pad)
    assert y.is_contiguous() and y_cl.is_contiguous(memory_format=CL) and not y_cl.is_contiguous()
    torch.testing.assert_close(y, y_cl)
    _run_and_check(x, w, 1, pad, out_format=CL)
    _run_and_check(x.contiguous(memory_format=CL), w, 1, pad, out_format=torch.contiguous_format)
    x_strided = randn(n, C, H, 2 * W, device=device, generator=gen)[..., 1::2]
    _run_and_check(x_strided, w, 1, pad)
    residual = randn(n, O, H, 2 * W, device=device, generator=gen)[..., ::2]     # strided residual
    _run_and_check(x_strided, w, 1, pad, bias=randn(O, device=device, generator=gen), residual=residual,
                   activation="silu")


def test_output_never_aliases_input(gen, device):
    """The custom op may not return (a view of) an input: the no-copy batch-1 1x1 path included."""
    w = _sparse_weight(C, C, 1, 1, 0.0, torch.float32, device, gen)
    x = _make_x(1, C, H, W, torch.float32, device, gen)
    crow, col, values = csr_parts(pack_csr_conv(w))
    y = torch.ops.sparsify.csr_conv2d(x, crow, col, values, C, 1, 1, [1, 1], [0, 0], [1, 1])
    assert y.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_int32_indices_and_empty_rows(dtype, gen, device):
    w = _sparse_weight(O, C, 3, 3, 0.8, dtype, device, gen)
    w[2] = 0.0
    w[-1] = 0.0   # empty output channels, the last one included: they are epilogue(0)
    x = _make_x(3, C, H, W, dtype, device, gen, channels_last=True)
    bias = randn(O, dtype=dtype, device=device, generator=gen)
    residual = randn(3, O, H, W, dtype=dtype, device=device, generator=gen)
    got, _ = _run_and_check(x, w, 1, 1, 1, bias, residual, "relu", index_dtype=torch.int32)
    expected = torch.relu(bias[-1]).float() + residual[:, -1].float()
    torch.testing.assert_close(got[:, -1].float(), expected, rtol=1e-2, atol=1e-2)


def test_realistic_sparse_layer(gen, device):
    """A late-stage-like conv at 90% sparsity: bigger reduction (K = 32 * 9) and batch 2."""
    w = _sparse_weight(48, 32, 3, 3, 0.9, torch.float32, device, gen)
    x = _make_x(2, 32, 14, 13, torch.float32, device, gen, channels_last=True)
    bias = randn(48, device=device, generator=gen)
    _run_and_check(x, w, 1, 1, 1, bias, None, "relu")


def test_all_zero_weight_empty_batch_no_outputs(gen, device):
    w = torch.zeros(O, C, 3, 3, device=device)
    crow, col, values = csr_parts(pack_csr_conv(w))
    assert values.numel() == 0
    x = _make_x(2, C, H, W, torch.float32, device, gen)
    bias = randn(O, device=device, generator=gen)
    y = csr_conv2d_torch(x, crow, col, values, O, 3, 3, 1, 1, bias=bias, activation="relu")
    torch.testing.assert_close(y, torch.relu(bias)[None, :, None, None].expand(2, O, H, W))
    empty = csr_conv2d_torch(x[:0], crow, col, values, O, 3, 3, 2, 1)
    assert empty.shape == (0, O, 5, 6)
    w0 = pack_csr_conv(torch.zeros(0, C, 3, 3, device=device))
    crow0, col0, values0 = csr_parts(w0)
    assert csr_conv2d_torch(x, crow0, col0, values0, 0, 3, 3).shape == (2, 0, H - 2, W - 2)
    # C = 0: F.unfold rejects it, the conv is zero and only the epilogue remains.
    crow_c0, col_c0, values_c0 = csr_parts(pack_csr_conv(torch.zeros(O, 0, 3, 3, device=device)))
    y0 = csr_conv2d_torch(x[:, :0], crow_c0, col_c0, values_c0, O, 3, 3, bias=bias)
    torch.testing.assert_close(y0, bias[None, :, None, None].expand(2, O, H - 2, W - 2))


def test_reference_matches_conv2d(gen, device):
    """csr_conv2d_reference (fp64 in, fp64 out) is torch conv2d + the epilogue, in x's memory format."""
    w = _sparse_weight(O, C, 3, 5, 0.6, torch.float64, device, gen)
    crow, col, values = csr_parts(pack_csr_conv(w))
    x = _make_x(3, C, H, W, torch.float64, device, gen, channels_last=True)
    bias = randn(O, dtype=torch.float64, device=device, generator=gen)
    residual = randn(3, O, 5, 6, dtype=torch.float64, device=device, generator=gen)
    args = (x, crow, col, values, O, 3, 5, 2, (1, 2), 1, bias, residual, "gelu")
    got = csr_conv2d_reference(*args)
    assert got.is_contiguous(memory_format=CL)
    torch.testing.assert_close(got, conv_f64(x, w, bias, 2, (1, 2), 1, residual, "gelu"))
    out = poison(torch.empty(3, O, 5, 6, dtype=torch.float64, device=device))
    assert csr_conv2d_reference(*args, out=out) is out
    torch.testing.assert_close(out, got)
    # float32 inputs: the reference computes in float32 and agrees with the torch-CSR path.
    args32 = (x.float(), crow, col, values.float(), O, 3, 5, 2, (1, 2), 1, bias.float(), residual.float(), "gelu")
    assert rel_l2(csr_conv2d_reference(*args32), csr_conv2d_torch(*args32)) <= 1e-5


# ------------------------------------------------------------------------------------------------
# Packing
# ------------------------------------------------------------------------------------------------

def test_pack_round_trip_and_column_order(gen):
    w = _sparse_weight(O, C, 3, 5, 0.75, torch.float32, "cpu", gen)
    packed = pack_csr_conv(w)
    assert packed.layout == torch.sparse_csr and packed.shape == (O, C * 15)
    assert packed.values().numel() == int((w != 0).sum())
    assert torch.equal(packed.to_dense().reshape(w.shape), w)
    # Column = c * kh * kw + i * kw + j: F.unfold's row order.
    w1 = torch.zeros(4, 3, 2, 3)
    w1[1, 2, 1, 0] = 1.5
    w1[3, 0, 0, 2] = float("nan")        # a NaN is kept
    p1 = pack_csr_conv(w1)
    assert p1.crow_indices().tolist() == [0, 0, 1, 1, 2]
    assert p1.col_indices().tolist() == [2 * 6 + 1 * 3 + 0, 2]
    assert p1.values()[0] == 1.5 and torch.isnan(p1.values()[1])
    # A channels-last weight packs by its logical order.
    assert torch.equal(pack_csr_conv(w.contiguous(memory_format=CL)).to_dense(), packed.to_dense())


def test_pack_errors():
    for bad in (torch.randn(8, 9), torch.randn(2, 3, 4, 3, 3), "w"):
        with pytest.raises(ValueError, match=r"weight must be a 4-D \[O, C, kh, kw\]"):
            pack_csr_conv(bad)
    with pytest.raises(TypeError, match="floating"):
        pack_csr_conv(torch.ones(4, 3, 3, 3, dtype=torch.int32))


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------

def _small(gen, dtype=torch.float32):
    w = _sparse_weight(O, C, 3, 3, 0.6, dtype, "cpu", gen)
    return w, csr_parts(pack_csr_conv(w))


def test_argument_errors(gen):
    w, (crow, col, values) = _small(gen)
    x = _make_x(2, C, H, W, torch.float32, "cpu", gen)
    args = (x, crow, col, values, O, 3, 3)
    for fn in (csr_conv2d_torch, csr_conv2d_reference):
        with pytest.raises(ValueError, match=r"x must be a 4-D"):
            fn(x[0], crow, col, values, O, 3, 3)
        with pytest.raises(ValueError, match=r"col indices must lie in \[0, k_in=36\).*C=4 from x.shape\[1\]"):
            fn(x[:, :4], crow, col, values, O, 3, 3)
    with pytest.raises(TypeError, match="x dtype"):
        csr_conv2d_torch(x.double(), crow, col, values.double(), O, 3, 3)
    with pytest.raises(TypeError, match="values dtype torch.float32 does not match x dtype torch.float16"):
        csr_conv2d_torch(x.half(), crow, col, values, O, 3, 3)
    with pytest.raises(TypeError, match="index dtype"):
        csr_conv2d_torch(x, crow, col.int(), values, O, 3, 3)
    with pytest.raises(TypeError, match="index dtype"):
        csr_conv2d_torch(x, crow.float(), col.float(), values, O, 3, 3)
    with pytest.raises(ValueError, match=r"crow must be \[o \+ 1\] = \[7\]"):
        csr_conv2d_torch(x, crow, col, values, O - 1, 3, 3)
    with pytest.raises(ValueError, match="col and values"):
        csr_conv2d_torch(x, crow, col, values[:-1], O, 3, 3)
    with pytest.raises(TypeError, match="crow must be a torch.Tensor"):
        csr_conv2d_torch(x, crow.tolist(), col, values, O, 3, 3)
    with pytest.raises(ValueError, match="kh must be a positive int"):
        csr_conv2d_torch(x, crow, col, values, O, 0, 3)
    with pytest.raises(ValueError, match="o must be a non-negative int"):
        csr_conv2d_torch(x, crow, col, values, -1, 3, 3)
    with pytest.raises(ValueError, match="crow must rise"):
        csr_conv2d_torch(x, crow.flip(0), col, values, O, 3, 3)
    with pytest.raises(ValueError, match="col indices must lie"):
        csr_conv2d_torch(x, crow, -col - 1, values, O, 3, 3)                    # negative columns
    # Validation is cached per unchanged index tensor; an in-place write must invalidate it.
    col2 = col.clone()
    csr_conv2d_torch(x, crow, col2, values, O, 3, 3)
    col2[0] = C * 9
    with pytest.raises(ValueError, match="col indices must lie"):
        csr_conv2d_torch(x, crow, col2, values, O, 3, 3)
    for kwargs, pattern in [
        (dict(stride=0), "stride must be >= 1"),
        (dict(stride=(1, 2, 3)), "stride must be an int or a pair"),
        (dict(padding=-1), "padding must be >= 0"),
        (dict(padding="same"), "padding must be an int or a pair"),
        (dict(dilation=0), "dilation must be >= 1"),
        (dict(dilation=5), "too small for a 3x3 kernel"),
        (dict(bias=torch.randn(O + 1)), "bias must have shape"),
        (dict(residual=torch.randn(2, O, H, W)), r"residual must have shape \(2, 7, 7, 9\)"),
        (dict(activation="tanh"), "activation must be one of"),
        (dict(out=torch.empty(2, O, 7, 8)), "out must have shape"),
        (dict(out=torch.empty(2, O, 7, 9, dtype=torch.float16)), "out must be torch.float32"),
        (dict(out=torch.empty(2, O, 7, 18)[..., ::2]), "out must be contiguous"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            csr_conv2d_torch(*args, **kwargs)
    with pytest.raises(TypeError, match="out_dtype must be a floating"):
        csr_conv2d_torch(*args, out_dtype=torch.int32)


def test_mismatched_device(gen):
    w, (crow, col, values) = _small(gen)
    x = _make_x(2, C, H, W, torch.float32, "cpu", gen)
    with pytest.raises(ValueError, match="values is on meta but x is on cpu"):
        csr_conv2d_torch(x, crow, col, values.to("meta"), O, 3, 3)
    with pytest.raises(ValueError, match="col is on meta but x is on cpu"):
        csr_conv2d_torch(x, crow, col.to("meta"), values, O, 3, 3)
    with pytest.raises(ValueError, match="bias is on meta"):
        csr_conv2d_torch(x, crow, col, values, O, 3, 3, bias=torch.empty(O, device="meta"))


def test_convenience_errors(gen):
    w, _ = _small(gen)
    x = _make_x(2, C, H, W, torch.float32, "cpu", gen)
    with pytest.raises(ValueError, match="w_csr must be a torch.sparse_csr"):
        csr_conv2d(x, w, 3, 3)
    with pytest.raises(ValueError, match=r"x must be \[N, C, H, W\] with C \* kh \* kw = 45"):
        csr_conv2d(x, pack_csr_conv(w), 3, 1)
    with pytest.raises(ValueError, match=r"x must be \[N, C, H, W\]"):
        csr_conv2d(x[0], pack_csr_conv(w), 3, 3)
    with pytest.raises(ValueError, match="kw must be a positive int"):
        csr_conv2d(x, pack_csr_conv(w), 3, 0)


# ------------------------------------------------------------------------------------------------
# Custom op, fake tensors, torch.compile, torch.export
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_op_and_fake(channels_last, gen, device):
    """The op gives the torch path's result; its fake gives the same shape, dtype and memory format."""
    w = _sparse_weight(O, C, 3, 5, 0.75, torch.float16, device, gen)
    crow, col, values = csr_parts(pack_csr_conv(w))
    x = _make_x(3, C, H, W, torch.float16, device, gen, channels_last)
    bias = randn(O, dtype=torch.float16, device=device, generator=gen)
    op_args = (x, crow, col, values, O, 3, 5, [2, 1], [1, 2], [1, 1], bias, None, "relu", torch.float32)
    y = torch.ops.sparsify.csr_conv2d(*op_args)
    torch.testing.assert_close(y, csr_conv2d_torch(*op_args))
    torch.testing.assert_close(csr_conv2d(x, pack_csr_conv(w), 3, 5, bias, (2, 1), (1, 2),
                                          activation="relu", out_dtype=torch.float32), y)
    assert rel_l2(y, conv_f64(x, w, bias, (2, 1), (1, 2), 1, None, "relu")) <= TOLERANCE[torch.float16]
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fake = torch.ops.sparsify.csr_conv2d(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a
                                               for a in op_args))
    assert fake.shape == y.shape and fake.dtype == y.dtype and fake.stride() == y.stride()
    assert KERNEL_VERSION == "csr_conv2d-1"


class _CSRConv(torch.nn.Module):
    def __init__(self, w_dense, bias):
        super().__init__()
        crow, col, values = csr_parts(pack_csr_conv(w_dense))
        self.register_buffer("crow", crow)
        self.register_buffer("col", col)
        self.register_buffer("values", values)
        self.register_buffer("bias", bias)
        self.o, _, self.kh, self.kw = w_dense.shape

    def forward(self, x, residual):
        return torch.ops.sparsify.csr_conv2d(x, self.crow, self.col, self.values, self.o, self.kh, self.kw,
                                             [2, 2], [1, 1], [1, 1], self.bias, residual, "silu")


def test_custom_op_compile_and_export(gen, device):
    w = _sparse_weight(O, C, 3, 3, 0.9, torch.float32, device, gen)
    mod = _CSRConv(w, randn(O, device=device, generator=gen))
    x = _make_x(2, C, H, W, torch.float32, device, gen, channels_last=True)
    residual = randn(2, O, 5, 6, device=device, generator=gen)
    eager = mod(x, residual)
    ref = conv_f64(x, w, mod.bias, 2, 1, 1, residual, "silu")
    assert rel_l2(eager, ref) <= TOLERANCE[torch.float32]
    assert eager.is_contiguous(memory_format=CL)

    compiled = torch.compile(mod, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, residual), eager)

    exported = torch.export.export(mod, (x, residual))
    nodes = [node for node in exported.graph.nodes if node.op == "call_function"
             and node.target == torch.ops.sparsify.csr_conv2d.default]
    assert len(nodes) == 1 and tuple(nodes[0].meta["val"].shape) == (2, O, 5, 6)
    torch.testing.assert_close(exported.module()(x, residual), eager)


# ------------------------------------------------------------------------------------------------
# GPU-sized (cuSPARSE through torch's CSR matmul; run by `pytest -m gpu`)
# ------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("geom", [(3, 1, 1), (1, 1, 0), (3, 2, 1)], ids=["3x3", "1x1", "3x3s2"])
def test_gpu_resnet_layer(geom, dtype, gen):
    """A ResNet-50 stage-3 conv at batch 4, 90% sparse, with the bias + relu + residual epilogue."""
    k, stride, pad = geom
    batch, c, o, hw = 4, 256, 256, 14
    w = _sparse_weight(o, c, k, k, 0.9, dtype, "cuda", gen)
    x = _make_x(batch, c, hw, hw, dtype, "cuda", gen)
    hout = (hw + 2 * pad - k) // stride + 1
    bias = randn(o, dtype=dtype, device="cuda", generator=gen)
    residual = randn(batch, o, hout, hout, dtype=dtype, device="cuda", generator=gen)
    _run_and_check(x, w, stride, pad, 1, bias, residual, "relu")
    _run_and_check(x, w, stride, pad, 1)
