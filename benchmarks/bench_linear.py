#!/usr/bin/env python
"""Sparse linear layers against dense cuBLAS and PyTorch's own sparse paths, in one run.

    python benchmarks/bench_linear.py                  # full grid (CUDA), writes benchmarks/results/<device>.md
    python benchmarks/bench_linear.py --quick          # reduced grid, a few minutes on an H100
    python benchmarks/bench_linear.py --sweep-configs  # tune the sparsify Triton kernels' launch configs
    TRITON_INTERPRET=1 python benchmarks/bench_linear.py --smoke   # CPU: exercises every code path

y = x @ W^T with x [M, K] and W [N, K] (nn.Linear convention), random weights and inputs, masks from
sparsify's own criteria (`nm_mask`, `block_mask`, `unstructured_mask` over the whole layer) on random
scores. Providers:

    dense         torch.nn.functional.linear(x, W)                       (cuBLAS)
    torch-2:4     F.linear(x, torch.sparse.to_sparse_semi_structured(W))
    cslt          sparsify::cslt_linear (torch._cslt_sparse_mm, cuSPARSELt)
    sparsify-nm   nm_linear_triton on pack_nm(W, 2, 4)
    torch-bsr     W.to_sparse_bsr((b, b)) @ x^T  (computes [N, K] @ [K, M], x^T made contiguous untimed)
    sparsify-bsr  bsr_linear_triton on pack_bsr(W, b)
    torch-csr     W.to_sparse_csr() @ x^T  (cuSPARSE; unstructured masks, x^T made contiguous untimed)
    sparsify-sell sell_linear_triton on pack_sell(W)  (unstructured masks)

Every non-dense provider's output is checked against float32 F.linear(x, W_masked): relative L2
error, flagged WRONG above --tol. A provider that raises is recorded as "error: ..." and the run
goes on. See benchmarks/README.md for what the timings do and do not include.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import inspect
import json
import math
import os
import shlex
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"

FULL_M = (1, 16, 128, 2048, 8192, 32768)
QUICK_M = (1, 16, 2048, 8192)
FULL_SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096))   # (K, N): in_features -> out_features
QUICK_SHAPES = ((4096, 4096), (4096, 14336))
DENSITIES = (0.5, 0.25, 0.1)
BLOCKS = (32, 64, 128)
SMOKE_M = (1, 16)
SMOKE_SHAPES = ((128, 128),)
SMOKE_DENSITIES = (0.5, 0.25)
SMOKE_BLOCKS = (32, 64)
# Unstructured weight densities: the high-sparsity range where a sparse GEMV can beat dense at small M.
UNSTRUCTURED_DENSITIES = (0.3, 0.1, 0.02)
SMOKE_UNSTRUCTURED_DENSITIES = (0.1,)
PROVIDERS = ("dense", "torch-2:4", "cslt", "sparsify-nm", "torch-bsr", "sparsify-bsr", "torch-csr",
             "sparsify-sell")
NM_PROVIDERS = ("torch-2:4", "cslt", "sparsify-nm")
BSR_PROVIDERS = ("torch-bsr", "sparsify-bsr")
UNSTRUCTURED_PROVIDERS = ("torch-csr", "sparsify-sell")
DTYPES = {"float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float32": torch.float32, "fp32": torch.float32}


# ----------------------------------------------------------------------------------------------
# Imports of sparsify (installed editable; fallback: map the repo's package dirs by hand)
# ----------------------------------------------------------------------------------------------

def _import_sparsify():
    """The kernel modules and criteria. pyproject maps sparsify.codegen -> codegen/ and
    sparsify.passes -> passes/, which a plain sys.path entry cannot express: without the editable
    install, load `sparsify` with both sparsify/ and the repo root on its __path__."""
    try:
        import sparsify.codegen.kernels.bsr_linear  # noqa: F401
        mode = "installed"
    except ImportError as first:
        for name in [n for n in sys.modules if n == "sparsify" or n.startswith("sparsify.")]:
            del sys.modules[name]
        spec = importlib.util.spec_from_file_location(
            "sparsify", REPO / "sparsify" / "__init__.py",
            submodule_search_locations=[str(REPO / "sparsify"), str(REPO)])
        if spec is None:
            raise first
        module = importlib.util.module_from_spec(spec)
        sys.modules["sparsify"] = module
        spec.loader.exec_module(module)
        mode = f"repo path fallback ({first})"
    from sparsify.codegen import runtime
    from sparsify.codegen.kernels import bsr_linear, nm_linear
    from sparsify.passes.analysis import criteria
    return runtime, bsr_linear, nm_linear, criteria, mode


# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------

def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(v) for v in s.split(",") if v.strip())


def _floats(s: str) -> tuple[float, ...]:
    return tuple(float(v) for v in s.split(",") if v.strip())


def _shapes(s: str) -> tuple[tuple[int, int], ...]:
    out = []
    for item in s.split(","):
        item = item.strip().replace("->", "x").replace(":", "x")
        if item:
            k, n = item.lower().split("x")
            out.append((int(k), int(n)))
    return tuple(out)


def _names(s: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in s.split(",") if v.strip())


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"reduced grid: M in {QUICK_M}, shapes {QUICK_SHAPES}")
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes (M in {1,16}, K=N=128) to exercise the code paths; on CPU it needs "
                        "TRITON_INTERPRET=1 (set automatically by re-executing) and its timings are meaningless")
    p.add_argument("--M", type=_ints, default=None, help="comma list of token counts, e.g. 1,16,2048")
    p.add_argument("--shapes", type=_shapes, default=None,
                   help="comma list of KxN (in->out features), e.g. 4096x4096,4096x14336 (also 4096->14336)")
    p.add_argument("--densities", type=_floats, default=None, help=f"block densities (default {DENSITIES})")
    p.add_argument("--blocks", type=_ints, default=None, help=f"BSR block sizes (default {BLOCKS})")
    p.add_argument("--unstructured-densities", type=_floats, default=None,
                   help=f"unstructured weight densities for {','.join(UNSTRUCTURED_PROVIDERS)} "
                        f"(default {UNSTRUCTURED_DENSITIES})")
    p.add_argument("--providers", type=_names, default=PROVIDERS,
                   help=f"comma list from {','.join(PROVIDERS)} (dense is always timed: it is the baseline)")
    p.add_argument("--dtype", default="float16", choices=sorted(DTYPES))
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warmup (ms)")
    p.add_argument("--rep", type=int, default=100, help="do_bench rep (ms)")
    p.add_argument("--tol", type=float, default=2e-2, help="relative L2 error above which a row is WRONG")
    p.add_argument("--mem-limit-gb", type=float, default=40.0,
                   help="skip (shape, M) combinations whose estimated footprint exceeds this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None,
                   help="results markdown path (default: benchmarks/results/<device>.md, or <device>-sweep.md "
                        "with --sweep-configs; a --smoke run writes nothing unless given)")
    p.add_argument("--json", default=None, help="also write the raw rows as JSON here")
    p.add_argument("--plot", default=None,
                   help="speedup-vs-sparsity PNG (default: next to the results file, <device>-speedup.png)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-write", action="store_true", help="print only, write no results file")
    g = p.add_argument_group("launch-config sweep (--sweep-configs)")
    g.add_argument("--sweep-configs", action="store_true",
                   help="instead of the provider comparison, time a grid of launch configs of the sparsify "
                        "Triton kernels and print the best per (shape, M, pattern). Default shape 4096x4096")
    g.add_argument("--sweep-kernels", type=_names, default=("bsr", "nm"), help="bsr,nm")
    g.add_argument("--sweep-block-m", type=_ints, default=(16, 32, 64, 128),
                   help="BLOCK_M candidates; per M the two largest not above max(16, next_pow2(M)) are tried")
    g.add_argument("--sweep-warps", type=_ints, default=None, help="num_warps (default bsr 2,4,8; nm 4,8)")
    g.add_argument("--sweep-stages", type=_ints, default=None, help="num_stages (default bsr 1,2,3; nm 2,3,4)")
    g.add_argument("--sweep-block-n", type=_ints, default=(32, 64, 128), help="nm BLOCK_N candidates")
    g.add_argument("--sweep-block-k", type=_ints, default=(32, 64, 128), help="nm BLOCK_K candidates")
    g.add_argument("--sweep-warmup", type=int, default=10, help="do_bench warmup (ms) in the sweep")
    g.add_argument("--sweep-rep", type=int, default=40, help="do_bench rep (ms) in the sweep")
    args = p.parse_args(argv)

    unknown = [v for v in args.providers if v not in PROVIDERS]
    if unknown:
        p.error(f"unknown provider(s) {unknown}; choose from {PROVIDERS}")
    bad = [k for k in args.sweep_kernels if k not in ("bsr", "nm")]
    if bad:
        p.error(f"unknown sweep kernel(s) {bad}; choose from bsr, nm")
    if args.smoke:
        args.M = args.M or SMOKE_M
        args.shapes = args.shapes or SMOKE_SHAPES
        args.densities = args.densities or SMOKE_DENSITIES
        args.blocks = args.blocks or SMOKE_BLOCKS
        args.unstructured_densities = args.unstructured_densities or SMOKE_UNSTRUCTURED_DENSITIES
    elif args.sweep_configs:
        args.M = args.M or (QUICK_M if args.quick else FULL_M)
        args.shapes = args.shapes or ((4096, 4096),)
    else:
        args.M = args.M or (QUICK_M if args.quick else FULL_M)
        args.shapes = args.shapes or (QUICK_SHAPES if args.quick else FULL_SHAPES)
    args.densities = args.densities or DENSITIES
    args.blocks = args.blocks or BLOCKS
    args.unstructured_densities = args.unstructured_densities or UNSTRUCTURED_DENSITIES
    return args


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------

def make_timer(device: torch.device, warmup: int, rep: int):
    """fn -> median milliseconds. CUDA: triton.testing.do_bench (it zeroes a 256 MB buffer before every
    timed call, so neither W nor x start in L2). CPU: perf_counter median of a few calls (meaningless
    under the Triton interpreter; only there to run the code)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        params = inspect.signature(do_bench).parameters
        kw = {"warmup": warmup, "rep": rep}
        if "return_mode" in params:
            kw["return_mode"] = "median"
        else:  # older triton: quantiles only
            kw["quantiles"] = [0.5]

        def timer(fn) -> float:
            r = do_bench(fn, **kw)
            return float(r[0] if isinstance(r, (list, tuple)) else r)

        desc = f"triton.testing.do_bench({', '.join(f'{k}={v!r}' for k, v in kw.items())}), L2 flushed before each call"
        return timer, desc

    def timer(fn) -> float:
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return timer, "CPU perf_counter median of 3 calls -- TIMINGS MEANINGLESS (Triton interpreter)"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _short(e: BaseException, limit: int = 90) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    msg = f"{type(e).__name__}: {msg}"
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    y = y.float()
    denom = ref.norm().item()
    return (y - ref).norm().item() / (denom if denom > 0 else 1.0)


