"""N:M sparse linear: mask, packing format, Triton kernel vs float64 reference, custom op."""
import zlib

import pytest
import torch

from kernel_utils import DTYPES, ODD_LINEAR_SHAPES, TOLERANCE, poison, randn, rel_l2
from sparsify.codegen.epilogue import ACTIVATIONS
from sparsify.codegen.kernels import nm_linear as nml
from sparsify.codegen.kernels.nm_linear import (
    NMWeight, meta_cols, nm_linear, nm_linear_reference, nm_linear_triton, nm_mask, pack_nm, unpack_nm,
)
from sparsify.codegen.runtime import force_triton

# 2:4 is the hardware format; 1:4 and 2:8 exercise the general path (other bit widths, groups per byte).
NM_CASES = [(2, 4), (1, 4), (2, 8)]
# Every epilogue the fused kernels support: (has_bias, activation, has_residual).
EPILOGUES = [(b, a, r) for b in (False, True) for a in ACTIVATIONS for r in (False, True)]


@pytest.fixture
def gen(request):
    """A generator seeded from the test id: fresh inputs per test, reproducible across runs."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def _nm_weight(n_out, k, n, m, dtype, device, gen):
    dense = randn(n_out, k, generator=gen)
    w = dense * nm_mask(randn(n_out, k, generator=gen), n, m)
    return pack_nm(w.to(device=device, dtype=dtype), n, m)


def _run_and_check(x, w: NMWeight, bias, residual, activation, device):
    """Launch the kernel into a poisoned `out` and compare with the float64 reference."""
    out = poison(torch.empty(x.shape[:-1] + (w.n_out,), dtype=x.dtype, device=device))
    with force_triton():
        got = nm_linear_triton(x, w.values, w.meta, w.n_out, w.k, w.n, w.m, bias, residual, activation,
                               out=out)
    assert got is out
    ref = nm_linear_reference(x.double(), w.values.double(), w.meta, w.n_out, w.k, w.n, w.m,
                              None if bias is None else bias.double(),
                              None if residual is None else residual.double(), activation)
    err = rel_l2(got, ref)
    assert err <= TOLERANCE[x.dtype], f"rel_l2 {err:.2e} > {TOLERANCE[x.dtype]:.0e}"


def _epilogue_inputs(lead, n_out, dtype, device, gen, has_bias, has_residual):
    bias = randn(n_out, dtype=dtype, device=device, generator=gen) if has_bias else None
    residual = randn(*lead, n_out, dtype=dtype, device=device, generator=gen) if has_residual else None
    return bias, residual


# ---- mask and format -------------------------------------------------------------------------

@pytest.mark.parametrize("n,m", NM_CASES + [(3, 8), (1, 2), (5, 16)])
@pytest.mark.parametrize("k", [64, 37])
def test_nm_mask_keeps_largest_n_of_every_group(n, m, k, gen):
    scores = randn(13, k, generator=gen)
    mask = nm_mask(scores, n, m)
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    for g0 in range(0, k, m):
        s = scores[:, g0:g0 + m].abs()
        kept = mask[:, g0:g0 + m]
        assert (kept.sum(1) == min(n, s.shape[1])).all()
        if kept.shape[1] > n:  # every kept |score| is at least every dropped one
            assert (s.masked_fill(~kept, float("inf")).amin(1)
                    >= s.masked_fill(kept, float("-inf")).amax(1)).all()


@pytest.mark.parametrize("n,m", NM_CASES + [(3, 8), (1, 2), (5, 16), (2, 3)])
@pytest.mark.parametrize("k", [64, 37])
def test_pack_unpack_round_trip(n, m, k, gen):
    w_dense = randn(11, k, generator=gen)
    w_dense = w_dense * nm_mask(w_dense, n, m)
    w = pack_nm(w_dense, n, m)
    groups = -(-k // m)
    assert w.values.shape == (11, groups * n) and w.values.dtype == w_dense.dtype
    assert w.meta.shape == (11, meta_cols(k, n, m)) and w.meta.dtype == torch.uint8
    assert (w.n, w.m, w.k, w.n_out) == (n, m, k, 11)
    assert torch.equal(unpack_nm(w), w_dense)


def test_2to4_meta_layout_and_bytes():
    # Row: group 0 keeps positions 1, 3; group 1 keeps 0, 2. Indices are 2 bits, lowest bits first,
    # two groups per byte: 1 | 3 << 2 | 0 << 4 | 2 << 6 = 141.
    w = torch.tensor([[0.0, 1.0, 0.0, 2.0, 3.0, 0.0, 4.0, 0.0]])
    packed = pack_nm(w, 2, 4)
    assert packed.values.tolist() == [[1.0, 2.0, 3.0, 4.0]]
    assert packed.meta.tolist() == [[141]]
    # The point of the format: fp16 2:4 reads K + K/8 bytes per row instead of 2K.
    big = pack_nm(torch.randn(8, 256).half() * nm_mask(torch.randn(8, 256), 2, 4), 2, 4)
    assert big.nbytes == 8 * (256 + 256 // 8) < 8 * 256 * 2


def test_pack_pads_groups_with_fewer_nonzeros(gen):
    w = randn(4, 24, generator=gen) * nm_mask(randn(4, 24, generator=gen), 2, 8)
    w[0, :8] = 0.0          # an empty group
    w[1, 8:16] = 0.0
    w[1, 13] = 5.0          # a group with one nonzero
    w[:, 16:] = 0.0         # every row's last group empty
    packed = pack_nm(w, 2, 8)
    assert torch.equal(unpack_nm(packed), w)
    positions = nml._unpack_meta(packed.meta, 3 * 2, 8).reshape(4, 3, 2)
    assert (positions[..., 0] < positions[..., 1]).all(), "padding must use distinct, sorted positions"


def test_pack_rejects_non_nm_weight_naming_row_and_group(gen):
    w = randn(5, 16, generator=gen)
    w = w * nm_mask(w, 2, 4)
    w[3, 5] = w[3, 6] = w[3, 7] = w[3, 4] = 1.0   # row 3, group 1 is dense
    with pytest.raises(ValueError, match=r"not 2:4 sparse: row 3, group 1"):
        pack_nm(w, 2, 4)


@pytest.mark.parametrize("n,m", [(3, 2), (0, 4), (4, 4), (1, 17), (2.0, 4), (True, 4)])
def test_bad_n_m_raise(n, m):
    w = torch.randn(4, 16)
    with pytest.raises(ValueError, match="N:M sparsity"):
        nm_mask(w, n, m)
    with pytest.raises(ValueError, match="N:M sparsity"):
        pack_nm(w, n, m)


# ---- kernel vs reference ---------------------------------------------------------------------

@pytest.mark.parametrize("n,m", NM_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape_idx", range(len(ODD_LINEAR_SHAPES)))
def test_kernel_matches_reference(shape_idx, dtype, n, m, device, gen):
    M, K, N = ODD_LINEAR_SHAPES[shape_idx]
    # Rotate through the epilogues so every shape and dtype meets several of them.
    rotation = shape_idx * 7 + DTYPES.index(dtype) * 3 + m
    has_bias, activation, has_residual = EPILOGUES[rotation % len(EPILOGUES)]
    w = _nm_weight(N, K, n, m, dtype, device, gen)
    x = randn(M, K, dtype=dtype, device=device, generator=gen)
    bias, residual = _epilogue_inputs((M,), N, dtype, device, gen, has_bias, has_residual)
    _run_and_check(x, w, bias, residual, activation, device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("has_bias,activation,has_residual", EPILOGUES)
def test_every_epilogue(has_bias, activation, has_residual, dtype, device, gen):
    M, K, N = 5, 80, 39   # K = 80 is not a multiple of the M<=16 BLOCK_K; N is odd
    w = _nm_weight(N, K, 2, 4, dtype, device, gen)
    x = randn(M, K, dtype=dtype, device=device, generator=gen)
    bias, residual = _epilogue_inputs((M,), N, dtype, device, gen, has_bias, has_residual)
    _run_and_check(x, w, bias, residual, activation, device)


@pytest.mark.parametrize("n,m,k", [(2, 4, 38), (3, 8, 100), (5, 16, 45), (1, 2, 33), (2, 3, 50)])
def test_general_nm_and_partial_last_group(n, m, k, device, gen):
    # 3:8 and 5:16 take the one-load-per-index metadata path; K here leaves a partial last group.
    w = _nm_weight(21, k, n, m, torch.float16, device, gen)
    x = randn(7, k, dtype=torch.float16, device=device, generator=gen)
    bias, residual = _epilogue_inputs((7,), 21, torch.float16, device, gen, True, True)
    _run_and_check(x, w, bias, residual, "silu", device)


@pytest.mark.parametrize("block_m,block_n,block_k", [(16, 16, 16), (32, 64, 32), (64, 16, 128)])
def test_tile_overrides(block_m, block_n, block_k, device, gen):
    M, K, N = 40, 72, 50
    w = _nm_weight(N, K, 2, 4, torch.float32, device, gen)
    x = randn(M, K, device=device, generator=gen)
    with force_triton():
        got = nm_linear_triton(x, w.values, w.meta, N, K, 2, 4, block_m=block_m, block_n=block_n,
                               block_k=block_k)
    ref = nm_linear_reference(x.double(), w.values.double(), w.meta, N, K, 2, 4)
    assert rel_l2(got, ref) <= TOLERANCE[torch.float32]


def test_leading_dims_strided_x_and_empty(device, gen):
    K, N = 48, 24
    w = _nm_weight(N, K, 2, 4, torch.float32, device, gen)
    x = randn(2, 3, 2 * K, device=device, generator=gen)[..., ::2]   # non-unit stride along K
    residual = randn(2, 3, N, device=device, generator=gen)
    _run_and_check(x, w, None, residual, "relu", device)
    empty = randn(0, K, device=device, generator=gen)
    with force_triton():
        y = nm_linear_triton(empty, w.values, w.meta, N, K, 2, 4)
    assert y.shape == (0, N)


@pytest.mark.parametrize("n_out,k", [(0, 8), (5, 0)])
def test_empty_weights(n_out, k, device, gen):
    w = pack_nm(torch.zeros(n_out, k, device=device), 2, 4)
    assert unpack_nm(w).shape == (n_out, k)
    bias = randn(n_out, device=device, generator=gen)
    with force_triton():
        y = nm_linear_triton(randn(3, k, device=device, generator=gen), w.values, w.meta, n_out, k, 2, 4,
                             bias=bias)
    torch.testing.assert_close(y, bias.expand(3, n_out))   # an empty reduction leaves the epilogue


def test_argument_errors(gen):
    K, N = 32, 8
    w = _nm_weight(N, K, 2, 4, torch.float32, "cpu", gen)
    x = randn(3, K, generator=gen)
    args = (w.values, w.meta, N, K, 2, 4)
    with force_triton():
        with pytest.raises(TypeError, match="x dtype"):
            nm_linear_triton(x.double(), w.values.double(), w.meta, N, K, 2, 4)
        with pytest.raises(TypeError, match="values dtype"):
            nm_linear_triton(x.half(), *args)
        with pytest.raises(ValueError, match=r"x must be \[\.\.\., k_in=32\]"):
            nm_linear_triton(x[:, :-1], *args)
        with pytest.raises(ValueError, match="values must be"):
            nm_linear_triton(x, w.values[:, :-1], w.meta, N, K, 2, 4)
        with pytest.raises(ValueError, match="meta must be"):
            nm_linear_triton(x, w.values, w.meta[:, :-1], N, K, 2, 4)
        with pytest.raises(TypeError, match="meta must be uint8"):
            nm_linear_triton(x, w.values, w.meta.to(torch.int32), N, K, 2, 4)
        with pytest.raises(ValueError, match="bias must have shape"):
            nm_linear_triton(x, *args, bias=torch.randn(N + 1))
        with pytest.raises(ValueError, match="residual must have shape"):
            nm_linear_triton(x, *args, residual=torch.randn(3, N + 1))
        with pytest.raises(ValueError, match="activation must be one of"):
            nm_linear_triton(x, *args, activation="tanh")
        with pytest.raises(ValueError, match="out must have shape"):
            nm_linear_triton(x, *args, out=torch.empty(3, N + 1))
        with pytest.raises(ValueError, match="N:M sparsity"):
            nm_linear_triton(x, w.values, w.meta, N, K, 4, 4)
        with pytest.raises(ValueError, match="block_k must be a power of two"):
            nm_linear_triton(x, *args, block_k=24)
        with pytest.raises(ValueError, match="is on meta but x is on cpu"):
            nm_linear_triton(x, w.values.to("meta"), w.meta, N, K, 2, 4)


# ---- custom op: dispatch, torch.compile, torch.export -----------------------------------------

class _NMLinear(torch.nn.Module):
    def __init__(self, w: NMWeight, bias):
        super().__init__()
        self.register_buffer("values", w.values)
        self.register_buffer("nm_meta", w.meta)
        self.register_buffer("bias", bias)
        self.shape = (w.n_out, w.k, w.n, w.m)

    def forward(self, x, residual):
        n_out, k, n, m = self.shape
        return torch.ops.sparsify.nm_linear(x, self.values, self.nm_meta, n_out, k, n, m, self.bias,
                                            residual, "gelu_tanh")


def test_custom_op_runs_kernel_or_reference(device, gen):
    w = _nm_weight(20, 40, 2, 4, torch.float32, device, gen)
    x = randn(3, 40, device=device, generator=gen)
    ref = nm_linear_reference(x.double(), w.values.double(), w.meta, 20, 40, 2, 4, activation="silu")
    y_default = nm_linear(x, w, activation="silu")          # reference on CPU, kernel on CUDA
    with force_triton():
        y_kernel = nm_linear(x, w, activation="silu")
    assert rel_l2(y_default, ref) <= TOLERANCE[torch.float32]
    assert rel_l2(y_kernel, ref) <= TOLERANCE[torch.float32]


def test_torch_compile_and_export(device, gen):
    w = _nm_weight(24, 36, 2, 4, torch.float32, device, gen)
    mod = _NMLinear(w, randn(24, device=device, generator=gen))
    x = randn(2, 5, 36, device=device, generator=gen)
    residual = randn(2, 5, 24, device=device, generator=gen)
    eager = mod(x, residual)

    compiled = torch.compile(mod, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, residual), eager)

    exported = torch.export.export(mod, (x, residual))
    targets = [node.target for node in exported.graph.nodes if node.op == "call_function"]
    assert torch.ops.sparsify.nm_linear.default in targets
    torch.testing.assert_close(exported.module()(x, residual), eager)
