"""The family extension point from outside the package, unsupported families, phases, and plans that
rebuild a compiled model on their own."""
import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import sparsify
from sparsify import Candidate, Config, Dense, Family, Measured, Prepared, Probe, Site, Trial, ir
from sparsify import timing
from sparsify.plan import PRUNED, SPARSE
from tests.helpers import MLP, fake_compare, mlp_input

FAST = dict(timing_repeats=2)


# ---- a family of our own: output features whose weight row is all zero are not computed ---------
@sparsify.register_pattern
@dataclasses.dataclass(frozen=True)
class DeadRows(sparsify.Pattern):
    field = "weight"


def dead_rows_linear(x, w_live, live, bias):
    y = bias.expand(*x.shape[:-1], -1).clone()
    y[..., live] += F.linear(x, w_live)
    return y


class DeadRowsFamily(Family):
    name, field, patterns = "dead_rows_test", "weight", (DeadRows,)
    calls: list = []

    def find_sites(self, gm, ctx):
        self.calls.append("find_sites")
        out = []
        for n in gm.graph.nodes:
            if n.target is torch.ops.aten.linear.default and len(n.args) == 3:
                fqn = ctx.full_fqn(n.args[1].target.rpartition(".")[0])
                if self.asked(fqn, ctx):
                    out.append(Site.at(n, fqn, self.name, "linear", probes=(Probe(fqn, n.args[0].name, -1, n.name),)))
        return out

    def _wb(self, gm, site):
        n = site.node(gm)
        return ir.fetch_attr(gm, n.args[1].target).detach(), ir.fetch_attr(gm, n.args[2].target).detach()

    def prepare(self, gm, site, plan, ctx):
        self.calls.append("prepare")
        w, b = self._wb(gm, site)
        live = (w != 0).any(dim=1).nonzero().flatten()
        return Prepared({"w_live": w[live].contiguous(), "live": live, "bias": b})

    def measure(self, gm, site, patterns, ctx):
        self.calls.append("measure")
        w, b = self._wb(gm, site)
        x = ctx.state.stats[site.key].sample
        p = self.prepare(gm, site, None, ctx).buffers
        err = sparsify.metrics.rel_l2(dead_rows_linear(x, **p), F.linear(x, w, b))
        cand = Candidate(patterns[0], "dead_rows", 1 - len(p["live"]) / w.shape[0], layer_error=err)
        return Measured(Trial(Candidate(Dense(), "dense", 0.0), run=lambda: F.linear(x, w, b), key=("d",)),
                        [Trial(cand, run=lambda: dead_rows_linear(x, **p), key=("dead_rows",), prepared=Prepared(p))])

    def rewrite(self, gm, site, plan, prepared, ctx):
        self.calls.append("rewrite")
        n = site.node(gm)
        bufs = ir.add_buffers(gm, "_dead_" + site.key, prepared.buffers, n, site.fqn)
        ir.replace_with_call(gm, n, dead_rows_linear, (n.args[0], bufs["w_live"], bufs["live"], bufs["bias"]),
                             ir.Provenance("rewrite_sites", "linear->dead_rows", n.name, site.fqn, plan.reason), plan)


@pytest.fixture
def dead_rows_family(monkeypatch):
    fam = sparsify.register_family(DeadRowsFamily())
    DeadRowsFamily.calls = []
    # the decision must not depend on this machine's timing: the dead-rows kernel is "faster"
    monkeypatch.setattr(timing.CostModel, "compare", fake_compare(lambda key: 1.0 if key.endswith("|d") else 0.5))
    yield fam
    sparsify.unregister_family(fam.name)


def _mlp_with_dead_rows():
    model = MLP()
    with torch.no_grad():
        model.fc1.weight[::2] = 0          # half of fc1's 96 units are dead
    return model


