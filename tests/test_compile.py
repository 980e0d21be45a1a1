"""End-to-end behaviour of sparsify.compile on small models (CPU; Triton through the interpreter)."""
import json

import pytest
import torch

import sparsify
from sparsify import Block, Config, Dense, NM, Plan, Unstructured
from sparsify.codegen import runtime
from sparsify.plan import FORCED, ROLLED_BACK, SPARSE
from tests.helpers import MLP, fake_compare, kernel_device, mlp_input

FAST = dict(timing_repeats=2)


def _sparse_ops(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and str(n.target).startswith("sparsify.")]


def test_lazy_one_liner_captures_at_first_call_and_recaptures_new_shapes():
    model = MLP()
    sm = sparsify.compile(model, config=Config(weight=Dense()))
    assert sm.plan is None, "nothing may happen before the first call"
    x = mlp_input(5)
    torch.testing.assert_close(sm(x), model(x), rtol=0, atol=0)
    assert sm.plan is not None and set(sm.plan) == {"fc1", "fc2", "out"}
    x2 = mlp_input(9, seed=3)  # a new batch size: must re-capture, never return a wrong result
    torch.testing.assert_close(sm(x2), model(x2), rtol=0, atol=0)
    assert len(sm._compiled) == 2


def test_forced_block_sparsity_runs_triton_kernel_end_to_end():
    """capture -> plan -> rewrite -> codegen (Triton, interpreted) -> run, against a dense reference."""
    dev = kernel_device()
    model = MLP().to(dev)
    x = mlp_input(6).to(dev)
    cfg = Config(weight=Block(16, 0.5), force=True, max_error=10.0, kernels=("bsr_triton",), **FAST)
    with runtime.force_triton():
        sm = sparsify.compile(model, (x,), cfg)
        out = sm(x)
    ops = _sparse_ops(sm.graph_module)
    assert {str(n.target) for n in ops} == {"sparsify.bsr_linear.default"}
    assert len(ops) == 3
    for lp in sm.plan.layers.values():
        assert lp.status in (SPARSE, FORCED) and lp.kernel == "bsr_triton"
    # out (8x48) has 1x3 blocks of 16: round(1.5) = 2 kept; the larger layers are at 0.5 exactly.
    assert sm.plan["fc1"].sparsity == pytest.approx(0.5, abs=0.05)
    assert sm.plan["out"].sparsity == pytest.approx(1 / 3, abs=1e-6)
    # Reference: the same masks applied to dense weights, in float64.
    ref_model = MLP().double().to(dev)
    for fqn in ("fc1", "fc2", "out"):
        packed = sm.prepared[fqn]
        from sparsify.codegen.kernels.bsr_linear import _unpack
        n, k = getattr(model, fqn).weight.shape
        w = _unpack(packed.buffers["values"], packed.buffers["row_ptr"], packed.buffers["col_idx"], n, k)
        getattr(ref_model, fqn).weight.data = w.double()
    ref = ref_model(x.double())
    assert ((out.double() - ref).norm() / ref.norm()).item() < 2e-3  # tf32-level tolerance


def test_epilogue_fusion_folds_relu_and_residual_into_the_kernel():
    dev = kernel_device()
    model = MLP().to(dev)
    x = mlp_input(4).to(dev)
    cfg = Config(weight=Block(16, 0.5), force=True, max_error=10.0, kernels=("bsr_triton",), **FAST)
    with runtime.force_triton():
        sm = sparsify.compile(model, (x,), cfg)
    code = sm.graph_module.code
    assert "aten.relu" not in code, "relu should be fused into fc1's kernel"
    fc1 = [n for n in _sparse_ops(sm.graph_module) if n.meta[sparsify.ir.FROM].fqn == "fc1"][0]
    fc2 = [n for n in _sparse_ops(sm.graph_module) if n.meta[sparsify.ir.FROM].fqn == "fc2"][0]
    assert sparsify.ir.op_arg(fc1, "activation")[1] == "relu"
    assert sparsify.ir.op_arg(fc2, "residual")[1] is not None, "the residual add should be fused into fc2"
    assert "fused epilogue" in fc2.meta[sparsify.ir.FROM].detail


def test_layer_slower_than_dense_stays_dense_with_the_numbers():
    # On CPU the BSR op runs its reference (unpack + dense matmul): always slower than dense.
    sm = sparsify.compile(MLP(), (mlp_input(),), Config(weight=Unstructured(0.5), **FAST))
    for lp in sm.plan.layers.values():
        if lp.status == "dense":
            assert "ms vs dense" in lp.reason
        else:
            assert lp.sparse_ms < lp.dense_ms


