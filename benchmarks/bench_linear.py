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
goes on. Timing, results file and table come from benchmarks/harness.py; see benchmarks/README.md
for what the timings do and do not include.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import math
import sys
import time
import types
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as H  # noqa: E402
from harness import Provider  # noqa: E402

FULL_M = (1, 16, 128, 2048, 8192, 32768)
QUICK_M = (1, 16, 2048, 8192)
FULL_SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096))   # (K, N): in_features -> out_features
QUICK_SHAPES = ((4096, 4096), (4096, 14336))
DENSITIES = (0.5, 0.25, 0.1)
BLOCKS = (32, 64, 128)
# Unstructured weight densities: the high-sparsity range where a sparse GEMV can beat dense at small M.
UNSTRUCTURED_DENSITIES = (0.3, 0.1, 0.02)
SMOKE = dict(M=(1, 16), shapes=((128, 128),), densities=(0.5, 0.25), blocks=(32, 64), unstructured_densities=(0.1,))
KIND_PROVIDERS = {"nm": ("torch-2:4", "cslt", "sparsify-nm"), "bsr": ("torch-bsr", "sparsify-bsr"),
                  "unstructured": ("torch-csr", "sparsify-sell")}
PROVIDERS = ("dense",) + sum(KIND_PROVIDERS.values(), ())
TRANSPOSED = ("torch-bsr", "torch-csr")   # compute [N, K] @ [K, M]: their output is y^T
DTYPES = {"float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float32": torch.float32, "fp32": torch.float32}


def kernels():
    """The sparsify modules the providers call (the one import of the mask helpers, `criteria`)."""
    from sparsify.codegen import runtime
    from sparsify.codegen.kernels import bsr_linear, nm_linear, sell_linear
    from sparsify.passes.analysis import criteria
    return types.SimpleNamespace(runtime=runtime, bsr=bsr_linear, nm=nm_linear, sell=sell_linear, criteria=criteria)


