"""CSR linear (torch sparse CSR matmul): packing, vs float64 dense reference, checks, custom op."""
import zlib

import pytest
import torch

from kernel_utils import DTYPES, ODD_LINEAR_SHAPES, TOLERANCE, poison, randn, rel_l2
from sparsify.codegen.epilogue import ACTIVATIONS
from sparsify.codegen.kernels.csr_linear import (
    csr_linear, csr_linear_reference, csr_linear_torch, csr_parts, pack_csr, unpack_csr,
)

EPILOGUES = [(b, a, r) for b in (False, True) for a in ACTIVATIONS for r in (False, True)]


@pytest.fixture
def gen(request):
    """A generator seeded from the test id: fresh inputs per test, reproducible across runs."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def _sparse_weight(n_out, k, sparsity, dtype, device, gen):
    w = randn(n_out, k, generator=gen)
    keep = torch.rand(n_out, k, generator=gen) >= sparsity
    return (w * keep).to(device=device, dtype=dtype)


def _parts(w_csr):
    return csr_parts(w_csr)


def _run_and_check(x, w_dense, bias, residual, activation, crow_dtype=None):
    crow, col, values = _parts(pack_csr(w_dense))
    if crow_dtype is not None:
        crow, col = crow.to(crow_dtype), col.to(crow_dtype)
    n_out, k = w_dense.shape
    out = poison(torch.empty(x.shape[:-1] + (n_out,), dtype=x.dtype, device=x.device))
    got = csr_linear_torch(x, crow, col, values, n_out, k, bias=bias, residual=residual, activation=activation, out=out)
    assert got is out
    ref = csr_linear_reference(x.double(), crow, col, values.double(), n_out, k,
                               bias=None if bias is None else bias.double(),
                               residual=None if residual is None else residual.double(), activation=activation)
    err = rel_l2(got, ref)
    assert err <= TOLERANCE[x.dtype], f"rel_l2 {err:.2e} > {TOLERANCE[x.dtype]:.0e}"


def _epilogue_inputs(lead, n_out, dtype, device, gen, has_bias, has_residual):
    bias = randn(n_out, dtype=dtype, device=device, generator=gen) if has_bias else None
    residual = randn(*lead, n_out, dtype=dtype, device=device, generator=gen) if has_residual else None
    return bias, residual


def test_pack_unpack_round_trip(gen):
    w = _sparse_weight(13, 29, 0.9, torch.float32, "cpu", gen)
    packed = pack_csr(w)
    assert packed.layout == torch.sparse_csr and packed.shape == w.shape
    assert packed.values().numel() == int((w != 0).sum())
    assert torch.equal(unpack_csr(packed), w)
    crow, col, values = csr_parts(packed)
    assert not any(t._is_view() for t in (crow, col, values))   # buffers torch.compile can trace
    assert torch.equal(values, packed.values()) and torch.equal(col, packed.col_indices())


def test_pack_errors():
    with pytest.raises(ValueError, match="2-D"):
        pack_csr(torch.randn(8))
    with pytest.raises(TypeError, match="floating"):
        pack_csr(torch.ones(4, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="sparse_csr"):
        unpack_csr(torch.randn(4, 4))
    with pytest.raises(ValueError, match="sparse_csr"):
        csr_parts(torch.randn(4, 4))


@pytest.mark.parametrize("sparsity", [0.5, 0.95])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape_idx", range(len(ODD_LINEAR_SHAPES)))
def test_matches_reference(shape_idx, dtype, sparsity, device, gen):
    M, K, N = ODD_LINEAR_SHAPES[shape_idx]
    has_bias, activation, has_residual = EPILOGUES[(shape_idx * 7 + DTYPES.index(dtype) * 3) % len(EPILOGUES)]
    w = _sparse_weight(N, K, sparsity, dtype, device, gen)
    x = randn(M, K, dtype=dtype, device=device, generator=gen)
    bias, residual = _epilogue_inputs((M,), N, dtype, device, gen, has_bias, has_residual)
    _run_and_check(x, w, bias, residual, activation)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("has_bias,activation,has_residual", EPILOGUES)
def test_every_epilogue(has_bias, activation, has_residual, dtype, device, gen):
    M, K, N = 6, 45, 31
    w = _sparse_weight(N, K, 0.8, dtype, device, gen)
    x = randn(M, K, dtype=dtype, device=device, generator=gen)
    bias, residual = _epilogue_inputs((M,), N, dtype, device, gen, has_bias, has_residual)
    _run_and_check(x, w, bias, residual, activation)


def test_int32_indices_empty_rows_leading_dims(device, gen):
    w = _sparse_weight(17, 40, 0.9, torch.float32, device, gen)
    w[3] = 0.0
    w[-1] = 0.0   # empty rows, the last one included
    x = randn(2, 3, 40, device=device, generator=gen)
    bias, residual = _epilogue_inputs((2, 3), 17, torch.float32, device, gen, True, True)
    _run_and_check(x, w, bias, residual, "gelu", crow_dtype=torch.int32)


def test_all_zero_weight_and_no_tokens(device, gen):
    w = torch.zeros(9, 20, device=device)
    x = randn(4, 20, device=device, generator=gen)
    bias = randn(9, device=device, generator=gen)
    crow, col, values = _parts(pack_csr(w))
    y = csr_linear_torch(x, crow, col, values, 9, 20, bias=bias, activation="relu")
    torch.testing.assert_close(y, torch.relu(bias).expand(4, 9))
    empty = csr_linear_torch(x[:0], crow, col, values, 9, 20)
    assert empty.shape == (0, 9)


def test_argument_errors(gen):
    w = _sparse_weight(8, 16, 0.5, torch.float32, "cpu", gen)
    crow, col, values = _parts(pack_csr(w))
    x = randn(3, 16, generator=gen)
    with pytest.raises(TypeError, match="x dtype"):
        csr_linear_torch(x.double(), crow, col, values.double(), 8, 16)
    with pytest.raises(TypeError, match="values dtype"):
        csr_linear_torch(x.half(), crow, col, values, 8, 16)
    with pytest.raises(TypeError, match="index dtype"):
        csr_linear_torch(x, crow, col.int(), values, 8, 16)
    with pytest.raises(ValueError, match="crow must be"):
        csr_linear_torch(x, crow, col, values, 7, 16)
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., k_in=16\]"):
        csr_linear_torch(x[:, :-1], crow, col, values, 8, 16)
    with pytest.raises(ValueError, match="col indices must lie"):
        csr_linear_torch(x, crow, col + 16, values, 8, 16)
    # Validation is cached per unchanged index tensor; an in-place write must invalidate it.
    col2 = col.clone()
    csr_linear_torch(x, crow, col2, values, 8, 16)
    col2[0] = 99
    with pytest.raises(ValueError, match="col indices must lie"):
        csr_linear_torch(x, crow, col2, values, 8, 16)
    with pytest.raises(ValueError, match="crow must rise"):
        csr_linear_torch(x, crow.flip(0), col, values, 8, 16)
    with pytest.raises(ValueError, match="bias must have shape"):
        csr_linear_torch(x, crow, col, values, 8, 16, bias=torch.randn(9))
    with pytest.raises(ValueError, match="residual must have shape"):
        csr_linear_torch(x, crow, col, values, 8, 16, residual=torch.randn(3, 9))
    with pytest.raises(ValueError, match="activation must be one of"):
        csr_linear_torch(x, crow, col, values, 8, 16, activation="tanh")
    with pytest.raises(ValueError, match="out must have shape"):
        csr_linear_torch(x, crow, col, values, 8, 16, out=torch.empty(3, 9))
    with pytest.raises(ValueError, match="sparse_csr"):
        csr_linear(x, w)


class _CSRLinear(torch.nn.Module):
    def __init__(self, w_dense, bias):
        super().__init__()
        crow, col, values = _parts(pack_csr(w_dense))
        self.register_buffer("crow", crow)
        self.register_buffer("col", col)
        self.register_buffer("values", values)
        self.register_buffer("bias", bias)
        self.shape = tuple(w_dense.shape)

    def forward(self, x, residual):
        n_out, k = self.shape
        return torch.ops.sparsify.csr_linear(x, self.crow, self.col, self.values, n_out, k, "row", self.bias,
                                             residual, "silu")


def test_custom_op_compile_and_export(device, gen):
    w = _sparse_weight(24, 36, 0.9, torch.float32, device, gen)
    mod = _CSRLinear(w, randn(24, device=device, generator=gen))
    x = randn(2, 5, 36, device=device, generator=gen)
    residual = randn(2, 5, 24, device=device, generator=gen)
    eager = mod(x, residual)
    ref = csr_linear_reference(x.double(), mod.crow, mod.col, mod.values.double(), 24, 36,
                               bias=mod.bias.double(), residual=residual.double(), activation="silu")
    assert rel_l2(eager, ref) <= TOLERANCE[torch.float32]
    assert eager.is_contiguous()
    torch.testing.assert_close(csr_linear(x, pack_csr(w), mod.bias, residual, "silu"), eager)

    compiled = torch.compile(mod, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, residual), eager)

    exported = torch.export.export(mod, (x, residual))
    targets = [node.target for node in exported.graph.nodes if node.op == "call_function"]
    assert torch.ops.sparsify.csr_linear.default in targets
    torch.testing.assert_close(exported.module()(x, residual), eager)



# ---- the feature layout: x [K, M] -> y [N, M], what consecutive sparse layers hand each other ------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("has_bias,activation,has_residual", EPILOGUES)
def test_feature_layout_matches_the_token_major_reference(dtype, has_bias, activation, has_residual, device, gen):
    m, k, n = 7, 19, 13                       # odd, and n != m so a transposed result cannot pass
    w = _sparse_weight(n, k, 0.8, dtype, device, gen)
    crow, col, values = csr_parts(pack_csr(w))
    crow, col = crow.int(), col.int()
    x = randn(m, k, generator=gen).to(device=device, dtype=dtype)
    bias = randn(n, generator=gen).to(device=device, dtype=dtype) if has_bias else None
    residual = randn(m, n, generator=gen).to(device=device, dtype=dtype) if has_residual else None   # token-major
    out = poison(torch.empty(n, m, dtype=dtype, device=device))
    got = csr_linear_torch(x.t().contiguous(), crow, col, values, n, k, "feature", bias=bias, residual=residual,
                           activation=activation, out=out)
    assert got is out and got.shape == (n, m)
    ref = csr_linear_reference(x.double(), crow, col, values.double(), n, k,
                               bias=None if bias is None else bias.double(),
                               residual=None if residual is None else residual.double(), activation=activation)
    assert rel_l2(got.t(), ref) <= TOLERANCE[dtype]
    # the reference in the feature layout gives the same [N, M]
    ref_fm = csr_linear_reference(x.double().t(), crow, col, values.double(), n, k, "feature",
                                  bias=None if bias is None else bias.double(),
                                  residual=None if residual is None else residual.double(), activation=activation)
    assert torch.allclose(ref_fm, ref.t())


def test_feature_layout_checks_its_shapes(gen):
    w = _sparse_weight(8, 16, 0.5, torch.float32, "cpu", gen)
    crow, col, values = csr_parts(pack_csr(w))
    x = randn(16, 5, generator=gen)
    with pytest.raises(ValueError, match="layout must be one of"):
        csr_linear_torch(x, crow, col, values, 8, 16, "column")
    with pytest.raises(ValueError, match=r"layout='feature' takes x as \[k_in, M\]"):
        csr_linear_torch(x[None], crow, col, values, 8, 16, "feature")
    with pytest.raises(ValueError, match="x must be"):
        csr_linear_torch(x.t().contiguous(), crow, col, values, 8, 16, "feature")      # [5, 16]: k_in first
    with pytest.raises(ValueError, match="residual must have shape"):
        csr_linear_torch(x, crow, col, values, 8, 16, "feature", residual=randn(8, 5, generator=gen))


def test_pack_keeps_int32_indices(gen):
    from sparsify.codegen import registry
    from sparsify.patterns import Unstructured

    p = registry.get("csr_torch").pack(_sparse_weight(8, 16, 0.5, torch.float32, "cpu", gen), Unstructured(0.5))
    assert p.buffers["crow"].dtype == torch.int32 and p.buffers["col"].dtype == torch.int32
