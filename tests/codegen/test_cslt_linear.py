"""cuSPARSELt 2:4 linear: CPU-side behaviour (errors, export through the fake) and, on a GPU, the GEMM
against nm_linear's float64 reference."""
import zlib

import pytest
import torch

from kernel_utils import TOLERANCE, randn, rel_l2
from sparsify.codegen.kernels.cslt_linear import cslt_linear, pack_cslt, semi_structured_available
from sparsify.codegen.kernels.nm_linear import nm_linear_reference, nm_mask, pack_nm


@pytest.fixture
def gen(request):
    """A generator seeded from the test id: fresh inputs per test, reproducible across runs."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def _epilogue_inputs(lead, n_out, dtype, device, gen, has_bias, has_residual):
    bias = randn(n_out, dtype=dtype, device=device, generator=gen) if has_bias else None
    residual = randn(*lead, n_out, dtype=dtype, device=device, generator=gen) if has_residual else None
    return bias, residual


def test_cslt_needs_cuda():
    if not torch.cuda.is_available():
        assert not semi_structured_available()
    x = torch.randn(4, 32, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="cuSPARSELt needs CUDA"):
        cslt_linear(x, torch.empty(16 * 32 // 2 * 2, dtype=torch.float16), 16)


def test_cslt_op_exports_without_running():
    # The fake impl is all export needs, so graphs with the op can be built on a CPU-only machine.
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("packed", torch.empty(400, dtype=torch.float16))

        def forward(self, x):
            return torch.ops.sparsify.cslt_linear(x, self.packed, 16, None, None, "relu")

    exported = torch.export.export(M(), (torch.randn(3, 32, dtype=torch.float16),))
    nodes = [n for n in exported.graph.nodes if n.target is torch.ops.sparsify.cslt_linear.default]
    assert len(nodes) == 1 and tuple(nodes[0].meta["val"].shape) == (3, 16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("has_bias,activation,has_residual",
                         [(False, "none", False), (True, "gelu", False), (True, "relu", True)])
def test_cslt_matches_reference(dtype, has_bias, activation, has_residual, gen):
    if not semi_structured_available():
        pytest.skip("cuSPARSELt not available on this GPU/torch build")
    M, K, N = 37, 128, 96   # M not a multiple of 8: exercises the row padding
    dense = randn(N, K, generator=gen)
    w = (dense * nm_mask(dense, 2, 4)).to(device="cuda", dtype=dtype)
    packed = pack_cslt(w)
    x = randn(3, M, K, dtype=dtype, device="cuda", generator=gen)
    bias, residual = _epilogue_inputs((3, M), N, dtype, "cuda", gen, has_bias, has_residual)
    got = cslt_linear(x, packed, N, bias, residual, activation)
    nm = pack_nm(w, 2, 4)
    ref = nm_linear_reference(x.double(), nm.values.double(), nm.meta, N, K, 2, 4,
                              None if bias is None else bias.double(),
                              None if residual is None else residual.double(), activation)
    assert got.shape == (3, M, N) and got.dtype == dtype
    assert rel_l2(got, ref) <= TOLERANCE[dtype]


@pytest.mark.gpu
def test_pack_cslt_rejects_non_2to4():
    if not semi_structured_available():
        pytest.skip("cuSPARSELt not available on this GPU/torch build")
    with pytest.raises(ValueError, match="not 2:4 sparse: row 0"):
        pack_cslt(torch.randn(32, 32, dtype=torch.float16, device="cuda"))


def test_nm_linear_still_offers_the_cslt_names():
    # benchmarks/bench_linear.py reads these from nm_linear, where they used to live.
    from sparsify.codegen.kernels import nm_linear

    assert nm_linear.pack_cslt is pack_cslt and nm_linear.cslt_linear is cslt_linear
    assert nm_linear.semi_structured_available is semi_structured_available
    with pytest.raises(AttributeError):
        nm_linear.no_such_name