def _shapes(s: str) -> tuple[tuple[int, int], ...]:
    """4096x4096,4096->14336 (also 4096:14336) -> ((4096, 4096), (4096, 14336))."""
    items = [v.strip().lower().replace("->", "x").replace(":", "x") for v in s.split(",") if v.strip()]
    return tuple((int(k), int(n)) for k, n in (v.split("x") for v in items))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"reduced grid: M in {QUICK_M}, shapes {QUICK_SHAPES}")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (M in {1,16}, K=N=128): code paths only; "
                   "on CPU under TRITON_INTERPRET=1 (re-executes itself), timings meaningless")
    p.add_argument("--M", type=H.ints, default=None, help="comma list of token counts, e.g. 1,16,2048")
    p.add_argument("--shapes", type=_shapes, default=None, help="comma list of KxN (in->out), e.g. 4096x14336")
    p.add_argument("--densities", type=H.floats, default=None, help=f"block densities (default {DENSITIES})")
    p.add_argument("--blocks", type=H.ints, default=None, help=f"BSR block sizes (default {BLOCKS})")
    p.add_argument("--unstructured-densities", type=H.floats, default=None,
                   help=f"weight densities for torch-csr, sparsify-sell (default {UNSTRUCTURED_DENSITIES})")
    p.add_argument("--providers", type=H.names_from(PROVIDERS), default=PROVIDERS,
                   help=f"comma list from {','.join(PROVIDERS)} (dense is always timed: it is the baseline)")
    p.add_argument("--dtype", default="float16", choices=sorted(DTYPES))
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warmup (ms)")
    p.add_argument("--rep", type=int, default=100, help="do_bench rep (ms)")
    p.add_argument("--cuda-timing", choices=("do_bench", "model"), default="do_bench",
                   help="do_bench (median, L2 flushed) or model (back-to-back calls, host launch cost included)")
    p.add_argument("--repeats", type=int, default=3, help="CPU timer: interleaved repeats, minimum kept")
    p.add_argument("--tol", type=float, default=2e-2, help="relative L2 error above which a row is WRONG")
    p.add_argument("--mem-limit-gb", type=float, default=40.0, help="skip (shape, M) estimated to need more")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="results markdown (default benchmarks/results/<device>.md, "
                   "<device>-sweep.md with --sweep-configs; a --smoke run writes only with --out)")
    p.add_argument("--json", default=None, help="also write the raw rows as JSON here")
    p.add_argument("--plot", default=None, help="speedup-vs-sparsity PNG (default next to the results file)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-write", action="store_true", help="print only, write no results file")
    g = p.add_argument_group("launch-config sweep (--sweep-configs)")
    g.add_argument("--sweep-configs", action="store_true", help="instead of the providers, time a grid of launch "
                   "configs of the sparsify kernels; best per (shape, M, pattern). Default shape 4096x4096")
    g.add_argument("--sweep-kernels", type=H.names_from(("bsr", "nm")), default=("bsr", "nm"), help="bsr,nm")
    g.add_argument("--sweep-block-m", type=H.ints, default=(16, 32, 64, 128),
                   help="BLOCK_M candidates; per M the two largest not above max(16, next_pow2(M)) are tried")
    g.add_argument("--sweep-warps", type=H.ints, default=None, help="num_warps (default bsr 2,4,8; nm 4,8)")
    g.add_argument("--sweep-stages", type=H.ints, default=None, help="num_stages (default bsr 1,2,3; nm 2,3,4)")
    g.add_argument("--sweep-block-n", type=H.ints, default=(32, 64, 128), help="nm BLOCK_N candidates")
    g.add_argument("--sweep-block-k", type=H.ints, default=(32, 64, 128), help="nm BLOCK_K candidates")
    g.add_argument("--sweep-warmup", type=int, default=10, help="do_bench warmup (ms) in the sweep")
    g.add_argument("--sweep-rep", type=int, default=40, help="do_bench rep (ms) in the sweep")
    args = p.parse_args(argv)
    full = dict(M=QUICK_M if args.quick else FULL_M, densities=DENSITIES, blocks=BLOCKS,
                shapes=((4096, 4096),) if args.sweep_configs else QUICK_SHAPES if args.quick else FULL_SHAPES,
                unstructured_densities=UNSTRUCTURED_DENSITIES)
    for name, default in full.items():
        setattr(args, name, getattr(args, name) or (SMOKE[name] if args.smoke else default))
    return args


# ---- Patterns and providers ------------------------------------------------------------------

def est_bytes(M: int, K: int, N: int, elsize: int, n_weight_copies: float) -> int:
    """Rough peak footprint of one (shape, M): x, x^T, x in fp32, a few outputs, the fp32 reference,
    and the dense + packed weights of every pattern of the shape."""
    return int(M * K * (2 * elsize + 4) + M * N * (3 * elsize + 8) + N * K * elsize * n_weight_copies)


def pattern_list(args, kinds=None):
    """[(label, kind, params, sparsity)] in table order, for the kinds some chosen provider runs."""
    kinds = kinds or [k for k, provs in KIND_PROVIDERS.items() if set(provs) & set(args.providers)]
    pats = [("2:4", "nm", (2, 4), 0.5)] if "nm" in kinds else []
    if "bsr" in kinds:
        pats += [(f"bsr-b{b}@{d:g}", "bsr", (b, d), 1.0 - d) for b in args.blocks for d in args.densities]
    if "unstructured" in kinds:
        pats += [(f"unstr@{d:g}", "unstructured", (d,), 1.0 - d) for d in args.unstructured_densities]
    return pats