def test_rollback_of_layers_over_the_error_budget():
    model = MLP()
    x = mlp_input(8)
    # 90% unstructured sparsity ruins the output; a tiny budget forces every layer back to dense.
    cfg = Config(weight=Unstructured(0.9), force=True, max_error=1e-6, **FAST)
    sm = sparsify.compile(model, (x,), cfg)
    statuses = {lp.status for lp in sm.plan.layers.values()}
    assert ROLLED_BACK in statuses
    assert all("rolled back" in lp.reason for lp in sm.plan.layers.values() if lp.status == ROLLED_BACK)
    assert sm.plan.model_error <= 1e-6
    assert not sm.plan.sparse_layers()
    torch.testing.assert_close(sm(x), model(x))
    assert "rolled_back" in sm.report()


def test_rollback_keeps_within_budget_and_reports_model_error():
    model = MLP()
    x = mlp_input(8)
    cfg = Config(weight=Unstructured(0.6), force=True, max_error=0.3, **FAST)
    sm = sparsify.compile(model, (x,), cfg)
    err = ((sm(x) - model(x)).norm() / model(x).norm()).item()
    assert sm.plan.model_error == pytest.approx(err, rel=1e-4, abs=1e-7)
    assert err <= 0.3


def test_plan_round_trips_through_dict_and_json(tmp_path):
    sm = sparsify.compile(MLP(), (mlp_input(),), Config(weight=NM(2, 4), force=True, max_error=10, **FAST))
    d = sm.plan.to_dict()
    assert Plan.from_dict(json.loads(json.dumps(d))) == sm.plan
    path = tmp_path / "plan.json"
    sm.plan.to_json(path)
    assert Plan.from_json(str(path)) == sm.plan
    assert Plan.from_dict(d)["fc1"].pattern == sm.plan["fc1"].pattern


def test_report_lists_every_layer_with_reason_and_model_error():
    sm = sparsify.compile(MLP(), (mlp_input(),), Config(weight=Unstructured(0.5), **FAST))
    text = sm.report()
    for fqn in ("fc1", "fc2", "out"):
        assert fqn in text
    assert "model output error" in text and "reasons:" in text
    assert all(lp.reason for lp in sm.plan.layers.values())


def test_torch_compile_and_export_of_a_compiled_model():
    dev = kernel_device()
    model = MLP().to(dev)
    x = mlp_input(4).to(dev)
    cfg = Config(weight=Block(16, 0.5), force=True, max_error=10, kernels=("bsr_triton",), **FAST)
    with runtime.force_triton():
        sm = sparsify.compile(model, (x,), cfg)
    gm = sm.graph_module
    assert _sparse_ops(gm)
    with torch.no_grad():  # sparse ops are inference-only (no autograd formula)
        expected = gm(x)
        compiled = torch.compile(gm, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), expected)
        whole = torch.compile(sm, backend="aot_eager")
        torch.testing.assert_close(whole(x), expected)
    ep = torch.export.export(gm, (x,), strict=False)
    targets = {str(n.target) for n in ep.graph.nodes}
    assert "sparsify.bsr_linear.default" in targets
    torch.testing.assert_close(ep.module()(x), expected)


def test_inspect_diff_and_dot(tmp_path):
    dev = kernel_device()
    model = MLP().to(dev)
    x = mlp_input(4).to(dev)
    before = sparsify.capture.capture(model, (x,)).root
    with runtime.force_triton():
        sm = sparsify.compile(model, (x,), Config(weight=Block(16, 0.5), force=True, max_error=10,
                                                  kernels=("bsr_triton",), **FAST))
    d = sparsify.inspection.diff(before, sm)
    assert "+" in d and "sparsify.bsr_linear" in d and "aten.linear" in d
    dot = sparsify.inspection.to_dot(sm.graph_module, tmp_path / "g.dot")
    assert dot.startswith("digraph") and (tmp_path / "g.dot").exists()
    assert "palegreen" in dot  # rewritten nodes are marked
    assert "rewrite_sites" in sparsify.inspection.why(sm, "fc1")


