"""Unstructured-sparse linear on the CPU as emitted machine code: y = epilogue(x @ W^T), the weight's
sparsity pattern compiled into AVX-512 instructions (codegen/cpu_x86_emit.py).

The same packed weight as csr_linear.py / csr_cpu.py (crow, col int32; values in x's dtype), the same
op arguments, layouts and checks (csr_cpu.csr_cpu_host, with this file's engine). The first call
with a weight emits its program (~0.1 s per 236K nonzeros; kept while the weight tensors live,
re-emitted if they change); a generated C driver (codegen/cpu_jit_source.py, built and cached like
every generated kernel) packs x into 16-token tiles, runs the program's row segments on the threads
and applies the fused epilogue (bias, activation, residual, output dtype) to each finished tile.

Where it is a candidate: x86-64 Linux with AVX-512F and a C compiler (the driver), fp32 or bf16
(bf16 values are widened to fp32 in the program: exact). The chooser times it against dense and the
other kernels like any candidate; it has no M == 1 path of its own (a token is a 16-token tile).

Entry points: `csr_jit_cpu_host`, `program_for(...)`, `SPEC`.
"""
from __future__ import annotations

import ctypes
import functools
import weakref
from typing import Optional

import torch

from sparsify.codegen import cpu_build, cpu_exec, cpu_jit_source, cpu_program_cache, cpu_x86_emit
from sparsify.codegen.kernels._common import LAYOUTS, linear_out_like
from sparsify.codegen.kernels.csr_cpu import (_DTYPES, _I, _I64, _OUT_DTYPES, _P, csr_cpu_host, kernel_inputs, ptr,
                                              scratch)
from sparsify.codegen.kernels.csr_linear import _pack, stack_csr
from sparsify.codegen.spec import KernelSpec
from sparsify.patterns import NM, Block, Unstructured

KERNEL_VERSION = f"csr_jit_cpu-1+{cpu_x86_emit.EMIT_VERSION}+{cpu_jit_source.TEMPLATE_VERSION}"
_DRIVERS: dict[tuple, ctypes._CFuncPtr] = {}


def driver_for(n: int, k: int, dtype: torch.dtype, out_dtype: torch.dtype, activation: str, has_bias: bool,
               has_residual: bool, in_row: bool, out_row: bool):
    return cpu_build.function(
        _DRIVERS, (n, k, dtype, out_dtype, activation, has_bias, has_residual, in_row, out_row),
        lambda: cpu_jit_source.source(n, k, _DTYPES[dtype], _OUT_DTYPES[out_dtype], activation, has_bias,
                                      has_residual, in_row, out_row),
        [_P, _I, _P, _P, _P, _P, _P, _I64, _I, _P])


def generated_sources() -> dict[str, str]:
    """The drivers' C sources and, per live program, what was emitted (sm.kernel_sources()); the
    code itself is `program_for(...).code` (disassemble with objdump -D -b binary -m i386:x86-64)."""
    out = cpu_build.sources(_DRIVERS)
    for key, (_, prog) in list(_PROGRAMS.items()):
        n, k = key[-2:]
        out[f"program_{n}x{k}_{id(prog):x}"] = (
            f"/* emitted program ({cpu_x86_emit.EMIT_VERSION}) of a {n}x{k} layer: {prog.segments} segment(s), "
            f"{prog.code.size} bytes of AVX-512 code, {prog.values.numel()} nonzeros */")
    return out


class LoadedProgram:
    """A weight's program in executable memory: the segment table the driver reads (absolute code
    addresses), the values, and the code mapping they point into (kept alive here)."""

    def __init__(self, program: cpu_x86_emit.Program):
        self.code = cpu_exec.ExecutableCode(program.code)
        table = torch.from_numpy(program.segments.copy())
        for s in range(table.shape[0]):
            table[s, 0] = self.code.address(int(table[s, 0]))
        self.table, self.values, self.segments = table, program.values, table.shape[0]
        self.max_rows = max(1, int((table[:, 3] - table[:, 2]).max())) if self.segments else 1


_PROGRAMS: dict[tuple, tuple] = {}   # key -> (weak refs of crow, col, values; the program)


