"""Timing decisions: interleaved rounds until the ratio is steady, what the cost cache keeps, and the
chooser's "too noisy to decide". Every clock here is a fake: real timings live in benchmarks/."""
import json
import time

import pytest
import torch

import sparsify
from sparsify import Config, Unstructured, timing
from sparsify.timing import CostModel, Timed, compare_rounds
from tests.helpers import MLP, mlp_input

CPU = torch.device("cpu")


def _scripted(rounds):
    """A stand-in for compare_ms that returns the given per-round times, one round per call."""
    it = iter(rounds)
    calls = []

    def compare_ms(fns, device, repeats=20, warmup=2):
        calls.append(len(fns))
        return next(it)
    return compare_ms, calls


def test_steady_ratios_stop_after_the_minimum_rounds(monkeypatch):
    fake, calls = _scripted([[2.0, 1.0, 4.0]] * 10)
    monkeypatch.setattr(timing, "compare_ms", fake)
    dense, fast, slow = compare_rounds([lambda: 0, lambda: 0, lambda: 0], CPU)
    assert len(calls) == timing.MIN_ROUNDS
    assert dense.ratio == 1.0 and fast.ratio == pytest.approx(2.0) and slow.ratio == pytest.approx(0.5)
    assert fast.stable and slow.stable and fast.ms == 1.0


def test_unsteady_ratios_run_every_round_and_are_marked(monkeypatch):
    wobble = [[2.0, 1.0 if r % 2 else 2.5] for r in range(20)]    # ratio 2.0, 0.8, 2.0, 0.8, ...
    fake, calls = _scripted(wobble)
    monkeypatch.setattr(timing, "compare_ms", fake)
    _, cand = compare_rounds([lambda: 0, lambda: 0], CPU)
    assert len(calls) == timing.MAX_ROUNDS and not cand.stable and cand.spread > timing.RATIO_TOLERANCE


def test_a_clearly_slower_candidate_leaves_the_rounds(monkeypatch):
    fake, calls = _scripted([[2.0, 1.5, 8.0]] + [[2.0, 1.5]] * 10)
    monkeypatch.setattr(timing, "compare_ms", fake)
    _, fast, slow = compare_rounds([lambda: 0, lambda: 0, lambda: 0], CPU, threshold=1.05)
    assert calls == [3] + [2] * (timing.MIN_ROUNDS - 1), "the 0.25x candidate is dropped after round one"
    assert slow.ratio == pytest.approx(0.25) and slow.stable and fast.ratio == pytest.approx(4 / 3)


def test_a_clearly_faster_candidate_leaves_after_two_rounds(monkeypatch):
    # 2.0x against a 1.05 threshold (>= 1.75x) in both rounds: decided; the 1.3x one stays for the steady rounds
    fake, calls = _scripted([[2.0, 1.0, 1.54]] * 2 + [[2.0, 1.54]] * 10)
    monkeypatch.setattr(timing, "compare_ms", fake)
    _, clear, close = compare_rounds([lambda: 0, lambda: 0, lambda: 0], CPU, threshold=1.05)
    assert calls == [3, 3] + [2] * (timing.MIN_ROUNDS - 2)
    assert clear.stable and clear.ratio == pytest.approx(2.0) and close.ratio == pytest.approx(2 / 1.54)


def test_a_fast_first_round_alone_decides_nothing(monkeypatch):
    # 3x, then 1.1x: one fast round is not two; the candidate stays and its spread marks it unsteady
    fake, calls = _scripted([[3.0, 1.0]] + [[1.1, 1.0], [3.0, 1.0]] * 10)
    monkeypatch.setattr(timing, "compare_ms", fake)
    _, cand = compare_rounds([lambda: 0, lambda: 0], CPU, threshold=1.0)
    assert len(calls) == timing.MAX_ROUNDS and not cand.stable


def test_a_function_that_raises_is_reported_not_timed(monkeypatch):
    fake, calls = _scripted([[1.0, 2.0]] * 10)
    monkeypatch.setattr(timing, "compare_ms", fake)

    def broken():
        raise RuntimeError("no kernel for this")

    dense, bad, ok = compare_rounds([lambda: 0, broken, lambda: 0], CPU)
    assert bad.ms is None and "no kernel for this" in bad.error and ok.ratio == pytest.approx(0.5)
    assert calls[0] == 2, "the broken one is left out of the rounds"


