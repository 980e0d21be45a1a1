"""Generated CPU FFN kernels (ffn_cpu): against a float64 reference at batch 1, 3, 16 and more, fp32 and
bf16 weights, odd sizes, every mode (statistical top-k too) and activation, thresholds that drop about half and 90% of the
units, the epilogue, poisoned outputs and scratch, the count of units read, bad arguments."""
import zlib

import pytest
import torch

from kernel_utils import TOLERANCE, poison, rel_l2
from sparsify.codegen import cpu_build, registry
from sparsify.codegen.kernels import ffn_cpu
from sparsify.codegen.kernels._ffn_common import FFN_ACTIVATIONS, ffn_activation, ffn_hidden_reference, ffn_reference

pytestmark = pytest.mark.skipif(cpu_build.compiler() is not None, reason=f"no C compiler: {cpu_build.compiler()}")
DTYPES = (torch.float32, torch.bfloat16)
SIZES = ((40, 72, 36), (67, 130, 49))      # (D, F, D_out): odd, and not multiples of the vector width
TOKENS = (1, 3, 16, 37)


@pytest.fixture
def gen(request):
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def _block(d, f, dout, mode, gen, rank=6):
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    blk = {"w_up": r(f, d) / d ** 0.5, "b_up": r(f) * 0.2, "w_gate": None, "b_gate": None,
           "w_down_t": r(f, dout) / f ** 0.5, "pred_in": None, "pred_out": None, "pred_bias": None}
    if mode in ("gated", "gated_topk"):
        blk.update(w_gate=r(f, d) / d ** 0.5, b_gate=r(f) * 0.2)
    if mode == "predicted":
        blk.update(pred_in=r(d, rank), pred_out=r(rank, f), pred_bias=r(f))
    return blk


def _threshold(x, blk, act, drop, mode="ungated"):
    """A threshold (one for the block) that drops about `drop` of the (token, unit) entries of this x;
    for top-k the coefficient of the per-token cut mean + c * std (c = 0: about half, 1.3: ~90%)."""
    if mode in ("topk", "gated_topk"):
        return torch.full((blk["w_up"].shape[0],), {0.5: 0.0, 0.9: 1.3}[drop])
    w, b = (blk["w_gate"], blk["b_gate"]) if blk["w_gate"] is not None else (blk["w_up"], blk["b_up"])
    s = ffn_activation(x.double() @ w.double().T + b.double(), act).abs()
    q = torch.full((s.shape[1],), torch.quantile(s.float().flatten(), drop).item())
    return q * (1 + 1e-3) + 1e-6     # off the sample's values: the kernel's rounding must not decide a tie


def _union(x, blk, thr, act, mode, dtype) -> int:
    d64 = lambda t: None if t is None else t.to(dtype).double()  # noqa: E731  (the weights the kernel reads)
    h = ffn_hidden_reference(x.double(), d64(blk["w_up"]), d64(blk["b_up"]), d64(blk["w_gate"]), d64(blk["b_gate"]),
                             thr, act, mode, *(None if blk[k] is None else blk[k].double() for k in ("pred_in", "pred_out", "pred_bias")))
    return int(h.ne(0).any(0).sum())


def _call(x, blk, thr, act, mode, dtype, **kw):
    c = lambda t: None if t is None else t.to(dtype).contiguous()  # noqa: E731
    args = dict(w_up=c(blk["w_up"]), b_up=c(blk["b_up"]), w_gate=c(blk["w_gate"]), b_gate=c(blk["b_gate"]),
                w_down_t=c(blk["w_down_t"]), pred_in=blk["pred_in"], pred_out=blk["pred_out"],
                pred_bias=blk["pred_bias"])
    y = ffn_cpu.ffn_cpu_host(x, threshold=thr, act=act, mode=mode, impl="generated", **args, **kw)
    d64 = lambda t: None if t is None else t.double()  # noqa: E731
    ref = ffn_reference(x.double(), **{k: d64(v) for k, v in args.items()}, threshold=thr, act=act, mode=mode,
                        **{k: d64(v) if isinstance(v, torch.Tensor) else v for k, v in kw.items()
                           if k not in ("out", "kept")})
    return y, ref


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ("ungated", "gated", "predicted", "topk", "gated_topk"))
@pytest.mark.parametrize("m", TOKENS)
def test_every_mode_matches_float64(gen, dtype, mode, m):
    for d, f, dout in SIZES:
        blk = _block(d, f, dout, mode, gen)
        x = torch.randn(m, d, generator=gen)
        for act in ("relu", "silu"):
            for drop in (0.5, 0.9):
                thr = _threshold(x, blk, act, drop, mode)
                out = poison(torch.empty(m, dout, dtype=torch.float32))
                kept = torch.zeros(1, dtype=torch.int32)
                y, ref = _call(x, blk, thr, act, mode, dtype, out=out, kept=kept)
                assert y is out
                assert rel_l2(y, ref) <= TOLERANCE[torch.bfloat16 if dtype == torch.bfloat16 else torch.float32]
                assert kept.item() == _union(x, blk, thr, act, mode, dtype)     # read: the units some token keeps


