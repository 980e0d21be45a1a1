"""The chooser against a fake cost table: it respects max_error and keeps slower layers dense."""
import pytest
import torch

import sparsify
from sparsify import Auto, Config, Unstructured
from sparsify import timing as cost_mod
from tests.helpers import MLP, by_kernel, fake_compare, mlp_input


class FakeCost(cost_mod.CostModel):
    """Times from a table keyed by kernel name ('dense' for the dense layer); nothing is run."""

    def __init__(self, table):
        super().__init__(torch.device("cpu"), use_disk=False)
        self.compare = fake_compare(table if callable(table) else by_kernel(table)).__get__(self)


def _compile(cfg, table):
    from sparsify.pipeline import Pipeline, PassContext
    gm = sparsify.capture.capture(MLP(), (mlp_input(),)).root
    ctx = PassContext(cfg, calibration=[((mlp_input(),), {})], state=sparsify.CompileState(costs=FakeCost(table)))
    Pipeline(["find_sites", "calibrate", "plan_sites"]).run(gm, ctx)
    return ctx.state.plans


def test_explicit_pattern_slower_than_dense_stays_dense_with_numbers():
    plans = _compile(Config(weight=Unstructured(0.5)), {"dense": 1.0, "csr_torch": 2.0})
    for lp in plans.values():
        assert lp.status == "dense"
        assert "2.0000 ms vs dense 1.0000 ms" in lp.reason


def test_explicit_pattern_faster_than_dense_is_sparse():
    plans = _compile(Config(weight=Unstructured(0.5)), {"dense": 1.0, "csr_torch": 0.5})
    assert all(lp.status == "sparse" and lp.speedup == pytest.approx(2.0) for lp in plans.values())


def test_force_keeps_a_slower_explicit_pattern_and_says_so():
    plans = _compile(Config(weight=Unstructured(0.5), force=True), {"dense": 1.0, "csr_torch": 2.0})
    assert all(lp.status == "forced" and "FORCED" in lp.reason for lp in plans.values())


def test_min_speedup_margin():
    plans = _compile(Config(weight=Unstructured(0.5), min_speedup=1.2), {"dense": 1.0, "csr_torch": 0.9})
    assert all(lp.status == "dense" for lp in plans.values())


def test_auto_picks_the_fastest_candidate_within_the_error_budget():
    # 90% unstructured is fastest but ruins random weights; NM 2:4 at ~50% error is over a 0.3 budget,
    # so with a generous budget the fastest wins and with a tight one nothing does.
    cands = (Unstructured(0.9), Unstructured(0.1))

    def times(key):          # the sparser, the faster: 90% at 0.3 ms, 10% at 0.9 ms, dense 1 ms
        return 1.0 if key.split("|")[3] == "dense" else (0.3 if "'sparsity': 0.9," in key else 0.9)
    loose = _compile(Config(weight=Auto(), candidates=cands, max_error=10.0, max_layer_error=10.0), times)
    assert all(lp.pattern == Unstructured(0.9) for lp in loose.values())
    tight = _compile(Config(weight=Auto(), candidates=cands, max_error=0.2, max_layer_error=10.0), times)
    for lp in tight.values():
        assert lp.status == "sparse" and lp.model_error <= 0.2, lp.reason
    # Where 90% would break the accumulated budget, the planner fell back to the milder candidate.
    mild = [lp for lp in tight.values() if lp.pattern == Unstructured(0.1)]
    assert mild, "with a 0.2 budget not every layer can be 90% sparse"
    for lp in mild:
        rejected = [c for c in lp.candidates if c.pattern == Unstructured(0.9) and c.kernel == "csr_torch"]
        assert rejected and rejected[0].model_error > 0.2


def test_equally_fast_candidates_go_to_the_smaller_error():
    cands = (Unstructured(0.9), Unstructured(0.1))
    plans = _compile(Config(weight=Auto(), candidates=cands, max_error=10.0, max_layer_error=10.0),
                     {"dense": 1.0, "csr_torch": 0.5})
    assert all(lp.pattern == Unstructured(0.1) for lp in plans.values())


def test_unknown_kernel_name_is_an_error():
    with pytest.raises(sparsify.pipeline.PassError, match="unknown kernel"):
        _compile(Config(weight=Unstructured(0.5), kernels=("cusparse9",)), {"dense": 1.0})


