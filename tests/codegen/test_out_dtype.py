"""Every registered weight kernel honours `out_dtype` (the fused dtype cast) in its op and its fake impl.

Generic over the registry, so a kernel added later is covered without a new test: pack a random
pruned weight, call the op with and without out_dtype, and compare against the float64 reference.
"""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from kernel_utils import TOLERANCE, rel_l2
from sparsify.codegen import runtime, weight_kernels
from sparsify.passes.families.weight.views import ConvView, LinearView
from sparsify.patterns import NM, Block, Unstructured

weight_kernels.load_ops()
PATTERN = {Block: Block(16, 0.5), NM: NM(2, 4), Unstructured: Unstructured(0.7)}
CONV_LAYER = {"stride": (1, 1), "padding": (1, 1), "dilation": (1, 1), "groups": 1}


def _cpu_kernels():
    for k in weight_kernels.KERNELS.values():
        if "cpu" in k.devices or k.triton:
            yield pytest.param(k, id=k.name)


def _pattern_for(kernel):
    return next(PATTERN[c] for c in kernel.serves if c in PATTERN)


def _case(kernel, gen):
    """(x, packed, dense masked weight) for a small odd shape of the kernel's layer kind."""
    pattern = _pattern_for(kernel)
    if kernel.layer_op == "conv2d":
        w = torch.randn(24, 20, 3, 3, generator=gen)
        x = torch.randn(2, 20, 5, 7, generator=gen)
        layer, view = CONV_LAYER, ConvView(w, None, CONV_LAYER)
    else:
        w = torch.randn(40, 48, generator=gen)
        x = torch.randn(3, 5, 48, generator=gen)
        layer, view = None, LinearView(w, None)
    w = view.sparse_weight(pattern, w.abs())
    return x, kernel.pack(w, pattern, layer), w


@pytest.mark.parametrize("kernel", list(_cpu_kernels()))
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_out_dtype_is_the_stored_dtype_and_values_match(kernel, out_dtype):
    gen = torch.Generator().manual_seed(7)
    x, packed, w = _case(kernel, gen)
    with runtime.force_triton():
        y = kernel.call(x, packed, activation="relu", out_dtype=out_dtype)
    assert y.dtype == out_dtype
    if kernel.layer_op == "conv2d":
        ref = torch.nn.functional.conv2d(x.double(), w.double(), padding=1).relu()
    else:
        ref = (x.double() @ w.double().t()).relu()
    assert rel_l2(y, ref) <= TOLERANCE[out_dtype]


@pytest.mark.parametrize("kernel", [pytest.param(k, id=k.name) for k in weight_kernels.KERNELS.values()])
def test_fake_impl_reports_out_dtype(kernel):
    gen = torch.Generator().manual_seed(8)
    if kernel.name == "cslt_2to4":
        pytest.skip("cuSPARSELt packing needs a CUDA device")
    x, packed, _ = _case(kernel, gen)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fx_ = mode.from_tensor(x)
        bufs = {k: mode.from_tensor(v) for k, v in packed.buffers.items()}
        args = kernel.op_args(fx_, bufs, packed.static, None, None, "none", packed.static["n_out"],
                              packed.static["k_in"], torch.bfloat16)
        y = kernel.op(*args)
    assert y.dtype == torch.bfloat16
