"""fuse_pairs: two consecutive csr_jit_cpu ops (an FFN's) run as one csr_jit_cpu_pair op where that
measured faster; the result is the two ops' and the decision is reported."""
import pytest
import torch

import sparsify
from sparsify import Config, Unstructured, ir
from sparsify.codegen import cpu_build, cpu_exec
from sparsify.models import lm_inputs, tiny_lm
from sparsify.passes.rewrite import fuse_pairs as FP

pytestmark = pytest.mark.skipif(cpu_build.compiler() is not None or cpu_exec.unsupported() is not None,
                                reason=f"{cpu_build.compiler() or cpu_exec.unsupported()}")
JIT = dict(weight=sparsify.Dense(), overrides={"blocks.*.fc*": Unstructured(0.8)}, force=True,
           kernels=("csr_jit_cpu",), max_error=10.0, timing_repeats=1, check_model_speed=False)


def _targets(gm):
    return [str(n.target) for n in gm.graph.nodes if str(n.target).startswith("sparsify.")]


def _model():
    return tiny_lm(d=48, ffn=96, heads=2, layers=2, vocab=64), lm_inputs(2, 9, vocab=64)


def _unfused(model, x):
    """The two ops as fuse_pairs finds them: in the row layout (assign_layouts, after it, may switch them)."""
    pipeline = sparsify.Pipeline.default().remove("fuse_pairs").remove("assign_layouts")
    return sparsify.compile(model, (x,), Config(**JIT), pipeline=pipeline)


def test_an_ffn_measured_faster_as_one_op_runs_as_one_with_the_two_ops_result(monkeypatch):
    monkeypatch.setattr(FP, "_faster", lambda gm, a, b, pair, ctx: (True, "faster (test)"))
    model, x = _model()
    sm = sparsify.compile(model, (x,), Config(**JIT))
    assert _targets(sm.graph_module) == ["sparsify.csr_jit_cpu_pair.default"] * 2, sm.graph_module.code
    pair = next(n for n in sm.graph_module.graph.nodes if "pair" in str(n.target))
    assert ir.op_arg(pair, "residual")[1] is not None and ir.op_arg(pair, "a_activation")[1] == "gelu"
    assert "blocks.0.fc1 -> blocks.0.fc2" in pair.meta[ir.FROM].detail
    two = _unfused(model, x)
    assert _targets(two.graph_module).count("sparsify.csr_jit_cpu_linear.default") == 4
    for inp in (x, lm_inputs(3, 5, vocab=64, seed=4)):
        torch.testing.assert_close(sm(inp), two(inp), rtol=1e-6, atol=1e-6)
    assert "faster (test)" in sm.report()


def test_an_ffn_measured_slower_as_one_op_stays_two(monkeypatch):
    monkeypatch.setattr(FP, "_faster", lambda gm, a, b, pair, ctx: (False, "slower (test)"))
    model, x = _model()
    sm = sparsify.compile(model, (x,), Config(**JIT))
    assert _targets(sm.graph_module).count("sparsify.csr_jit_cpu_linear.default") == 4
    assert "slower (test)" in sm.report()


def test_the_decision_times_the_same_computation_and_names_both_times():
    from sparsify.pipeline import PassContext

    model, x = _model()
    gm = _unfused(model, x).graph_module
    pairs = FP._pair_specs()
    (a, b, pair), _ = [(a, *FP._pair_of(a, pairs)) for a in gm.graph.nodes if FP._pair_of(a, pairs)]
    two, one = FP._runners(gm, a, b, pair, torch.device("cpu"))
    assert torch.equal(one(), two())
    faster, why = FP._faster(gm, a, b, pair, PassContext(config=Config(**JIT)))
    assert "two ops" in why and "csr_jit_cpu_pair" in why and ("fused" in why) == faster


def test_an_ffn_whose_hidden_activation_is_read_elsewhere_is_not_a_pair():
    """a's output used twice (here by the pair's second op and by the graph output) is not fused."""
    model, x = _model()
    gm = _unfused(model, x).graph_module
    pairs = FP._pair_specs()
    first = next(n for n in gm.graph.nodes if FP._pair_of(n, pairs))
    out = next(n for n in gm.graph.nodes if n.op == "output")
    out.args = (tuple(out.args[0]) + (first,),) if isinstance(out.args[0], tuple) else ((out.args[0], first),)
    assert FP._pair_of(first, pairs) is None
