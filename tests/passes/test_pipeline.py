"""The pass infrastructure: instruments, debug dumps, invariants, custom passes and rewrite rules."""
import pytest
import torch

import sparsify
from sparsify import Config, Dense, PassResult, Pipeline, RewriteRule, MatchFailure
from sparsify.pipeline import (PassError, PrintAfter, Timing, default_pass_names, register_pass,
                               register_rule, unregister_pass, unregister_rule)
from tests.helpers import MLP, mlp_input


def test_default_pipeline_order_by_phase():
    names = default_pass_names()
    assert names[:8] == ["drop_identities", "fold_batchnorm", "find_sites", "calibrate", "plan_sites", "rewrite_sites",
                         "apply_rewrite_rules", "fuse_epilogues"]
    phases = [sparsify.pipeline.get_pass(n).phase for n in names]
    assert phases == sorted(phases, key=sparsify.PHASES.index)


def test_debug_dir_dumps_code_and_dot_per_pass(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSIFY_DEBUG_DIR", str(tmp_path))
    from sparsify.codegen import runtime
    from tests.helpers import kernel_device
    dev = kernel_device()
    with runtime.force_triton():
        sparsify.compile(MLP().to(dev), (mlp_input().to(dev),), Config(weight=sparsify.Block(16, 0.5), force=True,
                                                       max_error=10, timing_repeats=1, kernels=("bsr_triton",)))
    files = sorted(p.name for p in tmp_path.iterdir())
    assert any(f.endswith("_find_sites.py") for f in files)
    assert any(f.endswith("_rewrite_sites.dot") for f in files)
    rewrite_dot = next(p for p in tmp_path.iterdir() if p.name.endswith("_rewrite_sites.dot")).read_text()
    assert "gold" in rewrite_dot, "nodes changed by the pass must be marked"
    code = next(p for p in tmp_path.iterdir() if p.name.endswith("_rewrite_sites.py")).read_text()
    assert "sparsify.bsr_linear" in code


def test_print_after_and_timing_instruments():
    printed = []
    timing = Timing()
    ctx_instruments = [PrintAfter({"find_sites"}, printer=printed.append), timing]
    gm = sparsify.capture.capture(MLP(), (mlp_input(),)).root
    ctx = sparsify.PassContext(Config(weight=Dense()), instruments=ctx_instruments,
                               calibration=[((mlp_input(),), {})])
    Pipeline(["find_sites", "calibrate"]).run(gm, ctx)
    assert len(printed) == 1 and "after find_sites" in printed[0]
    assert set(timing.seconds) == {"find_sites", "calibrate"}


def test_failing_pass_is_named_with_those_before_it():
    @register_pass("explode", phase="analysis")
    def explode(gm, ctx):
        raise ValueError("boom")

    try:
        gm = sparsify.capture.capture(MLP(), (mlp_input(),)).root
        ctx = sparsify.PassContext(Config(weight=Dense()))
        with pytest.raises(PassError, match=r"pass 'explode' failed after \['find_sites'\].*boom"):
            Pipeline(["find_sites", "explode"]).run(gm, ctx)
    finally:
        unregister_pass("explode")


def test_debug_invariants_catch_a_rewrite_without_provenance():
    @register_pass("sneaky", phase="rewrite")
    def sneaky(gm, ctx):
        node = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.relu.default)
        from sparsify.codegen.kernels import bsr_linear  # noqa: F401  (registers the op)
        with gm.graph.inserting_after(node):
            gm.graph.call_function(torch.ops.sparsify.bsr_linear.default, ())
        return PassResult(gm, True)

    try:
        gm = sparsify.capture.capture(MLP(), (mlp_input(),)).root
        ctx = sparsify.PassContext(Config(weight=Dense()), debug=True)
        with pytest.raises(PassError, match="without sparsify.from provenance"):
            Pipeline(["sneaky"]).run(gm, ctx)
    finally:
        unregister_pass("sneaky")


def test_user_analysis_pass_joins_the_default_pipeline_after_a_named_pass():
    seen = []

    @register_pass("count_layers", phase="analysis", after="find_sites")
    def count_layers(gm, ctx):
        seen.append(len(sparsify.ir.layer_nodes(gm)))
        return PassResult(gm, False)

    try:
        assert default_pass_names().index("count_layers") == default_pass_names().index("find_sites") + 1
        sparsify.compile(MLP(), (mlp_input(),), Config(weight=Dense()))
        assert seen == [3]
    finally:
        unregister_pass("count_layers")
    assert "count_layers" not in default_pass_names()


def test_custom_pipeline_insert_before():
    calls = []

    @register_pass("note_before_choose", phase="analysis")
    def note(gm, ctx):
        calls.append(sorted(ctx.state.stats))
        return PassResult(gm, False)

    try:
        pipe = Pipeline.default().insert_before("plan_sites", "note_before_choose")
        sparsify.compile(MLP(), (mlp_input(),), Config(weight=Dense()), pipeline=pipe)
        assert calls == [["fc1", "fc2", "out"]]  # calibration ran before it
    finally:
        unregister_pass("note_before_choose")


def test_custom_rewrite_rule_search_replace_with_check():
    def search(x):
        return torch.relu(x)

    def replace(x):
        return torch.clamp_min(x, 0.0)

    refused = []

    def only_2d(match):
        node = next(iter(match.returning_nodes))
        shape, _ = sparsify.ir.tensor_meta(node)
        if shape is not None and len(shape) == 2:
            return True
        refused.append(node.name)
        return MatchFailure("not 2-D")

    rule = register_rule(RewriteRule("relu_to_clamp", search, replace, extra_check=only_2d))
    try:
        model = MLP()
        x = mlp_input()
        sm = sparsify.compile(model, (x,), Config(weight=Dense()))
        code = sm.graph_module.code
        assert "clamp_min" in code and "aten.relu" not in code
        assert sm.rule_counts["relu_to_clamp"] == 1
        torch.testing.assert_close(sm(x), model(x))
        assert rule.apply(sm.graph_module) == 0  # idempotent: nothing left to match
    finally:
        unregister_rule("relu_to_clamp")