def test_calibration_data_with_several_batches_and_kwargs():
    class KW(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(16, 16)

        def forward(self, input_ids=None, scale=None):
            return self.lin(input_ids) * scale

    m = KW()
    batches = [{"input_ids": torch.randn(3, 16), "scale": torch.rand(3, 16)} for _ in range(3)]
    sm = sparsify.compile(m, batches[0], Config(weight=Dense()), calibration_data=batches)
    out = sm(**batches[1])
    torch.testing.assert_close(out, m(**batches[1]))
    with pytest.raises(ValueError, match="calibration_data is empty"):
        sparsify.compile(m, batches[0], Config(weight=Dense()), calibration_data=[])


def test_channel_pruning_through_compile_keeps_output_shape_and_reports():
    from sparsify import Channel
    from sparsify.models import image_inputs, tiny_convnet

    model = tiny_convnet()
    x = image_inputs(4)
    sm = sparsify.compile(model, (x,), Config(weight=Channel(0.5), max_error=10.0, **FAST))
    out = sm(x)
    assert out.shape == model(x).shape
    pruned = [lp for lp in sm.plan.layers.values() if lp.status == "pruned"]
    assert pruned, sm.report()
    assert all("kept" in lp.reason for lp in pruned)
    n_params = sum(p.numel() for p in sm.graph_module.parameters())
    assert n_params < sum(p.numel() for p in model.parameters())
    assert sm.plan.model_error is not None and "pruned" in sm.report()


def test_compiled_model_slower_end_to_end_is_rolled_back(monkeypatch):
    """Per-layer wins that vanish end to end (launch overhead) must not ship: everything goes dense."""
    from sparsify import timing as cost

    model = MLP()
    x = mlp_input(8)
    calls = []

    def fake_end_to_end(fns, device, repeats=5, threshold=None):
        calls.append(fns)
        assert len(fns) == 2
        return [cost.Timed(1.0), cost.Timed(2.0, 0.5)]   # end to end: dense 1.0 ms, compiled 2.0 ms

    def fake_layer_time(key):          # per layer: sparse 2x faster than dense
        return 1.0 if key.split("|")[3] == "dense" else 0.5

    cfg = Config(weight=Unstructured(0.5), max_error=10.0, **FAST)
    monkeypatch.setattr(cost, "compare_rounds", fake_end_to_end)
    monkeypatch.setattr(cost.CostModel, "compare", fake_compare(fake_layer_time))
    sm = sparsify.compile(model, (x,), cfg)
    assert len(calls) == 2, "3 sparse -> the 2 that save the least go dense -> still slower -> all dense"
    assert not sm.plan.sparse_layers()
    assert all(lp.status == ROLLED_BACK and "end to end" in lp.reason for lp in sm.plan.layers.values())
    assert sm.plan.model_sparse_ms == 2.0 and "end to end" in sm.report()
    torch.testing.assert_close(sm(x), model(x))


def test_end_to_end_rollback_keeps_the_layers_that_save_the_most(monkeypatch):
    """Slower end to end with 3 sparse layers: the 2 with the smallest per-layer saving go dense
    first; faster with only fc1 sparse, so fc1 ships and the report's numbers are the final ones."""
    from sparsify.metrics import output_error
    from sparsify import timing as cost

    model = MLP()
    x = mlp_input(8)
    end_to_end = iter([[cost.Timed(1.0), cost.Timed(2.0, 0.5)], [cost.Timed(1.0), cost.Timed(0.9, 1 / 0.9)]])

    def fake_end_to_end(fns, device, repeats=5, threshold=None):
        return next(end_to_end)

    def fake_layer_time(key):    # fc1 ([96, 48] weight) saves 0.9 ms, the others 0.1 ms
        if key.split("|")[3] == "dense":
            return 1.0
        return 0.1 if "(96, 48)" in key else 0.9

    cfg = Config(weight=Unstructured(0.5), max_error=10.0, **FAST)
    monkeypatch.setattr(cost, "compare_rounds", fake_end_to_end)
    monkeypatch.setattr(cost.CostModel, "compare", fake_compare(fake_layer_time))
    sm = sparsify.compile(model, (x,), cfg)
    assert [lp.fqn for lp in sm.plan.sparse_layers()] == ["fc1"]
    for fqn in ("fc2", "out"):
        lp = sm.plan.layers[fqn]
        assert lp.status == ROLLED_BACK and "the 2 that save the least go dense" in lp.reason
    assert sm.plan.model_sparse_ms == 0.9 and sm.plan.model_dense_ms == 1.0
    with torch.no_grad():
        err = output_error([model(x)], [sm(x)])
    assert err > 0 and sm.plan.model_error == pytest.approx(err, rel=1e-5), "the error of what ships"


def test_end_to_end_timings_are_interleaved():
    """Dense and compiled are timed call for call in turn, so machine drift hits both alike."""
    from sparsify.timing import compare_ms

    order = []
    a_ms, b_ms = compare_ms([lambda: order.append("a"), lambda: order.append("b")], torch.device("cpu"), repeats=3)
    assert order == ["a", "a", "b", "b"] + ["a", "b"] * 3, "two warm-up calls each, then alternating"
    assert 0 <= a_ms < 1e3 and 0 <= b_ms < 1e3
