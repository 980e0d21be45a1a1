"""Emitted machine-code kernels (csr_jit_cpu): the program against a float64 reference on odd shapes
and sparsity patterns (empty rows, a full row, one nonzero; more rows than a register block, tails
of the 16-token tile), every epilogue and layout, fp32 and bf16, poisoned outputs; the program's
segments against the thread count; re-emission after an in-place change; the encoder's bytes
against a disassembler; not a candidate where the CPU cannot run it."""
import shutil
import subprocess
import zlib

import numpy as np
import pytest
import torch

from kernel_utils import TOLERANCE, csr_pattern_weight, check_csr_host, randn, rel_l2
from sparsify.codegen import cpu_build, cpu_exec, cpu_x86_emit, registry
from sparsify.codegen.epilogue import ACTIVATIONS
from sparsify.codegen.kernels import csr_cpu, csr_jit_cpu
from sparsify.codegen.kernels._common import LAYOUTS
from sparsify.codegen.kernels.csr_linear import csr_parts, pack_csr

pytestmark = pytest.mark.skipif(cpu_build.compiler() is not None or cpu_exec.unsupported() is not None,
                                reason=f"{cpu_build.compiler() or cpu_exec.unsupported()}")
DTYPES = (torch.float32, torch.bfloat16)
TOKENS = (1, 15, 16, 17, 33, 130)           # a tile: partly used, whole, whole + 1, several
# fp32 products are fp32 sums of exact products; the general fp32 kernel tolerance is far looser
TIGHT = {torch.float32: 1e-5, torch.float16: TOLERANCE[torch.float16], torch.bfloat16: TOLERANCE[torch.bfloat16]}


@pytest.fixture
def gen(request):
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


_weight = csr_pattern_weight


def _parts(w, dtype):
    crow, col, values = csr_parts(pack_csr(w))
    return crow.int().contiguous(), col.int().contiguous(), values.to(dtype).contiguous()


def _run(x, w, dtype, layout, bias, residual, activation, out_dtype=None):
    check_csr_host(csr_jit_cpu.csr_jit_cpu_host, x, w, dtype, layout, bias, residual, activation, out_dtype, TIGHT)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", TOKENS)
def test_token_counts_and_odd_shapes(m, dtype, layout, gen):
    n, k = 61, 71                                 # 2 register blocks + 5 rows; K not a multiple of 16
    _run(randn(m, k, generator=gen), _weight(n, k, 0.8, gen), dtype, layout, randn(n, generator=gen), None, "none")


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("has_bias,has_residual", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_epilogue(activation, has_bias, has_residual, layout, gen):
    n, k, m = 33, 40, 37
    bias = randn(n, generator=gen) if has_bias else None
    residual = randn(m, n, generator=gen) if has_residual else None
    _run(randn(m, k, generator=gen), _weight(n, k, 0.7, gen), torch.float32, layout, bias, residual, activation)


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.95, 1.0])
def test_densities_from_full_to_empty(sparsity, gen):
    w = randn(64, 48, generator=gen) * (torch.rand(64, 48, generator=gen) >= sparsity)
    x = randn(2, 7, 48, generator=gen)
    _run(x, w, torch.float32, "row", randn(64, generator=gen), randn(2, 7, 64, generator=gen), "gelu")


def test_bf16_in_fp32_out_and_fp32_in_fp16_out(gen):
    w = _weight(24, 40, 0.6, gen)
    _run(randn(19, 40, generator=gen), w, torch.bfloat16, "row", None, None, "silu", out_dtype=torch.float32)
    _run(randn(19, 40, generator=gen), w, torch.float32, "feature", None, None, "relu", out_dtype=torch.float16)


def test_a_layer_of_more_than_256_nonzeros_per_segment_and_wide_k(gen):
    """The value cursor moves every 256 values, x's columns reach far (K 3000: displacements past
    what 8 bits hold), and many register blocks: a BERT-like layer at small size."""
    n, k, m = 200, 3000, 45
    _run(randn(m, k, generator=gen), _weight(n, k, 0.9, gen), torch.float32, "row", randn(n, generator=gen),
         randn(m, n, generator=gen), "gelu")