# ----------------------------------------------------------------------------------------------
# Problem setup
# ----------------------------------------------------------------------------------------------

def est_bytes(M: int, K: int, N: int, elsize: int, n_weight_copies: float) -> int:
    """Rough peak footprint of one (shape, M): x, x^T, x in fp32, a few outputs, the fp32 reference,
    and the dense + packed weights of every pattern of the shape."""
    return int(M * K * (2 * elsize + 4) + M * N * (3 * elsize + 8) + N * K * elsize * n_weight_copies)


def pattern_list(args):
    """[(label, kind, params, sparsity)] in table order."""
    pats = []
    if any(p in args.providers for p in NM_PROVIDERS):
        pats.append(("2:4", "nm", (2, 4), 0.5))
    if any(p in args.providers for p in BSR_PROVIDERS):
        for b in args.blocks:
            for d in args.densities:
                pats.append((f"bsr-b{b}@{d:g}", "bsr", (b, d), 1.0 - d))
    if any(p in args.providers for p in UNSTRUCTURED_PROVIDERS):
        for d in args.unstructured_densities:
            pats.append((f"unstr@{d:g}", "unstructured", (d,), 1.0 - d))
    return pats


class Ctx:
    """What the provider builders need: kernels, device, dtype."""

    def __init__(self, args, device, dtype, runtime, bsr_mod, nm_mod, criteria):
        self.args, self.device, self.dtype = args, device, dtype
        self.runtime, self.bsr, self.nm, self.criteria = runtime, bsr_mod, nm_mod, criteria


