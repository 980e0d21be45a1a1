"""Unstructured sparsity on conv layers: the chooser offers csr_conv_torch (im2col + torch's CSR
matmul) and keeps it only where it is measured faster than the dense conv."""
import torch
import torch.nn.functional as F
from torch import nn

import sparsify
from sparsify import Config, Unstructured, ir
from sparsify import timing as cost
from sparsify.plan import DENSE, SPARSE
from tests.helpers import by_kernel, fake_compare


class _ConvNet(nn.Module):
    """A strided 3x3 conv with padding and bias, a relu to fuse, then a 1x1 conv without bias."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(6, 12, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(12, 10, 1, bias=False)

    def forward(self, x):
        return self.conv2(F.relu(self.conv1(x)))


def _x(seed=1):
    return torch.randn(3, 6, 11, 9, generator=torch.Generator().manual_seed(seed))


def _fake_times(table):
    return fake_compare(by_kernel(table), run=True)   # still run: outputs are checked against the dense conv


def test_unstructured_conv_runs_csr_conv2d_where_faster_and_matches_masked_dense(monkeypatch):
    monkeypatch.setattr(cost.CostModel, "compare", _fake_times({"dense": 1.0, "csr_conv_torch": 0.5}))
    model, x = _ConvNet().eval(), _x()
    cfg = Config(weight=Unstructured(0.8), max_error=10.0, check_model_speed=False, timing_repeats=1)
    sm = sparsify.compile(model, (x,), cfg)
    ops = [str(n.target) for n in sm.graph_module.graph.nodes
           if n.op == "call_function" and str(n.target).startswith("sparsify.")]
    assert ops == ["sparsify.csr_conv2d.default"] * 2, sm.report()
    masked = _ConvNet().eval()
    for fqn in ("conv1", "conv2"):
        lp = sm.plan[fqn]
        assert lp.status == SPARSE and lp.kernel == "csr_conv_torch", lp.reason
        assert abs(lp.sparsity - 0.8) < 0.05
        w = getattr(model, fqn).weight
        kept = sm.plan[fqn].sparsity
        # magnitude over the whole layer: the kept weights are the largest |w|
        k = int(round(w.numel() * (1 - kept)))
        thresh = w.abs().flatten().topk(k).values.min()
        with torch.no_grad():
            getattr(masked, fqn).weight.mul_((w.abs() >= thresh).float())
    torch.testing.assert_close(sm(x), masked(x), atol=1e-4, rtol=1e-4)
    x2 = _x(seed=5)   # fresh input, same shape: the compiled graph, not a cached output
    torch.testing.assert_close(sm(x2), masked(x2), atol=1e-4, rtol=1e-4)


def test_unstructured_conv_slower_than_dense_stays_dense_with_the_numbers(monkeypatch):
    monkeypatch.setattr(cost.CostModel, "compare", _fake_times({"dense": 1.0, "csr_conv_torch": 3.0}))
    model, x = _ConvNet().eval(), _x()
    sm = sparsify.compile(model, (x,), Config(weight=Unstructured(0.8), max_error=10.0, timing_repeats=1))
    for fqn in ("conv1", "conv2"):
        lp = sm.plan[fqn]
        assert lp.status == DENSE, lp.reason
        assert "csr_conv_torch" in lp.reason and "3.0000 ms vs dense 1.0000 ms" in lp.reason, lp.reason
    torch.testing.assert_close(sm(x), model(x))


def test_wanda_on_conv_prunes_each_output_channel_to_the_same_count(monkeypatch):
    monkeypatch.setattr(cost.CostModel, "compare", _fake_times({"dense": 1.0, "csr_conv_torch": 0.5}))
    model, x = _ConvNet().eval(), _x()
    cfg = Config(weight=Unstructured(0.5, criterion="wanda"), max_error=10.0, check_model_speed=False,
                 timing_repeats=1, force=True)
    sm = sparsify.compile(model, (x,), cfg)
    gm = sm.graph_module
    node = next(n for n in gm.graph.nodes if str(n.target) == "sparsify.csr_conv2d.default")
    crow = ir.fetch_attr(gm, node.args[1].target)
    per_row = (crow[1:] - crow[:-1]).tolist()
    assert per_row == [6 * 9 // 2] * 12, "Wanda keeps half of each output channel's C*kh*kw weights"
