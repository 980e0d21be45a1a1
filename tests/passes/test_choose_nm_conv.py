"""The chooser offers N:M for conv layers: a forced NM(2, 4) conv net runs the nm_conv2d Triton kernel."""
import torch
from torch import nn
import torch.nn.functional as F

import sparsify
from sparsify import NM, Config
from sparsify.codegen import runtime
from sparsify.codegen.kernels.nm_conv2d import _unpack_conv, nm_conv_mask
from sparsify.plan import FORCED, SPARSE
from tests.helpers import kernel_device


class _ConvNet(nn.Module):
    """Odd channel counts (C % 4 != 0 for the second conv), a strided conv and a relu to fuse."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(8, 14, 3, padding=1)
        self.conv2 = nn.Conv2d(14, 10, 3, stride=2, padding=1, bias=False)

    def forward(self, x):
        return self.conv2(F.relu(self.conv1(x)))


def test_forced_nm_conv_runs_nm_conv2d_and_matches_masked_dense():
    dev = kernel_device()
    model = _ConvNet().to(dev).eval()
    x = torch.randn(2, 8, 7, 9, generator=torch.Generator().manual_seed(1)).to(dev)
    cfg = Config(weight=NM(2, 4), force=True, max_error=10.0, timing_repeats=2, kernels=("nm_conv_triton",))
    with runtime.force_triton():
        sm = sparsify.compile(model, (x,), cfg)
        out = sm(x)
    ops = [n for n in sm.graph_module.graph.nodes
           if n.op == "call_function" and str(n.target).startswith("sparsify.")]
    assert {str(n.target) for n in ops} == {"sparsify.nm_conv2d.default"} and len(ops) == 2, sm.report()
    ref_model = _ConvNet().double().to(dev)
    for fqn in ("conv1", "conv2"):
        lp = sm.plan[fqn]
        assert lp.status in (SPARSE, FORCED) and lp.kernel == "nm_conv_triton", lp.reason
        assert abs(lp.sparsity - 0.5) < 0.1
        packed = sm.prepared[fqn]
        w = _unpack_conv(packed.buffers["values"], packed.buffers["meta"], *getattr(model, fqn).weight.shape, 2, 4)
        dense = getattr(model, fqn).weight.detach()
        # The kept weights are the layer's own, under a valid 2:4 mask over (kh, kw, C) groups.
        assert torch.equal(w != 0, (w != 0) & nm_conv_mask(w, 2, 4))
        torch.testing.assert_close(w, dense * (w != 0))
        getattr(ref_model, fqn).weight.data = w.double()
    ref = ref_model(x.double())
    assert ((out.double() - ref).norm() / ref.norm()).item() < 2e-3     # tf32-level tolerance
