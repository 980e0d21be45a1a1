"""The kernel registry: what it discovers, the schema rule every spec keeps, that each spec's `pack`
names exactly what its op needs and its `call` computes the layer, and that a user's kernel joins."""
import pytest
import torch
import torch.nn.functional as F

from kernel_utils import TOLERANCE, masked_case, rel_l2
from sparsify.codegen import registry, runtime
from sparsify.codegen.epilogue import EPILOGUE_ARGS
from sparsify.codegen.kernels._common import linear_out_like
from sparsify.codegen.spec import KernelSpec
from sparsify.passes.families.weight.views import ConvView, LinearView
from sparsify.patterns import Unstructured
from sparsify.state import Prepared

EXPECTED = {"bsr_triton", "bsr_blocks", "csr_torch", "nm_triton", "cslt_2to4", "sell_triton", "bsr_conv_triton",
            "nm_conv_triton", "csr_conv_torch", "csr_cpu", "csr_jit_cpu", "csr_jit_cpu_pair", "ffn_cpu", "ffn_triton",
            "attention_cpu"}
CONV_LAYER = {"stride": (2, 1), "padding": (1, 0), "dilation": (1, 1), "groups": 1}
SPECS = [pytest.param(s, id=name) for name, s in sorted(registry.specs().items())]
# ops an epilogue can be fused into (attention_cpu stands in for torch's attention: no epilogue)
FUSIBLE_SPECS = [pytest.param(s, id=name) for name, s in sorted(registry.specs().items()) if s.replaces != "attention"]
# weight-layer kernels (an FFN kernel is packed by its family and tested in test_ffn_*.py; a pair
# kernel is made by fuse_pairs from two planned ops and tested in test_csr_jit_cpu_pair.py)
LAYER_SPECS = [pytest.param(s, id=name) for name, s in sorted(registry.specs().items())
               if s.replaces in ("linear", "conv2d")]


def test_registry_finds_the_built_in_kernels():
    assert set(registry.specs()) == EXPECTED


@pytest.mark.parametrize("spec", FUSIBLE_SPECS)
def test_schema_ends_with_the_epilogue_arguments(spec):
    args = spec.arguments
    assert args[0].name == "x"
    tail = args[-len(EPILOGUE_ARGS):]
    assert tuple(a.name for a in tail) == EPILOGUE_ARGS
    assert str(spec.overload._schema).endswith(
        'Tensor? bias=None, Tensor? residual=None, str activation="none", ScalarType? out_dtype=None) -> Tensor')


def _case(spec, gen):
    """(x, pattern, layer params, dense masked weight, bias, float64 reference of the layer + bias + relu)."""
    x, pattern, w = masked_case(spec, gen, CONV_LAYER, LinearView, ConvView)
    bias = torch.randn(w.shape[0], generator=gen)
    if spec.replaces == "conv2d":
        layer = CONV_LAYER
        ref = F.conv2d(x.double(), w.double(), bias.double(), CONV_LAYER["stride"], CONV_LAYER["padding"])
    else:
        layer, ref = None, x.double() @ w.double().t() + bias.double()
    return x, pattern, layer, w, bias, ref.relu()


@pytest.mark.parametrize("spec", LAYER_SPECS)
def test_pack_names_the_op_arguments_and_call_matches_the_reference(spec):
    if "cpu" not in spec.devices and not spec.interpretable:
        pytest.skip(f"{spec.name} runs on {spec.devices} only and has no interpreter path")
    gen = torch.Generator().manual_seed(11)
    x, pattern, layer, w, bias, ref = _case(spec, gen)
    prepared = spec.pack(w, pattern, layer)
    assert isinstance(prepared, Prepared)
    names = {a.name for a in spec.arguments}
    assert set(prepared.buffers) | set(prepared.static) <= names      # nothing packed that the op ignores
    args = spec.op_args(x, prepared.buffers, prepared.static, bias, None, "relu")   # raises on a missing one
    assert len(args) == len(spec.arguments)
    with runtime.force_triton():
        y = spec.call(x, prepared, bias, None, "relu")
    assert y.shape == ref.shape and y.dtype == x.dtype
    assert rel_l2(y, ref) <= TOLERANCE[torch.float32]


def _dense_linear(x, weight, n_out, bias=None, residual=None, activation="none", out_dtype=None):
    y = F.linear(x, weight, bias)
    y = y.relu() if activation == "relu" else y
    if residual is not None:
        y = y + residual
    return y.to(out_dtype or x.dtype)


def test_a_registered_user_kernel_is_offered_and_runs():
    spec = KernelSpec(
        name="test_dense", op="sparsify_test::dense_linear",
        schema="(Tensor x, Tensor weight, SymInt n_out, Tensor? bias=None, Tensor? residual=None, "
               "str activation='none', ScalarType? out_dtype=None) -> Tensor",
        patterns=(Unstructured,), replaces="linear", devices=("cpu",), impl=_dense_linear,
        pack=lambda w, pattern, layer=None: Prepared({"weight": w.clone()}, {"n_out": w.shape[0]}),
        out_like=linear_out_like, version="test-1")
    cpu = torch.device("cpu")
    assert spec not in registry.kernels_for(Unstructured(0.5), cpu, torch.float32, (8, 12))[0]
    registry.register_kernel(spec)
    try:
        ok, _ = registry.kernels_for(Unstructured(0.5), cpu, torch.float32, (8, 12))
        assert spec in ok and registry.get("test_dense") is spec
        assert spec not in registry.kernels_for(Unstructured(0.5), cpu, torch.float32, (8, 12, 3, 3),
                                                replaces="conv2d")[0]
        w, x = torch.randn(8, 12), torch.randn(4, 12)
        y = spec.call(x, spec.pack(w, Unstructured(0.5)), activation="relu", out_dtype=torch.float64)
        assert y.dtype == torch.float64
        torch.testing.assert_close(y, (x @ w.t()).relu().double())
    finally:
        registry.unregister_kernel("test_dense")
    assert "test_dense" not in registry.specs()