def build_pattern(ctx: Ctx, kind: str, params, W: torch.Tensor, scores: torch.Tensor):
    """Masked weight for a pattern and, per provider, either ("ok", make_fn(x, xT) -> fn, note) or
    ("skip"/"error", message). Packing happens here, once per (shape, pattern), outside timing."""
    args, dev = ctx.args, ctx.device
    N, K = W.shape
    if kind == "nm":
        n, m = params
        Wm = W * ctx.criteria.nm_mask(scores, n, m)
    elif kind == "unstructured":
        Wm = W * ctx.criteria.unstructured_mask(scores, 1.0 - params[0], per_row=False)
    else:
        b, d = params
        Wm = W * ctx.criteria.block_mask(scores, b, d)
    Wm = Wm.contiguous()
    provs = {}

    def add(name, builder):
        if name not in args.providers:
            return
        try:
            provs[name] = builder()
        except Exception as e:  # noqa: BLE001 - a provider that cannot even be set up is a table row
            provs[name] = ("error", "setup " + _short(e))

    if kind == "nm":
        def torch_24():
            if dev.type != "cuda":
                return ("skip", "needs CUDA")
            Ws = torch.sparse.to_sparse_semi_structured(Wm)
            return ("ok", lambda x, xT: (lambda: F.linear(x, Ws)), type(Ws).__name__.replace("SparseSemiStructuredTensor", "semi-"))

        def cslt():
            if not ctx.nm.semi_structured_available(dev if dev.type == "cuda" else None):
                return ("skip", "cuSPARSELt unavailable (needs CUDA sm_80+ and a cuSPARSELt build)")
            comp = ctx.nm.pack_cslt(Wm)
            return ("ok", lambda x, xT: (lambda: ctx.nm.cslt_linear(x, comp, N)),
                    "sparsify::cslt_linear (torch re-plans cuSPARSELt every call)")

        def sp_nm():
            pk = ctx.nm.pack_nm(Wm, n, m)

            def make(x, xT):
                return lambda: ctx.nm.nm_linear_triton(x, pk.values, pk.meta, N, K, n, m)
            return ("ok", make, None)

        add("torch-2:4", torch_24)
        add("cslt", cslt)
        add("sparsify-nm", sp_nm)
    elif kind == "unstructured":
        def torch_csr():
            Wc = Wm.to_sparse_csr()
            return ("ok", lambda x, xT: (lambda: Wc @ xT), "[N,K]@[K,M]")

        def sp_sell():
            from sparsify.codegen.kernels import sell_linear as sell

            pk = sell.pack_sell(Wm)

            def make(x, xT):
                return lambda: sell.sell_linear_triton(x, pk.values, pk.cols, pk.slice_ptr, pk.perm, N, K,
                                                       pk.slice_rows)
            note = f"S{pk.slice_rows}, padding {100 * pk.padding_overhead:.1f}%, W {pk.nbytes / 2**20:.2f} MiB"
            return ("ok", make, note)

        add("torch-csr", torch_csr)
        add("sparsify-sell", sp_sell)
    else:
        def torch_bsr():
            Wb = Wm.to_sparse_bsr((b, b))
            return ("ok", lambda x, xT: (lambda: Wb @ xT), "[N,K]@[K,M]")

        def sp_bsr():
            pk = ctx.bsr.pack_bsr(Wm, b)

            def make(x, xT):
                return lambda: ctx.bsr.bsr_linear_triton(x, pk.values, pk.row_ptr, pk.col_idx, N)
            return ("ok", make, f"nnzb={pk.nnzb}")

        add("torch-bsr", torch_bsr)
        add("sparsify-bsr", sp_bsr)
    return Wm, provs


