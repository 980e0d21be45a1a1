"""Two emitted programs as one op (csr_jit_cpu_pair): against a float64 reference on odd shapes and
patterns (empty rows, a full row, one nonzero in both weights; token counts around the 16-token
tile), every activation between and every epilogue after, poisoned outputs; the same bits as the
two csr_jit_cpu ops it replaces; its refusals; a changed weight is re-checked and re-emitted."""
import gc
import weakref
import zlib

import pytest
import torch

from kernel_utils import TOLERANCE, csr_pattern_weight, poison, randn, rel_l2
from sparsify.codegen import cpu_build, cpu_exec, cpu_jit_pair_source
from sparsify.codegen.epilogue import ACTIVATIONS, activation_reference
from sparsify.codegen.kernels import csr_jit_cpu, csr_jit_cpu_pair
from sparsify.codegen.kernels.csr_linear import csr_parts, pack_csr

pytestmark = pytest.mark.skipif(cpu_build.compiler() is not None or cpu_exec.unsupported() is not None,
                                reason=f"{cpu_build.compiler() or cpu_exec.unsupported()}")
# a tile partly used, whole, whole + 1, several; past ROW_SPLIT_BELOW tiles a thread (the tile-split path)
TOKENS = (1, 15, 16, 17, 33, 130, 16 * cpu_jit_pair_source.ROW_SPLIT_BELOW * torch.get_num_threads() + 21)
TIGHT = {torch.float32: 1e-5, torch.float16: TOLERANCE[torch.float16], torch.bfloat16: TOLERANCE[torch.bfloat16]}


@pytest.fixture
def gen(request):
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


_weight = csr_pattern_weight


def _csr(w):
    crow, col, values = csr_parts(pack_csr(w))
    return crow.int().contiguous(), col.int().contiguous(), values.float().contiguous()


def _layers(k, hidden, n, gen, sparsity=0.8):
    wa, wb = _weight(hidden, k, sparsity, gen), _weight(n, hidden, sparsity, gen)
    return wa, _csr(wa), randn(hidden, generator=gen), wb, _csr(wb), randn(n, generator=gen)


def _reference(x, wa, ba, act_a, wb, bb, residual, act_b):
    d = lambda t: None if t is None else t.double()  # noqa: E731
    h = activation_reference(torch.nn.functional.linear(x.double(), wa.double(), d(ba)), act_a)
    y = torch.nn.functional.linear(h, wb.double(), d(bb))
    return activation_reference(y, act_b) + (residual.double() if residual is not None else 0)   # the epilogue order


def _check(x, layers, act_a, bias_a, bias_b, residual, act_b, out_dtype=torch.float32):
    wa, (ca, cola, va), ba, wb, (cb, colb, vb), bb = layers
    hidden, k = wa.shape
    n = wb.shape[0]
    ba, bb = (ba if bias_a else None), (bb if bias_b else None)
    out = poison(torch.empty(tuple(x.shape[:-1]) + (n,), dtype=out_dtype))
    got = csr_jit_cpu_pair.csr_jit_cpu_pair_host(x, ca, cola, va, hidden, ba, act_a, cb, colb, vb, n, k, bb, residual,
                                                 act_b, out_dtype, out=out)
    assert got is out
    ref = _reference(x, wa, ba, act_a, wb, bb, residual, act_b)
    err = rel_l2(got.double(), ref)
    assert err <= TIGHT[out_dtype], f"rel_l2 {err:.3g}"
    return got


@pytest.mark.parametrize("m", TOKENS)
def test_token_counts_and_odd_shapes(m, gen):
    layers = _layers(71, 97, 61, gen)          # K and the hidden width not multiples of 16; > 2 register blocks
    _check(randn(m, 71, generator=gen), layers, "gelu", True, True, randn(m, 61, generator=gen), "none")


@pytest.mark.parametrize("act_a", ACTIVATIONS)
@pytest.mark.parametrize("act_b", ("none", "relu"))
@pytest.mark.parametrize("bias_a,bias_b", ((True, True), (False, True), (True, False)))
def test_every_activation_between_and_epilogue_after(act_a, act_b, bias_a, bias_b, gen):
    layers = _layers(40, 80, 33, gen)
    x = randn(3, 7, 40, generator=gen)         # 3-D tokens
    residual = randn(3, 7, 33, generator=gen) if bias_b else None
    _check(x, layers, act_a, bias_a, bias_b, residual, act_b)


