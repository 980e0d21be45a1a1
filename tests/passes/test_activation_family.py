"""The activation family: FFN sites in captured HF graphs, a lossless rewrite of a ReLU FFN, thresholds
under the error budget, overrides, plan rebuild and save/load, and what it leaves to the weight family."""
import pytest
import torch
import torch.nn as nn

import sparsify
from sparsify import ActivationThreshold, Auto, Config, Dense, ExactZeros, PredictedActive, TopK
from sparsify.plan import FORCED, SPARSE

FAST = dict(timing_repeats=2, check_model_speed=False)


class FFN(nn.Module):
    def __init__(self, d=48, f=200, shift=0.0):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, f), nn.Linear(f, d)
        with torch.no_grad():
            self.fc1.bias -= shift

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x))) + x


class Net(nn.Module):
    def __init__(self, n=2, shift=0.6):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([FFN(shift=shift) for _ in range(n)])

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def _x(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _ffn_ops(sm):
    return [n for n in sm.graph_module.graph.nodes if n.op == "call_function" and "ffn_" in str(n.target)]


def test_a_relu_ffn_with_exact_zeros_is_rewritten_losslessly():
    model, x = Net().eval(), _x(2, 5, 48)
    sm = sparsify.compile(model, (x,), Config(activation=ExactZeros(), weight=Dense(), force=True, **FAST),
                          progress=False)
    assert [lp.family for lp in sm.plan.layers.values()] == ["activation", "activation"]
    assert all(lp.status in (SPARSE, FORCED) and lp.kernel == "ffn_cpu" for lp in sm.plan.layers.values())
    assert all(0.3 < lp.sparsity < 1 for lp in sm.plan.layers.values())    # the measured zero rate
    ops = _ffn_ops(sm)
    assert len(ops) == 2 and sparsify.ir.op_arg(ops[0], "residual")[1] is not None   # residual fused
    assert not [n for n in sm.graph_module.graph.nodes if n.target == torch.ops.aten.relu.default]
    with torch.no_grad():
        for seed in (1, 2):
            xx = _x(2, 5, 48, seed=seed)
            y, ref = sm(xx), model(xx)
            assert ((y - ref).norm() / ref.norm()).item() < 1e-6


def test_a_dense_activation_leaves_the_layers_to_the_weight_family():
    sm = sparsify.compile(Net().eval(), (_x(1, 4, 48),), Config(weight=Dense(), **FAST), progress=False)
    assert {lp.family for lp in sm.plan.layers.values()} == {"weight"}
    assert len(sm.plan.layers) == 4


def test_an_override_asks_one_block_and_the_other_stays_with_the_weight_family():
    cfg = Config(weight=Dense(), overrides={"blocks.1": ExactZeros()}, force=True, **FAST)
    sm = sparsify.compile(Net().eval(), (_x(1, 4, 48),), cfg, progress=False)
    fams = {k: lp.family for k, lp in sm.plan.layers.items()}
    assert fams == {"blocks.0.fc1": "weight", "blocks.0.fc2": "weight", "blocks.1": "activation"}
    notes = sm.report()
    assert "blocks.1.fc1: not a weight site: activation site 'blocks.1' covers its nodes" in notes


def test_thresholds_are_calibrated_and_the_error_is_stated():
    model = Net(shift=0.0).eval()
    x, calib = _x(1, 8, 48), [_x(4, 64, 48, seed=s) for s in (2, 3)]
    cfg = Config(activation=ActivationThreshold(0.7, per_channel=False), weight=Dense(), force=True, max_error=1.0,
                 **FAST)
    sm = sparsify.compile(model, (x,), cfg, calibration_data=calib, progress=False)
    for lp in sm.plan.layers.values():
        assert lp.family == "activation" and 0.55 < lp.sparsity < 0.85
        assert lp.model_error is not None and lp.model_error > 0
    y, ref = sm(x), model(x)
    err = ((y - ref).norm() / ref.norm()).item()
    assert 0 < err == pytest.approx(sm.plan.model_error, rel=1e-3)


@pytest.mark.parametrize("gated", (False, True))
def test_statistical_top_k_keeps_the_fraction_per_token(gated):
    class Gated(FFN):
        def __init__(self):
            super().__init__()
            self.gate = nn.Linear(48, 200)

        def forward(self, x):
            return self.fc2(torch.nn.functional.silu(self.gate(x)) * self.fc1(x))

    torch.manual_seed(0)
    model = (Gated() if gated else Net(n=1, shift=0.0)).eval()
    calib = [_x(2, 64, 48, seed=s) for s in (2, 3)]
    cfg = Config(activation=TopK(fraction=0.3), weight=Dense(), force=True, max_error=1.0, **FAST)
    sm = sparsify.compile(model, (_x(1, 8, 48),), cfg, calibration_data=calib, progress=False)
    (lp,) = [lp for lp in sm.plan.layers.values() if lp.family == "activation"]
    assert lp.status in (SPARSE, FORCED) and lp.sparsity == pytest.approx(0.7, abs=0.02)
    assert sparsify.ir.op_arg(_ffn_ops(sm)[0], "mode")[1] == ("gated_topk" if gated else "topk")
    x = _x(1, 8, 48)
    err = ((sm(x) - model(x)).norm() / model(x).norm()).item()
    assert 0 < err < 0.5


def test_auto_takes_the_lossless_pattern_under_a_tight_budget():
    model = Net().eval()
    sm = sparsify.compile(model, (_x(1, 8, 48),), Config(activation=Auto(), weight=Dense(), max_error=1e-4,
                                                         force=False, min_speedup=0.01, **FAST),
                          calibration_data=[_x(1, 64, 48, seed=4)], progress=False)
    for lp in sm.plan.layers.values():
        assert lp.family == "activation"
        if lp.status == SPARSE:   # ExactZeros, or a threshold that drops no more than the ReLU's zeros
            assert lp.model_error <= 1e-4
        tried = {type(c.pattern).__name__ for c in lp.candidates}
        assert {"ExactZeros", "PredictedActive", "ActivationThreshold"} <= tried


def test_per_unit_thresholds_need_enough_calibration_tokens():
    sm = sparsify.compile(Net(shift=0.0).eval(), (_x(1, 4, 48),),
                          Config(activation=ActivationThreshold(0.9), weight=Dense(), force=True, **FAST),
                          progress=False)
    for lp in sm.plan.layers.values():
        assert lp.status not in (SPARSE, FORCED) and "calibration tokens, the sample has 4" in lp.reason


def test_exact_zeros_on_a_gelu_ffn_says_why_not():
    class GeluFFN(FFN):
        def forward(self, x):
            return self.fc2(torch.nn.functional.gelu(self.fc1(x)))

    sm = sparsify.compile(GeluFFN().eval(), (_x(1, 4, 48),), Config(activation=ExactZeros(), weight=Dense(), **FAST),
                          progress=False)
    (lp,) = sm.plan.layers.values()
    assert "ExactZeros needs an activation with exact zeros" in lp.reason


def test_predicted_active_units_on_low_rank_inputs():
    """Tokens from a low-dimensional subspace: the low-rank predictor finds the active units."""
    torch.manual_seed(0)
    model = Net(n=1, shift=0.8).eval()
    basis = torch.randn(6, 48)
    tokens = lambda n, s: (torch.randn(1, n, 6, generator=torch.Generator().manual_seed(s)) @ basis)  # noqa: E731
    cfg = Config(activation=PredictedActive(rank=8, recall=0.999), weight=Dense(), force=True, max_error=1.0, **FAST)
    sm = sparsify.compile(model, (tokens(256, 1),), cfg, progress=False)
    (lp,) = sm.plan.layers.values()
    assert lp.status in (SPARSE, FORCED) and isinstance(lp.pattern, PredictedActive)
    assert sparsify.ir.op_arg(_ffn_ops(sm)[0], "mode")[1] == "predicted"
    x = tokens(256, 2)
    y, ref = sm(x), model(x)
    assert ((y - ref).norm() / ref.norm()).item() < 0.05


def test_a_plan_rebuilds_and_a_saved_model_loads(tmp_path):
    model = Net(shift=0.0).eval()
    x, calib = _x(1, 8, 48), [_x(2, 64, 48, seed=5)]
    cfg = Config(activation=ActivationThreshold(0.5), weight=Dense(), force=True, max_error=1.0, **FAST)
    sm = sparsify.compile(model, (x,), cfg, calibration_data=calib, progress=False)
    y = sm(x)
    again = sparsify.compile(model, (x,), cfg, calibration_data=calib, plan=sm.plan.to_json(), progress=False)
    torch.testing.assert_close(again(x), y)
    with pytest.raises(sparsify.pipeline.PassError, match="thresholds rebuilt from the plan differ"):
        sparsify.compile(model, (x,), cfg, calibration_data=[_x(2, 64, 48, seed=6)], plan=sm.plan.to_json(),
                         progress=False)
    sm.save(tmp_path / "m.pt")
    loaded = sparsify.load(tmp_path / "m.pt", model, (x,), progress=False)
    torch.testing.assert_close(loaded(x), y)


# ---- captured Hugging Face graphs -------------------------------------------------------------------
transformers = pytest.importorskip("transformers")
VOCAB = 128


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=4, vocab_size=VOCAB, use_cache=False))


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64,
                                      use_cache=False))


