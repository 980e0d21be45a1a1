"""stack_siblings: sparse ops on the same x (attention's q, k, v) run as one op over stacked rows."""
import pytest
import torch
import torch.nn as nn

import sparsify
from sparsify import Config, Unstructured, ir
from sparsify.codegen import registry
from sparsify.codegen.kernels.csr_linear import csr_linear_reference, csr_parts, pack_csr, stack_csr

FORCED = dict(weight=Unstructured(0.7), force=True, max_error=10.0, timing_repeats=1, check_model_speed=False)


class QKV(nn.Module):
    """Three projections of one x, one without a bias, and a fourth layer on another input."""

    def __init__(self, d=40):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, 24), nn.Linear(d, 16, bias=False), nn.Linear(d, 24)
        self.other = nn.Linear(d, 8)

    def forward(self, x):
        return self.q(x).sum(-1) + self.k(x).mean(-1) + self.v(x)[..., 3], self.other(x * 2)


def _ops(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and registry.spec_of(n.target)]


def test_stacked_csr_is_the_layers_one_under_the_other():
    gen = torch.Generator().manual_seed(3)
    ws = [torch.randn(n, 13, generator=gen) * (torch.rand(n, 13, generator=gen) > 0.6) for n in (5, 1, 9)]
    ws[1].zero_()                                    # an empty layer in the middle
    parts = []
    for i, w in enumerate(ws):
        crow, col, values = csr_parts(pack_csr(w))
        parts.append({"crow": crow.int(), "col": col.int(), "values": values, "n_out": w.shape[0],
                      "bias": None if i == 1 else torch.randn(w.shape[0], generator=gen)})
    s = stack_csr(parts)
    x = torch.randn(7, 13, generator=gen, dtype=torch.float64)
    got = csr_linear_reference(x, s["crow"], s["col"], s["values"].double(), s["n_out"], 13, "row",
                               s["bias"].double())
    want = torch.cat([x @ w.double().t() + (p["bias"].double() if p["bias"] is not None else 0)
                      for w, p in zip(ws, parts)], dim=-1)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("kernel", ["csr_torch", "csr_cpu"])
def test_siblings_become_one_op_with_the_same_outputs(kernel):
    from sparsify.codegen import cpu_build
    if kernel == "csr_cpu" and cpu_build.compiler() is not None:
        pytest.skip(f"no C compiler: {cpu_build.compiler()}")
    model, x = QKV().eval(), torch.randn(3, 11, 40)
    cfg = Config(**FORCED, kernels=(kernel,))
    sm = sparsify.compile(model, (x,), cfg, progress=False)
    ops = _ops(sm.graph_module)
    assert len(ops) == 2, sm.graph_module.code            # q + k + v stacked, `other` alone
    stacked = [n for n in ops if n.meta[ir.FROM].pass_name == "stack_siblings"]
    assert len(stacked) == 1 and ir.op_arg(stacked[0], "n_out")[1] == 24 + 16 + 24
    assert not [b for b in dict(sm.graph_module.named_buffers()) if b.startswith("_sparsify_q_")], \
        "the layers' own packed buffers are not kept beside the stacked ones"
    apart = sparsify.compile(model, (x,), cfg, pipeline=sparsify.Pipeline.default().remove("stack_siblings"),
                             progress=False)
    assert len(_ops(apart.graph_module)) == 4
    for inp in (x, torch.randn(2, 5, 40)):
        for a, b in zip(sm(inp), apart(inp)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