def config_note(ctx: Ctx, provider: str, params, M: int, N: int, K: int) -> str:
    """The launch config the sparsify kernel's heuristic picks (what a sweep would replace)."""
    try:
        if provider == "sparsify-bsr":
            bm, w, s = ctx.bsr._config_for(M, params[0], ctx.dtype)
            return f"BM{bm} w{w} s{s}"
        if provider == "sparsify-nm":
            bm, bn, bk, w, s = ctx.nm._config_for(M, N, K, ctx.dtype)
            variant = getattr(ctx.nm, "_permute_x_for", None)
            variant = "" if variant is None else (" permute-x" if variant(bn, bk) else " interleave")
            return f"{bm}x{bn}x{bk} w{w} s{s}{variant}"
        if provider == "sparsify-sell":
            from sparsify.codegen.kernels import sell_linear as sell

            bm, bk, w = sell._config_for(M, sell.DEFAULT_SLICE_ROWS)
            return f"BM{bm} BK{bk} w{w}"
    except Exception:  # noqa: BLE001 - a note only
        pass
    return ""


# ----------------------------------------------------------------------------------------------
# The provider comparison
# ----------------------------------------------------------------------------------------------

def run_compare(args, ctx: Ctx, timer, on_progress):
    dev, dtype = ctx.device, ctx.dtype
    el = torch.empty((), dtype=dtype).element_size()
    rows = []
    pats = pattern_list(args)
    need_xT = "torch-bsr" in args.providers or "torch-csr" in args.providers
    gen = torch.Generator(device="cpu").manual_seed(args.seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=dev, dtype=dtype)

    for (K, N) in args.shapes:
        shape = f"{K}->{N}"
        copies = 1 + 1.5 * len(pats)
        Ms = []
        for M in args.M:
            need = est_bytes(M, K, N, el, copies)
            if need > args.mem_limit_gb * 2**30:
                print(f"[skip] {shape} M={M}: ~{need / 2**30:.1f} GB > --mem-limit-gb {args.mem_limit_gb}", flush=True)
                rows.append(dict(shape=shape, K=K, N=N, M=M, pattern="-", sparsity=None, provider="all",
                                 ms=None, ratio=None, rel_err=None, status=f"skip: ~{need / 2**30:.0f} GB", note=""))
            else:
                Ms.append(M)
        if not Ms:
            continue
        W = randn(N, K, scale=K ** -0.5)
        scores = torch.rand(N, K, generator=gen).to(dev)
        # Inputs: random normal, never zeros; one buffer per M (do_bench flushes L2 before each call).
        xs = {M: randn(M, K) for M in Ms}
        xTs = {M: xs[M].t().contiguous() for M in Ms} if need_xT else {M: None for M in Ms}

        dense_ms = {}
        for M in Ms:
            x = xs[M]
            try:
                ms = timer(lambda: F.linear(x, W))
                row = dict(status="ok", ms=ms, ratio=1.0)
                dense_ms[M] = ms
            except Exception as e:  # noqa: BLE001
                row = dict(status="error: " + _short(e), ms=None, ratio=None)
            row.update(shape=shape, K=K, N=N, M=M, pattern="dense", sparsity=0.0, provider="dense",
                       rel_err=None, note="F.linear (cuBLAS)" if dev.type == "cuda" else "F.linear")
            rows.append(row)
            on_progress(row, rows)

        for (label, kind, params, sparsity) in pats:
            try:
                Wm, provs = build_pattern(ctx, kind, params, W, scores)
            except Exception as e:  # noqa: BLE001 - the mask itself failed: every provider errors
                kind_providers = {"nm": NM_PROVIDERS, "unstructured": UNSTRUCTURED_PROVIDERS}.get(kind,
                                                                                                  BSR_PROVIDERS)
                Wm, provs = None, {p: ("error", "mask " + _short(e)) for p in args.providers if p != "dense"
                                   and p in kind_providers}
            Wm32 = Wm.float() if Wm is not None else None
            for M in Ms:
                x, xT = xs[M], xTs[M]
                ref = F.linear(x.float(), Wm32) if Wm32 is not None else None
                for prov, spec in provs.items():
                    row = dict(shape=shape, K=K, N=N, M=M, pattern=label, sparsity=sparsity, provider=prov,
                               ms=None, ratio=None, rel_err=None, note="")
                    if spec[0] != "ok":
                        row["status"] = f"{spec[0]}: {spec[1]}"
                    else:
                        _, make, note = spec
                        cfg = config_note(ctx, prov, params, M, N, K)
                        row["note"] = "; ".join(v for v in (note, cfg) if v)
                        try:
                            fn = make(x, xT)
                            y = fn()
                            _sync(dev)
                            if prov in ("torch-bsr", "torch-csr"):
                                y = y.t()
                            if tuple(y.shape) != (M, N):
                                raise RuntimeError(f"output shape {tuple(y.shape)} != {(M, N)}")
                            err = rel_err(y, ref)
                            del y
                            row["rel_err"] = err
                            ms = timer(fn)
                            row["ms"] = ms
                            if M in dense_ms:
                                row["ratio"] = dense_ms[M] / ms
                            row["status"] = "ok" if err <= args.tol else "WRONG"
                        except Exception as e:  # noqa: BLE001
                            row["status"] = "error: " + _short(e)
                            if os.environ.get("BENCH_TRACEBACK"):
                                traceback.print_exc()
                    rows.append(row)
                    on_progress(row, rows)
                del ref
            del Wm, Wm32, provs
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        del W, scores, xs, xTs
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------------------------
# Launch-config sweep of the sparsify kernels
# ----------------------------------------------------------------------------------------------