@pytest.mark.parametrize("act", FFN_ACTIVATIONS)
def test_every_activation(gen, act):
    d, f, dout = SIZES[1]
    for mode in ("ungated", "gated"):
        blk = _block(d, f, dout, mode, gen)
        x = torch.randn(3, d, generator=gen)
        y, ref = _call(x, blk, _threshold(x, blk, act, 0.5), act, mode, torch.float32)
        assert rel_l2(y, ref) <= TOLERANCE[torch.float32]


def test_units_read_are_the_union_of_the_kept_ones(gen):
    """What the kernel reads is what the reference keeps for some token: nothing more."""
    d, f, dout = SIZES[1]
    blk = _block(d, f, dout, "ungated", gen)
    x = torch.randn(16, d, generator=gen)
    thr = _threshold(x, blk, "relu", 0.9)
    kept = torch.zeros(1, dtype=torch.int32)
    _call(x, blk, thr, "relu", "ungated", torch.float32, kept=kept)
    s = torch.relu(x.double() @ blk["w_up"].double().T + blk["b_up"].double())
    assert kept.item() == int((s > thr.double()).any(0).sum())


@pytest.mark.parametrize("out_dtype", (None, torch.bfloat16, torch.float16))
def test_epilogue_bias_activation_residual_cast(gen, out_dtype):
    d, f, dout = SIZES[0]
    blk = _block(d, f, dout, "gated", gen)
    x = torch.randn(2, 5, d, generator=gen)
    bias, residual = torch.randn(dout, generator=gen), torch.randn(2, 5, dout, generator=gen)
    thr = _threshold(x.reshape(-1, d), blk, "silu", 0.5)
    y, ref = _call(x, blk, thr, "silu", "gated", torch.float32, bias=bias, residual=residual, activation="gelu",
                   out_dtype=out_dtype)
    assert y.shape == (2, 5, dout) and y.dtype == (out_dtype or torch.float32)
    assert rel_l2(y, ref) <= TOLERANCE[out_dtype or torch.float32]


def test_exact_zeros_of_a_relu_are_lossless(gen):
    d, f, dout = SIZES[1]
    blk = _block(d, f, dout, "ungated", gen)
    blk["b_up"] -= 1.0                       # most units zero
    x = torch.randn(1, d, generator=gen)
    y, ref = _call(x, blk, torch.zeros(f), "relu", "ungated", torch.float32)
    dense = torch.relu(x @ blk["w_up"].T + blk["b_up"]) @ blk["w_down_t"]
    assert rel_l2(y, ref) <= 1e-6 and rel_l2(y, dense) <= 1e-6


def test_poisoned_scratch_is_never_read(gen):
    """The kernel's scratch (compacted units, accumulators) is written before it is read."""
    d, f, dout = SIZES[1]
    blk = _block(d, f, dout, "gated", gen)
    x = torch.randn(16, d, generator=gen)
    ffn_cpu._scratch(f, 64, torch.get_num_threads())    # make sure the buffer exists, then poison it
    ffn_cpu._SCRATCH.buf.fill_(0xFF)                     # NaN as floats, -1 as int32
    y, ref = _call(x, blk, _threshold(x, blk, "silu", 0.9), "silu", "gated", torch.float32)
    assert rel_l2(y, ref) <= TOLERANCE[torch.float32]


def test_the_op_and_the_spec(gen):
    d, f, dout = SIZES[0]
    blk = _block(d, f, dout, "ungated", gen)
    x = torch.randn(3, d, generator=gen)
    thr = _threshold(x, blk, "relu", 0.5)
    y = torch.ops.sparsify.ffn_cpu(x, blk["w_up"], blk["b_up"], None, None, blk["w_down_t"], thr, "relu", "ungated")
    _, ref = _call(x, blk, thr, "relu", "ungated", torch.float32)
    assert rel_l2(y, ref) <= TOLERANCE[torch.float32]
    spec = registry.get("ffn_cpu")
    assert spec.replaces == "ffn" and spec.overload == torch.ops.sparsify.ffn_cpu.default


def test_sparse_input_linear_matches_float64(gen):
    for m in (1, 3, 16):
        h = torch.relu(torch.randn(m, 130, generator=gen) - 0.8)
        w_t, b = torch.randn(130, 49, generator=gen), torch.randn(49, generator=gen)
        thr = torch.full((130,), 0.2)
        y = ffn_cpu.sparse_input_linear_cpu(h, w_t, thr, b)
        ref = torch.where(h.abs() > thr, h, 0).double() @ w_t.double() + b.double()
        assert rel_l2(y, ref) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("bad, match", [
    (dict(mode="sideways"), "mode must be one of"),
    (dict(act="tanh"), "act must be one of"),
    (dict(threshold=torch.zeros(5)), "threshold must be"),
    (dict(w_down_t=torch.zeros(7, 36)), "w_down_t must be"),
    (dict(mode="gated"), "needs w_gate"),
    (dict(mode="predicted"), "needs pred_in"),
    (dict(x=torch.zeros(2, 41)), "x has 41 features"),
])
def test_bad_arguments_name_the_argument(gen, bad, match):
    d, f, dout = SIZES[0]
    blk = _block(d, f, dout, "ungated", gen)
    args = dict(x=torch.randn(2, d, generator=gen), w_up=blk["w_up"], b_up=blk["b_up"], w_gate=None, b_gate=None,
                w_down_t=blk["w_down_t"], threshold=torch.zeros(f), act="relu", mode="ungated")
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        ffn_cpu.ffn_cpu_host(**args)