@pytest.mark.parametrize("segments,threads", [(1, 2), (2, 1), (3, 2), (5, 3)])
def test_segments_and_threads_need_not_match(segments, threads, gen, monkeypatch):
    """A program emitted for one thread count runs under another (the work items are segment x tile)."""
    n, k, m = 97, 64, 50
    w = _weight(n, k, 0.75, gen)
    crow, col, values = _parts(w, torch.float32)
    program = cpu_x86_emit.emit(crow, col, values, n, k, segments)
    assert program.segments.shape[0] == segments
    assert program.segments[0, 2] == 0 and program.segments[-1, 3] == n
    assert (program.segments[1:, 2] == program.segments[:-1, 3]).all()      # the rows, each once
    monkeypatch.setattr(csr_jit_cpu, "_PROGRAMS", {})
    monkeypatch.setattr(csr_jit_cpu.cpu_x86_emit, "emit", lambda *a: program)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = randn(m, k, generator=gen)
        got = csr_jit_cpu.csr_jit_cpu_host(x, crow, col, values, n, k, "row", check_indices=False)
    finally:
        torch.set_num_threads(old)
    ref = x.double() @ w.double().t()
    assert rel_l2(got, ref) <= 1e-5


def test_an_in_place_change_of_the_weight_emits_the_program_again(gen):
    n, k = 30, 50
    crow, col, values = _parts(_weight(n, k, 0.6, gen), torch.float32)
    x = randn(20, k, generator=gen)
    first = csr_jit_cpu.csr_jit_cpu_host(x, crow, col, values, n, k)
    values.mul_(-2)
    second = csr_jit_cpu.csr_jit_cpu_host(x, crow, col, values, n, k)
    assert torch.allclose(second, -2 * first, rtol=1e-5, atol=1e-5)
    assert sum(key[:3] == (id(crow), id(col), id(values)) for key in csr_jit_cpu._PROGRAMS) == 1


@pytest.mark.skipif(shutil.which("objdump") is None, reason="no objdump to disassemble with")
def test_the_encoder_writes_the_instructions_it_means(tmp_path):
    """Each instruction form at the register numbers where the EVEX bits change (0, 7, 8, 15, 16,
    27, 28, 31), disassembled by binutils."""
    regs = np.array([0, 7, 8, 15, 16, 27])
    xs = np.array([28, 29, 30, 31, 28, 31])
    parts = [cpu_x86_emit._vpxord(regs), cpu_x86_emit._mem32(0x10, xs, 7, np.array([64, 128, 0, -64, 1 << 20, 48])),
             cpu_x86_emit._fma_bcast8(regs, xs, np.array([-128, -1, 0, 1, 127, 5])),
             cpu_x86_emit._mem32(0x11, regs, 2, np.array([0, 64, 640, 6400, 64000, 128]))]
    code = b"".join(p.tobytes() for p in parts)
    (tmp_path / "c.bin").write_bytes(code)
    out = subprocess.run(["objdump", "-D", "--no-show-raw-insn", "-b", "binary", "-m", "i386:x86-64", str(tmp_path / "c.bin")],
                         capture_output=True, text=True, check=True).stdout
    lines = [" ".join(line.split("\t", 1)[1].split()) for line in out.splitlines()
             if "\t" in line and line.split("\t", 1)[0].strip().rstrip(":").isalnum()]
    want = [f"vpxord %zmm{r},%zmm{r},%zmm{r}" for r in regs]
    want += [f"vmovups {hex(d) if d >= 0 else '-' + hex(-d)}(%rdi),%zmm{x}"
             for d, x in zip([64, 128, 0, -64, 1 << 20, 48], xs)]
    want += [f"vfmadd231ps {'-' if d < 0 else ''}{hex(abs(d) * 4)}(%r8){{1to16}},%zmm{x},%zmm{r}"
             for d, x, r in zip([-128, -1, 0, 1, 127, 5], xs, regs)]
    want += [f"vmovups %zmm{r},{hex(d)}(%rdx)" for d, r in zip([0, 64, 640, 6400, 64000, 128], regs)]
    norm = lambda s: s.replace("0x0(", "(")  # noqa: E731   (objdump writes a zero displacement as "0x0(" or "(")
    assert [norm(x) for x in lines] == [norm(x) for x in want]


