"""Block-sparse linear on the CPU by dense block products, against a float64 torch reference."""
import zlib

import pytest
import torch

from kernel_utils import DTYPES, ODD_LINEAR_SHAPES, TOLERANCE, poison, randn, rel_l2
from sparsify.codegen.epilogue import ACTIVATIONS
from sparsify.codegen.kernels import bsr_blocks
from sparsify.codegen.kernels.bsr_blocks import bsr_blocks_cpu, bsr_blocks_reference
from sparsify.codegen.kernels.bsr_linear import pack_bsr
from test_bsr_linear import RAGGED_SHAPES, make_weight


@pytest.fixture
def gen(request):
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def _check(x, bsr, bias=None, residual=None, activation="none", out_dtype=None):
    out_dtype = out_dtype or x.dtype
    out = poison(torch.empty(x.shape[:-1] + (bsr.n,), dtype=out_dtype))
    got = bsr_blocks_cpu(x, bsr.values, bsr.row_ptr, bsr.col_idx, bsr.n, bias, residual, activation, out_dtype,
                         out=out)
    assert got is out
    d = lambda t: None if t is None else t.double()  # noqa: E731
    ref = bsr_blocks_reference(d(x), d(bsr.values), bsr.row_ptr, bsr.col_idx, bsr.n, d(bias), d(residual),
                               activation)
    err = rel_l2(got, ref)
    assert err <= TOLERANCE[out_dtype], f"rel_l2 {err:.3g} > {TOLERANCE[out_dtype]}"


@pytest.mark.parametrize("batched", [False, True], ids=["per-block", "batched"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block", [16, 32])
@pytest.mark.parametrize("shape", ODD_LINEAR_SHAPES + RAGGED_SHAPES, ids=str)
def test_shapes_and_both_paths(shape, block, dtype, batched, gen, monkeypatch):
    if batched:
        monkeypatch.setattr(bsr_blocks, "_LOOP_MAX", 0)   # where the shape allows it (K, N multiples of B)
        monkeypatch.setattr(bsr_blocks, "_GATHER_MAX", 2 ** 40)
    m, k, n = shape
    density = (0.2, 0.5, 1.0)[(m + block) % 3]
    w, _ = make_weight(n, k, block, density, gen, dtype, "cpu", empty_row=0 if n > block else None)
    _check(randn(m, k, dtype=dtype, generator=gen), pack_bsr(w, block))


@pytest.mark.parametrize("batched", [False, True], ids=["per-block", "batched"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("has_bias,has_residual", [(False, False), (True, False), (False, True), (True, True)])
def test_every_epilogue(activation, has_bias, has_residual, batched, gen, monkeypatch):
    if batched:
        monkeypatch.setattr(bsr_blocks, "_LOOP_MAX", 0)
        monkeypatch.setattr(bsr_blocks, "_GATHER_MAX", 2 ** 40)
    m, k, n, block = 9, 64, 96, 32
    w, _ = make_weight(n, k, block, 0.4, gen, torch.float32, "cpu")
    bias = randn(n, generator=gen) if has_bias else None
    residual = randn(m, n, generator=gen) if has_residual else None
    _check(randn(m, k, generator=gen), pack_bsr(w, block), bias, residual, activation)


def test_3d_input_out_dtype_and_an_all_empty_weight(gen):
    w, _ = make_weight(40, 48, 16, 0.3, gen, torch.float32, "cpu")
    x = randn(2, 3, 48, generator=gen)
    _check(x, pack_bsr(w, 16), out_dtype=torch.bfloat16)
    zero = pack_bsr(torch.zeros(40, 48), 16)
    bias = randn(40, generator=gen)
    y = bsr_blocks_cpu(x, zero.values, zero.row_ptr, zero.col_idx, 40, bias)
    torch.testing.assert_close(y, bias.expand(2, 3, 40))


def test_custom_op_and_its_checks(gen):
    w, _ = make_weight(24, 32, 16, 0.5, gen, torch.float32, "cpu")
    p = pack_bsr(w, 16)
    x = randn(5, 32, generator=gen)
    y = torch.ops.sparsify.bsr_blocks_linear(x, p.values, p.row_ptr, p.col_idx, 24)
    torch.testing.assert_close(y, x @ w.t(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="too small for the packed weight"):
        bsr_blocks_cpu(randn(5, 16, generator=gen), p.values, p.row_ptr, p.col_idx, 24)
    with pytest.raises(ValueError, match="impl must be"):
        bsr_blocks.bsr_blocks_host(x, p.values, p.row_ptr, p.col_idx, 24, impl="triton")
