"""Save and load, state_dict, device/dtype conversions, and the error budget's metric and output."""
import pytest
import torch

import sparsify
from sparsify import Block, Config, ConfigError, Unstructured
from sparsify.models import lm_inputs, tiny_lm
from tests.helpers import MLP, mlp_input

FORCED = dict(force=True, max_error=10.0, check_model_speed=False, timing_repeats=1)


def _lm():
    return tiny_lm(d=64, ffn=256, heads=2, layers=1, vocab=64, ffn_sparsity=0.8, ffn_block=32)


def test_save_and_load_rebuild_the_same_model_without_planning(tmp_path, monkeypatch):
    x = lm_inputs(2, 16, vocab=64)
    sm = sparsify.compile(_lm(), (x,), Config(weight=Block(32, 0.2), **FORCED))
    path = tmp_path / "lm.pt"
    sm.save(path)
    planned = []
    monkeypatch.setattr("sparsify.family.Family.plan", lambda *a, **k: planned.append(a))
    again = sparsify.load(path, _lm(), (x,))
    assert planned == [], "a loaded model is not planned again"
    assert torch.equal(again(x), sm(x))
    assert [lp.fqn for lp in again.plan.sparse_layers()] == [lp.fqn for lp in sm.plan.sparse_layers()]
    for key, p in sm.prepared.items():
        if key in again.prepared:
            assert all(torch.equal(p.buffers[n], again.prepared[key].buffers[n]) for n in p.buffers)


def test_load_refuses_another_model_and_another_kernel_version(tmp_path, monkeypatch):
    x = lm_inputs(2, 16, vocab=64)
    path = tmp_path / "lm.pt"
    sm = sparsify.compile(_lm(), (x,), Config(weight=Block(32, 0.2), **FORCED))
    sm.save(path)
    kernel = sm.plan.sparse_layers()[0].kernel
    other = tiny_lm(d=64, ffn=256, heads=2, layers=1, vocab=64, ffn_sparsity=0.8, ffn_block=32, seed=3)
    with pytest.raises(ValueError, match="other values"):
        sparsify.load(path, other, (x,))
    with pytest.raises(ValueError, match="parameters differ"):
        sparsify.load(path, tiny_lm(d=64, ffn=128, heads=2, layers=1, vocab=64), (x,))
    from sparsify.codegen import registry
    import dataclasses
    spec = registry.get(kernel)
    monkeypatch.setitem(registry._SPECS, kernel, dataclasses.replace(spec, version=spec.version + "-99"))
    with pytest.raises(ValueError, match=f"was packed for kernel {kernel}"):
        sparsify.load(path, _lm(), (x,))


def test_state_dict_holds_the_packed_buffers_and_loads_into_a_twin(tmp_path):
    model, x = MLP(), mlp_input(5)
    cfg = Config(weight=Unstructured(0.5), **FORCED)
    sm = sparsify.compile(model, (x,), cfg)
    sd = sm.state_dict()
    assert any("_sparsify_fc1" in k for k in sd), list(sd)
    twin = sparsify.compile(MLP(), (x,), cfg)
    with torch.no_grad():                         # spoil the twin's packed values, then load ours
        for k, t in twin.state_dict().items():
            if "_sparsify_" in k and t.is_floating_point():
                t.mul_(3)
    assert twin.load_state_dict(sd).missing_keys == []
    torch.testing.assert_close(twin(x), sm(x))
    dense_only = {k: v for k, v in sd.items() if "_sparsify_" not in k}
    with pytest.raises(RuntimeError, match="Missing key"):
        twin.load_state_dict(dense_only)


def test_to_another_dtype_or_device_is_refused_with_the_way_out():
    sm = sparsify.compile(MLP(), (mlp_input(),), Config(weight=Unstructured(0.5), **FORCED))
    assert sm.to("cpu") is sm and sm.to(torch.float32) is sm
    with pytest.raises(RuntimeError, match=r"compile the model again with Config\(device=\.\.\., dtype=\.\.\.\)"):
        sm.to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="specialised"):
        sm.half()


def test_the_budget_can_be_on_a_selected_output_and_a_cosine():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128,
                                  vocab_size=128, max_position_embeddings=64)
    model = transformers.BertModel(cfg).eval()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    pooled = lambda o: o.last_hidden_state.mean(1)  # noqa: E731
    runs = {}
    for name, extra in (("all", {}), ("cos", dict(metric="cosine", output=pooled)), ("pooler", dict(output="pooler_output"))):
        sm = sparsify.compile(model, (ids,), Config(weight=Unstructured(0.5), **FORCED, **extra))
        runs[name] = sm
    with torch.no_grad():
        d, s = model(ids), runs["cos"](ids)
    cos = torch.nn.functional.cosine_similarity(pooled(d).double(), pooled(s).double(), dim=-1).mean()
    assert runs["cos"].plan.model_error == pytest.approx(1 - float(cos), rel=1e-4)
    assert "cosine" in runs["cos"].plan.error_measure and "pooler_output" in runs["pooler"].plan.error_measure
    assert runs["cos"].plan.model_error < runs["all"].plan.model_error


def test_metric_and_output_are_checked_and_callables_are_not_restored():
    with pytest.raises(ConfigError, match="Config.metric"):
        Config(metric="l1")
    with pytest.raises(ConfigError, match="Config.output"):
        Config(output=1.5)
    d = Config(metric="cosine", output=lambda o: o[0]).to_dict()
    assert d["output"].startswith("callable:")
    with pytest.raises(ConfigError, match="cannot restore it"):
        Config.from_dict(d)
    assert Config.from_dict(Config(metric="cosine", output="pooler_output").to_dict()).output == "pooler_output"


def test_compile_shows_stage_lines_by_default_and_is_silent_on_request(capfd):
    sparsify.compile(MLP(), (mlp_input(),), Config(weight=Unstructured(0.5), timing_repeats=1))
    err = capfd.readouterr().err
    assert "[sparsify] capture" in err and "[sparsify] plan 1/3 fc1" in err and "compiled in" in err
    sparsify.compile(MLP(), (mlp_input(),), Config(weight=Unstructured(0.5), timing_repeats=1), progress=False)
    assert "[sparsify]" not in capfd.readouterr().err
