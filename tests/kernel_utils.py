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


def csr_pattern_weight(n, k, sparsity, gen):
    """A random [n, k] weight at about `sparsity`, with the rows a CSR kernel must get right: (when
    n >= 3) an empty row, a full row and a row of one nonzero."""
    w = randn(n, k, generator=gen) * (torch.rand(n, k, generator=gen) >= sparsity)
    if n >= 3:
        w[0] = 0
        w[1] = randn(k, generator=gen)
        w[2] = 0
        w[2, k // 2] = 1.5
    return w


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


def check_csr_host(host, x, w, dtype, layout, bias, residual, activation, out_dtype=None, tolerance=None):
    """A CPU CSR host (csr_cpu's or csr_jit_cpu's) on the CSR of w against the float64 reference, in
    a poisoned `out`, for any layout: x [..., K] as the tokens, bias [N], residual [..., N]."""
    from sparsify.codegen.kernels import csr_cpu
    from sparsify.codegen.kernels._common import layout_ends
    from sparsify.codegen.kernels.csr_linear import csr_parts, pack_csr

    n, k = w.shape
    crow, col, values = csr_parts(pack_csr(w))
    crow, col, values = crow.int().contiguous(), col.int().contiguous(), values.to(dtype).contiguous()
    lead, m = x.shape[:-1], x[..., 0].numel()
    x_feature, y_feature = layout_ends(layout)
    xin = x.reshape(m, k).t().contiguous().to(dtype) if x_feature else x.to(dtype)
    out_dtype = out_dtype or dtype
    shape = (n, m) if y_feature else ((m,) if x_feature else tuple(lead)) + (n,)
    out = poison(torch.empty(shape, dtype=out_dtype))
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    got = host(xin, crow, col, values, n, k, layout, cast(bias), cast(residual), activation, out_dtype, out=out)
    assert got is out
    d = lambda t: None if t is None else t.to(dtype).double()  # noqa: E731
    ref = csr_cpu.csr_cpu_reference(d(x), crow, col, values.double(), n, k, "row", d(bias), d(residual), activation)
    got_rows = got.t().reshape(ref.shape) if y_feature else got.reshape(ref.shape)
    err = rel_l2(got_rows, ref)
    tol = (tolerance or TOLERANCE)[out_dtype]
    assert err <= tol, f"rel_l2 {err:.3g} > {tol}"
