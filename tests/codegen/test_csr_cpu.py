"""Generated CPU kernels (csr_cpu): against a float64 reference on odd shapes and sparsity patterns,
every epilogue, fp32 and bf16, both layouts, poisoned outputs; the build cache; no compiler."""
import zlib

import pytest
import torch

from kernel_utils import TOLERANCE, check_csr_host, randn, rel_l2
from sparsify.codegen import cpu_build, registry
from sparsify.codegen.epilogue import ACTIVATIONS
from sparsify.codegen.kernels import csr_cpu
from sparsify.codegen.kernels._common import LAYOUTS
from sparsify.codegen.kernels.csr_linear import csr_parts, pack_csr

pytestmark = pytest.mark.skipif(cpu_build.compiler() is not None, reason=f"no C compiler: {cpu_build.compiler()}")
DTYPES = (torch.float32, torch.bfloat16)
# token counts that exercise every path: one token, the scalar tail, one- and two-vector tiles, full
# tiles, and all of them in one call (91 = 64 + 16 + 8 + 3 with 8 lanes)
TOKENS = (1, 3, 9, 17, 37, 70, 91, 130)


@pytest.fixture
def gen(request):
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def _weight(n, k, sparsity, gen, special=True):
    """Random sparsity, plus the rows a kernel gets wrong first: empty, full, a single nonzero."""
    w = randn(n, k, generator=gen) * (torch.rand(n, k, generator=gen) >= sparsity)
    if special and n >= 3:
        w[0] = 0
        w[1] = randn(k, generator=gen)
        w[2] = 0
        w[2, k // 2] = 1.5
    return w


def _run(x, w, dtype, layout, bias, residual, activation, out_dtype=None):
    check_csr_host(csr_cpu.csr_cpu_generated, x, w, dtype, layout, bias, residual, activation, out_dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", TOKENS)
def test_token_counts_and_odd_shapes(m, dtype, layout, gen):
    n, k = 45, 71
    w = _weight(n, k, 0.8, gen)
    _run(randn(m, k, generator=gen), w, dtype, layout, randn(n, generator=gen), None, "none")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_wide_batches_go_k_block_by_k_block(dtype, layout, gen, monkeypatch):
    """Built with KB 512 explicitly (the default blocks only K >= 2048), K > 512 and M >= two full tiles: the K-blocked pass (three
    blocks, the last partial), then the tail tiles, with every epilogue term and the special rows."""
    source = csr_cpu.cpu_csr_source.source
    monkeypatch.setattr(csr_cpu.cpu_csr_source, "source", lambda *a, **kw: source(*a, **kw, kb=512))
    monkeypatch.setattr(csr_cpu, "_FUNCS", {})
    assert "#define KB 512" in csr_cpu.cpu_csr_source.source(5, 5, "float32", "float32", "none", False, False,
                                                             True, True)[0]
    n, k, m = 37, 1100, 203
    w = _weight(n, k, 0.85, gen)
    _run(randn(m, k, generator=gen), w, dtype, layout, randn(n, generator=gen), randn(m, n, generator=gen), "gelu")


@pytest.mark.parametrize("layout", ["row", "feature_to_row"])
def test_the_default_build_goes_k_block_by_k_block_where_k_and_m_are_wide(layout, gen):
    """The default build's K-blocked pass: K >= 2048 (five blocks, the last partial) and 512 tokens
    or more (eight full tiles, then the tails)."""
    n, k, m = 29, 2100, 8 * 64 + 19
    w = _weight(n, k, 0.9, gen)
    _run(randn(m, k, generator=gen), w, torch.float32, layout, randn(n, generator=gen), randn(m, n, generator=gen),
         "relu")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_full_tiles_in_groups_and_a_last_smaller_group(layout, gen):
    """Five full tiles of a narrow layer go as a group of four and a group of one (rows pass over
    each group's tiles in turn), then the tails; every epilogue term and the special rows."""
    n, k, m = 37, 200, 5 * 64 + 19
    w = _weight(n, k, 0.8, gen)
    _run(randn(m, k, generator=gen), w, torch.float32, layout, randn(n, generator=gen), randn(m, n, generator=gen),
         "silu")


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("has_bias,has_residual", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_epilogue(activation, has_bias, has_residual, layout, gen):
    n, k, m = 33, 40, 21
    w = _weight(n, k, 0.7, gen)
    bias = randn(n, generator=gen) if has_bias else None
    residual = randn(m, n, generator=gen) if has_residual else None
    _run(randn(m, k, generator=gen), w, torch.float32, layout, bias, residual, activation)


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.95, 1.0])
def test_densities_from_full_to_empty(sparsity, gen):
    w = _weight(64, 48, sparsity, gen, special=False)
    x = randn(2, 7, 48, generator=gen)                   # leading dims are tokens too
    _run(x, w, torch.float32, "row", randn(64, generator=gen), randn(2, 7, 64, generator=gen), "gelu")


def test_bf16_in_fp32_out_and_fp32_in_bf16_out(gen):
    w = _weight(24, 40, 0.6, gen)
    _run(randn(19, 40, generator=gen), w, torch.bfloat16, "row", None, None, "silu", out_dtype=torch.float32)
    _run(randn(19, 40, generator=gen), w, torch.float32, "feature", None, None, "relu", out_dtype=torch.bfloat16)


def test_a_second_build_of_the_same_source_is_a_cache_hit(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSIFY_CACHE_DIR", str(tmp_path))
    src, name = csr_cpu.cpu_csr_source.source(7, 9, "float32", "float32", "relu", True, False, True, True)
    before = dict(cpu_build.BUILD_STATS)
    cpu_build.build(src, name)
    assert cpu_build.BUILD_STATS["built"] == before["built"] + 1
    monkeypatch.setattr(cpu_build, "_LOADED", {})       # a new process: only the disk cache is left
    cpu_build.build(src, name)
    assert cpu_build.BUILD_STATS["built"] == before["built"] + 1 and cpu_build.BUILD_STATS["loaded"] == before["loaded"] + 1
    assert len(list(tmp_path.glob("cpu/*.so"))) == 1


def test_without_a_compiler_the_kernel_is_not_a_candidate_and_says_why(monkeypatch):
    from sparsify.patterns import Unstructured

    monkeypatch.setenv("SPARSIFY_CC", "/nonexistent/cc")
    cpu_build._compiler.cache_clear()
    try:
        why = cpu_build.compiler()
        assert why is not None and "/nonexistent/cc" in why
        ok, why_not = registry.kernels_for(Unstructured(0.5), torch.device("cpu"), torch.float32, (8, 8))
        assert "csr_cpu" not in [s.name for s in ok]
        assert "need a C compiler" in why_not["csr_cpu"]
    finally:
        cpu_build._compiler.cache_clear()


def test_checks_name_the_argument(gen):
    w = _weight(8, 16, 0.5, gen)
    crow, col, values = csr_parts(pack_csr(w))
    x = randn(3, 16, generator=gen)
    with pytest.raises(TypeError, match="int32 indices"):
        csr_cpu.csr_cpu_generated(x, crow, col, values, 8, 16)
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        csr_cpu.csr_cpu_generated(x.half(), crow.int(), col.int(), values.half(), 8, 16)
    with pytest.raises(ValueError, match="x must be"):
        csr_cpu.csr_cpu_generated(randn(3, 15, generator=gen), crow.int(), col.int(), values, 8, 16)


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "silu"])
def test_activations_saturate_without_nans_on_large_inputs(activation, gen):
    w = _weight(16, 24, 0.5, gen) * 40                   # pre-activations of several hundred
    _run(randn(11, 24, generator=gen), w, torch.float32, "feature", None, None, activation)


