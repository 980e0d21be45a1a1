"""lower_attention: torch's scaled_dot_product_attention runs as attention_cpu where that measured
faster; the result is torch's (to fp32 rounding) and each decision is reported."""
import pytest
import torch

import sparsify
from sparsify import Config, Unstructured
from sparsify.codegen.kernels import attention_cpu
from sparsify.models import lm_inputs, tiny_lm
from sparsify.passes.rewrite import lower_attention as LA

pytestmark = pytest.mark.skipif(attention_cpu.unsupported() is not None, reason=f"{attention_cpu.unsupported()}")
CFG = dict(weight=sparsify.Dense(), overrides={"blocks.*.fc*": Unstructured(0.8)}, force=True, kernels=("csr_cpu",),
           max_error=10.0, timing_repeats=1, check_model_speed=False)


def _targets(gm):
    return [str(n.target) for n in gm.graph.nodes if "attention" in str(n.target)]


def _model():
    return tiny_lm(d=64, ffn=96, heads=2, layers=2, vocab=64), lm_inputs(2, 11, vocab=64)   # D = 32, causal


def test_attention_measured_faster_runs_the_generated_kernel_with_torchs_result(monkeypatch):
    model, x = _model()
    with monkeypatch.context() as m:
        m.setattr(LA, "_faster", lambda node, example, ctx: (False, "slower (test)"))
        torch_attention = sparsify.compile(model, (x,), Config(**CFG))
    assert _targets(torch_attention.graph_module) == ["aten.scaled_dot_product_attention.default"] * 2
    assert "slower (test)" in torch_attention.report()
    monkeypatch.setattr(LA, "_faster", lambda node, example, ctx: (True, "faster (test)"))
    sm = sparsify.compile(model, (x,), Config(**CFG))
    assert _targets(sm.graph_module) == ["sparsify.attention_cpu.default"] * 2, sm.graph_module.code
    for inp in (x, lm_inputs(3, 5, vocab=64, seed=4)):
        torch.testing.assert_close(sm(inp), torch_attention(inp), rtol=1e-5, atol=1e-5)
    ep = torch.export.export(sm.graph_module, (x,), strict=False)       # still an exportable graph
    torch.testing.assert_close(ep.module()(x), sm(x))


def test_the_decision_names_both_times():
    model, x = _model()
    sm = sparsify.compile(model, (x,), Config(**CFG))
    notes = {n.where: n.text for s in sm._state.values() for n in s.notes if n.pass_name == "lower_attention"}
    assert len(notes) == 2 and all("torch" in t and "attention_cpu" in t and " ms" in t for t in notes.values()), notes


def test_what_the_kernel_cannot_run_keeps_torchs_attention_and_says_why():
    model, x = tiny_lm(d=48, ffn=96, heads=2, layers=1, vocab=64), lm_inputs(2, 11, vocab=64)   # D = 24
    sm = sparsify.compile(model, (x,), Config(**CFG))
    assert _targets(sm.graph_module) == ["aten.scaled_dot_product_attention.default"]
    assert "multiple of 32" in sm.report()
