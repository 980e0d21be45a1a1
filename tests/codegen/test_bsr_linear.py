"""Block-sparse linear kernel: Triton (interpreter on CPU) against a float64 torch reference."""
import dataclasses
import zlib

import pytest
import torch
import triton

from kernel_utils import DTYPES, ODD_LINEAR_SHAPES, TOLERANCE, poison, randn, rel_l2
from sparsify.codegen import runtime
from sparsify.codegen.epilogue import ACTIVATIONS, activation_reference
from sparsify.codegen.kernels.bsr_linear import (
    KERNEL_VERSION, BSRWeight, _config_for, block_mask_from_scores, bsr_linear, bsr_linear_reference,
    bsr_linear_triton, pack_bsr, unpack_bsr,
)

# (M, K, N) with K and N off every block size, so the edge masks are exercised.
RAGGED_SHAPES = [(5, 100, 70), (19, 37, 45), (40, 81, 33)]


@pytest.fixture
def gen(request):
    """A generator per test, seeded from its id: fresh inputs per test, reproducible on rerun."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def make_weight(n, k, block, density, gen, dtype, device, empty_row=None):
    """Random [n, k] weight whose nonzero blocks follow a random block mask of the given density.
    empty_row: a block-row index to leave with no block at all."""
    nbr = triton.cdiv(n, block)
    scores = torch.rand(n, k, generator=gen)
    mask = block_mask_from_scores(scores, block, density)
    if empty_row is not None:
        mask[empty_row] = False
        if not mask.any():                       # keep some work for the kernel to do
            mask[(empty_row + 1) % nbr, 0] = True
    dense_mask = mask.repeat_interleave(block, 0).repeat_interleave(block, 1)[:n, :k]
    w = randn(n, k, generator=gen) / k ** 0.5 * dense_mask
    return w.to(device=device, dtype=dtype), mask


def run_and_check(x, bsr, dtype, bias=None, residual=None, activation="none", out_dtype=None, **launch):
    """Launch into a NaN-poisoned buffer and compare with the reference on float64 copies."""
    out_dtype = out_dtype or x.dtype
    out = poison(torch.empty(x.shape[:-1] + (bsr.n,), dtype=out_dtype, device=x.device))
    with runtime.force_triton():
        got = bsr_linear_triton(x, bsr.values, bsr.row_ptr, bsr.col_idx, bsr.n, bias, residual,
                                activation, out_dtype, out=out, **launch)
    assert got is out
    d = lambda t: None if t is None else t.double()  # noqa: E731
    ref = bsr_linear_reference(d(x), d(bsr.values), bsr.row_ptr, bsr.col_idx, bsr.n, d(bias), d(residual),
                               activation)
    err = rel_l2(got, ref)
    assert err <= TOLERANCE[out_dtype], f"rel_l2 {err:.3g} > {TOLERANCE[out_dtype]} for {out_dtype}"
    return got, ref


# ------------------------------------------------------------------------------------------------
# Numerics
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block", [16, 32])
@pytest.mark.parametrize("shape", ODD_LINEAR_SHAPES + RAGGED_SHAPES, ids=str)
def test_shapes(shape, block, dtype, gen, device):
    m, k, n = shape
    # Density varies with the case so the grid covers sparse, medium and dense without tripling it.
    density = (0.2, 0.5, 1.0)[(m + block) % 3]
    w, mask = make_weight(n, k, block, density, gen, dtype, device,
                          empty_row=0 if triton.cdiv(n, block) > 1 else None)
    bsr = pack_bsr(w, block)
    x = randn(m, k, dtype=dtype, device=device, generator=gen)
    run_and_check(x, bsr, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("density", [0.1, 0.4, 0.7, 1.0])
def test_densities(density, dtype, gen, device):
    m, k, n, block = 24, 112, 96, 16
    w, _ = make_weight(n, k, block, density, gen, dtype, device)
    bsr = pack_bsr(w, block)
    assert bsr.density == pytest.approx(max(1, round(density * 42)) / 42)
    x = randn(m, k, dtype=dtype, device=device, generator=gen)
    run_and_check(x, bsr, dtype)


EPILOGUES = ([dict(bias=True)]
             + [dict(bias=True, activation=a) for a in ACTIVATIONS if a != "none"]
             + [dict(activation="gelu_tanh"), dict(residual=True),
                dict(bias=True, activation="silu", residual=True)])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("epi", EPILOGUES, ids=lambda e: "+".join(f"{k}={v}" for k, v in e.items()))
def test_epilogues(epi, dtype, gen, device):
    m, k, n, block = 21, 72, 50, 16
    w, _ = make_weight(n, k, block, 0.5, gen, dtype, device, empty_row=1)
    bsr = pack_bsr(w, block)
    x = randn(m, k, dtype=dtype, device=device, generator=gen)
    bias = randn(n, dtype=dtype, device=device, generator=gen) if epi.get("bias") else None
    residual = randn(m, n, dtype=dtype, device=device, generator=gen) if epi.get("residual") else None
    run_and_check(x, bsr, dtype, bias, residual, epi.get("activation", "none"))


def test_empty_block_row_is_epilogue_of_zero(gen, device):
    """A block-row with no stored block runs zero loop iterations: its columns are epilogue(0)."""
    m, k, n, block = 9, 64, 48, 16
    w, _ = make_weight(n, k, block, 1.0, gen, torch.float32, device, empty_row=1)
    bsr = pack_bsr(w, block)
    assert int(bsr.row_ptr[2] - bsr.row_ptr[1]) == 0
    x = randn(m, k, device=device, generator=gen)
    bias = randn(n, device=device, generator=gen)
    residual = randn(m, n, device=device, generator=gen)
    got, _ = run_and_check(x, bsr, torch.float32, bias, residual, "gelu")
    cols = slice(block, 2 * block)
    expected = activation_reference(bias[cols], "gelu")[None, :] + residual[:, cols]
    torch.testing.assert_close(got[:, cols], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_all_zero_weight(dtype, gen, device):
    m, k, n, block = 7, 40, 36, 16
    bsr = pack_bsr(torch.zeros(n, k, dtype=dtype, device=device), block)
    assert bsr.values.shape[0] == 0 and bsr.density == 0.0
    x = randn(m, k, dtype=dtype, device=device, generator=gen)
    bias = randn(n, dtype=dtype, device=device, generator=gen)
    run_and_check(x, bsr, dtype, bias=bias, activation="relu")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_block_64(dtype, gen, device):
    m, k, n, block = 20, 200, 130, 64
    w, _ = make_weight(n, k, block, 0.6, gen, dtype, device, empty_row=0)
    bsr = pack_bsr(w, block)
    x = randn(m, k, dtype=dtype, device=device, generator=gen)
    bias = randn(n, dtype=dtype, device=device, generator=gen)
    run_and_check(x, bsr, dtype, bias=bias, activation="silu")


def test_3d_input(gen, device):
    b, s, k, n, block = 2, 9, 80, 56, 16
    w, _ = make_weight(n, k, block, 0.5, gen, torch.float16, device)
    bsr = pack_bsr(w, block)
    x = randn(b, s, k, dtype=torch.float16, device=device, generator=gen)
    residual = randn(b, s, n, dtype=torch.float16, device=device, generator=gen)
    got, _ = run_and_check(x, bsr, torch.float16, residual=residual, activation="relu")
    assert got.shape == (b, s, n)


def test_non_contiguous_inputs(gen, device):
    """x with a strided last dim is made contiguous; a transposed residual is read through its strides."""
    m, k, n, block = 12, 48, 40, 16
    w, _ = make_weight(n, k, block, 0.5, gen, torch.float32, device)
    bsr = pack_bsr(w, block)
    x = randn(m, 2 * k, device=device, generator=gen)[:, ::2]
    residual = randn(n, m, device=device, generator=gen).t()
    assert x.stride(-1) != 1 and not residual.is_contiguous()
    run_and_check(x, bsr, torch.float32, residual=residual)


def test_out_dtype_and_launch_overrides(gen, device):
    m, k, n, block = 33, 64, 64, 32
    w, _ = make_weight(n, k, block, 0.5, gen, torch.float16, device)
    bsr = pack_bsr(w, block)
    x = randn(m, k, dtype=torch.float16, device=device, generator=gen)
    got, _ = run_and_check(x, bsr, torch.float16, out_dtype=torch.float32, block_m=16, num_warps=2,
                           num_stages=2)
    assert got.dtype == torch.float32


def test_fp32_ieee_precision(gen, device):
    m, k, n, block = 10, 64, 32, 16
    w, _ = make_weight(n, k, block, 0.5, gen, torch.float32, device)
    bsr = pack_bsr(w, block)
    x = randn(m, k, device=device, generator=gen)
    run_and_check(x, bsr, torch.float32, input_precision="ieee")


def test_empty_m(gen, device):
    w, _ = make_weight(32, 32, 16, 1.0, gen, torch.float32, device)
    bsr = pack_bsr(w, 16)
    x = torch.empty(0, 32, device=device)
    with runtime.force_triton():
        assert bsr_linear_triton(x, bsr.values, bsr.row_ptr, bsr.col_idx, 32).shape == (0, 32)
        assert bsr_linear(torch.empty(2, 0, 32, device=device), bsr).shape == (2, 0, 32)


def test_config_for():
    assert [_config_for(m, 32, torch.float16)[0] for m in (1, 16, 17, 32, 33, 64, 65, 4096)] == \
        [16, 16, 32, 32, 64, 64, 128, 128]
    for m in (1, 100, 4096):
        for block in (16, 32, 64, 128):
            for dtype in DTYPES:
                block_m, warps, stages = _config_for(m, block, dtype)
                assert warps in (2, 4, 8) and stages in (1, 3)


# ------------------------------------------------------------------------------------------------
# Packing
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("block", [16, 32, 64])
@pytest.mark.parametrize("dtype", DTYPES + (torch.float64,), ids=str)
def test_pack_unpack_round_trip(block, dtype, gen):
    n, k = 70, 100
    w, mask = make_weight(n, k, block, 0.5, gen, dtype, "cpu", empty_row=0)
    bsr = pack_bsr(w, block)
    assert torch.equal(unpack_bsr(bsr), w)
    assert bsr.values.dtype == dtype and bsr.values.shape[1:] == (block, block)
    assert bsr.values.is_contiguous()
    assert bsr.row_ptr.dtype == torch.int32 and bsr.col_idx.dtype == torch.int32
    assert bsr.row_ptr.shape == (triton.cdiv(n, block) + 1,)
    assert (bsr.n, bsr.k, bsr.block) == (n, k, block)
    assert bsr.values.shape[0] == int(mask.sum()) == bsr.col_idx.shape[0]
    assert bsr.density == pytest.approx(mask.float().mean().item())
    # Sorted by (row, col), and the stored blocks are exactly the mask.
    for r in range(mask.shape[0]):
        cols = bsr.col_idx[bsr.row_ptr[r]:bsr.row_ptr[r + 1]].tolist()
        assert cols == mask[r].nonzero().flatten().tolist()


def test_pack_drops_only_all_zero_blocks():
    w = torch.zeros(32, 48)
    w[0, 0] = 1.0           # block (0, 0): one nonzero is enough to keep it
    w[20, 47] = -2.0        # block (1, 2)
    w[5, 20] = float("nan")  # block (0, 1): NaN is not zero
    bsr = pack_bsr(w, 16)
    assert bsr.row_ptr.tolist() == [0, 2, 3] and bsr.col_idx.tolist() == [0, 1, 2]
    assert bsr.density == pytest.approx(3 / 6)
    assert isinstance(bsr, BSRWeight)
    with pytest.raises(dataclasses.FrozenInstanceError):
        bsr.n = 3


def test_block_mask_from_scores(gen):
    scores = torch.rand(40, 70, generator=gen)   # 3 x 5 blocks of 16, ragged edges
    scores[16:32, 32:48] += 10.0                 # block (1, 2) dominates
    mask = block_mask_from_scores(scores, 16, 0.2)
    assert mask.shape == (3, 5) and mask.dtype == torch.bool
    assert int(mask.sum()) == 3 and mask[1, 2]
    assert int(block_mask_from_scores(scores, 16, 0.0).sum()) == 1   # at least one block
    assert bool(block_mask_from_scores(scores, 16, 1.0).all())
    # The kept blocks are the largest by summed |score|.
    neg = -scores
    assert torch.equal(block_mask_from_scores(neg, 16, 0.2), mask)
    with pytest.raises(ValueError, match="density"):
        block_mask_from_scores(scores, 16, 1.5)


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("block", [0, 24, 256, 8, True])
def test_bad_block(block):
    with pytest.raises(ValueError, match=rf"^block must be .* got {block!r}$"):
        pack_bsr(torch.randn(32, 32), block)


def test_bad_weight_rank():
    with pytest.raises(ValueError, match="weight must be a 2-D"):
        pack_bsr(torch.randn(32), 16)
    with pytest.raises(ValueError, match="weight must be a 2-D"):
        pack_bsr(torch.randn(2, 32, 32), 16)


def _small(gen, dtype=torch.float32):
    w, _ = make_weight(32, 64, 16, 1.0, gen, dtype, "cpu")
    return pack_bsr(w, 16)


def test_mismatched_x_dim(gen):
    bsr = _small(gen)
    x = randn(4, 32, generator=gen)   # the weight has K=64
    with pytest.raises(ValueError, match=r"x\.shape\[-1\]"):
        bsr_linear(x, bsr)
    for fn in (bsr_linear_triton, bsr_linear_reference):
        with pytest.raises(ValueError, match=r"x\.shape\[-1\]=32"):
            fn(x, bsr.values, bsr.row_ptr, bsr.col_idx, bsr.n)


def test_mismatched_dtype(gen):
    bsr = _small(gen)
    x = randn(4, 64, dtype=torch.float16, generator=gen)
    with pytest.raises(TypeError, match="values dtype torch.float32 does not match x dtype torch.float16"):
        bsr_linear_triton(x, bsr.values, bsr.row_ptr, bsr.col_idx, bsr.n)
    with pytest.raises(TypeError, match="x dtype"):
        bsr_linear_triton(x.double(), bsr.values.double(), bsr.row_ptr, bsr.col_idx, bsr.n)
    with pytest.raises(TypeError, match="col_idx"):
        bsr_linear_triton(x.float(), bsr.values, bsr.row_ptr, bsr.col_idx.long(), bsr.n)


def test_bad_epilogue_args(gen):
    bsr = _small(gen)
    x = randn(4, 64, generator=gen)
    args = (x, bsr.values, bsr.row_ptr, bsr.col_idx, bsr.n)
    with pytest.raises(ValueError, match="bias must have shape"):
        bsr_linear_triton(*args, bias=torch.randn(31))
    with pytest.raises(ValueError, match="residual must have shape"):
        bsr_linear_triton(*args, residual=torch.randn(4, 31))
    with pytest.raises(ValueError, match="activation"):
        bsr_linear_triton(*args, activation="tanh")
    with pytest.raises(ValueError, match="row_ptr"):
        bsr_linear_triton(x, bsr.values, bsr.row_ptr, bsr.col_idx, 64)
    with pytest.raises(ValueError, match="out must have shape"):
        bsr_linear_triton(*args, out=torch.empty(4, 33))


# ------------------------------------------------------------------------------------------------
# Custom op, torch.compile, torch.export
# ------------------------------------------------------------------------------------------------

def test_op_dispatch(gen, device):
    """The op runs the kernel under force_triton and the reference otherwise; both agree."""
    bsr = pack_bsr(make_weight(48, 64, 16, 0.5, gen, torch.float32, device)[0], 16)
    x = randn(5, 64, device=device, generator=gen)
    bias = randn(48, device=device, generator=gen)
    with runtime.force_triton():
        a = bsr_linear(x, bsr, bias=bias, activation="relu")
    with runtime.force_reference():
        b = bsr_linear(x, bsr, bias=bias, activation="relu")
    assert rel_l2(a, b) <= TOLERANCE[torch.float32]
    assert KERNEL_VERSION == "bsr_linear-2"


def test_torch_compile(gen, device):
    bsr = pack_bsr(make_weight(48, 64, 16, 0.5, gen, torch.float32, device)[0], 16)
    x = randn(2, 5, 64, device=device, generator=gen)
    residual = randn(2, 5, 48, device=device, generator=gen)

    def fn(x, residual):
        return bsr_linear(x * 2.0, bsr, residual=residual, activation="silu") + 1.0

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    with runtime.force_triton():
        got = compiled(x, residual)
    assert rel_l2(got, fn(x, residual)) <= TOLERANCE[torch.float32]


class _SparseLinear(torch.nn.Module):
    def __init__(self, bsr: BSRWeight, bias):
        super().__init__()
        self.n = bsr.n
        self.register_buffer("values", bsr.values)
        self.register_buffer("row_ptr", bsr.row_ptr)
        self.register_buffer("col_idx", bsr.col_idx)
        self.register_buffer("bias", bias)

    def forward(self, x):
        return torch.ops.sparsify.bsr_linear(x, self.values, self.row_ptr, self.col_idx, self.n,
                                             self.bias, None, "gelu")


def test_torch_export(gen, device):
    bsr = pack_bsr(make_weight(40, 64, 16, 0.5, gen, torch.float32, device)[0], 16)
    module = _SparseLinear(bsr, randn(40, device=device, generator=gen))
    x = randn(6, 64, device=device, generator=gen)
    ep = torch.export.export(module, (x,))
    targets = [node.target for node in ep.graph.nodes if node.op == "call_function"]
    assert torch.ops.sparsify.bsr_linear.default in targets
    with runtime.force_triton():
        got = ep.module()(x)
    assert rel_l2(got, module(x)) <= TOLERANCE[torch.float32]


# ------------------------------------------------------------------------------------------------
# GPU-sized
# ------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("block", [32, 64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_large(block, dtype, gen):
    m, k, n = 300, 1024, 768
    w, _ = make_weight(n, k, block, 0.3, gen, dtype, "cuda", empty_row=2)
    bsr = pack_bsr(w, block)
    x = randn(m, k, dtype=dtype, device="cuda", generator=gen)
    bias = randn(n, dtype=dtype, device="cuda", generator=gen)
    residual = randn(m, n, dtype=dtype, device="cuda", generator=gen)
    run_and_check(x, bsr, dtype, bias, residual, "gelu_tanh")