@pytest.mark.parametrize("out_dtype", (torch.bfloat16, torch.float16), ids=str)
def test_rounded_once_to_the_output_type(out_dtype, gen):
    layers = _layers(40, 64, 30, gen)
    _check(randn(37, 40, generator=gen), layers, "relu", True, True, None, "none", out_dtype)


@pytest.mark.parametrize("m", (45, 16 * cpu_jit_pair_source.ROW_SPLIT_BELOW * torch.get_num_threads() + 3))
def test_the_same_bits_as_the_two_ops_it_replaces(m, gen):
    """Both run the same programs on the same fp32 tiles: fusing changes where the hidden activation
    lives, not one rounding (rows split and tiles split)."""
    wa, (ca, cola, va), ba, wb, (cb, colb, vb), bb = _layers(48, 112, 40, gen, sparsity=0.9)
    x, residual = randn(m, 48, generator=gen), randn(m, 40, generator=gen)
    h = csr_jit_cpu.csr_jit_cpu_host(x, ca, cola, va, 112, 48, "row", ba, None, "gelu")
    two = csr_jit_cpu.csr_jit_cpu_host(h, cb, colb, vb, 40, 112, "row", bb, residual, "none")
    one = torch.ops.sparsify.csr_jit_cpu_pair(x, ca, cola, va, 112, ba, "gelu", cb, colb, vb, 40, 48, bb, residual,
                                              "none", None)
    assert torch.equal(one, two)
    again = torch.ops.sparsify.csr_jit_cpu_pair(x, ca, cola, va, 112, ba, "gelu", cb, colb, vb, 40, 48, bb, residual,
                                                "none", None)                       # the checked fast path
    assert torch.equal(again, one)


def test_refusals_name_the_argument(gen):
    wa, (ca, cola, va), ba, wb, (cb, colb, vb), bb = _layers(40, 64, 30, gen)
    x = randn(5, 40, generator=gen)
    with pytest.raises(TypeError, match="float32"):
        csr_jit_cpu_pair.csr_jit_cpu_pair_host(x.bfloat16(), ca, cola, va.bfloat16(), 64, ba.bfloat16(), "none", cb,
                                               colb, vb.bfloat16(), 30, 40, bb.bfloat16())
    with pytest.raises(ValueError, match="n_out|rows|crow"):
        csr_jit_cpu_pair.csr_jit_cpu_pair_host(x, ca, cola, va, 63, ba, "none", cb, colb, vb, 30, 40, bb)
    with pytest.raises(ValueError, match="residual"):
        csr_jit_cpu_pair.csr_jit_cpu_pair_host(x, ca, cola, va, 64, ba, "none", cb, colb, vb, 30, 40, bb,
                                               randn(5, 31, generator=gen))
    with pytest.raises(ValueError):
        csr_jit_cpu_pair.csr_jit_cpu_pair_host(randn(5, 41, generator=gen), ca, cola, va, 64, ba, "none", cb, colb,
                                               vb, 30, 40, bb)
    with pytest.raises(ValueError, match="activation"):
        csr_jit_cpu_pair.csr_jit_cpu_pair_host(x, ca, cola, va, 64, ba, "swish", cb, colb, vb, 30, 40, bb)


def _call(x, ca, cola, va, ba, cb, colb, vb, bb):
    return torch.ops.sparsify.csr_jit_cpu_pair(x, ca, cola, va, 64, ba, "relu", cb, colb, vb, 30, 40, bb, None,
                                               "none", None)


def test_a_weight_changed_in_place_is_emitted_again_and_none_is_kept_alive(gen):
    wa, (ca, cola, va), ba, wb, (cb, colb, vb), bb = _layers(40, 64, 30, gen)
    x = randn(20, 40, generator=gen)
    first = _call(x, ca, cola, va, ba, cb, colb, vb, bb)
    vb.mul_(2)
    again = _call(x, ca, cola, va, ba, cb, colb, vb, bb)
    assert rel_l2(again.double(), _reference(x, wa, ba, "relu", wb * 2, bb, None, "none")) <= 1e-5
    assert not torch.equal(again, first)
    ref = weakref.ref(vb)
    del vb
    gc.collect()
    assert ref() is None, "a cached call must not keep the weight alive"
