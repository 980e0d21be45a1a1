"""Every registered weight kernel honours `out_dtype` (the fused dtype cast) in its op and its fake impl.

Generic over the registry, so a kernel added later is covered without a new test: pack a random
pruned weight, call the op with and without out_dtype, and compare against the float64 reference.
"""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from kernel_utils import TOLERANCE, masked_case, rel_l2
from sparsify.codegen import registry, runtime
from sparsify.passes.families.weight.views import ConvView, LinearView

CONV_LAYER = {"stride": (1, 1), "padding": (1, 1), "dilation": (1, 1), "groups": 1}


def _cpu_kernels():
    for k in registry.specs().values():
        if ("cpu" in k.devices or k.interpretable) and k.replaces in ("linear", "conv2d"):   # FFN, pair: own tests
            yield pytest.param(k, id=k.name)


def _case(kernel, gen):
    """(x, packed, dense masked weight) for a small odd shape of the kernel's layer kind."""
    x, pattern, w = masked_case(kernel, gen, CONV_LAYER, LinearView, ConvView)
    return x, kernel.pack(w, pattern, CONV_LAYER if kernel.replaces == "conv2d" else None), w


@pytest.mark.parametrize("kernel", list(_cpu_kernels()))
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_out_dtype_is_the_stored_dtype_and_values_match(kernel, out_dtype):
    gen = torch.Generator().manual_seed(7)
    x, packed, w = _case(kernel, gen)
    with runtime.force_triton():
        y = kernel.call(x, packed, activation="relu", out_dtype=out_dtype)
    assert y.dtype == out_dtype
    if kernel.replaces == "conv2d":
        ref = torch.nn.functional.conv2d(x.double(), w.double(), padding=1).relu()
    else:
        ref = (x.double() @ w.double().t()).relu()
    assert rel_l2(y, ref) <= TOLERANCE[out_dtype]


@pytest.mark.parametrize("kernel", [pytest.param(k, id=k.name) for k in registry.specs().values()
                                    if k.replaces in ("linear", "conv2d")])
def test_fake_impl_reports_out_dtype(kernel):
    gen = torch.Generator().manual_seed(8)
    if kernel.name == "cslt_2to4":
        pytest.skip("cuSPARSELt packing needs a CUDA device")
    x, packed, _ = _case(kernel, gen)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fx_ = mode.from_tensor(x)
        bufs = {k: mode.from_tensor(v) for k, v in packed.buffers.items()}
        args = kernel.op_args(fx_, bufs, packed.static, out_dtype=torch.bfloat16)
        y = kernel.overload(*args)
    assert y.dtype == torch.bfloat16