def _np2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def _block_m_candidates(args, M: int):
    """The two largest BLOCK_M candidates that do not exceed max(16, next_pow2(M)): a tile taller
    than M only wastes work, and much shorter tiles than the usual ones only re-read W more often."""
    cands = sorted(b for b in args.sweep_block_m if b <= max(16, _np2(M)))
    return cands[-2:] or sorted(args.sweep_block_m)[:1]


def sweep_grid(args, kernel: str, M: int):
    warps = args.sweep_warps or ((2, 4, 8) if kernel == "bsr" else (4, 8))
    stages = args.sweep_stages or ((1, 2, 3) if kernel == "bsr" else (2, 3, 4))
    grid = []
    for bm in _block_m_candidates(args, M):
        if kernel == "bsr":
            for w in warps:
                for s in stages:
                    grid.append(dict(block_m=bm, num_warps=w, num_stages=s))
        else:
            for bn in args.sweep_block_n:
                for bk in args.sweep_block_k:
                    for w in warps:
                        for s in stages:
                            grid.append(dict(block_m=bm, block_n=bn, block_k=bk, num_warps=w, num_stages=s))
    return grid


def _cfg_str(cfg: dict) -> str:
    keys = (("block_m", "BM"), ("block_n", "BN"), ("block_k", "BK"), ("num_warps", "w"), ("num_stages", "s"))
    return " ".join(f"{short}{cfg[k]}" for k, short in keys if k in cfg)


