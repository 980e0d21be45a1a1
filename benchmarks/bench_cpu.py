#!/usr/bin/env python
"""Sparse layers and whole models on the CPU: dense torch, torch's own CSR, and sparsify's CPU kernels.

    python benchmarks/bench_cpu.py                    # per layer + the demo LM end to end
    python benchmarks/bench_cpu.py --quick            # fewer shapes and token counts
    python benchmarks/bench_cpu.py --dtypes bfloat16  # bf16 activations and weights
    python benchmarks/bench_cpu.py --smoke --no-write # tiny: exercises every provider

Per layer, y = x @ W^T with x [M, K], W [N, K] (nn.Linear), random normal weights and inputs,
masks from sparsify's criteria (magnitude over the layer, or whole blocks). Providers, timed
interleaved in one run (ratios of minima):

    dense         F.linear(x, W, b)                                   (MKL sgemm)
    torch-csr     (W_csr @ x^T)^T + b, W_csr = W.to_sparse_csr()       (torch's CSR path as a user writes it)
    sparsify-csr  sparsify::csr_linear, token-major in and out         (MKL CSR, bias in the multiply, int32)
    sparsify-csr-fm  sparsify::csr_linear on x^T, layout "feature"     (inside a chain of sparse layers)
    sparsify-cpu  sparsify::csr_cpu_linear, token-major in and out     (the generated CPU kernel; a lone layer)
    sparsify-cpu-fm  sparsify::csr_cpu_linear, layout "feature"        (the generated kernel inside a chain)
    sparsify-jit  sparsify::csr_jit_cpu_linear, token-major in and out (the pattern emitted as AVX-512 code)
    sparsify-jit-fm  sparsify::csr_jit_cpu_linear, layout "feature"
    sparsify-bsr-blocks  sparsify::bsr_blocks_linear                   (block patterns: a dense product per block)

Composite cases (fp32, 90% unstructured, BERT-base sizes), what the lower passes make of a graph:
    q|k|v         three 768->768 layers on one x: three calls, and one over the stacked rows (stack_siblings)
    FFN           768->3072, GELU, 3072->768 + residual: two csr_jit_cpu ops, and one csr_jit_cpu_pair
                  (fuse_pairs); "-cold" rows cycle six such FFNs (more weights than the L3 holds), as
                  a model's layers run
    attention     12 heads x 128 tokens x 64, additive mask: torch's scaled_dot_product_attention
                  (the baseline) and the generated attention_cpu (lower_attention), per batch M / 128

bf16 (--dtypes bfloat16): dense is F.linear in bf16 (oneDNN), ours stores bf16 and accumulates in
fp32; torch's CSR matmul has no bf16 CPU kernel (its rows say so).

Whole model: the built-in demo LM (sparsify.models.tiny_lm, 64-block FFN pruning at 90%), compiled
by sparsify.compile with Auto from a fresh cost cache, against the dense model, interleaved rounds.
Every output is checked against float32 F.linear on the masked weight (WRONG above --tol).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import harness as H  # noqa: E402

H.import_sparsify()

MS = (1, 16, 128, 512, 2048)
# (K, N, token counts): BERT-base's FFN and attention projections, a 7B model's square projection
# at prefill and its FFN up-projection at decode, the demo LM's FFN
SHAPES = ((768, 3072, MS), (3072, 768, MS), (768, 768, (1, 128, 2048)), (4096, 4096, (2048,)),
          (4096, 11008, (1, 16)), (256, 1024, (1, 128, 512)))
QUICK_SHAPES = ((768, 3072, (1, 128, 512)), (3072, 768, (128, 512)))
SPARSITIES = (0.5, 0.75, 0.9, 0.95)
BLOCKS = ((32, 0.25), (64, 0.1))                                  # (block, density)
MKL_MAX_M = 512
STACKED_MS = (1, 16, 128, 2048)
BF16_TOL = 1e-2   # bf16 inputs and outputs: ~3e-3 rounding against the float32 reference
SMOKE = dict(shapes=((64, 96, (1, 5)),), sparsities=(0.9,), blocks=((32, 0.5),))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--smoke", action="store_true", help="tiny shapes; checks code paths, times mean little")
    p.add_argument("--M", type=H.ints, default=None)
    p.add_argument("--sparsities", type=H.floats, default=None)
    p.add_argument("--dtypes", type=H.names_from(("float32", "bfloat16")), default=("float32",))
    p.add_argument("--no-model", action="store_true", help="per layer only")
    p.add_argument("--only-stacked", action="store_true", help="only the composite cases (q|k|v, FFN, attention)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--tol", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="results markdown (default benchmarks/results/<device>-cpu.md)")
    p.add_argument("--no-write", action="store_true")
    return p.parse_args(argv)


def _csr_parts(w):
    from sparsify.codegen.kernels.csr_linear import csr_parts, pack_csr

    crow, col, values = csr_parts(pack_csr(w))
    return crow.int(), col.int(), values


def layer_providers(x, w_masked, b, pattern: str, block: int | None):
    """The providers of one (shape, M, pattern) case, all on the same masked weight."""
    from sparsify.codegen.kernels.bsr_linear import pack_bsr

    n, k = w_masked.shape
    ref = lambda: F.linear(x.float(), w_masked.float(), b.float())  # noqa: E731
    w_dense = w_masked.clone()
    out = [H.Provider("dense", lambda: F.linear(x, w_dense, b), "dense", ref=ref, baseline=True)]
    if block is None:
        wc = w_masked.to_sparse_csr()
        crow, col, values = _csr_parts(w_masked)
        xt = x.t().contiguous()
        cpu = torch.ops.sparsify.csr_cpu_linear
        out += [
            H.Provider("sparsify-cpu", lambda: cpu(x, crow, col, values, n, k, bias=b), pattern, ref=ref),
            H.Provider("sparsify-cpu-fm", lambda: cpu(xt, crow, col, values, n, k, "feature", bias=b), pattern,
                       ref=ref, out=lambda y: y.t(), note="x^T given, y^T returned (inside a chain)"),
        ]
        from sparsify.codegen import cpu_exec

        jit, why = torch.ops.sparsify.csr_jit_cpu_linear, cpu_exec.unsupported()
        out += [
            H.Provider("sparsify-jit", None if why else lambda: jit(x, crow, col, values, n, k, bias=b), pattern,
                       ref=ref, status=f"skip: {why}" if why else "ok"),
            H.Provider("sparsify-jit-fm", None if why else lambda: jit(xt, crow, col, values, n, k, "feature", bias=b),
                       pattern, ref=ref, out=lambda y: y.t(), note="x^T given, y^T returned (inside a chain)",
                       status=f"skip: {why}" if why else "ok"),
        ]
        if x.dtype != torch.float32:    # torch's CSR matmul and csr_linear have no bf16 CPU kernel
            return out
        if x.shape[0] > MKL_MAX_M and k * n >= 768 * 3072:
            why = (f"skip: MKL's CSR takes seconds a call at M > {MKL_MAX_M} on this shape (1.5 s at "
                   f"3072->768, M=2048, 50%); its rows at M <= {MKL_MAX_M} show the trend")
            return out + [H.Provider(name, None, pattern, status=why) for name in
                          ("torch-csr", "sparsify-csr", "sparsify-csr-fm")]
        out += [
            H.Provider("torch-csr", lambda: (wc @ x.t()).t() + b, pattern, ref=ref),
            H.Provider("sparsify-csr", lambda: torch.ops.sparsify.csr_linear(x, crow, col, values, n, k, bias=b),
                       pattern, ref=ref),
            H.Provider("sparsify-csr-fm", lambda: torch.ops.sparsify.csr_linear(xt, crow, col, values, n, k,
                                                                                 "feature", bias=b),
                       pattern, ref=ref, out=lambda y: y.t(), note="x^T given, y^T returned (inside a chain)"),
        ]
    else:
        pk = pack_bsr(w_masked, block)
        out.append(H.Provider("sparsify-bsr-blocks",
                              lambda: torch.ops.sparsify.bsr_blocks_linear(x, pk.values, pk.row_ptr, pk.col_idx, n, b),
                              pattern, ref=ref, note=f"{pk.nnzb} blocks of {block}"))
    return out


def run_layers(args, timer, table, results):
    gen = torch.Generator().manual_seed(args.seed)
    shapes = SMOKE["shapes"] if args.smoke else (QUICK_SHAPES if args.quick else SHAPES)
    sparsities = args.sparsities or (SMOKE["sparsities"] if args.smoke else SPARSITIES)
    blocks = SMOKE["blocks"] if args.smoke else BLOCKS
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for k, n, shape_ms in () if args.only_stacked else shapes:
            _run_shape(args, timer, table, results, gen, k, n, args.M or shape_ms, dtype, sparsities, blocks)
    for m in args.M or ((5,) if args.smoke else STACKED_MS):
        _run_stacked(args, timer, table, results, gen, 48 if args.smoke else 768, m)
    for m in args.M or ((5,) if args.smoke else STACKED_MS):
        _run_ffn(args, timer, table, results, gen, (48, 96) if args.smoke else (768, 3072), m)
    for m in args.M or ((32,) if args.smoke else (128, 2048)):
        _run_attention(args, timer, table, results, gen, (2, 32) if args.smoke else (12, 64), m)


def _sparse(n, k, gen, sparsity=0.9):
    from sparsify.passes.analysis import criteria

    w = torch.randn(n, k, generator=gen) / k ** 0.5
    w = w * criteria.unstructured_mask(w.abs(), sparsity, per_row=False)
    crow, col, values = _csr_parts(w)
    return w, torch.randn(n, generator=gen), crow, col, values.contiguous()


def _run_ffn(args, timer, table, results, gen, dims, m):
    """An FFN (d -> h, GELU, h -> d + residual, 90%): dense, two csr_jit_cpu ops, one csr_jit_cpu_pair;
    hot (the same FFN called again) and cold (six FFNs cycled: their weights stream from memory)."""
    from sparsify.codegen.kernels import csr_jit_cpu

    if csr_jit_cpu._supports(None, torch.float32, ()) is not None:
        print(f"FFN case skipped: {csr_jit_cpu._supports(None, torch.float32, ())}", flush=True)
        return
    d, h = dims
    ffns = [(_sparse(h, d, gen), _sparse(d, h, gen)) for _ in range(1 if args.smoke else 6)]
    x, res = torch.randn(1, m, d, generator=gen), torch.randn(1, m, d, generator=gen)
    jit, pair = torch.ops.sparsify.csr_jit_cpu_linear, torch.ops.sparsify.csr_jit_cpu_pair

    def dense(f):
        (w1, b1, *_), (w2, b2, *_) = f
        return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2) + res

    def two(f):
        (_, b1, c1, i1, v1), (_, b2, c2, i2, v2) = f
        return jit(jit(x, c1, i1, v1, h, d, "row", b1, None, "gelu"), c2, i2, v2, d, h, "row", b2, res)

    def one(f):
        (_, b1, c1, i1, v1), (_, b2, c2, i2, v2) = f
        return pair(x, c1, i1, v1, h, b1, "gelu", c2, i2, v2, d, d, b2, res, "none", None)

    for cold in (False, True):
        chosen = ffns if cold else ffns[:1]
        ref = lambda: dense(ffns[-1] if cold else ffns[0])  # noqa: E731
        cycle = lambda fn: (lambda: [fn(f) for f in chosen][-1])  # noqa: E731
        providers = [
            H.Provider("dense", cycle(dense), "dense", ref=ref, baseline=True, note=f"{len(chosen)} FFN(s) a call"),
            H.Provider("sparsify-jit x2", cycle(two), "unstructured 0.9", ref=ref, note="two ops"),
            H.Provider("sparsify-jit pair", cycle(one), "unstructured 0.9", ref=ref, note="one op (fuse_pairs)"),
        ]
        rows = H.run_case({"shape": f"{d}->{h}->{d} (FFN{'-cold' if cold else ''})", "M": m, "dtype": "float32"},
                          providers, timer, args.tol)
        for row in table.add(rows):
            print(table.line(row), flush=True)
        results.progress(table.markdown, table.rows)


def _run_attention(args, timer, table, results, gen, heads_dim, m):
    """Attention of M / 128 sequences of 128 tokens (fewer for --smoke) from a packed q|k|v projection,
    with an additive mask: torch's scaled_dot_product_attention and attention_cpu."""
    from sparsify.codegen.kernels import attention_cpu

    if attention_cpu.unsupported() is not None:
        print(f"attention case skipped: {attention_cpu.unsupported()}", flush=True)
        return
    heads, dim = heads_dim
    seq = min(m, 128)
    b = max(1, m // seq)
    qkv = torch.randn(b, seq, 3 * heads * dim, generator=gen)
    q, k, v = (t.view(b, seq, heads, dim).transpose(1, 2) for t in qkv.split(heads * dim, -1))
    mask = torch.zeros(b, 1, 1, seq)
    mask[0, ..., -seq // 8:] = torch.finfo(torch.float32).min          # padding in one sequence
    ref = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # noqa: E731
    providers = [
        H.Provider("torch sdpa", ref, "dense", ref=ref, baseline=True, note="torch's CPU attention"),
        H.Provider("sparsify-attention", lambda: attention_cpu.attention_cpu_host(q, k, v, mask), "dense", ref=ref,
                   note="generated kernel (lower_attention)"),
    ]
    rows = H.run_case({"shape": f"attention {b}x{heads}x{seq}x{dim}", "M": b * seq, "dtype": "float32"}, providers,
                      timer, args.tol)
    for row in table.add(rows):
        print(table.line(row), flush=True)
    results.progress(table.markdown, table.rows)


def _run_stacked(args, timer, table, results, gen, d, m):
    """Attention's q, k, v (three d->d layers on one x, 90% unstructured): three dense F.linear, three
    csr_cpu calls, and one csr_cpu call over the stacked rows (what passes/rewrite/stack_siblings.py
    makes of them); the three outputs are checked as one [M, 3d] tensor."""
    from sparsify.codegen.kernels.csr_linear import stack_csr
    from sparsify.passes.analysis import criteria

    x = torch.randn(1, m, d, generator=gen)
    parts, ws, bs = [], [], []
    for _ in range(3):
        w = torch.randn(d, d, generator=gen) / d ** 0.5
        w = w * criteria.unstructured_mask(w.abs(), 0.9, per_row=False)
        b = torch.randn(d, generator=gen)
        crow, col, values = _csr_parts(w)
        parts.append({"crow": crow, "col": col, "values": values.contiguous(), "bias": b, "n_out": d})
        ws.append(w)
        bs.append(b)
    s = stack_csr(parts)
    cpu = torch.ops.sparsify.csr_cpu_linear
    ref = lambda: torch.cat([F.linear(x, w, b) for w, b in zip(ws, bs)], -1)  # noqa: E731
    providers = [
        H.Provider("dense", ref, "dense", ref=ref, baseline=True, note="three F.linear"),
        H.Provider("sparsify-cpu x3", lambda: [cpu(x, p["crow"], p["col"], p["values"], d, d, bias=p["bias"])
                                               for p in parts], "unstructured 0.9", ref=ref,
                   out=lambda ys: torch.cat(ys, -1), note="three calls, each packing x"),
        H.Provider("sparsify-cpu stacked", lambda: cpu(x, s["crow"], s["col"], s["values"], 3 * d, d, bias=s["bias"]),
                   "unstructured 0.9", ref=ref, note="one call over the stacked rows (stack_siblings)"),
    ]
    if hasattr(torch.ops.sparsify, "csr_jit_cpu_linear"):
        from sparsify.codegen.kernels import csr_jit_cpu

        if csr_jit_cpu._supports(None, torch.float32, ()) is None:
            jit = torch.ops.sparsify.csr_jit_cpu_linear
            providers.append(H.Provider("sparsify-jit stacked", lambda: jit(x, s["crow"], s["col"], s["values"], 3 * d,
                                                                             d, bias=s["bias"]),
                                        "unstructured 0.9", ref=ref, note="emitted code, one call over the stacked rows"))
    rows = H.run_case({"shape": f"{d}->3x{d} (q|k|v)", "M": m, "dtype": "float32"}, providers, timer, args.tol)
    for row in table.add(rows):
        print(table.line(row), flush=True)
    results.progress(table.markdown, table.rows)


def _run_shape(args, timer, table, results, gen, k, n, ms, dtype, sparsities, blocks):
    from sparsify.passes.analysis import criteria

    w = torch.randn(n, k, generator=gen) / k ** 0.5
    b = torch.randn(n, generator=gen)
    scores = w.abs()
    cases = [(f"unstructured {s:g}", w * criteria.unstructured_mask(scores, s, per_row=False), None)
             for s in sparsities]
    if dtype == torch.float32:
        cases += [(f"block{bl} d={d:g}", w * criteria.block_mask(scores, bl, d), bl) for bl, d in blocks]
    for m in ms:
        x = torch.randn(m, k, generator=gen).to(dtype)
        for pattern, wm, block in cases:
            rows = H.run_case({"shape": f"{k}->{n}", "M": m, "dtype": str(dtype).removeprefix("torch.")},
                              layer_providers(x, wm.to(dtype), b.to(dtype), pattern, block), timer,
                              args.tol if dtype == torch.float32 else BF16_TOL)
            for row in table.add(rows):
                print(table.line(row), flush=True)
            results.progress(table.markdown, table.rows)


def run_model(args, device):
    """The demo LM: dense vs sparsify.compile(Auto), cold cost cache, interleaved rounds."""
    import os

    import sparsify
    from sparsify.models import lm_inputs, tiny_lm
    from sparsify.timing import compare_rounds

    os.environ["SPARSIFY_CACHE_DIR"] = tempfile.mkdtemp(prefix="sparsify-cost-")
    batch, seq = (1, 16) if args.smoke else (4, 128)
    model = tiny_lm(ffn_sparsity=0.9, **({"d": 64, "ffn": 256, "heads": 2} if args.smoke else {}))
    x = lm_inputs(batch, seq, vocab=512)
    calib = [lm_inputs(batch, seq, seed=s) for s in (1, 2)]
    sm = sparsify.compile(model, (x,), sparsify.Config(), calibration_data=calib, progress=False)
    dense, compiled = compare_rounds([lambda: model(x), lambda: sm(x)], device, max(1, args.repeats // 4))
    with torch.no_grad():
        err = float((sm(x) - model(x)).norm() / model(x).norm())
    changed = ", ".join(f"{lp.fqn} ({lp.kernel} {lp.speedup:.2f}x)" for lp in sm.plan.sparse_layers()) or "none"
    return [["demo LM", f"{batch}x{seq}", H.fmt_ms(dense.ms), H.fmt_ms(compiled.ms), H.fmt_ratio(compiled.ratio),
             f"{err:.1e}", changed]]


def main(argv=None) -> int:
    from sparsify.codegen import registry

    registry.specs()   # imports every kernel file: their ops exist from here on
    args = parse_args(argv)
    device = torch.device("cpu")
    timer = H.Timer(device, repeats=args.repeats)
    env = H.Environment(device, [("timing", timer.description),
                                 ("reference", f"float32 F.linear on the masked weight; WRONG above {args.tol:g} "
                                               f"(bf16: {BF16_TOL:g})")])
    path = H.results_path(device, "-cpu", args.out, smoke=args.smoke, no_write=args.no_write)
    results = H.Results(path, f"bench_cpu: {env.info['device']}", env)
    print(env.banner(), flush=True)
    table = H.ProviderTable((("shape (K->N)", "shape"), ("M", "M"), ("dtype", "dtype")), args.tol)
    run_layers(args, timer, table, results)
    body = table.markdown()
    if not args.no_model:
        rows = run_model(args, device)
        body += "\n\nWhole model (sparsify.compile, Auto, fresh cost cache; dense and compiled interleaved rounds):\n\n"
        body += H.markdown_table(("model", "batch x seq", "dense ms", "compiled ms", "speedup", "rel err",
                                  "sparse sites"), rows, "llrrrll")
    results.finish("bench_cpu", body, table.rows, table.summary())
    return 1 if table.counts()["WRONG"] else 0


if __name__ == "__main__":
    sys.exit(main())
