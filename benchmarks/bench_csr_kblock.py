#!/usr/bin/env python
"""The K block of the generated CSR kernel (codegen/cpu_csr_source.py, KB): the same kernel built
with each block size, and without blocking (KB 0), on BERT-base shapes, timed interleaved in one run.

    python benchmarks/bench_csr_kblock.py                 # KB 0 / 256 / 512 at M 128, 512, 2048, 90%
    python benchmarks/bench_csr_kblock.py --smoke --no-write

Token-major in and out, fp32, no epilogue, 2 threads; every variant is checked against a float64
product first. Ratios are of minima over the rounds, against KB 0. Before each timed call a 64 MB
buffer is written, so the weights come from memory as a model's layers find them (--warm: they
stay in cache from the last call, as a single layer timed in a loop would have them).
"""
from __future__ import annotations

import argparse
import ctypes
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import harness as H  # noqa: E402

H.import_sparsify()
from sparsify.codegen import cpu_build, cpu_csr_source  # noqa: E402

SHAPES = ((768, 2304), (768, 3072), (3072, 768))   # (K, N): q|k|v stacked, FFN up, FFN down


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--M", type=H.ints, default=(128, 512, 2048))
    p.add_argument("--kb", type=H.ints, default=(0, 256, 512))
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--warm", action="store_true", help="no cache flush between calls")
    p.add_argument("--smoke", action="store_true", help="small shapes, 2 rounds: checks the code path")
    p.add_argument("--out", default=None)
    p.add_argument("--no-write", action="store_true")
    return p.parse_args(argv)


def _kernel(n, k, kb):
    src, name = cpu_csr_source.source(n, k, "float32", "float32", "none", False, False, True, True, kb=kb)
    fn = getattr(cpu_build.build(src, name), name)
    fn.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_int64, ctypes.c_int, ctypes.c_void_p]
    return fn


def run_shape(k, n, m, args, threads):
    gen = torch.Generator().manual_seed(k * 7 + n + m)
    w = torch.randn(n, k, generator=gen) * (torch.rand(n, k, generator=gen) >= args.sparsity)
    csr = w.to_sparse_csr()
    rp, col, val = csr.crow_indices().int(), csr.col_indices().int(), csr.values().contiguous()
    x = torch.randn(m, k, generator=gen)
    scratch, y = torch.empty(k * m), torch.empty(m, n)
    ref = (x.double() @ w.double().t()).float()
    fns = {kb: _kernel(n, k, kb) for kb in args.kb}
    call = lambda fn: fn(rp.data_ptr(), col.data_ptr(), val.data_ptr(), x.data_ptr(), None, None,  # noqa: E731
                         y.data_ptr(), m, threads, scratch.data_ptr())
    errs = {}
    for kb, fn in fns.items():
        y.fill_(float("nan"))
        call(fn)
        errs[kb] = H.rel_err(y, ref)
        if not errs[kb] <= 1e-5:
            raise SystemExit(f"KB {kb} at {k}->{n}, M {m}: rel err {errs[kb]:.2e}")
    best = {kb: float("inf") for kb in fns}
    junk = None if args.warm else torch.empty((64 << 20) // 4)
    for _ in range(args.rounds):
        for kb, fn in fns.items():
            if junk is not None:
                junk.add_(1.0)   # evicts the weights (and x) from the caches, as the layers before would
            t0 = time.perf_counter()
            call(fn)
            best[kb] = min(best[kb], (time.perf_counter() - t0) * 1e3)
    gflop = 2 * val.numel() * m / 1e9
    base = best[args.kb[0]]
    return [[f"{k}->{n}", m, f"{kb}", H.fmt_ms(best[kb]), f"{base / best[kb]:.2f}x", f"{gflop / best[kb] * 1e3:.0f}",
             f"{errs[kb]:.1e}"] for kb in fns]


def main(argv=None) -> int:
    args = parse_args(argv)
    shapes, ms = (((40, 48), (600, 24)), (130,)) if args.smoke else (SHAPES, args.M)
    if args.smoke:
        args.rounds = 2
    threads = torch.get_num_threads()
    device = torch.device("cpu")
    env = H.Environment(device, [("kernel", f"{cpu_csr_source.TEMPLATE_VERSION}, fp32, token-major in and out, "
                                            f"{threads} threads, sparsity {args.sparsity}"),
                                 ("timing", f"{args.rounds} rounds, the variants interleaved call by call; "
                                            f"ms = minimum; ratio = KB {args.kb[0]}'s minimum / this one's; "
                                            + ("caches warm from the last call" if args.warm else
                                               "a 64 MB write before each call (weights cold)"))])
    rows = []
    for k, n in shapes:
        for m in ms:
            rows += run_shape(k, n, m, args, threads)
    body = H.markdown_table(("shape (K->N)", "M", "KB", "ms", "vs KB " + str(args.kb[0]), "GFLOP/s (nonzeros)",
                             "rel err"), rows)
    path = None if args.no_write else H.results_path(device, "-csr-kblock", args.out, smoke=args.smoke)
    H.Results(path, "bench_csr_kblock: the K block of the generated CSR kernel", env).finish("bench_csr_kblock", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