def _bert():
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                                vocab_size=VOCAB))


@pytest.mark.parametrize("build, sites", [
    (_llama, {"model.layers.0.mlp": "ffn:gated:silu", "model.layers.1.mlp": "ffn:gated:silu"}),
    (_gpt2, {"transformer.h.0.mlp": "ffn:ungated:gelu_tanh", "transformer.h.1.mlp": "ffn:ungated:gelu_tanh"}),
    (_bert, {"encoder.layer.0": "ffn:ungated:gelu", "encoder.layer.1": "ffn:ungated:gelu"}),
])
def test_ffn_sites_of_captured_hf_models(build, sites):
    torch.manual_seed(0)
    model = build().eval()
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    cfg = Config(activation=ActivationThreshold(0.5, per_channel=False), weight=Dense(), force=True, max_error=1.0,
                 **FAST)
    sm = sparsify.compile(model, (ids,), cfg, progress=False)
    found = {k: lp.op for k, lp in sm.plan.layers.items() if lp.family == "activation"}
    assert found == sites
    assert all(sm.plan.layers[k].status in (SPARSE, FORCED) for k in sites)
    assert len(_ffn_ops(sm)) == len(sites)
    out, ref = sm(ids), model(ids)
    o = out.last_hidden_state if hasattr(out, "last_hidden_state") else out.logits
    r = ref.last_hidden_state if hasattr(ref, "last_hidden_state") else ref.logits
    assert ((o - r).norm() / r.norm()).item() == pytest.approx(sm.plan.model_error, rel=1e-2, abs=1e-6)
