"""The Triton FFN kernels (ffn_triton) under the interpreter: against a float64 reference at batch 1,
3 and 16 (the decode kernels) and 40 (prefill), fp16 / bf16 / fp32, odd sizes, ungated / gated /
predicted, thresholds dropping about half and 90% of the units, the epilogue, and what it refuses."""
import zlib

import pytest
import torch

from kernel_utils import TOLERANCE, rel_l2
from sparsify.codegen import registry, runtime
from sparsify.codegen.kernels import ffn_triton
from sparsify.codegen.kernels._ffn_common import ffn_activation, ffn_reference

SIZES = ((40, 72, 36), (67, 130, 49))
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@pytest.fixture
def gen(request):
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def _block(d, f, dout, mode, gen):
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    blk = {"w_up": r(f, d) / d ** 0.5, "b_up": r(f) * 0.2, "w_gate": None, "b_gate": None,
           "w_down_t": r(f, dout) / f ** 0.5, "pred_in": None, "pred_out": None, "pred_bias": None}
    if mode == "gated":
        blk.update(w_gate=r(f, d) / d ** 0.5, b_gate=r(f) * 0.2)
    if mode == "predicted":
        blk.update(pred_in=r(d, 5), pred_out=r(5, f), pred_bias=r(f))
    return blk


def _threshold(x, blk, act, drop):
    w, b = (blk["w_gate"], blk["b_gate"]) if blk["w_gate"] is not None else (blk["w_up"], blk["b_up"])
    s = ffn_activation(x.double() @ w.double().T + b.double(), act).abs()
    q = torch.quantile(s.float().flatten(), drop).item()
    return torch.full((s.shape[1],), q * (1 + 1e-2) + 1e-4)   # off the sample's values: no ties at the cut


def _run(x, blk, thr, act, mode, dtype, **kw):
    c = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    args = {k: c(v) if k not in ("pred_in", "pred_out", "pred_bias") else v for k, v in blk.items()}
    with runtime.force_triton():
        y = ffn_triton.ffn_triton_host(x.to(dtype), threshold=thr, act=act, mode=mode, **args, **kw)
    d64 = lambda t: None if t is None else t.to(dtype).double() if t.is_floating_point() else t  # noqa: E731
    ref = ffn_reference(x.to(dtype).double(), **{k: None if v is None else v.double() if k.startswith("pred")
                                                 else d64(v) for k, v in args.items()},
                        threshold=thr, act=act, mode=mode,
                        **{k: d64(v) if isinstance(v, torch.Tensor) else v for k, v in kw.items()})
    return y, ref


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ("ungated", "gated", "predicted"))
@pytest.mark.parametrize("m", (1, 3, 16, 40))
def test_matches_float64_at_every_batch(gen, dtype, mode, m):
    d, f, dout = SIZES[1] if m in (3, 40) else SIZES[0]
    blk = _block(d, f, dout, mode, gen)
    x = torch.randn(m, d, generator=gen)
    for act, drop in (("relu", 0.5), ("silu", 0.9)):
        y, ref = _run(x, blk, _threshold(x, blk, act, drop), act, mode, dtype)
        assert y.dtype == dtype and not torch.isnan(y).any()
        assert rel_l2(y, ref) <= TOLERANCE[dtype]


@pytest.mark.parametrize("act", ("relu2", "gelu", "gelu_tanh"))
def test_other_activations(gen, act):
    d, f, dout = SIZES[0]
    blk = _block(d, f, dout, "gated", gen)
    x = torch.randn(3, d, generator=gen)
    y, ref = _run(x, blk, _threshold(x, blk, act, 0.5), act, "gated", torch.float32)
    assert rel_l2(y, ref) <= TOLERANCE[torch.float32]


def test_epilogue(gen):
    d, f, dout = SIZES[1]
    blk = _block(d, f, dout, "ungated", gen)
    x = torch.randn(2, 3, d, generator=gen)
    bias, residual = torch.randn(dout, generator=gen), torch.randn(2, 3, dout, generator=gen)
    y, ref = _run(x, blk, _threshold(x.reshape(-1, d), blk, "relu", 0.5), "relu", "ungated", torch.float32,
                  bias=bias, residual=residual, activation="gelu", out_dtype=torch.bfloat16)
    assert y.shape == (2, 3, dout) and y.dtype == torch.bfloat16
    assert rel_l2(y, ref) <= TOLERANCE[torch.bfloat16]


def test_statistical_top_k_is_refused_and_not_a_candidate(gen):
    d, f, dout = SIZES[0]
    blk = _block(d, f, dout, "ungated", gen)
    with pytest.raises(ValueError, match="statistical top-k"):
        _run(torch.randn(1, d, generator=gen), blk, torch.zeros(f), "relu", "topk", torch.float32)
    spec = registry.get("ffn_triton")
    assert "top-k" in spec.unsupported_reason(__import__("sparsify").TopK(fraction=0.5), torch.device("cuda"),
                                             torch.float16, (f, d))
    assert spec.unsupported_reason(__import__("sparsify").ExactZeros(), torch.device("cuda"), torch.float16,
                                   (f, d)) is None