def test_a_family_registered_from_outside_is_found_planned_rewritten_and_reported(dead_rows_family):
    model, x = _mlp_with_dead_rows(), mlp_input(7)
    cfg = Config(weight=Dense(), overrides={"fc1": DeadRows()}, check_model_speed=False, **FAST)
    sm = sparsify.compile(model, (x,), cfg)
    assert DeadRowsFamily.calls[:2] == ["find_sites", "measure"] and "rewrite" in DeadRowsFamily.calls
    lp = sm.plan["fc1"]
    assert lp.family == "dead_rows_test" and lp.status == SPARSE and lp.kernel == "dead_rows"
    assert lp.sparsity == pytest.approx(0.5) and lp.speedup == pytest.approx(2.0)
    assert sm.plan["fc2"].family == "weight" and sm.plan["fc2"].status == "dense"
    assert [n.target for n in sm.graph_module.graph.nodes].count(dead_rows_linear) == 1
    torch.testing.assert_close(sm(x), model(x))
    report = sm.report()
    assert "dead_rows_test" in report and "DeadRows()" in report
    assert "linear->dead_rows" in sparsify.inspection.why(sm, "fc1")


def test_a_plan_of_a_user_family_rebuilds_from_json(dead_rows_family):
    model, x = _mlp_with_dead_rows(), mlp_input(7)
    cfg = Config(weight=Dense(), overrides={"fc1": DeadRows()}, check_model_speed=False, **FAST)
    text = sparsify.compile(model, (x,), cfg).plan.to_json()
    DeadRowsFamily.calls = []
    again = sparsify.compile(copy.deepcopy(model), (x,), cfg, plan=text)
    assert "measure" not in DeadRowsFamily.calls and DeadRowsFamily.calls[-2:] == ["prepare", "rewrite"]
    torch.testing.assert_close(again(x), model(x))


def test_two_families_never_claim_one_layer():
    fams = [f for f in sparsify.families() if f.supported]
    assert [f.name for f in fams][:3] == ["channel", "activation", "weight"]
    for fam in fams:   # a Dense site is the weight family's record (an FFN asked Dense is no FFN site)
        assert fam.owns(Dense()) == (fam.name == "weight")


@pytest.mark.parametrize("field,pattern,family", [
    ("attention", sparsify.SlidingWindow(64), "attention"),
    ("spatial", sparsify.Submanifold(), "spatial"),
])
def test_a_config_naming_an_unimplemented_family_is_refused(field, pattern, family):
    with pytest.raises(sparsify.UnsupportedPatternError, match=rf"Config\.{field}=.*{type(pattern).__name__}.*"
                                                               rf"{family} sparsity is not yet supported"):
        sparsify.compile(MLP(), config=Config(**{field: pattern}))


def test_an_override_naming_an_unimplemented_family_is_refused():
    with pytest.raises(sparsify.UnsupportedPatternError, match=r"overrides\['fc1'\].*SlidingWindow"):
        sparsify.compile(MLP(), config=Config(overrides={"fc1": sparsify.SlidingWindow(8)}))


# ---- phases ---------------------------------------------------------------------------------------
def test_a_user_pass_joins_the_end_of_its_phase_and_runs_on_every_build():
    from sparsify.pipeline import default_pass_names, unregister_pass

    seen = []

    @sparsify.register_pass("count_sparse_ops", phase="rewrite", default=True)
    def count_sparse_ops(gm, ctx):
        seen.append(sum(str(n.target).startswith("sparsify.") for n in gm.graph.nodes))
        return sparsify.PassResult(gm, False)

    try:
        names = default_pass_names()
        assert names.index("rewrite_sites") < names.index("count_sparse_ops") < names.index("fuse_epilogues")
        model, x = MLP(), mlp_input(8)
        # too tight a budget: every forced layer is rolled back, one build after another
        cfg = Config(weight=sparsify.Unstructured(0.9), force=True, max_error=1e-6, **FAST)
        sm = sparsify.compile(model, (x,), cfg)
        assert seen[0] == 3 and seen[-1] == 0 and len(seen) == 4, seen
        sm(mlp_input(3))              # a new input shape: the rewrite phase runs again, the plan is kept
        assert len(seen) == 5
    finally:
        unregister_pass("count_sparse_ops")


def test_phases_cannot_go_backwards():
    @sparsify.register_pass("late_analysis", phase="analysis")
    def late(gm, ctx):
        return sparsify.PassResult(gm, False)

    try:
        with pytest.raises(ValueError, match=r"'late_analysis' \(analysis\) cannot run after 'rewrite_sites'"):
            sparsify.Pipeline.default().insert_after("rewrite_sites", "late_analysis")
        pipe = sparsify.Pipeline.default().add("late_analysis")
        assert pipe.names.index("late_analysis") == pipe.names.index("plan_sites") + 1
    finally:
        sparsify.pipeline.unregister_pass("late_analysis")


