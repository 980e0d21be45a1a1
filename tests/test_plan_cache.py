"""The plan cache: a second compile of the same model, config and inputs applies the stored plan."""
import pytest
import torch

import sparsify
from sparsify import Block, Config, plan_cache
from sparsify.models import lm_inputs, tiny_lm

FORCED = dict(force=True, max_error=10.0, check_model_speed=False, timing_repeats=1)
CFG = Config(weight=Block(32, 0.2), **FORCED)


def _lm(seed=0):
    return tiny_lm(d=64, ffn=256, heads=2, layers=1, vocab=64, ffn_sparsity=0.8, ffn_block=32, seed=seed)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """The plan cache on, in a folder of this test's own (the kernel build and cost caches stay)."""
    monkeypatch.delenv("SPARSIFY_PLAN_CACHE", raising=False)
    monkeypatch.delenv("SPARSIFY_NO_COST_CACHE", raising=False)
    monkeypatch.setattr(plan_cache, "cache_dir", lambda: tmp_path / "plans")
    monkeypatch.setattr("sparsify.timing.machine_busy", lambda: None)
    return tmp_path / "plans"


def _planned(monkeypatch) -> list:
    calls = []
    real = sparsify.Family.plan

    def spy(self, *a, **k):
        calls.append(self.name)
        return real(self, *a, **k)
    monkeypatch.setattr("sparsify.family.Family.plan", spy)
    return calls


def _compile(model, x, config=CFG, **kw):
    return sparsify.compile(model, (x,), config, progress=False, **kw)


def test_a_second_compile_applies_the_stored_plan_without_planning(cache, monkeypatch):
    x = lm_inputs(2, 16, vocab=64)
    first = _compile(_lm(), x)
    assert first.plan_cache_info.startswith("plan stored"), first.plan_cache_info
    assert len(list(cache.glob("*.pt"))) == 1
    planned = _planned(monkeypatch)
    again = _compile(_lm(), x)                 # another instance, the same weights
    assert planned == [] and "plan_sites" not in again.pass_seconds and "calibrate" not in again.pass_seconds
    assert again.plan_cache_info.startswith("hit"), again.plan_cache_info
    assert any(n.startswith("plan from the plan cache (key ") for n in again.plan.notes), again.plan.notes
    assert not any("plan applied as given" in n for n in again.plan.notes)
    assert "plan from the plan cache" in again.report()
    assert torch.equal(again(x), first(x))
    assert [lp.to_dict() | {"model_error": None} for lp in again.plan.layers.values()] == \
        [lp.to_dict() | {"model_error": None} for lp in first.plan.layers.values()]
    assert again.plan.model_error == pytest.approx(first.plan.model_error, rel=1e-5)
    lazy = sparsify.compile(_lm(), config=CFG, progress=False)    # compiled at the first call: a hit too
    assert torch.equal(lazy(x), first(x)) and lazy.plan_cache_info.startswith("hit")


@pytest.mark.parametrize("change", ["weight", "buffer", "config", "input shape", "input values", "calibration data",
                                    "calibration shape"])
def test_what_the_plan_was_made_on_changes_and_the_cache_misses(cache, monkeypatch, change):
    x = lm_inputs(2, 16, vocab=64)
    calib = [lm_inputs(2, 16, vocab=64, seed=s) for s in (5, 6)]

    def model():
        m = _lm()
        if change == "buffer":    # not in the state_dict, still what the model computes with
            m.register_buffer("scale", torch.ones(1), persistent=False)
        return m
    _compile(model(), x, CFG, calibration_data=calib)
    case = dict(model=model(), x=x, config=CFG, calibration_data=calib)
    if change == "weight":
        with torch.no_grad():
            case["model"].blocks[0].fc1.weight[0, 1] += 1e-4
    elif change == "buffer":
        case["model"].scale.fill_(2.0)
    elif change == "config":
        case["config"] = Config(weight=Block(32, 0.2), **dict(FORCED, max_error=9.0))
    elif change == "input shape":
        case["x"] = lm_inputs(2, 12, vocab=64)
    elif change == "input values":
        case["x"] = lm_inputs(2, 16, vocab=64, seed=9)
    elif change == "calibration data":
        case["calibration_data"] = [calib[0], lm_inputs(2, 16, vocab=64, seed=7)]
    elif change == "calibration shape":
        case["calibration_data"] = [calib[0], lm_inputs(2, 8, vocab=64, seed=6)]
    planned = _planned(monkeypatch)
    sm = _compile(case["model"], case["x"], case["config"], calibration_data=case["calibration_data"])
    assert sm.plan_cache_info.startswith("plan stored"), (change, sm.plan_cache_info)
    assert planned and "plan_sites" in sm.pass_seconds
    assert not any("plan cache" in n for n in sm.plan.notes)


def test_a_corrupt_entry_is_ignored_with_a_note_and_replaced(cache):
    x = lm_inputs(2, 16, vocab=64)
    first = _compile(_lm(), x)
    (entry,) = cache.glob("*.pt")
    entry.write_bytes(b"not a torch file")
    sm = _compile(_lm(), x)
    assert "plan_sites" in sm.pass_seconds
    assert any("ignored" in n for n in sm.plan.notes), sm.plan.notes
    assert torch.equal(sm(x), first(x))
    again = _compile(_lm(), x)        # the compile that planned stored a good entry again
    assert again.plan_cache_info.startswith("hit")
    assert not any("ignored" in n for n in again.plan.notes)


