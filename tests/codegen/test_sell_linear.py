"""SELL (sliced ELLPACK) linear: packing format, Triton kernel vs float64 reference, checks, custom op."""
import zlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from kernel_utils import DTYPES, TOLERANCE, poison, randn, rel_l2
from sparsify.codegen.epilogue import ACTIVATIONS
from sparsify.codegen.kernels.sell_linear import (
    KERNEL_VERSION, SELLWeight, _config_for, pack_sell, sell_linear, sell_linear_reference,
    sell_linear_triton, unpack_sell,
)
from sparsify.codegen.runtime import force_triton

# Every epilogue the fused kernel supports: (has_bias, activation, has_residual).
EPILOGUES = [(b, a, r) for b in (False, True) for a in ACTIVATIONS for r in (False, True)]
DENSITIES = (0.02, 0.1, 0.3)
# (K, N, slice_rows): N never a multiple of the slice, K odd, N past two slices so that one of
# them can be emptied.
SHAPES = [(45, 70, 16), (127, 75, 32), (301, 130, 8)]


@pytest.fixture
def gen(request):
    """A generator seeded from the test id: fresh inputs per test, reproducible across runs."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def _sparse_weight(n_out, k, density, gen, empty_slice=0):
    """Random [n_out, k] float32 weight, Bernoulli(density) mask, row 1 all zero, and, given
    empty_slice=S, the S rows of a slice-aligned run in the middle all zero: a whole empty slice
    in the original row order, and (with row 1) more empty rows than the short last slice holds
    once sorted, so an empty slice either way."""
    w = randn(n_out, k, generator=gen) * (torch.rand(n_out, k, generator=gen) < density)
    w[:, 0] = torch.where(torch.rand(n_out, generator=gen) < 0.5, w[:, 0], 0.0)
    w[0, 0] = 1.5   # at least one real entry in column 0, where the padding points too
    w[1] = 0.0
    if empty_slice:
        first = empty_slice * ((n_out // empty_slice) // 2)
        w[first:first + empty_slice] = 0.0
    if not (w[2:] != 0).any():
        w[2, -1] = 1.0
    return w


def _args(p: SELLWeight):
    return (p.values, p.cols, p.slice_ptr, p.perm, p.n_out, p.k_in, p.slice_rows)


def _epilogue_inputs(lead, n_out, dtype, gen, has_bias, has_residual):
    bias = randn(n_out, dtype=dtype, generator=gen) if has_bias else None
    residual = randn(*lead, n_out, dtype=dtype, generator=gen) if has_residual else None
    return bias, residual


def _run_and_check(x, p: SELLWeight, bias=None, residual=None, activation="none", out_dtype=None, **launch):
    """Launch the kernel into a poisoned `out` and compare with the float64 reference."""
    out_dtype = out_dtype or x.dtype
    out = poison(torch.empty(x.shape[:-1] + (p.n_out,), dtype=out_dtype, device=x.device))
    with force_triton():
        got = sell_linear_triton(x, *_args(p), bias, residual, activation, out_dtype, out, **launch)
    assert got is out
    ref = sell_linear_reference(x.double(), p.values.double(), *_args(p)[1:],
                                None if bias is None else bias.double(),
                                None if residual is None else residual.double(), activation)
    err = rel_l2(got, ref)
    tol = max(TOLERANCE[x.dtype], TOLERANCE[out_dtype])
    assert err <= tol, f"rel_l2 {err:.2e} > {tol:.0e}"


# ---- format ----------------------------------------------------------------------------------

@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("slice_rows,sort_window", [(8, 1), (16, 32), (32, None), (64, None)])
def test_pack_unpack_round_trip_and_invariants(density, slice_rows, sort_window, gen):
    n_out, k = 150, 77
    w = _sparse_weight(n_out, k, density, gen, empty_slice=slice_rows)
    p = pack_sell(w, slice_rows, sort_window)
    assert torch.equal(unpack_sell(p), w)
    s = slice_rows
    n_slices = -(-n_out // s)
    assert (p.n_out, p.k_in, p.slice_rows, p.n_slices) == (n_out, k, s, n_slices)
    assert p.values.dtype == w.dtype and p.cols.dtype == torch.int16 and p.perm.dtype == torch.int32
    assert p.slice_ptr.dtype == torch.int64 and p.slice_ptr.shape == (n_slices + 1,)
    assert torch.equal(p.perm.sort().values, torch.arange(n_out, dtype=torch.int32))

    counts = (w != 0).sum(1)[p.perm.long()]
    assert p.nnz == int(counts.sum()) and p.slots == int(p.slice_ptr[-1]) == p.values.numel()
    widths = (p.slice_ptr[1:] - p.slice_ptr[:-1]) // s
    padded = torch.nn.functional.pad(counts, (0, n_slices * s - n_out))
    assert torch.equal(widths, padded.reshape(n_slices, s).amax(1))   # as narrow as the slice allows
    assert (widths == 0).any()                                        # the emptied slice
    assert p.padding_overhead == pytest.approx((p.slots - p.nnz) / p.nnz)
    window = n_out if sort_window is None else sort_window
    for w0 in range(0, n_out, window):
        chunk = counts[w0:w0 + window]
        assert (chunk[:-1] >= chunk[1:]).all() or window == 1         # largest first per window
    if sort_window == 1:
        assert torch.equal(p.perm, torch.arange(n_out, dtype=torch.int32))
    # Padding slots: value 0, column 0.
    assert int((p.values != 0).sum()) == p.nnz
    assert int((p.cols[p.values == 0] != 0).sum()) == 0


def test_slot_major_layout():
    w = torch.zeros(10, 6)
    w[0, [1, 4]] = torch.tensor([1.0, 2.0])
    w[3, [0, 2, 5]] = torch.tensor([3.0, 4.0, 5.0])
    w[9, 3] = 6.0                                                     # in the short second slice
    p = pack_sell(w, 8, sort_window=1)
    assert p.slice_ptr.tolist() == [0, 24, 32]                        # widths 3 and 1
    v = p.values[:24].reshape(3, 8)                                   # [entry j, row r] within slice 0
    c = p.cols[:24].reshape(3, 8)
    assert v[:, 0].tolist() == [1.0, 2.0, 0.0] and c[:, 0].tolist() == [1, 4, 0]
    assert v[:, 3].tolist() == [3.0, 4.0, 5.0] and c[:, 3].tolist() == [0, 2, 5]
    assert p.values[24:].tolist() == [0.0, 6.0] + [0.0] * 6 and int(p.cols[25]) == 3
    assert p.nbytes == 32 * 4 + 32 * 2 + 3 * 8 + 10 * 4


def test_sorting_cuts_padding_on_random_masks(gen):
    w = randn(512, 512, generator=gen) * (torch.rand(512, 512, generator=gen) < 0.05)
    unsorted, default = pack_sell(w, 32, sort_window=1), pack_sell(w, 32)
    assert default.padding_overhead < 0.05 < unsorted.padding_overhead
    assert default.nbytes < unsorted.nbytes
    assert torch.equal(unpack_sell(default), unpack_sell(unsorted))


def test_index_dtype_choice(gen):
    assert pack_sell(torch.ones(2, 32767)).cols.dtype == torch.int16
    wide = torch.zeros(2, 32768)
    wide[1, 32767] = 2.0
    p = pack_sell(wide)
    assert p.cols.dtype == torch.int32 and int(p.cols.max()) == 32767
    assert torch.equal(unpack_sell(p), wide)
    with pytest.raises(ValueError, match="int16 holds columns up to 32767"):
        pack_sell(wide, index_dtype=torch.int16)
    # int32 columns on a small K go through the kernel the same way.
    w = _sparse_weight(40, 33, 0.3, gen)
    p32 = pack_sell(w, 16, index_dtype=torch.int32)
    assert p32.cols.dtype == torch.int32
    _run_and_check(randn(3, 33, generator=gen), p32, activation="relu")


def test_pack_errors():
    with pytest.raises(ValueError, match="weight must be a 2-D"):
        pack_sell(torch.randn(8))
    with pytest.raises(TypeError, match="weight must be a floating tensor"):
        pack_sell(torch.ones(4, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="slice_rows must be a power of two"):
        pack_sell(torch.randn(4, 4), 24)
    with pytest.raises(ValueError, match="sort_window must be 1"):
        pack_sell(torch.randn(4, 4), 16, sort_window=24)
    with pytest.raises(TypeError, match="index_dtype must be one of"):
        pack_sell(torch.randn(4, 4), index_dtype=torch.int64)
    with pytest.raises(TypeError, match="expected a SELLWeight"):
        unpack_sell(torch.randn(4, 4))


# ---- kernel vs reference ---------------------------------------------------------------------

@pytest.mark.parametrize("M", [1, 3, 17])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("density", DENSITIES)
def test_kernel_matches_reference(density, dtype, M, gen):
    case = DENSITIES.index(density) * 9 + DTYPES.index(dtype) * 3 + [1, 3, 17].index(M)
    K, N, s = SHAPES[case % len(SHAPES)]
    has_bias, activation, has_residual = EPILOGUES[(case * 7) % len(EPILOGUES)]
    w = _sparse_weight(N, K, density, gen, empty_slice=s)
    p = pack_sell(w.to(dtype), s, sort_window=1 if case % 2 else None)
    x = randn(M, K, dtype=dtype, generator=gen)
    bias, residual = _epilogue_inputs((M,), N, dtype, gen, has_bias, has_residual)
    _run_and_check(x, p, bias, residual, activation)


@pytest.mark.parametrize("has_bias,activation,has_residual", EPILOGUES)
def test_every_epilogue(has_bias, activation, has_residual, gen):
    dtype = DTYPES[EPILOGUES.index((has_bias, activation, has_residual)) % len(DTYPES)]
    K, N = 39, 50
    p = pack_sell(_sparse_weight(N, K, 0.3, gen).to(dtype), 16)
    x = randn(4, K, dtype=dtype, generator=gen)
    bias, residual = _epilogue_inputs((4,), N, dtype, gen, has_bias, has_residual)
    _run_and_check(x, p, bias, residual, activation)


def test_3d_and_strided_x(gen):
    K, N = 37, 45
    p = pack_sell(_sparse_weight(N, K, 0.1, gen), 16)
    x = randn(2, 3, K, generator=gen)
    bias, residual = _epilogue_inputs((2, 3), N, torch.float32, gen, True, True)
    _run_and_check(x, p, bias, residual, "silu")
    strided = randn(5, 2 * K, generator=gen)[:, ::2]                  # stride 2 along K
    _run_and_check(strided, p, activation="gelu_tanh")
    residual_t = randn(N, 5, generator=gen).t()                       # a transposed residual
    _run_and_check(strided, p, residual=residual_t)


@pytest.mark.parametrize("dtype,out_dtype", [(torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                                             (torch.float32, torch.bfloat16)], ids=str)
def test_out_dtype(dtype, out_dtype, gen):
    K, N = 41, 36
    p = pack_sell(_sparse_weight(N, K, 0.3, gen).to(dtype), 32)
    x = randn(3, K, dtype=dtype, generator=gen)
    bias, residual = _epilogue_inputs((3,), N, dtype, gen, True, True)
    _run_and_check(x, p, bias, residual, "gelu", out_dtype=out_dtype)
    y = sell_linear(x, p, bias, residual, "gelu", out_dtype=out_dtype)   # the op, reference on CPU
    assert y.dtype == out_dtype


@pytest.mark.parametrize("block_m,block_k", [(1, 8), (4, 16), (16, 128)])
def test_launch_overrides(block_m, block_k, gen):
    K, N = 90, 40
    p = pack_sell(_sparse_weight(N, K, 0.3, gen), 8)
    x = randn(17, K, generator=gen)                                   # several token tiles
    _run_and_check(x, p, randn(N, generator=gen), None, "relu", block_m=block_m, block_k=block_k,
                   num_warps=2)


def test_config_for():
    assert _config_for(1, 32)[:2] == (1, 64) and _config_for(1, 8)[2] == 2
    assert _config_for(3, 32)[0] == 4 and _config_for(17, 32)[0] == 16 and _config_for(10**6, 32)[0] == 16
    for m in (1, 5, 16, 300):
        for s in (8, 32, 128):
            bm, bk, _ = _config_for(m, s)
            assert bk >= 8 and bk & (bk - 1) == 0 and bm * s * bk <= max(4096, bm * s * 8)
    assert KERNEL_VERSION == "sell_linear-1"


def test_all_zero_weight_and_empty_shapes(gen):
    bias = randn(9, generator=gen)
    p = pack_sell(torch.zeros(9, 20), 8)
    assert p.slots == 0 and p.nnz == 0 and p.padding_overhead == 0.0
    x = randn(4, 20, generator=gen)
    with force_triton():
        y = sell_linear_triton(x, *_args(p), bias, None, "relu")
        torch.testing.assert_close(y, torch.relu(bias).expand(4, 9))
        assert sell_linear_triton(x[:0], *_args(p)).shape == (0, 9)
        for n_out, k in ((0, 8), (5, 0)):
            pe = pack_sell(torch.zeros(n_out, k), 8)
            assert unpack_sell(pe).shape == (n_out, k)
            b = randn(n_out, generator=gen)
            ye = sell_linear_triton(randn(3, k, generator=gen), *_args(pe), b)
            torch.testing.assert_close(ye, b.expand(3, n_out))       # an empty reduction leaves the epilogue


# ---- argument checks -------------------------------------------------------------------------

def test_argument_errors(gen):
    K, N = 32, 20
    p = pack_sell(_sparse_weight(N, K, 0.3, gen), 8)
    v, c, sp, pm = p.values, p.cols, p.slice_ptr, p.perm
    x = randn(3, K, generator=gen)
    with force_triton():
        with pytest.raises(TypeError, match="x dtype"):
            sell_linear_triton(x.double(), v.double(), c, sp, pm, N, K, 8)
        with pytest.raises(TypeError, match="values dtype"):
            sell_linear_triton(x.half(), v, c, sp, pm, N, K, 8)
        with pytest.raises(ValueError, match=r"x must be \[\.\.\., k_in=32\]"):
            sell_linear_triton(x[:, :-1], v, c, sp, pm, N, K, 8)
        with pytest.raises(TypeError, match="cols must be one of"):
            sell_linear_triton(x, v, c.long(), sp, pm, N, K, 8)
        with pytest.raises(ValueError, match="values and cols must be 1-D of the same length"):
            sell_linear_triton(x, v, c[:-1], sp, pm, N, K, 8)
        with pytest.raises(ValueError, match="slice_rows must be a power of two"):
            sell_linear_triton(x, v, c, sp, pm, N, K, 12)
        with pytest.raises(ValueError, match=r"slice_ptr must be int64 \[ceil\(n_out / slice_rows\) \+ 1\]"):
            sell_linear_triton(x, v, c, sp, pm, N, K, 16)
        with pytest.raises(ValueError, match="slice_ptr must be int64"):
            sell_linear_triton(x, v, c, sp.int(), pm, N, K, 8)
        with pytest.raises(ValueError, match=r"perm must be int32 \[n_out\]"):
            sell_linear_triton(x, v, c, sp, pm.long(), N, K, 8)
        with pytest.raises(ValueError, match="n_out must be a non-negative int"):
            sell_linear_triton(x, v, c, sp, pm, -1, K, 8)
        with pytest.raises(ValueError, match="cols is on meta but x is on cpu"):
            sell_linear_triton(x, v, c.to("meta"), sp, pm, N, K, 8)
        with pytest.raises(ValueError, match="bias must have shape"):
            sell_linear_triton(x, *_args(p), bias=torch.randn(N + 1))
        with pytest.raises(ValueError, match="residual must have shape"):
            sell_linear_triton(x, *_args(p), residual=torch.randn(3, N + 1))
        with pytest.raises(ValueError, match="activation must be one of"):
            sell_linear_triton(x, *_args(p), activation="tanh")
        with pytest.raises(TypeError, match="out_dtype must be a floating torch.dtype"):
            sell_linear_triton(x, *_args(p), out_dtype=torch.int32)
        with pytest.raises(ValueError, match="out must have shape"):
            sell_linear_triton(x, *_args(p), out=torch.empty(3, N + 1))
        with pytest.raises(ValueError, match="block_m must be a power of two in 1..16"):
            sell_linear_triton(x, *_args(p), block_m=32)
        with pytest.raises(ValueError, match="block_k must be a power of two >= 8"):
            sell_linear_triton(x, *_args(p), block_k=12)
    with pytest.raises(TypeError, match="w must be a SELLWeight"):
        sell_linear(x, torch.randn(N, K))


@pytest.mark.parametrize("impl", [sell_linear_triton, sell_linear_reference], ids=["triton", "reference"])
def test_index_content_errors(impl, gen):
    K, N = 32, 20
    p = pack_sell(_sparse_weight(N, K, 0.3, gen), 8)
    v, c, sp, pm = p.values, p.cols, p.slice_ptr, p.perm
    x = randn(2, K, generator=gen)
    bad_cols = c.clone()
    bad_cols[-1] = K
    bad_ptr = sp.clone()
    bad_ptr[1] += 1
    dup_perm = pm.clone()
    dup_perm[0] = dup_perm[1]
    with force_triton():
        with pytest.raises(ValueError, match=r"cols must lie in \[0, k_in=32\)"):
            impl(x, v, bad_cols, sp, pm, N, K, 8)
        with pytest.raises(ValueError, match="slice_ptr must rise from 0 to slots"):
            impl(x, v, c, bad_ptr, pm, N, K, 8)
        with pytest.raises(ValueError, match=r"perm must be a permutation of range\(n_out=20\)"):
            impl(x, v, c, sp, dup_perm, N, K, 8)
        impl(x, v, c, sp, dup_perm, N, K, 8, check_indices=False)   # the caller's responsibility then


# ---- custom op: dispatch, fake, torch.compile, torch.export ----------------------------------

def test_custom_op_runs_kernel_or_reference(gen):
    p = pack_sell(_sparse_weight(40, 50, 0.1, gen), 16)
    x = randn(3, 50, generator=gen)
    ref = sell_linear_reference(x.double(), p.values.double(), *_args(p)[1:], activation="silu")
    y_default = sell_linear(x, p, activation="silu")                  # reference on CPU, kernel on CUDA
    with force_triton():
        y_kernel = sell_linear(x, p, activation="silu")
    assert rel_l2(y_default, ref) <= TOLERANCE[torch.float32]
    assert rel_l2(y_kernel, ref) <= TOLERANCE[torch.float32]


def test_schema_and_fake(gen):
    op = torch.ops.sparsify.sell_linear.default
    schema = str(op._schema)
    assert schema.endswith('str activation="none", ScalarType? out_dtype=None) -> Tensor'), schema
    p = pack_sell(_sparse_weight(24, 30, 0.3, gen).half(), 8)
    x = randn(2, 3, 30, dtype=torch.float16, generator=gen)
    args = (x, *_args(p), randn(24, dtype=torch.float16, generator=gen), None, "gelu", torch.float32)
    torch.library.opcheck(op, args)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        y = op(*fake)
        assert y.shape == (2, 3, 24) and y.dtype == torch.float32
        assert op(*fake[:-1], None).dtype == torch.float16


class _SELLLinear(torch.nn.Module):
    def __init__(self, p: SELLWeight, bias):
        super().__init__()
        for name in ("values", "cols", "slice_ptr", "perm"):
            self.register_buffer(name, getattr(p, name))
        self.register_buffer("bias", bias)
        self.shape = (p.n_out, p.k_in, p.slice_rows)

    def forward(self, x, residual):
        n_out, k, s = self.shape
        return torch.ops.sparsify.sell_linear(x, self.values, self.cols, self.slice_ptr, self.perm, n_out, k, s,
                                              self.bias, residual, "gelu_tanh")


def test_torch_compile_and_export(gen):
    p = pack_sell(_sparse_weight(24, 36, 0.1, gen), 16)
    mod = _SELLLinear(p, randn(24, generator=gen))
    x = randn(2, 5, 36, generator=gen)
    residual = randn(2, 5, 24, generator=gen)
    with force_triton():
        eager = mod(x, residual)
        compiled = torch.compile(mod, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(x, residual), eager)
    exported = torch.export.export(mod, (x, residual))
    targets = [node.target for node in exported.graph.nodes if node.op == "call_function"]
    assert torch.ops.sparsify.sell_linear.default in targets
    torch.testing.assert_close(exported.module()(x, residual), eager)


def test_registered_weight_kernel(gen):
    from sparsify.codegen.registry import get, kernels_for
    from sparsify.patterns import NM, Unstructured

    wk = get("sell_triton")
    assert (wk.replaces == "linear" and wk.interpretable and wk.devices == ("cuda",) and wk.version == KERNEL_VERSION
            and wk.op == "sparsify::sell_linear")
    cuda = torch.device("cuda")
    assert wk in kernels_for(Unstructured(sparsity=0.9), cuda, torch.float16, (64, 64))[0]
    assert wk.unsupported_reason(NM(), cuda, torch.float16, (64, 64)) is not None
    w = _sparse_weight(40, 48, 0.1, gen)
    packed = wk.pack(w, Unstructured(sparsity=0.9))
    assert packed.nbytes() == pack_sell(w).nbytes
    x = randn(3, 48, generator=gen)
    bias = randn(40, generator=gen)
    with force_triton():
        y = wk.call(x, packed, bias, None, "relu")
    ref = torch.relu(x.double() @ w.double().t() + bias.double())
    assert rel_l2(y, ref) <= TOLERANCE[torch.float32]
