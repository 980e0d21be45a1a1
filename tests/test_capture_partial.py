"""Partial capture: a model whose forward neither torch.export nor fx.symbolic_trace can capture.

The whole-model capture fails, so each child is captured on the inputs it really receives; the
children that capture become parts (and are planned), the ones that do not stay eager and the report
says which and why. A child that fails but has children of its own is recursed into.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import sparsify
from sparsify.capture import capture
from sparsify.plan import DENSE, FORCED, ROLLED_BACK, SPARSE


class Wobble(nn.Module):
    """Not capturable: Python control flow on a tensor value, a loop whose range comes from `.item()`,
    and a numpy op. Its own Linear child is capturable."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 16)

    def forward(self, x):
        h = self.proj(x)
        if h.sum() > 0:
            h = h * 0.5
        steps = int(h.abs().mean().item() * 10) % 3 + 1
        for _ in range(steps):
            h = h - 0.1 * torch.tanh(h)
        return h + torch.from_numpy(np.tanh(h.detach().cpu().numpy()))


class Gate(nn.Module):
    """A leaf that is not capturable: `.item()` -> Python int for a slice, `.tolist()` -> numpy."""

    def forward(self, x):
        k = int(x.abs().max().item() * 4) % 4 + 1
        scale = float(np.mean(np.abs(x.tolist())))
        return x * scale + x[..., :k].sum(-1, keepdim=True)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.wobble = Wobble()
        self.gate = Gate()
        self.head = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))

    def forward(self, x):
        h = torch.relu(self.inp(x))
        h = self.wobble(h)
        h = self.gate(h)
        return self.head(h)


def _model():
    torch.manual_seed(0)
    return Net().eval()


def _x(batch=6, seed=1):
    return torch.randn(batch, 8, generator=torch.Generator().manual_seed(seed))


CAPTURED = {"inp", "wobble.proj", "head"}
LAYERS = {"inp", "wobble.proj", "head.0", "head.2"}


def _plan_covers_parts(plan) -> None:
    """Every layer of the plan lies in a captured part, and every part's Linear layers are planned."""
    for fqn in plan:
        assert any(fqn == p or fqn.startswith(p + ".") for p in CAPTURED), fqn
    assert {"head.0", "head.2"} <= set(plan)
    assert len(plan) == len(LAYERS)


@pytest.mark.parametrize("child", [Wobble(), Gate()], ids=["wobble", "gate"])
def test_child_really_is_uncapturable(child):
    x = torch.randn(4, 16)
    with pytest.raises(Exception):
        torch.export.export(child, (x,), strict=False)
    with pytest.raises(Exception):
        fx.symbolic_trace(child)


def test_capture_partial_parts_and_failures():
    model = _model()
    x = _x()
    with torch.no_grad():
        ref = model(x)
    originals = dict(model.named_modules())

    cap = capture(model, (x,))
    assert not cap.whole
    by_prefix = {f.prefix: f.reason for f in cap.failures}
    # The whole model failed with both methods; the reason is shortened and says so.
    assert "" in by_prefix
    assert "export" in by_prefix[""] and "symbolic_trace" in by_prefix[""]
    # The untraceable children are named, with short reasons; Wobble is recursed into, Gate kept eager.
    assert "wobble" in by_prefix and "capturing its children" in by_prefix["wobble"]
    assert "gate" in by_prefix and "kept eager" in by_prefix["gate"]
    for reason in by_prefix.values():
        for piece in reason.split("; "):
            assert len(piece) <= 200, piece
        assert "\n" not in reason
    assert {p.prefix for p in cap.parts} == CAPTURED
    for p in cap.parts:
        assert p.method in ("export", "symbolic_trace")
        assert isinstance(p.gm, fx.GraphModule)

    # The stitched model runs the parts where they were captured and is exact.
    with torch.no_grad():
        out = cap.root(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    assert isinstance(cap.root.get_submodule("head"), fx.GraphModule)
    assert isinstance(cap.root.get_submodule("wobble.proj"), fx.GraphModule)
    assert isinstance(cap.root.get_submodule("gate"), Gate)

    # The user's model is untouched.
    assert dict(model.named_modules()).keys() == originals.keys()
    for name, mod in model.named_modules():
        assert mod is originals[name]
        assert not isinstance(mod, fx.GraphModule)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=0, atol=0)


def test_compile_partial_dense():
    model = _model()
    x = _x()
    with torch.no_grad():
        ref = model(x)

    sm = sparsify.compile(model, example_inputs=x, config=sparsify.Config(weight=sparsify.Dense()))
    info = sm.capture_info
    assert not info.whole
    failed = {f.prefix for f in info.failures}
    assert {"", "wobble", "gate"} <= failed
    assert {p.prefix for p in info.parts} == CAPTURED
    _plan_covers_parts(sm.plan)
    assert all(lp.status == DENSE and lp.reason for lp in sm.plan.layers.values())

    with torch.no_grad():
        out = sm(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)

    report = sm.report()
    assert "not captured: <model>" in report
    assert "not captured: gate" in report and "kept eager" in report
    assert "not captured: wobble" in report
    for prefix in CAPTURED:
        assert f"{prefix} (" in report  # "captured: inp (export), ..."

    # Another batch size: captured again in parts, still exact.
    x2 = _x(batch=3, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(sm(x2), model(x2), rtol=0, atol=1e-6)
    cap2 = list(sm._compiled.values())[-1]
    assert {p.prefix for p in cap2.parts} == CAPTURED


def test_compile_partial_sparse_parts_run():
    """With forced sparsity the stitched model (sparse parts + eager children) runs and its error is
    the one the plan reports; the uncapturable children's own weights are never touched."""
    model = _model()
    x = _x(batch=32)
    with torch.no_grad():
        ref = model(x)
    cfg = sparsify.Config(weight=sparsify.Unstructured(0.5), force=True, max_error=1.0, timing_repeats=2)
    sm = sparsify.compile(model, example_inputs=x, config=cfg)
    assert not sm.capture_info.whole
    _plan_covers_parts(sm.plan)
    for fqn, lp in sm.plan.items():
        assert lp.status in (SPARSE, FORCED, ROLLED_BACK, DENSE) and lp.reason, fqn
    assert sm.plan.sparse_layers()
    with torch.no_grad():
        out = sm(x)
    err = float((out.double() - ref.double()).norm() / ref.double().norm())
    assert err == pytest.approx(sm.plan.model_error, rel=1e-3, abs=1e-6)
    assert err <= 1.0
    assert isinstance(sm.capture_info.root.get_submodule("gate"), Gate)
    # The user's weights are not pruned in place.
    fresh = _model()
    for (n, p), (_, q) in zip(model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(p, q), n


def test_leaf_part_layer_named_by_its_prefix():
    sm = sparsify.compile(_model(), example_inputs=_x(), config=sparsify.Config(weight=sparsify.Dense()))
    assert set(sm.plan) == LAYERS