def test_cache_keeps_only_steady_timings_taken_on_a_quiet_machine(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSIFY_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("SPARSIFY_NO_COST_CACHE", raising=False)
    results = {"steady": [Timed(2.0, 1.0), Timed(1.0, 2.0)], "noisy": [Timed(2.0, 1.0), Timed(1.0, 2.0, 0.5, False)]}
    mode = {"now": "steady"}
    monkeypatch.setattr(timing, "compare_rounds", lambda fns, device, repeats, threshold=None: results[mode["now"]])
    monkeypatch.setattr(timing, "machine_busy", lambda: None)
    CostModel(CPU).compare([("k-dense", lambda: 0), ("k-a", lambda: 0)])
    mode["now"] = "noisy"
    CostModel(CPU).compare([("n-dense", lambda: 0), ("n-a", lambda: 0)])
    monkeypatch.setattr(timing, "machine_busy", lambda: "load average 6.1 on 2 cores")
    mode["now"] = "steady"
    CostModel(CPU).compare([("b-dense", lambda: 0), ("b-a", lambda: 0)])
    disk = json.loads((tmp_path / "cost.json").read_text())
    assert {"k-dense", "k-a", "n-dense"} == set(disk), "noisy candidates and busy-machine timings are not kept"
    assert disk["k-a"]["baseline"] == "k-dense" and disk["k-a"]["ratio"] == 2.0 and "load" in disk["k-a"]


def test_cache_is_used_whole_and_fresh_only(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSIFY_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("SPARSIFY_NO_COST_CACHE", raising=False)
    now = time.time()
    entry = lambda ms, ratio, when: {"ms": ms, "ratio": ratio, "spread": 0.0, "baseline": "d", "when": when}  # noqa: E731
    (tmp_path / "cost.json").write_text(json.dumps({"d": entry(2.0, 1.0, now), "a": entry(1.0, 2.0, now),
                                                    "old": entry(1.0, 9.0, now - 90 * 86400)}))
    measured = []
    monkeypatch.setattr(timing, "compare_rounds", lambda fns, device, repeats, threshold=None: measured.append(len(fns)) or
                        [Timed(2.0, 1.0)] + [Timed(1.5, 1.33)] * (len(fns) - 1))
    hit = CostModel(CPU).compare([("d", lambda: 0), ("a", lambda: 0)])
    assert measured == [] and all(t.cached for t in hit) and hit[1].ratio == 2.0
    stale = CostModel(CPU).compare([("d", lambda: 0), ("old", lambda: 0)])
    assert measured == [2] and stale[1].ratio == 1.33, "a 90-day-old entry is measured again"


def test_the_chooser_keeps_dense_where_the_ratio_is_too_noisy(monkeypatch):
    def noisy(self, entries, threshold=None):
        return [Timed(1.0, 1.0)] + [Timed(0.5, 2.0, 0.6, False) for _ in entries[1:]]
    monkeypatch.setattr(CostModel, "compare", noisy)
    sm = sparsify.compile(MLP(), (mlp_input(),), Config(weight=Unstructured(0.5), timing_repeats=1))
    for lp in sm.plan.layers.values():
        assert lp.status == "dense" and "too noisy to decide on" in lp.reason, lp.reason
        assert any("too noisy to decide" in c.note for c in lp.candidates)


def test_candidates_are_timed_with_the_epilogue_the_graph_will_fuse(monkeypatch):
    keys = []

    def record(self, entries, threshold=None):
        keys.extend(k for k, _ in entries)
        for _, fn in entries:
            fn()                            # the runnables run, epilogue included
        return [Timed(1.0, 1.0)] + [Timed(0.5, 2.0) for _ in entries[1:]]
    monkeypatch.setattr(CostModel, "compare", record)
    sparsify.compile(MLP(), (mlp_input(),), Config(weight=Unstructured(0.5), timing_repeats=1,
                                                    check_model_speed=False))
    fc1 = [k for k in keys if "(96, 48)" in k]          # fc1's weight; relu follows it
    fc2 = [k for k in keys if "(48, 96)" in k]          # fc2's weight; + x follows it
    assert fc1 and all("epilogue=relu+-+None" in k for k in fc1)
    assert fc2 and all("epilogue=none+residual+None" in k for k in fc2)


def test_model_sensitivity_needs_no_forward_for_a_substitution_that_changes_nothing():
    """A model pruned before compiling gets its own weights back from a mask: its model error is
    the one already known, without running the model; a real change runs it, and is accumulated."""
    from sparsify.capture import capture
    from sparsify.sensitivity import ModelSensitivity
    from tests.helpers import MLP, mlp_input

    x = mlp_input(5)
    gm = capture(MLP(), (x,)).root
    sens = ModelSensitivity(gm, [((x,), {})])
    calls = []
    gm.register_forward_pre_hook(lambda *a: calls.append(1))
    (name, w), = [(n, p) for n, p in gm.named_parameters() if n.endswith("weight")][:1]
    assert sens.error({name: w.detach().clone()}) == 0.0 and not calls
    pruned = w.detach() * (torch.rand_like(w) > 0.5)
    err = sens.error({name: pruned})
    assert err > 0 and len(calls) == 1
    sens.accept({name: pruned})
    assert sens.error({name: pruned.clone()}) == err and len(calls) == 1    # the accepted state, known
    other = [(n, p) for n, p in gm.named_parameters() if n.endswith("weight")][1]
    assert sens.error({other[0]: other[1].detach() * 0.5}) != err and len(calls) == 2


def test_long_calls_get_fewer_calls_a_round_but_never_under_the_minimum(monkeypatch):
    import time as _time

    seen = []

    def compare_ms(fns, device, repeats=20, warmup=2):
        seen.append((repeats, warmup))
        return [2.0, 1.0]
    monkeypatch.setattr(timing, "compare_ms", compare_ms)
    slow = lambda: _time.sleep(timing.ROUND_BUDGET_MS / 1e3)  # noqa: E731 - one call spends the round
    compare_rounds([slow, lambda: 0], CPU, repeats=5)
    assert all(s == (timing.MIN_CALLS, 0) for s in seen), "a call that spends the round is its own warm-up"
    seen.clear()
    compare_rounds([lambda: 0, lambda: 0], CPU, repeats=5)
    assert seen[0] == (5, 1), "short calls keep the requested repeats and one warm-up a round"