def masked(k, kind: str, params, W: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    if kind == "nm":
        mask = k.criteria.nm_mask(scores, *params)
    elif kind == "unstructured":
        mask = k.criteria.unstructured_mask(scores, 1.0 - params[0], per_row=False)
    else:
        mask = k.criteria.block_mask(scores, *params)
    return (W * mask).contiguous()


class Skip(Exception):
    """A provider that cannot run on this machine."""


def setup(k, name: str, params, Wm: torch.Tensor):
    """(call(x, xT), note) of one provider on a masked weight; packing happens here, outside timing.
    The sparsify Triton calls take launch-config keywords too (the sweep's)."""
    N, K = Wm.shape
    cuda = Wm.device.type == "cuda"
    if name == "torch-2:4":
        if not cuda:
            raise Skip("needs CUDA")
        Ws = torch.sparse.to_sparse_semi_structured(Wm)
        return (lambda x, xT: F.linear(x, Ws)), type(Ws).__name__.replace("SparseSemiStructuredTensor", "semi-")
    if name == "cslt":
        if not k.nm.semi_structured_available(Wm.device if cuda else None):
            raise Skip("cuSPARSELt unavailable (needs CUDA sm_80+ and a cuSPARSELt build)")
        comp = k.nm.pack_cslt(Wm)
        return ((lambda x, xT: k.nm.cslt_linear(x, comp, N)),
                "sparsify::cslt_linear (torch re-plans cuSPARSELt every call)")
    if name == "sparsify-nm":
        pk = k.nm.pack_nm(Wm, *params)
        return (lambda x, xT, **cfg: k.nm.nm_linear_triton(x, pk.values, pk.meta, N, K, *params, **cfg)), ""
    if name in TRANSPOSED:   # torch's BSR / CSR matmul: [N, K] @ [K, M]
        Ws = Wm.to_sparse_bsr((params[0], params[0])) if name == "torch-bsr" else Wm.to_sparse_csr()
        return (lambda x, xT: Ws @ xT), "[N,K]@[K,M]"
    if name == "sparsify-bsr":
        pk = k.bsr.pack_bsr(Wm, params[0])
        return ((lambda x, xT, **cfg: k.bsr.bsr_linear_triton(x, pk.values, pk.row_ptr, pk.col_idx, N, **cfg)),
                f"nnzb={pk.nnzb}")
    pk = k.sell.pack_sell(Wm)   # sparsify-sell
    note = f"S{pk.slice_rows}, padding {100 * pk.padding_overhead:.1f}%, W {pk.nbytes / 2**20:.2f} MiB"
    return (lambda x, xT: k.sell.sell_linear_triton(x, pk.values, pk.cols, pk.slice_ptr, pk.perm, N, K,
                                                    pk.slice_rows)), note


def setup_pattern(k, args, pattern, W, scores):
    """(masked weight or None, [Provider]) for one pattern; a provider's fn is its call(x, xT)."""
    label, kind, params, sparsity = pattern
    chosen = [p for p in KIND_PROVIDERS[kind] if p in args.providers]
    try:
        Wm = masked(k, kind, params, W, scores)
    except Exception as e:  # noqa: BLE001 - the mask itself failed: every provider errors
        return None, [Provider(p, None, label, status="error: mask " + H.short(e)) for p in chosen]
    provs = []
    for name in chosen:
        prov = Provider(name, None, label, out=(lambda y: y.t()) if name in TRANSPOSED else None,
                        extra={"sparsity": sparsity})
        try:
            prov.fn, prov.note = setup(k, name, params, Wm)
        except Skip as e:
            prov.status = f"skip: {e}"
        except Exception as e:  # noqa: BLE001 - a provider that cannot even be set up is a table row
            prov.status = "error: setup " + H.short(e)
        provs.append(prov)
    return Wm, provs


def config_note(k, provider: str, params, M: int, N: int, K: int, dtype) -> str:
    """The launch config the sparsify kernel's heuristic picks (what a sweep would replace). The one
    place that reads the kernels' private heuristics (`_config_for`): they have no public form."""
    try:
        if provider == "sparsify-bsr":
            bm, w, s = k.bsr._config_for(M, params[0], dtype)
            return f"BM{bm} w{w} s{s}"
        if provider == "sparsify-nm":
            bm, bn, bk, w, s = k.nm._config_for(M, N, K, dtype)
            return f"{bm}x{bn}x{bk} w{w} s{s} {'permute-x' if k.nm._permute_x_for(bn, bk) else 'interleave'}"
        if provider == "sparsify-sell":
            bm, bk, w = k.sell._config_for(M, k.sell.DEFAULT_SLICE_ROWS)
            return f"BM{bm} BK{bk} w{w}"
    except Exception:  # noqa: BLE001 - a note only
        pass
    return ""


def inputs(args, device, dtype, K: int, N: int, Ms):
    """W [N, K], the mask scores and one x [M, K] per M: random normal, never zeros (do_bench
    flushes L2 before each call, so one buffer per M is enough)."""
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    W = (torch.randn(N, K, generator=gen) * K ** -0.5).to(device=device, dtype=dtype)
    scores = torch.rand(N, K, generator=gen).to(device)
    return W, scores, {M: torch.randn(M, K, generator=gen).to(device=device, dtype=dtype) for M in Ms}


def dense_provider(x, W) -> Provider:
    return Provider("dense", lambda: F.linear(x, W), baseline=True, extra={"sparsity": 0.0},
                    note="F.linear (cuBLAS)" if x.device.type == "cuda" else "F.linear")


# ---- The provider comparison -----------------------------------------------------------------

def run_compare(k, args, device, dtype, timer, table, on_rows):
    el = torch.empty((), dtype=dtype).element_size()
    pats = pattern_list(args)
    for (K, N) in args.shapes:
        case = dict(shape=f"{K}->{N}", K=K, N=N)
        Ms = []
        for M in args.M:
            need = est_bytes(M, K, N, el, 1 + 1.5 * len(pats))
            if need > args.mem_limit_gb * 2**30:
                print(f"[skip] {case['shape']} M={M}: ~{need / 2**30:.1f} GB > --mem-limit-gb {args.mem_limit_gb}")
                on_rows(table.add(H.run_case(dict(case, M=M), [Provider(
                    "all", pattern="-", status=f"skip: ~{need / 2**30:.0f} GB", extra={"sparsity": None})],
                    timer, args.tol)))
            else:
                Ms.append(M)
        if not Ms:
            continue
        W, scores, xs = inputs(args, device, dtype, K, N, Ms)
        built = [(pat, *setup_pattern(k, args, pat, W, scores)) for pat in pats]   # packed once per shape
        for M in Ms:
            x = xs[M]
            xT = x.t().contiguous() if set(TRANSPOSED) & set(args.providers) else None
            provs = [dense_provider(x, W)]
            for (_, _, params, _), Wm, specs in built:
                ref = None if Wm is None else (lambda Wm=Wm: F.linear(x.float(), Wm.float()))
                for p in specs:
                    note = "; ".join(v for v in (p.note, config_note(k, p.name, params, M, N, K, dtype)) if v)
                    provs.append(dataclasses.replace(p, fn=p.fn and functools.partial(p.fn, x, xT), ref=ref, note=note))
            on_rows(table.add(H.run_case(dict(case, M=M), provs, timer, args.tol)))
            del provs, xT
        del W, scores, xs, built
        if device.type == "cuda":
            torch.cuda.empty_cache()


# ---- Launch-config sweep of the sparsify kernels ---------------------------------------------

def sweep_grid(args, kernel: str, M: int) -> list[dict]:
    """Per M only the two largest BLOCK_M candidates not above max(16, next_pow2(M)): a taller tile
    only wastes work, a much shorter one only re-reads W more often."""
    warps = args.sweep_warps or ((2, 4, 8) if kernel == "bsr" else (4, 8))
    stages = args.sweep_stages or ((1, 2, 3) if kernel == "bsr" else (2, 3, 4))
    cap = max(16, 1 << max(0, (M - 1).bit_length()))   # max(16, next_pow2(M))
    bms = sorted(b for b in args.sweep_block_m if b <= cap)[-2:] or sorted(args.sweep_block_m)[:1]
    tiles = [{}] if kernel == "bsr" else [dict(block_n=bn, block_k=bk) for bn in args.sweep_block_n
                                          for bk in args.sweep_block_k]
    return [dict(block_m=bm, **t, num_warps=w, num_stages=s) for bm in bms for t in tiles for w in warps
            for s in stages]


def _cfg_str(cfg: dict) -> str:
    keys = (("block_m", "BM"), ("block_n", "BN"), ("block_k", "BK"), ("num_warps", "w"), ("num_stages", "s"))
    return " ".join(f"{short}{cfg[k]}" for k, short in keys if k in cfg)


def sweep_row(case: dict, label: str, kind: str, default_cfg: str, rows: list[dict]) -> dict:
    """One (shape, M, pattern) of the sweep from its case rows: dense, default, then the grid."""
    dense_ms, default, tuned = rows[0]["ms"], rows[1], rows[2:]
    best = sorted((r["ms"], r["provider"]) for r in tuned if r["ms"] is not None)
    failures = [f"{r['provider']}: " + (f"WRONG {r['rel_err']:.2g}" if r["status"] == "WRONG" else r["status"][:67])
                for r in rows[1:] if r["ms"] is None]
    b_ms, b_cfg = best[0] if best else (None, None)
    return dict(case, pattern=label, kernel=kind, default_cfg=default_cfg, default_ms=default["ms"],
                best_cfg=b_cfg, best_ms=b_ms, gain=(default["ms"] / b_ms) if (b_ms and default["ms"]) else None,
                dense_ms=dense_ms, vs_dense=(dense_ms / b_ms) if (b_ms and dense_ms) else None,
                tried=sum(r["ms"] is not None for r in rows[1:]), failed=len(failures),
                top3=[f"{nm} {ms:.4f}" for ms, nm in best[:3]], failures=failures[:5])


def run_sweep(k, args, device, dtype, timer, table, on_rows):
    pats = pattern_list(args, kinds=[kd for kd in ("nm", "bsr") if kd in args.sweep_kernels])
    for (K, N) in args.shapes:
        case = dict(shape=f"{K}->{N}", K=K, N=N)
        W, scores, xs = inputs(args, device, dtype, K, N, args.M)
        calls = []
        for label, kind, params, _ in pats:
            Wm = masked(k, kind, params, W, scores)
            calls.append((label, kind, params, Wm, setup(k, "sparsify-" + kind, params, Wm)[0]))
        for M in args.M:
            x = xs[M]
            for label, kind, params, Wm, call in calls:
                ref = (lambda Wm=Wm: F.linear(x.float(), Wm.float()))
                provs = [dense_provider(x, W)] + [
                    Provider(_cfg_str(cfg) if cfg else "default", functools.partial(call, x, None, **(cfg or {})),
                             label, ref=ref) for cfg in [None] + sweep_grid(args, kind, M)]
                case_rows = H.run_case(dict(case, M=M), provs, timer, args.tol, time_wrong=False)
                default = config_note(k, "sparsify-" + kind, params, M, N, K, dtype)
                on_rows(table.add([sweep_row(dict(case, M=M), label, kind, default, case_rows)]))
        del W, scores, xs, calls
        if device.type == "cuda":
            torch.cuda.empty_cache()


class SweepTable(H.ProviderTable):
    """The sweep's rows (one per shape, M, pattern) and their table."""

    def line(self, r: dict) -> str:
        return (f"  {r['shape']} M={r['M']} {r['pattern']}: default {H.fmt_ms(r['default_ms'])} ({r['default_cfg']}), "
                f"best {H.fmt_ms(r['best_ms'])} ({r['best_cfg']}), dense {H.fmt_ms(r['dense_ms'])}, "
                f"tried {r['tried']}, failed {r['failed']}" + (f" e.g. {r['failures'][0]}" if r["failures"] else ""))

    def markdown(self) -> str:
        ms = self.ms_head
        heads = ["shape (K->N)", "M", "pattern", "default cfg", f"default {ms}", "best cfg", f"best {ms}",
                 "best/default", "dense ms", "best vs dense", "tried/failed", "next best"]
        return H.markdown_table(heads, ([r["shape"], r["M"], r["pattern"], r["default_cfg"], H.fmt_ms(r["default_ms"]),
                                         r["best_cfg"] or "-", H.fmt_ms(r["best_ms"]), H.fmt_ratio(r["gain"]),
                                         H.fmt_ms(r["dense_ms"]), H.fmt_ratio(r["vs_dense"]),
                                         f"{r['tried']}/{r['failed']}", "; ".join(r["top3"][1:])] for r in self.rows),
                                "lrllrlrrrrll")


# ---- Main ------------------------------------------------------------------------------------

def plot(rows, path: Path, note: str) -> str:
    """Speedup vs sparsity at 4096->4096 (else the first shape), the M closest to 2048."""
    timed = [r for r in rows if r.get("ratio") is not None and not r["baseline"]]
    if timed:
        shape = "4096->4096" if any(r["shape"] == "4096->4096" for r in timed) else timed[0]["shape"]
        M = min({r["M"] for r in timed if r["shape"] == shape}, key=lambda m: abs(math.log2(m) - 11))
        timed, note = [r for r in timed if r["shape"] == shape and r["M"] == M], f"{shape}, M={M} {note}"

    def label(r):
        pat = r["pattern"]
        if pat.startswith("bsr-b"):
            return f"{r['provider']} b{pat[5:].split('@')[0]}"
        return f"{r['provider']} ({'unstructured' if pat.startswith('unstr@') else pat})"
    return H.plot_speedup(timed, path, note.strip(), label, "speedup vs dense F.linear (>1 = faster)")


def main(argv=None) -> int:
    args = parse_args(argv)
    device = H.pick_device("bench_linear", args.device, args.smoke, cpu_needs_smoke=True)
    if device is None:
        return 2
    dtype, sweep = DTYPES[args.dtype], args.sweep_configs
    warnings.filterwarnings("ignore", message=".*Sparse BSR tensor support is in beta.*")
    warnings.filterwarnings("ignore", message=".*semi-structured sparsity support is in prototype.*")

    import_mode = H.import_sparsify()
    k = kernels()
    timer = H.Timer(device, args.cuda_timing, args.sweep_warmup if sweep else args.warmup,
                    args.sweep_rep if sweep else args.rep, args.repeats)
    versions = ", ".join(m.KERNEL_VERSION for m in (k.bsr, k.nm, k.sell))
    env = H.Environment(device, [("dtype", str(dtype).replace("torch.", "")), ("timing", timer.description),
                                 ("kernels", versions)])
    if not sweep:
        env.add("ratio", "dense F.linear ms / provider ms (> 1 = faster than dense)")
        env.add("rel err", f"||y - F.linear(x.float(), W_masked.float())|| / ||ref||; WRONG above {args.tol:g}")
    print(f"[bench_linear] {env.banner()}\n[bench_linear] sparsify import: {import_mode}\n"
          f"[bench_linear] timing: {timer.description}", flush=True)

    md_path = H.results_path(device, "-sweep" if sweep else "", args.out, args.smoke, args.no_write)
    plot_path = Path(args.plot) if args.plot else md_path and md_path.with_name(md_path.stem + "-speedup.png")
    title = f"bench_linear{' --sweep-configs' if sweep else ''}: {env.info['device']}"
    results = H.Results(md_path, title, env, args.json, every_s=0 if sweep else 15)
    table = (SweepTable if sweep else H.ProviderTable)([("shape (K->N)", "shape"), ("M", "M")], args.tol, timer.ms_head)
    t0 = time.time()

    def on_rows(new):
        print("\n".join(table.line(r) for r in new) + (f"\n    ({time.time() - t0:.0f} s elapsed)" if sweep else ""),
              flush=True)
        results.progress(table.markdown, table.rows)   # a run cut off by a time limit still leaves its rows

    with k.runtime.force_triton() if device.type == "cpu" else contextlib.nullcontext():
        (run_sweep if sweep else run_compare)(k, args, device, dtype, timer, table, on_rows)
    results.finish("bench_linear", table.markdown(), table.rows, f"{len(table.rows)} rows in {time.time() - t0:.0f} s"
                   + ("" if sweep else f"; {table.summary()}"))
    if not sweep and not args.no_plot and plot_path:
        note = "(CPU smoke: meaningless)" if timer.meaningless else f"{env.info['device']} {env.extra[0][1]}"
        print(f"[bench_linear] {plot(table.rows, plot_path, note)}", flush=True)
    return 1 if any(r["status"] == "WRONG" and r["provider"].startswith("sparsify") for r in table.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