def run_sweep(args, ctx: Ctx, timer, on_progress):
    dev, dtype = ctx.device, ctx.dtype
    rows = []
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    t_start = time.time()

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=dev, dtype=dtype)

    for (K, N) in args.shapes:
        shape = f"{K}->{N}"
        W = randn(N, K, scale=K ** -0.5)
        scores = torch.rand(N, K, generator=gen).to(dev)
        xs = {M: randn(M, K) for M in args.M}
        dense_ms = {}
        for M in args.M:
            x = xs[M]
            try:
                dense_ms[M] = timer(lambda: F.linear(x, W))
            except Exception as e:  # noqa: BLE001
                print(f"[dense error] {shape} M={M}: {_short(e)}", flush=True)
        pats = []
        if "nm" in args.sweep_kernels:
            pats.append(("2:4", "nm", (2, 4)))
        if "bsr" in args.sweep_kernels:
            pats += [(f"bsr-b{b}@{d:g}", "bsr", (b, d)) for b in args.blocks for d in args.densities]
        for (label, kind, params) in pats:
            if kind == "nm":
                Wm = W * ctx.criteria.nm_mask(scores, *params)
                pk = ctx.nm.pack_nm(Wm, *params)

                def call(x, cfg, pk=pk, params=params):
                    return ctx.nm.nm_linear_triton(x, pk.values, pk.meta, N, K, *params, **cfg)
            else:
                Wm = W * ctx.criteria.block_mask(scores, *params)
                pk = ctx.bsr.pack_bsr(Wm, params[0])

                def call(x, cfg, pk=pk):
                    return ctx.bsr.bsr_linear_triton(x, pk.values, pk.row_ptr, pk.col_idx, N, **cfg)
            Wm32 = Wm.float()
            for M in args.M:
                x = xs[M]
                ref = F.linear(x.float(), Wm32)
                default = config_note(ctx, "sparsify-" + kind, params, M, N, K)
                results = []   # (ms, cfg_str)
                failures = []
                for cfg in [None] + sweep_grid(args, kind, M):
                    name = "default" if cfg is None else _cfg_str(cfg)
                    try:
                        fn = (lambda cfg=cfg: call(x, cfg or {}))
                        err = rel_err(fn(), ref)
                        if not err <= args.tol:
                            failures.append(f"{name}: WRONG {err:.2g}")
                            continue
                        results.append((timer(fn), name))
                    except Exception as e:  # noqa: BLE001
                        failures.append(f"{name}: {_short(e, 60)}")
                default_ms = next((ms for ms, nm in results if nm == "default"), None)
                tuned = [r for r in results if r[1] != "default"]
                best = min(tuned) if tuned else None
                row = dict(shape=shape, K=K, N=N, M=M, pattern=label, kernel=kind,
                           default_cfg=default, default_ms=default_ms,
                           best_cfg=best[1] if best else None, best_ms=best[0] if best else None,
                           gain=(default_ms / best[0]) if (best and default_ms) else None,
                           dense_ms=dense_ms.get(M),
                           vs_dense=(dense_ms[M] / best[0]) if (best and M in dense_ms) else None,
                           tried=len(results), failed=len(failures),
                           top3=[f"{nm} {ms:.4f}" for ms, nm in sorted(tuned)[:3]],
                           failures=failures[:5])
                rows.append(row)
                on_progress(row, rows)
                print(f"    ({time.time() - t_start:.0f} s elapsed)", flush=True)
                del ref
            del Wm, Wm32, pk
        del W, scores, xs
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------

def sort_key(args, r):
    """Table order: shape as given, M ascending, dense first, then patterns and providers in run order."""
    shapes = [f"{k}->{n}" for k, n in args.shapes]
    pats = ["dense"] + [p[0] for p in pattern_list(args)]
    if args.sweep_configs:
        pats += ["2:4"] + [f"bsr-b{b}@{d:g}" for b in args.blocks for d in args.densities]
    prov = r.get("provider", r.get("kernel", ""))
    return (shapes.index(r["shape"]) if r["shape"] in shapes else len(shapes), r["M"],
            pats.index(r["pattern"]) if r["pattern"] in pats else len(pats),
            PROVIDERS.index(prov) if prov in PROVIDERS else len(PROVIDERS))


def _fmt_ms(v):
    return "-" if v is None else f"{v:.4f}"


def _fmt_ratio(v):
    return "-" if v is None else f"{v:.2f}x"


def compare_table(rows, tol: float, smoke_cpu: bool) -> str:
    ms_head = "ms (CPU, meaningless)" if smoke_cpu else "ms"
    lines = [f"| shape (K->N) | M | pattern | provider | {ms_head} | vs dense | rel err | note |",
             "|---|---:|---|---|---:|---:|---|---|"]
    for r in rows:
        st = r["status"]
        if st == "ok":
            err = "-" if r["rel_err"] is None else f"{r['rel_err']:.1e}"
        elif st == "WRONG":
            err = f"**WRONG** {r['rel_err']:.2e} (> {tol:g})"
        else:
            err = st.replace("|", "/")
        lines.append(f"| {r['shape']} | {r['M']} | {r['pattern']} | {r['provider']} | {_fmt_ms(r['ms'])} | "
                     f"{_fmt_ratio(r['ratio'])} | {err} | {r.get('note', '').replace('|', '/')} |")
    return "\n".join(lines)


def sweep_table(rows, smoke_cpu: bool) -> str:
    ms = "ms (CPU, meaningless)" if smoke_cpu else "ms"
    lines = [f"| shape (K->N) | M | pattern | default cfg | default {ms} | best cfg | best {ms} | "
             "best/default | dense ms | best vs dense | tried/failed | next best |",
             "|---|---:|---|---|---:|---|---:|---:|---:|---:|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['M']} | {r['pattern']} | {r['default_cfg']} | {_fmt_ms(r['default_ms'])} | "
            f"{r['best_cfg'] or '-'} | {_fmt_ms(r['best_ms'])} | {_fmt_ratio(r['gain'])} | "
            f"{_fmt_ms(r['dense_ms'])} | {_fmt_ratio(r['vs_dense'])} | {r['tried']}/{r['failed']} | "
            f"{'; '.join(r['top3'][1:])} |")
    return "\n".join(lines)