def test_an_entry_from_another_format_or_without_its_packed_data_is_ignored(cache):
    x = lm_inputs(2, 16, vocab=64)
    _compile(_lm(), x)
    (entry,) = cache.glob("*.pt")
    data = torch.load(entry, weights_only=True)
    torch.save(dict(data, prepared={}), entry)
    sm = _compile(_lm(), x)
    assert "plan_sites" in sm.pass_seconds and any("no prepared data" in n for n in sm.plan.notes)
    data = torch.load(entry, weights_only=True)
    torch.save(dict(data, format="sparsify-plan-cache-0"), entry)
    sm = _compile(_lm(), x)
    assert "plan_sites" in sm.pass_seconds and any("ignored" in n for n in sm.plan.notes)


def test_an_entry_that_measures_over_budget_or_does_not_apply_is_dropped_and_planned_again(cache):
    x = lm_inputs(2, 16, vocab=64)
    cfg = Config(weight=Block(32, 0.2), **dict(FORCED, max_error=2.0))
    first = _compile(_lm(), x, cfg)
    (entry,) = cache.glob("*.pt")
    data = torch.load(entry, weights_only=True)
    spoiled = {k: {"buffers": {n: t * 1000 if t.is_floating_point() else t for n, t in v["buffers"].items()},
                   "static": v["static"]} for k, v in data["prepared"].items()}
    torch.save(dict(data, prepared=spoiled), entry)
    sm = _compile(_lm(), x, cfg)
    assert "plan_sites" in sm.pass_seconds
    assert any("dropped: it measured model error" in n for n in sm.plan.notes), sm.plan.notes
    assert torch.equal(sm(x), first(x)) and sm.plan.model_error == pytest.approx(first.plan.model_error)
    data = torch.load(entry, weights_only=True)        # stored again by the compile that planned
    old = data["plan"]["layers"][0]["fqn"]
    data["plan"]["layers"][0]["fqn"] = "no.such.layer"
    data["prepared"]["no.such.layer"] = data["prepared"].pop(old)
    torch.save(data, entry)
    sm = _compile(_lm(), x, cfg)
    assert "plan_sites" in sm.pass_seconds
    assert any("dropped: it failed to apply (ValueError" in n for n in sm.plan.notes), sm.plan.notes
    assert torch.equal(sm(x), first(x))


def test_the_off_switches(cache, monkeypatch):
    x = lm_inputs(2, 16, vocab=64)
    assert _compile(_lm(), x, plan_cache=False).plan_cache_info == "off"
    monkeypatch.setenv("SPARSIFY_PLAN_CACHE", "0")
    assert _compile(_lm(), x).plan_cache_info.startswith("off")
    monkeypatch.delenv("SPARSIFY_PLAN_CACHE")
    monkeypatch.setenv("SPARSIFY_NO_COST_CACHE", "1")     # fresh timings asked for: no stored plan either
    assert _compile(_lm(), x).plan_cache_info.startswith("off")
    assert not cache.exists() or not list(cache.glob("*.pt"))
    monkeypatch.delenv("SPARSIFY_NO_COST_CACHE")
    _compile(_lm(), x)
    planned = _planned(monkeypatch)
    sm = _compile(_lm(), x, plan_cache=False)              # an entry exists, and is not used
    assert planned and sm.plan_cache_info == "off"


def test_a_callable_metric_a_custom_pipeline_or_a_given_plan_is_not_cached(cache):
    x = lm_inputs(2, 16, vocab=64)
    cfg = Config(weight=Block(32, 0.2), output=lambda o: o, **FORCED)
    assert "callable" in _compile(_lm(), x, cfg).plan_cache_info
    sm = _compile(_lm(), x, pipeline=sparsify.Pipeline.default())
    assert "custom pipeline" in sm.plan_cache_info
    assert "plan was given" in _compile(_lm(), x, plan=sm.plan).plan_cache_info
    assert not cache.exists() or not list(cache.glob("*.pt"))


def test_the_key_covers_threads_and_kernel_versions(cache, monkeypatch):
    x = lm_inputs(2, 16, vocab=64)
    _compile(_lm(), x)
    with monkeypatch.context() as m:
        m.setattr(torch, "get_num_threads", lambda: 977)
        assert _compile(_lm(), x).plan_cache_info.startswith("plan stored")
    from sparsify.codegen import registry
    import dataclasses
    name, spec = next(iter(registry.specs().items()))
    with monkeypatch.context() as m:
        m.setitem(registry._SPECS, name, dataclasses.replace(spec, version=spec.version + "-99"))
        assert _compile(_lm(), x).plan_cache_info.startswith("plan stored")
    assert _compile(_lm(), x).plan_cache_info.startswith("hit")


def test_the_tests_run_with_the_plan_cache_off():
    sm = _compile(_lm(), lm_inputs(2, 16, vocab=64))
    assert sm.plan_cache_info.startswith("off")


def test_the_least_recently_used_entries_are_evicted(cache, monkeypatch):
    monkeypatch.setattr(plan_cache, "MAX_ENTRIES", 2)
    x = lm_inputs(2, 16, vocab=64)
    for seed in (0, 1):
        _compile(_lm(seed), x)
    import os
    import time
    for p in cache.glob("*.pt"):                  # both older than what comes next
        os.utime(p, (time.time() - 100, time.time() - 100))
    assert _compile(_lm(0), x).plan_cache_info.startswith("hit")      # used: now the newest
    _compile(_lm(2), x)
    assert len(list(cache.glob("*.pt"))) == 2
    assert _compile(_lm(0), x).plan_cache_info.startswith("hit")
    assert _compile(_lm(1), x).plan_cache_info.startswith("plan stored")
