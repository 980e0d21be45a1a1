"""Why does our cuSPARSELt provider (`sparsify::cslt_linear`) cost ~1 ms a call on an H100 while
torch's semi-structured Linear reaches 0.96-1.47x of dense at M = 8192? Time the ways of calling
`torch._cslt_sparse_mm` side by side with dense and with torch's own wrapper, at the shapes of
issue 3's goals, so the next GPU session can pick the calling convention from numbers.

Variants (W: a 2:4-sparse [N, K] weight, x: [M, K]; all return x @ W^T):
  dense            F.linear(x, W)                                         cuBLAS
  torch-semi       F.linear(x, to_sparse_semi_structured(W))              torch's wrapper
  B-view           _cslt_sparse_mm(c, x.t()).t()                          no copy of x
  B-view-T         _cslt_sparse_mm(c, x.t(), transpose_result=True)       result already [M, N]
  B-contig         _cslt_sparse_mm(c, x.t().contiguous()).t()             what cslt_linear does now
  B-view+search    B-view with alg_id from _cslt_sparse_mm_search at this shape

Two times per variant: `gpu ms` (triton.testing.do_bench: CUDA events around many calls, the
device's time once the queue is full) and `wall ms` (perf_counter around 50 back-to-back calls
and one synchronize: what a caller waits, host overhead included). Ratios are dense / variant.

  python benchmarks/probe_cslt.py [--dtype float16] [--out FILE.md]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as H  # noqa: E402

SHAPES = [(16, 4096, 4096), (16, 4096, 14336), (2048, 4096, 4096), (8192, 4096, 4096),
          (8192, 4096, 14336), (32768, 4096, 11008)]


def two_four(n: int, k: int, dtype, device) -> torch.Tensor:
    """A random weight with the 2 largest of every 4 consecutive entries of a row kept."""
    w = torch.randn(n, k, dtype=dtype, device=device)
    groups = w.reshape(n, k // 4, 4)
    keep = groups.abs().topk(2, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return (groups * mask).reshape(n, k)


def wall_ms(fn, calls: int = 50) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3 / calls


def variants(x: torch.Tensor, w: torch.Tensor) -> dict:
    from torch.sparse import to_sparse_semi_structured

    c = torch._cslt_compress(w)
    out = {"dense": lambda: F.linear(x, w)}
    try:
        ws = to_sparse_semi_structured(w)
        out["torch-semi"] = lambda: F.linear(x, ws)
    except Exception as e:   # noqa: BLE001 - a provider that cannot run is reported, not fatal
        print(f"  torch-semi unavailable: {type(e).__name__}: {e}", file=sys.stderr)
    out["B-view"] = lambda: torch._cslt_sparse_mm(c, x.t()).t()
    out["B-view-T"] = lambda: torch._cslt_sparse_mm(c, x.t(), transpose_result=True)
    out["B-contig"] = lambda: torch._cslt_sparse_mm(c, x.t().contiguous()).t()
    try:
        alg = torch._cslt_sparse_mm_search(c, x.t())
        out[f"B-view+search(alg {alg})"] = lambda: torch._cslt_sparse_mm(c, x.t(), alg_id=alg).t()
    except Exception as e:   # noqa: BLE001
        print(f"  _cslt_sparse_mm_search failed: {type(e).__name__}: {e}", file=sys.stderr)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--out", help="also write the markdown table to this file")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("probe_cslt: needs a CUDA device (cuSPARSELt)", file=sys.stderr)
        return 2
    import triton.testing

    dtype = getattr(torch, args.dtype)
    dev = torch.device("cuda")
    torch.manual_seed(0)
    env = H.Environment(dev, [("dtype", args.dtype),
                              ("gpu ms", "triton.testing.do_bench(fn, warmup=25, rep=100), its default (mean)"),
                              ("wall ms", "perf_counter around 50 back-to-back calls and one synchronize"),
                              ("ratios", "dense / variant")])
    heads = ("M", "K->N", "variant", "gpu ms", "wall ms", "gpu ratio", "wall ratio", "rel err")
    rows = []
    print(H.markdown_table(heads, []), flush=True)
    for m, k, n in SHAPES:
        x = torch.randn(m, k, dtype=dtype, device=dev)
        w = two_four(n, k, dtype, dev)
        ref = F.linear(x.float(), w.float())
        base_gpu = base_wall = None
        for name, fn in variants(x, w).items():
            try:
                err = H.rel_err(fn(), ref)
                g = triton.testing.do_bench(fn, warmup=25, rep=100)
                wl = wall_ms(fn)
            except Exception as e:   # noqa: BLE001
                rows.append([m, f"{k}->{n}", name, f"failed: {H.short(e)}", "", "", "", ""])
                continue
            if name == "dense":
                base_gpu, base_wall = g, wl
            rows.append([m, f"{k}->{n}", name, f"{g:.4f}", f"{wl:.4f}", H.fmt_ratio(base_gpu and base_gpu / g),
                         H.fmt_ratio(base_wall and base_wall / wl), f"{err:.1e}"])
            print(H.markdown_row(rows[-1]), flush=True)
        del x, w, ref
        torch.cuda.empty_cache()
    table = H.markdown_table(heads, rows, "rllrrrrl")
    H.Results(args.out, f"cuSPARSELt calling conventions: {env.info['device']}", env).save(table)
    print(H.render(f"cuSPARSELt calling conventions: {env.info['device']}", env.items(), table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