def program_for(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, n: int, k: int) -> LoadedProgram:
    """The weight's program, emitted on first use with one segment per thread of this process (or
    read from the disk cache of programs, cpu_program_cache.py); the entry goes when the values
    tensor does, and a changed tensor (its version) emits again."""
    key = (id(crow), id(col), id(values), crow._version, col._version, values._version, n, k)
    hit = _PROGRAMS.get(key)
    if hit is not None and all(ref() is t for ref, t in zip(hit[0], (crow, col, values))):
        return hit[1]
    segments = torch.get_num_threads()
    name = cpu_program_cache.key(crow, col, values, n, k, segments) if cpu_program_cache.enabled() else None
    emitted = cpu_program_cache.load(name) if name is not None else None
    if emitted is None:
        emitted = cpu_x86_emit.emit(crow, col, values, n, k, segments)
        if name is not None:
            cpu_program_cache.store(name, emitted)
    prog = LoadedProgram(emitted)
    for stale in [kk for kk in _PROGRAMS if kk[:3] == key[:3]]:
        del _PROGRAMS[stale]
    _PROGRAMS[key] = (tuple(weakref.ref(t) for t in (crow, col, values)), prog)
    weakref.finalize(values, _PROGRAMS.pop, key, None)
    return prog


def _launch(fn, x, crow, col, values, n_out, k_in, m, row, bias, residual, y):
    prog = program_for(crow, col, values, n_out, k_in)
    xc, b, r = kernel_inputs(x, n_out, k_in, m, row, bias, residual)
    threads = torch.get_num_threads()
    work = scratch(cpu_jit_source.scratch_floats(k_in, prog.max_rows, threads))
    fn(prog.table.data_ptr(), prog.segments, prog.values.data_ptr(), xc.data_ptr(), ptr(b), ptr(r), y.data_ptr(), m,
       threads, work.data_ptr())
    return y


class _JitEngine:
    name = "jit"

    def bind(self, n, k, dtype, out_dtype, activation, has_bias, has_residual, in_row, out_row, crow, col, values):
        """The call y = fn(x, crow, col, values, n_out, k_in, m, row, bias, residual, y) of this variant;
        it holds no tensor and finds the weight's program per call (a dict lookup)."""
        fn = driver_for(n, k, dtype, out_dtype, activation, has_bias, has_residual, in_row, out_row)
        program_for(crow, col, values, n, k)   # emitted now, with the checks, not inside a timed call
        return functools.partial(_launch, fn)


JIT_ENGINE = _JitEngine()


def csr_jit_cpu_host(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, n_out: int,
                     k_in: int, layout: str = "row", bias: Optional[torch.Tensor] = None,
                     residual: Optional[torch.Tensor] = None, activation: str = "none",
                     out_dtype: Optional[torch.dtype] = None, out: Optional[torch.Tensor] = None, *,
                     impl: str = "auto", check_indices: Optional[bool] = None) -> torch.Tensor:
    """csr_cpu_host's contract, run by the emitted program ("generated"; or "reference")."""
    return csr_cpu_host(x, crow, col, values, n_out, k_in, layout, bias, residual, activation, out_dtype, out,
                        impl=impl, check_indices=check_indices, engine=JIT_ENGINE)


def _supports(pattern, dtype: torch.dtype, weight_shape: tuple) -> str | None:
    why = cpu_exec.unsupported()
    if why is not None:
        return why
    return cpu_build.unsupported(dtype, _DTYPES, "CPU")


SPEC = KernelSpec(
    name="csr_jit_cpu", op="sparsify::csr_jit_cpu_linear",
    schema="(Tensor x, Tensor crow, Tensor col, Tensor values, SymInt n_out, SymInt k_in, str layout='row', "
           "Tensor? bias=None, Tensor? residual=None, str activation='none', ScalarType? out_dtype=None) -> Tensor",
    patterns=(Unstructured, NM, Block), replaces="linear", devices=("cpu",), layouts=LAYOUTS, supports=_supports,
    impl=csr_jit_cpu_host, pack=_pack, out_like=linear_out_like, version=KERNEL_VERSION, stack_rows=stack_csr)