def env_info(device: torch.device) -> dict:
    import triton

    info = {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
            "python": sys.version.split()[0]}
    if device.type == "cuda":
        info["device"] = torch.cuda.get_device_name(device)
        info["capability"] = "sm_%d%d" % torch.cuda.get_device_capability(device)
        try:
            info["cusparselt"] = (torch.backends.cusparselt.version()
                                  if torch.backends.cusparselt.is_available() else "unavailable")
        except Exception as e:  # noqa: BLE001
            info["cusparselt"] = f"? ({_short(e, 40)})"
        props = torch.cuda.get_device_properties(device)
        info["memory_gb"] = round(props.total_memory / 2**30, 1)
        l2 = getattr(props, "L2_cache_size", None)
        if l2:
            info["l2_mb"] = round(l2 / 2**20, 1)
    else:
        import platform

        model = platform.processor() or platform.machine()
        try:   # the processor's name, where Linux tells it
            with open("/proc/cpuinfo") as f:
                model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        info["device"] = f"CPU ({model}), {torch.get_num_threads()} torch threads"
    info["TRITON_INTERPRET"] = os.environ.get("TRITON_INTERPRET", "0")
    return info


def command_line() -> str:
    env = " ".join(f"{k}={os.environ[k]}" for k in ("TRITON_INTERPRET", "SPARSIFY_KERNELS") if k in os.environ)
    cmd = "python " + shlex.join([os.path.relpath(sys.argv[0], REPO) if os.path.isabs(sys.argv[0]) else sys.argv[0]]
                                 + sys.argv[1:])
    return f"{env} {cmd}".strip()


def device_slug(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).strip().replace(" ", "-")
    return "cpu-smoke"


def write_markdown(path: Path, header: dict, table: str, extra: str = ""):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# {header['title']}", ""]
    for k, v in header["items"]:
        lines.append(f"- {k}: {v}")
    lines += ["", table, ""]
    if extra:
        lines += [extra, ""]
    path.write_text("\n".join(lines))


