"""assign_layouts: chains of consecutive sparse layers run feature-major, with one transpose in and
out, where that measured faster than token-major."""
import pytest
import torch

import sparsify
from sparsify import Config, Unstructured, ir
from sparsify.passes.rewrite import assign_layouts as AL
from tests.helpers import MLP, mlp_input

CSR = dict(weight=Unstructured(0.6), force=True, kernels=("csr_torch",), max_error=10.0, timing_repeats=1,
           check_model_speed=False)


def _sparse_ops(gm):
    return [n for n in gm.graph.nodes if str(n.target).startswith("sparsify.")]


@pytest.fixture
def handoff_faster(monkeypatch):
    """The measured decision taken out of the tests of what a switch does: every chain switches."""
    monkeypatch.setattr(AL, "_handoff_faster", lambda gm, chain, ctx: (True, "faster (test)"))


def test_a_chain_runs_feature_major_with_one_transpose_each_side(tmp_path, monkeypatch, handoff_faster):
    monkeypatch.setenv("SPARSIFY_DEBUG_DIR", str(tmp_path))
    model, x = MLP(), mlp_input(7)
    sm = sparsify.compile(model, (x,), Config(**CSR))
    ops = _sparse_ops(sm.graph_module)
    assert len(ops) == 3 and all(ir.op_arg(n, "layout")[1] == "feature" for n in ops), sm.graph_module.code
    made = [n for n in sm.graph_module.graph.nodes if n.meta.get(ir.FROM) and n.meta[ir.FROM].pass_name == "assign_layouts"]
    assert [str(n.target) for n in made] == ["aten.reshape.default", "aten.t.default", "aten.clone.default",
                                             "aten.t.default", "aten.clone.default", "aten.reshape.default"]
    row = sparsify.compile(model, (x,), Config(**CSR), pipeline=sparsify.Pipeline.default().remove("assign_layouts"))
    assert all(ir.op_arg(n, "layout")[1] in (None, "row") for n in _sparse_ops(row.graph_module))
    torch.testing.assert_close(sm(x), row(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sm(mlp_input(3, seed=5)), row(mlp_input(3, seed=5)), rtol=1e-5, atol=1e-5)
    assert any(p.name.endswith("_assign_layouts.py") for p in tmp_path.iterdir())
    ep = torch.export.export(sm.graph_module, (x,), strict=False)       # still an exportable graph
    torch.testing.assert_close(ep.module()(x), sm(x))


def test_a_lone_sparse_layer_keeps_the_row_layout():
    model, x = MLP(), mlp_input(7)
    cfg = Config(**{**CSR, "weight": sparsify.Dense()}, overrides={"fc2": Unstructured(0.6)})
    sm = sparsify.compile(model, (x,), cfg)
    (op,) = _sparse_ops(sm.graph_module)
    assert ir.op_arg(op, "layout")[1] == "row"
    torch.testing.assert_close(sm(x), model(x), rtol=0.5, atol=10.0)   # runs; the error is the pruning's


def test_a_chain_on_3d_activations_with_a_residual_matches_the_row_layout(handoff_faster):
    from sparsify.models import lm_inputs, tiny_lm

    model, x = tiny_lm(d=32, ffn=64, heads=2, layers=1, vocab=64), lm_inputs(2, 9, vocab=64)
    cfg = Config(**{**CSR, "weight": sparsify.Dense()}, overrides={"blocks.0.fc*": Unstructured(0.6)})
    sm = sparsify.compile(model, (x,), cfg)
    ops = _sparse_ops(sm.graph_module)
    assert len(ops) == 2 and all(ir.op_arg(n, "layout")[1] == "feature" for n in ops)
    assert ir.op_arg(ops[1], "residual")[1] is not None, "fc2 + x is fused, the residual read token-major"
    row = sparsify.compile(model, (x,), cfg, pipeline=sparsify.Pipeline.default().remove("assign_layouts"))
    torch.testing.assert_close(sm(x), row(x), rtol=1e-5, atol=1e-5)


def test_a_kernel_that_transposes_itself_takes_the_chain_ends_without_copies(handoff_faster):
    """csr_cpu reads token-major x and stores token-major y on its own: the first op of a chain
    is row_to_feature, the last feature_to_row, and no transposed copy is left in the graph."""
    from sparsify.codegen import cpu_build
    from sparsify.models import lm_inputs, tiny_lm

    if cpu_build.compiler() is not None:
        import pytest
        pytest.skip(f"no C compiler: {cpu_build.compiler()}")
    model, x = tiny_lm(d=32, ffn=64, heads=2, layers=1, vocab=64), lm_inputs(2, 9, vocab=64)
    cfg = Config(**{**CSR, "weight": sparsify.Dense(), "kernels": ("csr_cpu",)},
                 overrides={"blocks.0.fc*": Unstructured(0.6)})
    sm = sparsify.compile(model, (x,), cfg)
    ops = _sparse_ops(sm.graph_module)
    assert [ir.op_arg(n, "layout")[1] for n in ops] == ["row_to_feature", "feature_to_row"], sm.graph_module.code
    assert ir.op_arg(ops[1], "residual")[1] is not None
    made = [n for n in sm.graph_module.graph.nodes if n.meta.get(ir.FROM) and n.meta[ir.FROM].pass_name == "assign_layouts"]
    assert [str(n.target) for n in made] == ["aten.reshape.default"], "only the tokens' shape given back"
    row = sparsify.compile(model, (x,), cfg, pipeline=sparsify.Pipeline.default().remove("assign_layouts"))
    torch.testing.assert_close(sm(x), row(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sm(lm_inputs(3, 5, vocab=64, seed=4)), row(lm_inputs(3, 5, vocab=64, seed=4)),
                               rtol=1e-5, atol=1e-5)


def test_a_chain_measured_slower_feature_major_keeps_the_row_layout(monkeypatch):
    monkeypatch.setattr(AL, "_handoff_faster", lambda gm, chain, ctx: (False, "slower (test)"))
    model, x = MLP(), mlp_input(7)
    sm = sparsify.compile(model, (x,), Config(**CSR))
    ops = _sparse_ops(sm.graph_module)
    assert len(ops) == 3 and all(ir.op_arg(n, "layout")[1] in (None, "row") for n in ops), sm.graph_module.code
    assert not any(n.meta.get(ir.FROM) and n.meta[ir.FROM].pass_name == "assign_layouts"
                   for n in sm.graph_module.graph.nodes)
    assert "slower (test)" in sm.report()


def test_the_decision_times_the_same_computation_both_ways_and_is_reported():
    """Both runners compute the chain's function (same output on the same inputs); the decision
    names both times, and the graph follows it."""
    from sparsify.models import lm_inputs, tiny_lm
    from sparsify.pipeline import PassContext

    model, x = tiny_lm(d=32, ffn=64, heads=2, layers=1, vocab=64), lm_inputs(2, 9, vocab=64)
    cfg = Config(**{**CSR, "weight": sparsify.Dense()}, overrides={"blocks.0.fc*": Unstructured(0.6)})
    row = sparsify.compile(model, (x,), cfg, pipeline=sparsify.Pipeline.default().remove("assign_layouts"))
    gm = row.graph_module
    (chain,) = AL._chains(gm)
    assert len(chain) == 2
    token_major, feature_major = AL._runner(gm, chain, False, torch.device("cpu")), AL._runner(gm, chain, True, torch.device("cpu"))
    out = token_major()
    assert out.abs().sum() > 0
    torch.testing.assert_close(feature_major().reshape(out.shape), out, rtol=1e-5, atol=1e-5)
    ctx = PassContext(config=cfg)
    faster, why = AL._handoff_faster(gm, chain, ctx)
    assert "token-major" in why and "feature-major handoff" in why and " ms" in why
    assert ("switched" in why) == faster
    sm = sparsify.compile(model, (x,), cfg)
    notes = "\n".join(str(n) for s in sm._state.values() for n in s.notes if n.pass_name == "assign_layouts")
    assert "feature-major handoff" in notes, sm.report()
    torch.testing.assert_close(sm(x), row(x), rtol=1e-5, atol=1e-5)