def test_not_a_candidate_where_the_cpu_cannot_run_it_and_says_why(monkeypatch):
    from sparsify.patterns import Unstructured

    monkeypatch.setattr(cpu_exec, "unsupported", lambda: "emitted machine code needs AVX-512F, which this CPU "
                                                          "does not have")
    ok, why_not = registry.kernels_for(Unstructured(0.5), torch.device("cpu"), torch.float32, (8, 8))
    assert "csr_jit_cpu" not in [s.name for s in ok] and "csr_cpu" in [s.name for s in ok]
    assert "AVX-512F" in why_not["csr_jit_cpu"]


def test_checks_name_the_argument(gen):
    crow, col, values = csr_parts(pack_csr(_weight(8, 16, 0.5, gen)))
    x = randn(3, 16, generator=gen)
    with pytest.raises(TypeError, match="int32 indices"):
        csr_jit_cpu.csr_jit_cpu_host(x, crow, col, values, 8, 16)
    with pytest.raises(ValueError, match="x must be"):
        csr_jit_cpu.csr_jit_cpu_host(randn(3, 15, generator=gen), crow.int(), col.int(), values, 8, 16)


@pytest.mark.parametrize("host", ["jit", "csr"])
def test_the_kernel_caches_do_not_keep_a_weight_alive(host, gen):
    """The checked-call cache and the program cache hold weights weakly: once the model's tensors
    go, so do they (and the program's code and values)."""
    import gc
    import weakref

    fn = csr_jit_cpu.csr_jit_cpu_host if host == "jit" else csr_cpu.csr_cpu_host
    crow, col, values = _parts(_weight(40, 30, 0.7, gen), torch.float32)
    x = randn(20, 30, generator=gen)
    fn(x, crow, col, values, 40, 30)
    fn(x, crow, col, values, 40, 30)                      # the checked fast path
    refs = [weakref.ref(t) for t in (crow, col, values)]
    programs = len(csr_jit_cpu._PROGRAMS)
    del crow, col, values
    gc.collect()
    assert all(r() is None for r in refs)
    if host == "jit":
        assert len(csr_jit_cpu._PROGRAMS) == programs - 1


def test_a_program_is_read_back_from_the_disk_cache_for_the_same_weight(tmp_path, monkeypatch, gen):
    from sparsify.codegen import cpu_program_cache

    monkeypatch.setenv("SPARSIFY_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("SPARSIFY_PROGRAM_CACHE", "1")
    monkeypatch.delenv("SPARSIFY_NO_COST_CACHE", raising=False)
    w = _weight(45, 70, 0.8, gen)
    first = csr_jit_cpu.program_for(*_parts(w, torch.float32), 45, 70)
    assert len(list(cpu_program_cache.folder().glob("*.npy"))) == 1

    def no_emission(*a, **k):
        raise AssertionError("emitted again: the disk cache was not read")

    monkeypatch.setattr(cpu_x86_emit, "emit", no_emission)
    crow, col, values = _parts(w, torch.float32)        # new tensors, the same bytes
    again = csr_jit_cpu.program_for(crow, col, values, 45, 70)
    assert again is not first and again.code.size == first.code.size and torch.equal(again.values, first.values)
    x = randn(19, 70, generator=gen)
    torch.testing.assert_close(csr_jit_cpu.csr_jit_cpu_host(x, crow, col, values, 45, 70), x @ w.t(),
                               rtol=1e-5, atol=1e-5)
    values.mul_(2)                                       # another weight: another key, emitted
    with pytest.raises(AssertionError, match="emitted again"):
        csr_jit_cpu.program_for(crow, col, values, 45, 70)
    monkeypatch.setenv("SPARSIFY_PROGRAM_CACHE", "0")
    assert not cpu_program_cache.enabled()
