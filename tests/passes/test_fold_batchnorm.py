"""fold_batchnorm: conv2d + inference BatchNorm become one conv with the same function."""
import copy

import pytest
import torch
import torch.nn as nn

import sparsify
from sparsify import Block, Config, Dense
from sparsify.capture import capture
from sparsify.codegen import runtime
from sparsify.pipeline import PassContext, Pipeline
from sparsify.models import TinyConvNet
from tests.helpers import kernel_device


def _randomize_bn(model: nn.Module, gen: torch.Generator) -> nn.Module:
    """Fresh BN statistics and affine parameters: defaults (mean 0, var 1, gamma 1) would hide errors."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=gen))
            m.running_var.copy_(torch.rand(c, generator=gen) * 2 + 0.1)
            if m.affine:
                m.weight.data.copy_(torch.randn(c, generator=gen))
                m.bias.data.copy_(torch.randn(c, generator=gen))
    return model.eval()


class ConvBN(nn.Module):
    def __init__(self, bias: bool, affine: bool = True, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(6, 10, 3, padding=1, bias=bias, groups=groups if 6 % groups == 0 else 1)
        self.bn = nn.BatchNorm2d(10, affine=affine)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


def _fold(model, x):
    gm = capture(model, (x,)).root
    ctx = PassContext(Config(weight=Dense()))
    return Pipeline(["fold_batchnorm", "find_sites"]).run(gm, ctx), ctx


@pytest.mark.parametrize("bias,affine,groups", [(True, True, 1), (False, True, 1), (False, False, 1),
                                                (True, True, 2)])
def test_folded_graph_computes_the_same_function(bias, affine, groups):
    gen = torch.Generator().manual_seed(11)
    model = _randomize_bn(ConvBN(bias, affine, groups), gen)
    x = torch.randn(2, 6, 7, 9, generator=gen)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm, _ = _fold(model, x)
    code = gm.code
    assert "batch_norm" not in code
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)
    conv = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.conv2d.default)
    assert conv.meta[sparsify.ir.LAYER].fqn == "conv", "the folded conv keeps its layer name"
    assert conv.meta[sparsify.ir.FROM].pass_name == "fold_batchnorm"
    for k, v in model.state_dict().items():      # the user's model is never written
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_training_mode_batch_norm_is_left_alone():
    gen = torch.Generator().manual_seed(12)
    model = _randomize_bn(ConvBN(True), gen)
    model.bn.train()
    x = torch.randn(2, 6, 5, 5, generator=gen)
    ref = copy.deepcopy(model)
    gm, ctx = _fold(model, x)
    assert "batch_norm" in gm.code
    assert "training mode" in next(iter(ctx.state.notes_of("fold_batchnorm").values()))
    torch.testing.assert_close(gm(x), ref(x))


def test_conv_with_two_users_is_not_folded():
    class TwoUsers(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    gen = torch.Generator().manual_seed(13)
    model = _randomize_bn(TwoUsers(), gen)
    x = torch.randn(1, 4, 6, 6, generator=gen)
    gm, _ = _fold(model, x)
    assert "batch_norm" in gm.code
    torch.testing.assert_close(gm(x), model(x))


def test_compile_folds_bn_so_relu_and_residual_fuse_into_the_sparse_conv():
    dev = kernel_device()
    gen = torch.Generator().manual_seed(14)
    model = _randomize_bn(TinyConvNet(), gen).to(dev)
    x = torch.randn(2, 3, 9, 11, generator=gen).to(dev)
    cfg = Config(weight=Block(16, 0.5), force=True, max_error=10.0, kernels=("bsr_conv_triton",),
                 timing_repeats=1, check_model_speed=False)
    with runtime.force_triton():
        sm = sparsify.compile(model, (x,), cfg)
        y = sm(x)
        y2 = sm(torch.randn(1, 3, 8, 8, generator=gen).to(dev))   # a new signature replays the fold
    gm = sm.graph_module
    assert "batch_norm" not in gm.code
    convs = [n for n in gm.graph.nodes if str(n.target) == "sparsify.bsr_conv2d.default"]
    assert convs, "some conv must be sparse"
    fused = [n for n in convs if sparsify.ir.op_arg(n, "activation")[1] == "relu"]
    assert fused, "relu after a folded conv-bn must fuse into the sparse conv"
    assert any(sparsify.ir.op_arg(n, "residual")[1] is not None for n in convs), "stage1's residual add"
    # Reference: the eager model (BN unfolded, float64) with the packed weights' zero pattern applied
    # to its conv weights; BN scales each output channel by a nonzero factor, so the masks agree.
    ref = copy.deepcopy(model).double()
    for fqn, lp in sm.plan.layers.items():
        if lp.status in ("sparse", "forced") and sm.plan[fqn].kernel == "bsr_conv_triton":
            conv = ref.get_submodule(fqn)
            conv.weight.data *= (_packed_conv_weight(sm, fqn) != 0).double()
    want = ref(x.double())
    assert ((y.double() - want).norm() / want.norm()).item() < 2e-3
    assert y2.shape == (1, 10)


def _packed_conv_weight(sm, fqn):
    from sparsify.codegen.kernels.bsr_conv2d import _unpack_conv

    b = sm.prepared[fqn].buffers
    return _unpack_conv(b["values"], b["row_ptr"], b["col_idx"], *sm.plan[fqn].weight_shape)


def test_dense_plan_runs_the_original_module_even_with_bn_folded():
    model = _randomize_bn(TinyConvNet(), torch.Generator().manual_seed(15))
    x = torch.randn(1, 3, 8, 8)
    sm = sparsify.compile(model, (x,), Config(weight=Dense()))
    assert sm.capture_info.root is sm._model
    assert any("original module" in n for n in sm.plan.notes)
