"""Never a silent wrong result: the user's model is left as it was, what the graph specialised on is
watched, the compiled model is inference-only and says so, bad devices and shapes are named."""
import pytest
import torch
import torch.nn as nn

import sparsify
from sparsify import Config, ConfigError, Unstructured

FORCED = dict(weight=Unstructured(0.6), force=True, max_error=10.0, check_model_speed=False, timing_repeats=1)


class Flagged(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(16, 48), nn.Linear(48, 16)
        self.drop = nn.Dropout(0.5)
        self.use_gelu = True

    def forward(self, x):
        h = self.fc1(x)
        h = torch.nn.functional.gelu(h) if self.use_gelu else torch.relu(h)
        return self.fc2(self.drop(h))


def _x(n=6):
    return torch.randn(n, 16, generator=torch.Generator().manual_seed(1))


def test_compiling_leaves_the_users_model_as_it_was():
    model = Flagged().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sm = sparsify.compile(model, (_x(),), Config(**FORCED))
    assert model.training and model.drop.training, "the user's model stays in training mode"
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not sm._model.training, "what runs is an eval copy"
    assert "inference-only" in sm.report()


def test_a_flag_the_forward_reads_toggled_after_compiling_captures_again():
    model = Flagged().eval()
    sm = sparsify.compile(model, (_x(),), Config(**FORCED))
    x = _x()

    def applied_to(use_gelu):     # the same plan on a fresh model with the flag set: what sm must compute
        fresh = Flagged().eval()
        fresh.use_gelu = use_gelu
        return sparsify.compile(fresh, (x,), Config(**FORCED), plan=sm.plan)(x)

    model.use_gelu = False        # on the user's model, after compiling
    torch.testing.assert_close(sm(x), applied_to(False))
    assert any("use_gelu: True -> False" in n for n in sm.plan.notes)
    model.use_gelu = True
    torch.testing.assert_close(sm(x), applied_to(True))


def test_backward_and_train_mode_are_refused_with_a_reason():
    sm = sparsify.compile(Flagged().eval(), (_x(),), Config(**FORCED))
    x = _x().requires_grad_(True)
    with pytest.raises(RuntimeError, match="inference-only"):
        sm(x).sum().backward()
    assert any(p.requires_grad for p in sm.parameters())   # as in the original model, a loss has a graph
    with pytest.raises(RuntimeError, match="inference-only"):
        sm(_x()).sum().backward()
    with torch.no_grad():
        assert not sm(x).requires_grad
    with pytest.raises(RuntimeError, match="inference-only"):
        sm.train()
    sm.eval()                                   # eval is fine


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_cuda_config_without_cuda_is_refused_up_front():
    with pytest.raises(ConfigError, match=r"Config.device='cuda'.*no CUDA device"):
        sparsify.compile(Flagged(), config=Config(device="cuda"))


def test_calibration_batches_of_other_shapes_give_statistics_not_a_failure():
    from sparsify.models import lm_inputs, tiny_lm

    model = tiny_lm(d=32, ffn=64, heads=2, layers=1, vocab=64)
    x = lm_inputs(4, 12, vocab=64)
    calib = [lm_inputs(2, 12, vocab=64, seed=3), lm_inputs(4, 7, vocab=64, seed=4), x]
    cfg = Config(**{**FORCED, "weight": Unstructured(0.5, "wanda")})
    sm = sparsify.compile(model, (x,), cfg, calibration_data=calib)
    assert any("2 calibration batch(es) of other shapes" in n for n in sm.plan.notes)
    assert sm.plan["blocks.0.fc1"].status == "forced"
    assert sm(lm_inputs(3, 5, vocab=64)).shape == (3, 5, 64)


def test_a_container_that_is_never_called_has_its_children_captured():
    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.layers = nn.ModuleList([nn.Linear(16, 16) for _ in range(2)])

        def forward(self, x, cache=None):
            for layer in self.layers:
                x = layer(x)
            return {"y": x, "cache": object()}      # an output export cannot take

    cap = sparsify.capture.capture(Stack(), (_x(),))
    assert [p.prefix for p in cap.parts] == ["layers.0", "layers.1"]
    assert any("container" in f.reason for f in cap.failures if f.prefix == "layers")


def test_a_pattern_that_changes_nothing_is_not_a_candidate():
    """Block(64) on a 16x48 layer keeps its one block whole: sparsity 0, no kernel timed, no speedup."""
    model = nn.Sequential(nn.Linear(16, 48))
    sm = sparsify.compile(model, (_x(),), Config(weight=sparsify.Block(64, 0.25), force=True, timing_repeats=1))
    lp = sm.plan["0"]
    assert lp.status == "dense" and lp.speedup is None, lp.reason
    assert all(c.time_ms is None for c in lp.candidates)
    assert any("keeps every weight" in c.note for c in lp.candidates)


def test_channel_pruning_stays_within_the_error_budget():
    from tests.helpers import MLP, mlp_input

    x = mlp_input(8)
    loose = sparsify.compile(MLP(), (x,), Config(weight=sparsify.Channel(0.5), max_error=10.0, timing_repeats=1))
    assert loose.plan.model_error > 0.05 and loose.plan.sparse_layers()
    tight = sparsify.compile(MLP(), (x,), Config(weight=sparsify.Channel(0.5), max_error=0.05, timing_repeats=1))
    assert tight.plan.model_error <= 0.05
    rolled = [lp for lp in tight.plan.layers.values() if lp.status == "rolled_back"]
    assert rolled and all("max_error 0.05" in lp.reason for lp in rolled)