def test_a_pass_whose_requirement_nothing_provides_is_named():
    gm = sparsify.capture.capture(MLP(), (mlp_input(),)).root
    with pytest.raises(sparsify.pipeline.PassError, match=r"'plan_sites' \(analysis\) requires \['sites'\]"):
        sparsify.Pipeline(["plan_sites"]).run(gm, sparsify.PassContext(Config()))


def test_recapture_runs_only_the_passes_the_rewrite_needs():
    pipe = sparsify.Pipeline.default()
    back = pipe.phase("rewrite", "lower")
    assert back.requirements() == {"sites", "plan"}
    assert pipe.providers(back.requirements() - {"plan"}).names == ["drop_identities", "fold_batchnorm", "find_sites"]


# ---- a plan alone rebuilds the compiled model -------------------------------------------------------
def _code_without_names(gm):
    return "\n".join(line for line in gm.code.splitlines() if "sparsify" in line)


@pytest.mark.parametrize("pattern", [sparsify.Unstructured(0.6), sparsify.Channel(0.5)], ids=["weight", "channel"])
def test_a_plan_from_json_rebuilds_the_same_graph_on_a_fresh_model(pattern, tmp_path):
    model, x = MLP(), mlp_input(6)
    cfg = Config(weight=pattern, force=True, max_error=10.0, check_model_speed=False, **FAST)
    sm = sparsify.compile(model, (x,), cfg)
    changed = sm.plan.sparse_layers()
    assert changed and all(lp.status in (SPARSE, "forced", PRUNED) for lp in changed)
    path = tmp_path / "plan.json"
    sm.plan.to_json(path)

    fresh = MLP()                      # same seed: the same weights, another object
    again = sparsify.compile(fresh, (x,), cfg, plan=path)
    assert again.plan == sparsify.Plan.from_json(path) or again.plan.model_error is not None
    assert [lp.status for lp in again.plan.layers.values()] == [lp.status for lp in sm.plan.layers.values()]
    assert _code_without_names(again.graph_module) == _code_without_names(sm.graph_module)
    assert torch.equal(again(x), sm(x))
    assert any("plan applied as given" in n for n in again.plan.notes)


def test_a_plan_for_other_weights_is_refused():
    model, x = MLP(), mlp_input(6)
    cfg = Config(weight=sparsify.Unstructured(0.6), force=True, max_error=10.0, **FAST)
    plan = sparsify.compile(model, (x,), cfg).plan
    with pytest.raises(sparsify.pipeline.PassError, match="mask rebuilt from the plan differs"):
        sparsify.compile(MLP(seed=1), (x,), cfg, plan=plan)
    with pytest.raises(ValueError, match="does not have"):
        sparsify.compile(torch.nn.Sequential(torch.nn.Linear(48, 8)), (x,), cfg, plan=plan)


def _trial(pattern, kernel, ms, err):
    return Trial(Candidate(pattern, kernel, 0.9, layer_error=err, time_ms=ms, speedup=10.0 / ms))


def test_the_chooser_ranks_by_time_and_lets_only_a_patterns_error_break_a_tie():
    from sparsify.family import _ranked

    u, nm = sparsify.Unstructured(0.9), sparsify.NM(2, 4)
    # one pattern, two kernels within the tie band: their errors differ by rounding, the faster goes first
    first, second = _trial(u, "slower", 2.1, 1.0e-7), _trial(u, "faster", 2.0, 1.1e-7)
    assert [t.candidate.kernel for t in _ranked([first, second])] == ["faster", "slower"]
    # two patterns within the band: the smaller error goes first even if a little slower
    assert [t.candidate.kernel for t in _ranked([_trial(nm, "nm", 2.0, 0.3), _trial(u, "u", 2.1, 0.01)])] == ["u", "nm"]
    # outside the band the time alone decides
    assert [t.candidate.kernel for t in _ranked([_trial(u, "u", 3.0, 0.01), _trial(nm, "nm", 2.0, 0.3)])] == ["nm", "u"]