def test_auto_budget_is_on_the_accumulated_model_error():
    cands = (Unstructured(0.5),)
    table = {"dense": 1.0, "csr_torch": 0.5}
    loose = _compile(Config(weight=Auto(), candidates=cands, max_error=10.0, max_layer_error=10.0), table)
    e1, e12 = loose["fc1"].model_error, loose["fc2"].model_error
    assert e1 is not None and e12 > e1, "fc2's error is measured with fc1 already sparse"
    budget = (e1 + e12) / 2
    tight = _compile(Config(weight=Auto(), candidates=cands, max_error=budget, max_layer_error=10.0), table)
    assert tight["fc1"].status == "sparse" and tight["fc1"].model_error <= budget
    assert tight["fc2"].status == "dense"
    assert "over the error budget" in tight["fc2"].reason
    for lp in tight.values():
        if lp.status == "sparse":
            assert lp.model_error <= budget


def test_auto_refuses_a_destroyed_layer_even_if_the_model_output_hides_it():
    plans = _compile(Config(weight=Auto(), candidates=(Unstructured(0.9),), max_error=10.0, max_layer_error=0.3),
                     {"dense": 1.0, "csr_torch": 0.5})
    for lp in plans.values():
        assert lp.status == "dense"
        assert all(c.layer_error > 0.3 for c in lp.candidates if c.layer_error is not None)


def test_a_kernel_whose_output_is_wrong_is_never_a_candidate():
    """Every candidate is checked against the dense op on the same pruned weight before it is timed:
    a kernel that miscompiles (here: doubles its output) is reported and the layer stays dense, even
    when forced."""
    import dataclasses

    from sparsify.codegen import registry
    from sparsify.codegen.spec import KernelSpec

    class Doubling(KernelSpec):
        def call(self, *args, **kwargs):
            return super().call(*args, **kwargs) * 2

    csr = registry.get("csr_torch")
    registry.register_kernel(Doubling(**{f.name: getattr(csr, f.name) for f in dataclasses.fields(csr)}
                                      | {"name": "doubling_csr"}))
    try:
        plans = _compile(Config(weight=Unstructured(0.5), force=True, kernels=("doubling_csr",)),
                         {"dense": 1.0, "doubling_csr": 0.1})
    finally:
        registry.unregister_kernel("doubling_csr")
    for lp in plans.values():
        assert lp.status == "dense"
        (cand,) = [c for c in lp.candidates if c.kernel == "doubling_csr"]
        assert "differs from the dense op on the same pruned weight" in cand.note


def test_candidates_that_keep_the_same_weights_are_timed_once_unless_packed_differently():
    from sparsify import Block

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(64, 64)
            with torch.no_grad():
                self.fc.weight.zero_()
                self.fc.weight[:32, :32] = torch.randn(32, 32)      # one 32-block, four 16-blocks

        def forward(self, x):
            return self.fc(x)

    timed = []

    class Recording(FakeCost):
        def __init__(self):
            super().__init__({"dense": 1.0, "bsr_blocks": 0.5, "csr_torch": 0.5})
            inner = self.compare
            self.compare = lambda entries, threshold=None: timed.extend(k for k, _ in entries) or inner(entries)

    from sparsify.pipeline import PassContext, Pipeline
    x = torch.randn(3, 64)
    gm = sparsify.capture.capture(One(), (x,)).root
    cands = (Block(32, 0.25), Block(16, 0.25), Unstructured(0.75), Unstructured(0.7501))
    ctx = PassContext(Config(weight=Auto(), candidates=cands, max_error=10.0, max_layer_error=10.0),
                      calibration=[((x,), {})], state=sparsify.CompileState(costs=Recording()))
    Pipeline(["find_sites", "calibrate", "plan_sites"]).run(gm, ctx)
    lp = ctx.state.plans["fc"]
    blocks = [c for c in lp.candidates if c.kernel == "bsr_blocks"]
    assert len(blocks) == 2 and all(c.time_ms is not None for c in blocks), "16- and 32-blocks pack differently"
    csr = [c for c in lp.candidates if c.kernel == "csr_torch"]
    assert len([c for c in csr if c.time_ms is not None]) == 1 and any("keeps the same weights" in c.note for c in csr)
