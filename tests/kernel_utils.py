"""One place for what every kernel test shares: tolerances, odd shapes, poison, error metric."""
import torch

# Relative L2 error (||out - ref|| / ||ref||) allowed per output dtype, reference in float64.
# fp32 dots in Triton default to tf32 on GPU (about 3e-4), hence not 1e-6.
TOLERANCE = {torch.float32: 2e-3, torch.float16: 5e-3, torch.bfloat16: 2e-2, torch.float64: 1e-10}

DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# (M, K, N) for linear-shaped kernels: M is tokens, K the reduction, N the outputs. Odd on purpose.
ODD_LINEAR_SHAPES = [(1, 64, 48), (3, 96, 80), (17, 128, 112), (33, 160, 64), (70, 192, 144)]


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64, ref64 = out.double(), ref.double()
    assert not torch.isnan(out64).any(), "NaN in output (unwritten element or overflow)"
    return ((out64 - ref64).norm() / ref64.norm().clamp_min(1e-30)).item()


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill an output buffer with NaN so any element the kernel forgets to write fails the test."""
    return t.fill_(float("nan"))


def randn(*shape, dtype=torch.float32, device="cpu", generator=None) -> torch.Tensor:
    return torch.randn(*shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)


def conv_f64(x, w, bias, stride, padding, dilation, residual, activation):
    """Ground truth for the sparse convs: float64 F.conv2d on the dense (masked) weight, then the
    epilogue (activation, residual), in NCHW."""
    import torch.nn.functional as F

    from sparsify.codegen.epilogue import activation_reference

    d = lambda t: None if t is None else t.double()  # noqa: E731
    y = F.conv2d(d(x), d(w), d(bias), stride, padding, dilation)
    y = activation_reference(y, activation)
    return y if residual is None else y + d(residual)


def masked_case(spec, gen, conv_layer, linear_view, conv_view):
    """(x, pattern, dense masked weight) of a small odd shape for a registry spec's layer kind: its first
    pattern among Block(16, 0.5), NM(2, 4), Unstructured(0.7), masked as the planner masks it (its
    LinearView / ConvView from passes.families.weight.views, passed in; conv_layer: the conv's parameters)."""
    from sparsify.patterns import NM, Block, Unstructured

    patterns = {Block: Block(16, 0.5), NM: NM(2, 4), Unstructured: Unstructured(0.7)}
    pattern = next(patterns[c] for c in spec.patterns if c in patterns)
    if spec.replaces == "conv2d":
        w = torch.randn(24, 20, 3, 3, generator=gen)
        x = torch.randn(2, 20, 5, 7, generator=gen)
        view = conv_view(w, None, conv_layer)
    else:
        w = torch.randn(40, 48, generator=gen)
        x = torch.randn(3, 5, 48, generator=gen)
        view = linear_view(w, None)
    return x, pattern, view.sparse_weight(pattern, w.abs())
