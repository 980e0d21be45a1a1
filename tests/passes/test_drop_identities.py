"""drop_identities: eval-mode dropout leaves the graph, so a residual add after it fuses into the kernel."""
import torch
import torch.nn as nn

import sparsify
from sparsify import Config, Unstructured
from sparsify.capture import capture
from sparsify.pipeline import PassContext, Pipeline
from sparsify import ir
from sparsify.codegen import registry

FORCED = dict(force=True, max_error=10.0, check_model_speed=False, timing_repeats=1)

aten = torch.ops.aten


class DenseDropoutResidual(nn.Module):
    """BERT's output block: LayerNorm(dropout(dense(h)) + h)."""

    def __init__(self, d=48):
        super().__init__()
        self.dense = nn.Linear(d, d)
        self.drop = nn.Dropout(0.1)
        self.norm = nn.LayerNorm(d)

    def forward(self, h):
        return self.norm(self.drop(self.dense(h)) + h)


def _dropouts(gm):
    return [n for n in gm.graph.nodes if n.target == aten.dropout.default]


def test_eval_dropout_is_dropped_and_the_function_kept():
    model = DenseDropoutResidual().eval()
    h = torch.randn(3, 7, 48)
    gm = capture(model, (h,)).root
    assert _dropouts(gm), "torch.export keeps the eval-mode dropout: nothing would be tested"
    gm = Pipeline(["drop_identities"]).run(gm, PassContext(Config()))
    assert not _dropouts(gm)
    torch.testing.assert_close(gm(h), model(h))


def test_a_training_dropout_stays():
    gm = capture(DenseDropoutResidual().eval(), (torch.randn(2, 48),)).root
    for n in _dropouts(gm):
        n.args = (n.args[0], n.args[1], True)    # as a graph captured in training mode has it
    gm.recompile()
    gm = Pipeline(["drop_identities"]).run(gm, PassContext(Config()))
    assert len(_dropouts(gm)) == 1


def test_the_residual_after_an_eval_dropout_fuses_into_the_sparse_kernel():
    model = DenseDropoutResidual().eval()
    with torch.no_grad():                      # pruned already: the compiled model computes the same function
        w = model.dense.weight
        w.mul_(w.abs() >= w.abs().flatten().kthvalue(int(0.75 * w.numel()) + 1).values)
    h = torch.randn(4, 9, 48)
    sm = sparsify.compile(model, (h,), Config(weight=Unstructured(0.75), **FORCED), progress=False)
    assert len(sm.plan.sparse_layers()) == 1
    (cap,) = sm._compiled.values()
    (op,) = [n for n in cap.root.graph.nodes if n.op == "call_function" and registry.spec_of(n.target)]
    assert ir.op_arg(op, "residual")[1] is not None, cap.root.code
    assert not [n for n in cap.root.graph.nodes if n.target == aten.add.Tensor]
    with torch.no_grad():
        torch.testing.assert_close(sm(h), model(h), rtol=1e-4, atol=1e-4)
