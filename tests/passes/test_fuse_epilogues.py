"""fuse_epilogues: which ops after a sparse matmul fold into its kernel, and that the result still matches."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsify
from sparsify import Block, Config
from sparsify.codegen import runtime
from tests.helpers import kernel_device

# Forced block sparsity on every layer, verification off (max_error large): these tests are about the
# graph the fusion pass leaves and its numerics, not about which layers are worth making sparse.
CFG = dict(weight=Block(16, 0.5), force=True, max_error=10.0, kernels=("bsr_triton",), timing_repeats=2,
           check_model_speed=False)


class CastAfterResidual(nn.Module):
    """fc -> gelu -> + x -> cast: all three fold into one kernel."""

    def __init__(self, d=48, dtype=torch.float16):
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.dtype = dtype

    def forward(self, x):
        return (F.gelu(self.fc(x)) + x).to(self.dtype)


class CastBeforeResidual(nn.Module):
    """fc -> cast -> + r: the cast folds, the add (after the cast) stays in the graph."""

    def __init__(self, d=48):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x, r):
        return self.fc(x).to(torch.float16) + r


def _sparse_ops(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and str(n.target).startswith("sparsify.")]


def _masked_reference(sm, model, *args):
    """The eager model with the packed (pruned) weights, in float64: the fused kernel must match it."""
    from sparsify.codegen.kernels.bsr_linear import _unpack

    ref = copy.deepcopy(model).double()
    for fqn, packed in sm.prepared.items():
        b = packed.buffers
        w = _unpack(b["values"], b["row_ptr"], b["col_idx"], *getattr(model, fqn).weight.shape)
        getattr(ref, fqn).weight.data = w.double()
    return ref(*(a.double() for a in args))


def _gen():
    return torch.Generator().manual_seed(1234)


def test_activation_residual_and_cast_fuse_into_one_kernel():
    dev = kernel_device()
    model = CastAfterResidual().to(dev)
    x = torch.randn(5, 48, generator=_gen()).to(dev)
    with runtime.force_triton():
        sm = sparsify.compile(model, (x,), Config(**CFG))
        y = sm(x)
    (op,) = _sparse_ops(sm.graph_module)
    assert sparsify.ir.op_arg(op, "activation")[1] == "gelu"
    assert sparsify.ir.op_arg(op, "residual")[1] is not None
    assert sparsify.ir.op_arg(op, "out_dtype")[1] == torch.float16
    assert "aten.to" not in sm.graph_module.code and "_to_copy" not in sm.graph_module.code
    assert "cast to float16" in op.meta[sparsify.ir.FROM].detail
    assert y.dtype == torch.float16
    ref = _masked_reference(sm, model, x)
    err = ((y.double() - ref).norm() / ref.norm()).item()
    assert err < 5e-3, err


def test_cast_before_the_residual_add_folds_and_the_add_stays():
    dev = kernel_device()
    model = CastBeforeResidual().to(dev)
    g = _gen()
    x = torch.randn(7, 48, generator=g).to(dev)
    r = torch.randn(7, 48, generator=g).to(dev, torch.float16)
    with runtime.force_triton():
        sm = sparsify.compile(model, (x, r), Config(**CFG))
        y = sm(x, r)
    (op,) = _sparse_ops(sm.graph_module)
    assert sparsify.ir.op_arg(op, "out_dtype")[1] == torch.float16
    assert sparsify.ir.op_arg(op, "residual")[1] is None, "the add follows the cast: not an epilogue"
    assert "aten.add" in sm.graph_module.code
    ref = _masked_reference(sm, model, x, r)
    assert ((y.double() - ref).norm() / ref.norm()).item() < 5e-3


@pytest.mark.parametrize("cast", [
    pytest.param(lambda y: y.double(), id="float64"),
    pytest.param(lambda y: y.to(torch.int32), id="int"),
])
def test_casts_the_kernels_cannot_store_stay_in_the_graph(cast):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(48, 48)

        def forward(self, x):
            return cast(self.fc(x))

    x = torch.randn(3, 48, generator=_gen())
    with runtime.force_triton():
        sm = sparsify.compile(M(), (x,), Config(**CFG))
        y = sm(x)
    (op,) = _sparse_ops(sm.graph_module)
    assert sparsify.ir.op_arg(op, "out_dtype")[1] is None
    assert y.dtype == cast(torch.zeros(1)).dtype


def test_cast_of_an_output_with_two_users_is_not_fused():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(48, 48)

        def forward(self, x):
            y = self.fc(x)
            return y.half(), y.sum()

    x = torch.randn(3, 48, generator=_gen())
    with runtime.force_triton():
        sm = sparsify.compile(M(), (x,), Config(**CFG))
        y, s = sm(x)
    (op,) = _sparse_ops(sm.graph_module)
    assert sparsify.ir.op_arg(op, "out_dtype")[1] is None
    assert y.dtype == torch.float16 and s.dtype == torch.float32


def test_half_model_with_export_metadata_asserts_runs_after_cast_fusion():
    # torch.export guards `.float()` with an _assert_tensor_metadata node on the fp16 matmul output;
    # once the cast is fused that assertion is stale and must go, or the graph fails at run time.
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(48, 32)

        def forward(self, x):
            return self.fc(x).float()

    model = M().half()
    x = torch.randn(4, 48, generator=_gen()).half()
    with runtime.force_triton():
        sm = sparsify.compile(model, (x,), Config(**CFG))
        y = sm(x)
    (op,) = _sparse_ops(sm.graph_module)
    assert sparsify.ir.op_arg(op, "out_dtype")[1] == torch.float32
    assert "_assert_tensor_metadata" not in sm.graph_module.code
    assert y.dtype == torch.float32
    ref = _masked_reference(sm, model, x)
    assert ((y.double() - ref).norm() / ref.norm()).item() < 5e-3