def plot_speedup(rows, path: Path, title_note: str) -> str:
    """Speedup vs sparsity at M=2048, 4096->4096 (else the closest M / first shape present)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib is not installed (pip install matplotlib)"
    ok = [r for r in rows if r.get("ratio") is not None and r["provider"] != "dense" and r["status"] in ("ok", "WRONG")]
    if not ok:
        return "plot skipped: no timed sparse rows"
    shapes = [r["shape"] for r in ok]
    shape = "4096->4096" if "4096->4096" in shapes else shapes[0]
    Ms = sorted({r["M"] for r in ok if r["shape"] == shape})
    M = min(Ms, key=lambda m: abs(math.log2(m) - math.log2(2048)))
    sel = [r for r in ok if r["shape"] == shape and r["M"] == M]
    series = {}
    for r in sel:
        if r["pattern"].startswith("bsr-b"):
            key = f"{r['provider']} b{r['pattern'][5:].split('@')[0]}"
        elif r["pattern"].startswith("unstr@"):
            key = f"{r['provider']} (unstructured)"
        else:
            key = f"{r['provider']} ({r['pattern']})"
        series.setdefault(key, []).append((r["sparsity"], r["ratio"], r["status"] == "WRONG"))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key in sorted(series):
        pts = sorted(series[key])
        xs_, ys_ = [p[0] for p in pts], [p[1] for p in pts]
        style = "o-" if len(pts) > 1 else "s"
        ax.plot(xs_, ys_, style, label=key + (" [WRONG]" if any(p[2] for p in pts) else ""))
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xlabel("sparsity (fraction of weights removed)")
    ax.set_ylabel("speedup vs dense F.linear (>1 = faster)")
    ax.set_title(f"{shape}, M={M} {title_note}".strip(), fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot: {path}"


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        if not args.smoke:
            print("no CUDA device: only --smoke runs on CPU (Triton interpreter)", file=sys.stderr)
            return 2
        if os.environ.get("TRITON_INTERPRET") != "1":
            # Must be set before triton is imported: re-run this script with it.
            print("[smoke] re-executing with TRITON_INTERPRET=1", flush=True)
            env = dict(os.environ, TRITON_INTERPRET="1")
            os.execve(sys.executable, [sys.executable] + sys.argv, env)
    dtype = DTYPES[args.dtype]
    smoke_cpu = device.type == "cpu"
    warnings.filterwarnings("ignore", message=".*Sparse BSR tensor support is in beta.*")
    warnings.filterwarnings("ignore", message=".*semi-structured sparsity support is in prototype.*")

    runtime, bsr_mod, nm_mod, criteria, import_mode = _import_sparsify()
    ctx = Ctx(args, device, dtype, runtime, bsr_mod, nm_mod, criteria)
    if args.sweep_configs:
        timer, timer_desc = make_timer(device, args.sweep_warmup, args.sweep_rep)
    else:
        timer, timer_desc = make_timer(device, args.warmup, args.rep)
    info = env_info(device)
    started = datetime.datetime.now(datetime.timezone.utc)
    print(f"[bench_linear] {info}", flush=True)
    print(f"[bench_linear] sparsify import: {import_mode}; kernels: bsr {bsr_mod.KERNEL_VERSION}, "
          f"nm {nm_mod.KERNEL_VERSION}", flush=True)
    print(f"[bench_linear] timing: {timer_desc}", flush=True)
    if smoke_cpu:
        print("[bench_linear] CPU SMOKE RUN: timings are meaningless; only code paths and errors are checked",
              flush=True)

    # Where results go.
    # Default results files are for real runs only: a smoke run (CPU or CUDA) writes only with --out.
    write = not args.no_write and (args.out is not None or not args.smoke)
    slug = device_slug(device)
    suffix = "-sweep" if args.sweep_configs else ""
    md_path = Path(args.out) if args.out else RESULTS / f"{slug}{suffix}.md"
    if args.plot:
        plot_path = Path(args.plot)
    else:
        plot_path = md_path.with_name(md_path.stem + "-speedup.png") if args.out else RESULTS / f"{slug}-speedup.png"

    header_items = [
        ("device", info["device"] + (f" ({info.get('capability')}, {info.get('memory_gb')} GB, L2 {info.get('l2_mb')} MB)"
                                     if device.type == "cuda" else "")),
        ("versions", f"torch {info['torch']}, triton {info['triton']}, CUDA {info['cuda']}, "
                     f"cuSPARSELt {info.get('cusparselt', '-')}, python {info['python']}"),
        ("date (UTC)", started.strftime("%Y-%m-%d %H:%M")),
        ("command", f"`{command_line()}`"),
        ("dtype", str(dtype).replace("torch.", "")),
        ("timing", timer_desc),
        ("kernels", f"{bsr_mod.KERNEL_VERSION}, {nm_mod.KERNEL_VERSION}"),
    ]
    if smoke_cpu:
        header_items.insert(0, ("WARNING", "CPU smoke run under the Triton interpreter: timings are meaningless"))
    if not args.sweep_configs:
        header_items += [
            ("ratio", "dense F.linear ms / provider ms (> 1 = faster than dense)"),
            ("rel err", f"||y - F.linear(x.float(), W_masked.float())|| / ||ref||; WRONG above {args.tol:g}"),
        ]

    def save(rows, final: bool):
        rows = sorted(rows, key=lambda r: sort_key(args, r))
        table = sweep_table(rows, smoke_cpu) if args.sweep_configs else compare_table(rows, args.tol, smoke_cpu)
        if write:
            title = f"bench_linear{' --sweep-configs' if args.sweep_configs else ''}: {info['device']}"
            items = header_items + ([] if final else [("status", "INCOMPLETE (run still in progress or cut off)")])
            write_markdown(md_path, {"title": title, "items": items}, table)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(
                {"info": info, "command": command_line(), "date_utc": started.isoformat(), "dtype": str(dtype),
                 "timing": timer_desc, "complete": final, "rows": rows}, indent=1, default=str))
        return table

    last_save = [time.time()]

    def on_progress(row, rows):
        if args.sweep_configs:
            print(f"  {row['shape']} M={row['M']} {row['pattern']}: default {_fmt_ms(row['default_ms'])} "
                  f"({row['default_cfg']}), best {_fmt_ms(row['best_ms'])} ({row['best_cfg']}), "
                  f"dense {_fmt_ms(row['dense_ms'])}, tried {row['tried']}, failed {row['failed']}"
                  + (f" e.g. {row['failures'][0]}" if row["failures"] else ""), flush=True)
        else:
            err = "-" if row["rel_err"] is None else f"{row['rel_err']:.1e}"
            print(f"  {row['shape']} M={row['M']} {row['pattern']} {row['provider']}: {_fmt_ms(row['ms'])} ms "
                  f"{_fmt_ratio(row['ratio'])} err {err} [{row['status']}]", flush=True)
        # Rewrite the files now and then so a run cut off by a time limit still leaves its rows.
        if args.sweep_configs or time.time() - last_save[0] > 15:
            save(rows, final=False)
            last_save[0] = time.time()

    ctxmgr = runtime.force_triton() if smoke_cpu else contextlib.nullcontext()
    t0 = time.time()
    with ctxmgr:
        rows = (run_sweep if args.sweep_configs else run_compare)(args, ctx, timer, on_progress)
    table = save(rows, final=True)
    print()
    print(table)
    print(f"\n[bench_linear] {len(rows)} rows in {time.time() - t0:.0f} s", flush=True)
    if not args.sweep_configs:
        wrong = [r for r in rows if r["status"] == "WRONG"]
        errors = [r for r in rows if r["status"].startswith("error")]
        print(f"[bench_linear] WRONG: {len(wrong)}, errors: {len(errors)}, "
              f"skipped: {sum(r['status'].startswith('skip') for r in rows)}", flush=True)
    if write:
        print(f"[bench_linear] wrote {md_path}", flush=True)
    if args.json:
        print(f"[bench_linear] wrote {args.json}", flush=True)
    if not args.sweep_configs and not args.no_plot and (write or args.plot):
        note = "(CPU smoke: meaningless)" if smoke_cpu else f"{info['device']} {str(dtype).replace('torch.', '')}"
        print(f"[bench_linear] {plot_speedup(rows, plot_path, note)}", flush=True)
    if not args.sweep_configs and any(r["status"] == "WRONG" and r["provider"].startswith("sparsify") for r in rows):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