@pytest.mark.parametrize("activation", [a for a in ACTIVATIONS if a != "none"])
@pytest.mark.parametrize("m", [1, 77])
def test_activations_elementwise_over_their_whole_range(activation, m, gen):
    """A diagonal weight makes y = act(x + b) exactly: the generated vector math against float64,
    far into both tails (where exp saturates) and near zero."""
    from sparsify.codegen.kernels.csr_linear import csr_linear_reference

    n = 203
    w = torch.eye(n)
    crow, col, values = csr_parts(pack_csr(w))
    crow, col = crow.int(), col.int()
    grid = torch.cat([torch.linspace(-30, 30, n - 8), torch.tensor([0.0, -0.0, 1e-6, -1e-6, 88.0, -88.0, 100.0, -100.0])])
    x = grid[torch.randperm(n, generator=gen)].repeat(m, 1) + randn(m, n, generator=gen) * 0.01
    got = csr_cpu.csr_cpu_generated(x, crow, col, values, n, n, "row", activation=activation)
    ref = csr_linear_reference(x.double(), crow, col, values.double(), n, n, "row", activation=activation)
    # x * g(x) carries x's rounding: the scale of an fp32 error is max(|y|, |x|, 1)
    err = (got.double() - ref).abs() / torch.maximum(ref.abs(), x.double().abs()).clamp_min(1.0)
    assert float(err.max()) < 2e-6, f"{activation}: worst at x={float(x.flatten()[err.flatten().argmax()]):.4g}"


def test_repeated_calls_skip_the_weight_checks_only_while_the_weight_is_unchanged(gen, monkeypatch):
    """The fast path of a compiled graph: checked weight tensors are not checked again, but an
    in-place edit, another tensor, or a wrong per-call argument goes back through every check."""
    n, k = 12, 20
    crow, col, values = (t.contiguous() for t in csr_parts(pack_csr(_weight(n, k, 0.6, gen))))
    crow, col = crow.int(), col.int()
    bias = randn(n, generator=gen)
    checks = []
    full_check = csr_cpu._check_indices
    monkeypatch.setattr(csr_cpu, "_check_indices", lambda *a: checks.append(1) or full_check(*a))
    for m in (5, 1, 33):                                   # new shapes on the fast path
        x = randn(m, k, generator=gen)
        got = csr_cpu.csr_cpu_host(x, crow, col, values, n, k, "row", bias)
        ref = csr_cpu.csr_cpu_reference(x.double(), crow, col, values.double(), n, k, "row", bias.double())
        assert rel_l2(got, ref) <= TOLERANCE[torch.float32]
    assert len(checks) == 1, "the weight was checked again although it did not change"
    values.mul_(2)                                          # in place: the version moves, results follow
    got = csr_cpu.csr_cpu_host(x, crow, col, values, n, k, "row", bias)
    ref = csr_cpu.csr_cpu_reference(x.double(), crow, col, values.double(), n, k, "row", bias.double())
    assert rel_l2(got, ref) <= TOLERANCE[torch.float32] and len(checks) == 2
    col[0] = k + 5                                          # a corrupted index is caught again
    with pytest.raises(ValueError, match="col"):
        csr_cpu.csr_cpu_host(x, crow, col, values, n, k, "row", bias)
    col[0] = 0
    with pytest.raises(ValueError, match="residual"):
        csr_cpu.csr_cpu_host(x, crow, col, values, n, k, "row", bias, randn(33, n + 1, generator=gen))
    with pytest.raises(ValueError, match="x must be"):
        csr_cpu.csr_cpu_host(randn(4, k + 1, generator=gen), crow, col, values, n, k, "row", bias)
