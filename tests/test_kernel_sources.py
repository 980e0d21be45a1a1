"""sm.kernel_sources(): what each kernel the compiled graph calls was built from, CPU kernels included."""
import pytest
import torch

import sparsify
from sparsify.codegen import cpu_build, cpu_exec


@pytest.mark.skipif(cpu_build.compiler() is not None, reason="no C compiler")
@pytest.mark.parametrize("kernel,marker", [("csr_cpu", "sparsify generated kernel csr_"),
                                           ("csr_jit_cpu", "emitted program (")])
def test_kernel_sources_show_the_generated_cpu_code(kernel, marker):
    if kernel == "csr_jit_cpu" and cpu_exec.unsupported():
        pytest.skip(cpu_exec.unsupported())
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 64)).eval()
    sm = sparsify.compile(model, (torch.randn(32, 64),),
                          sparsify.Config(weight=sparsify.Unstructured(0.9), kernels=[kernel], force=True,
                                          max_error=10.0), progress=False)
    assert {lp.kernel for lp in sm.plan.layers.values() if lp.status != "dense"} == {kernel}
    sources = sm.kernel_sources()
    # the two csr_jit_cpu layers may run as one csr_jit_cpu_pair op (fuse_pairs, where measured faster)
    (called,) = sources
    assert called in {kernel, f"{kernel}_pair"}
    assert marker in sources[called] and "256x64" in sources[called]
