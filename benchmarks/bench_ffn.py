#!/usr/bin/env python
"""Activation-sparse FFN blocks on the CPU: dense torch, torch gathers of the active rows, sparsify's kernel.

    python benchmarks/bench_ffn.py                    # Llama-2-7B's FFN (4096 -> 11008 -> 4096), batch 1, 4, 16
    python benchmarks/bench_ffn.py --smoke --no-write # tiny: exercises every provider
    python benchmarks/bench_ffn.py --gpu              # on a CUDA device: ffn_triton, fp16 (see below)
    python benchmarks/bench_ffn.py --gpu --smoke --no-write   # the GPU cases, tiny, Triton interpreter

Weights are random normal (fp32, stored as nn.Linear has them; w_down_t, the down weight
transposed, for the gathers and ours). The zero rate after the activation is set by the up bias:
per hidden unit, minus the `zeros` quantile of its pre-activation on 256 calibration tokens, so each
unit is zero with that probability on fresh tokens (as a ReLU model's units are; their real zero
rate on the measured tokens is in the table). Cases, each timed interleaved in one run:

    down        the down projection alone, given h (ReLU output): dense F.linear(h, W_down);
                torch gather h[:, idx] @ w_down_t[idx] over the union of active units (idx found by
                nonzero); embedding_bag (sum, per-sample weights: one bag per token); ours
                (sparse_input_linear_cpu: the FFN kernel's second phase)
    relu        the whole ReLU block: dense; torch gather (dense up, relu, gathered down); ours
                ExactZeros (lossless) and, on tokens from a 32-dimensional subspace (what makes a
                low-rank predictor work, as in contextually sparse LLM activations), ours with a
                PredictedActive(rank 64, recall 0.99) predictor calibrated on 256 such tokens
    model       the demo's ReLU LM at one token (sparsify.models.relu_lm), dense vs compiled
    swiglu      the gated block (SiLU gate): dense; torch gather (dense gate, per-block threshold
                on |silu(gate)| calibrated to `zeros`, gathered up and down rows); ours with that
                threshold, and ours with statistical top-k (TopK(fraction=1 - zeros): a cut per
                token from the mean and std of |silu(gate)|, its coefficient calibrated)

--gpu: Llama-3-8B's FFN (4096, 14336) and Llama-2-7B's (4096, 11008) in fp16, batch 1, 2, 4, 8, 16 and
prefill 512, activation sparsity 0 / 25 / 40 / 50 / 70 / 90% (a per-block threshold on |silu(gate)|):
the whole SwiGLU block (dense, torch gather of the kept rows, ffn_triton), timed by triton's
do_bench. Not yet run: no GPU was lent when it was written.

Every output is checked against a float32 torch reference of the same computation (WRONG above
--tol); a lossy provider's error against the dense block is in its note.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import harness as H  # noqa: E402

H.import_sparsify()

SHAPE = (4096, 11008)
BATCHES = (1, 4, 16)
ZEROS = (0.5, 0.9, 0.97)
SMOKE = dict(shape=(64, 176), batches=(1, 3), zeros=(0.9,))
CALIB_TOKENS = 256
NOTES = """Notes: "union active" is the share of hidden units some token of the batch keeps: what the
kernel reads (one pass over the kept rows serves every token), so at batch 16 with independent
random tokens most units are active and the gain shrinks to what the kernel's own dense part gives.
Part of every sparsify-cpu ratio is that part: its up (gate) GEMV streams the weight rows at close
to the memory bandwidth, where torch's F.linear at M = 1..16 does not (this is why the ReLU block at
50% zeros, union 100% at batch 16, is still above 1x). The PredictedActive rows use tokens from a
32-dimensional subspace (plus noise), where a rank-64 predictor finds the active units (contextual
sparsity); on unstructured random tokens a low-rank predictor cannot, and the chooser would find it
too inaccurate. The SwiGLU thresholds are on random weights, whose gate activations are not
heavy-tailed as trained LLMs' are: the error vs dense is large here; the speed is what this table
shows, the accuracy of thresholds on real weights is in cpu-*-ffn-minilm.md."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes; checks code paths, times mean little")
    p.add_argument("--batches", type=H.ints, default=None)
    p.add_argument("--zeros", type=H.floats, default=None)
    p.add_argument("--cases", type=H.names_from(("down", "relu", "swiglu", "model")),
                   default=("down", "relu", "swiglu", "model"))
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--tol", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="results markdown (default benchmarks/results/<device>-ffn.md)")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--gpu", action="store_true", help="the GPU cases (CUDA; with --smoke: the interpreter on CPU)")
    return p.parse_args(argv)


GPU_SHAPES = ((4096, 14336), (4096, 11008))
GPU_BATCHES = (1, 2, 4, 8, 16, 512)
GPU_SPARSITIES = (0.0, 0.25, 0.4, 0.5, 0.7, 0.9)
GPU_SMOKE = dict(shapes=((64, 176),), batches=(1, 3), sparsities=(0.5,))


def gpu_cases(args, timer, table, emit, device):
    """The SwiGLU block and its down projection with ffn_triton, fp16, on `device`."""
    from sparsify.codegen import runtime
    from sparsify.codegen.kernels._ffn_common import ffn_reference
    from sparsify.codegen.kernels.ffn_triton import ffn_triton_host

    dtype = torch.float16
    shapes = GPU_SMOKE["shapes"] if args.smoke else GPU_SHAPES
    gen = torch.Generator().manual_seed(args.seed)
    for d, f in shapes:
        blk = Block(d, f, gen, gated=True)
        w = {k: getattr(blk, k).to(device, dtype) for k in ("w_up", "w_gate", "w_down", "w_down_t", "b_down")}
        calib = torch.randn(CALIB_TOKENS, d, generator=gen)
        s_cal = F.silu(calib @ blk.w_gate.T).abs().flatten()
        for zeros in GPU_SMOKE["sparsities"] if args.smoke else GPU_SPARSITIES:
            cut = s_cal.kthvalue(max(1, int(zeros * s_cal.numel()))).values.item() if zeros else -1.0
            thr = torch.full((f,), cut, device=device)
            for m in GPU_SMOKE["batches"] if args.smoke else GPU_BATCHES:
                x = torch.randn(m, d, generator=gen).to(device, dtype)
                dense = lambda: F.linear(F.silu(F.linear(x, w["w_gate"])) * F.linear(x, w["w_up"]), w["w_down"],  # noqa: E731
                                         w["b_down"])
                ref = lambda: ffn_reference(x, w["w_up"], None, w["w_gate"], None, w["w_down_t"], thr, "silu",  # noqa: E731
                                            "gated", bias=w["b_down"])

                def gather():
                    s = F.silu(F.linear(x, w["w_gate"]))
                    keep = s.abs() > thr
                    idx = keep.any(0).nonzero().squeeze(1)
                    hh = torch.where(keep, s, 0).index_select(1, idx) * F.linear(x, w["w_up"].index_select(0, idx))
                    return torch.addmm(w["b_down"], hh, w["w_down_t"].index_select(0, idx))

                def ours():
                    with runtime.force_triton():
                        return ffn_triton_host(x, w["w_up"], None, w["w_gate"], None, w["w_down_t"], thr, "silu",
                                               "gated", bias=w["b_down"])

                providers = [H.Provider("dense", dense, "dense", ref=ref if zeros == 0 else dense, baseline=True),
                             H.Provider("torch-gather", gather, f"threshold {zeros:g}", ref=ref),
                             H.Provider("sparsify-triton", ours, f"threshold {zeros:g}", ref=ref)]
                emit(H.run_case({"case": "swiglu (gpu)", "shape": f"{d}->{f}->{d}", "M": m}, providers, timer,
                                5e-3 if zeros else 1e-2))


class Block:
    """One FFN's weights (random, fixed seed) and the bias that gives its units a zero rate."""

    def __init__(self, d, f, gen, gated=False):
        self.w_up = torch.randn(f, d, generator=gen) / d ** 0.5
        self.w_gate = torch.randn(f, d, generator=gen) / d ** 0.5 if gated else None
        self.w_down = torch.randn(d, f, generator=gen) / f ** 0.5
        self.w_down_t = self.w_down.t().contiguous()
        self.b_down = torch.randn(d, generator=gen) * 0.1

    def bias_for(self, calib, zeros):
        z = calib @ self.w_up.T
        return -torch.quantile(z, zeros, dim=0)


def gather_rows(h, w_down_t, bias):
    """torch: the union of active units over the tokens, gathered rows, one matmul."""
    idx = h.ne(0).any(0).nonzero().squeeze(1)
    return torch.addmm(bias, h.index_select(1, idx), w_down_t.index_select(0, idx))


def bag_rows(h, w_down_t, bias):
    """torch: embedding_bag over each token's own active units (sum, per-sample weights)."""
    tok, unit = h.nonzero(as_tuple=True)
    offsets = torch.searchsorted(tok, torch.arange(h.shape[0]))
    return F.embedding_bag(unit, w_down_t, offsets, mode="sum", per_sample_weights=h[tok, unit]) + bias


def zero_rate(h) -> str:
    return f"zeros {100 * (h == 0).float().mean().item():.1f}%, union active {100 * h.ne(0).any(0).float().mean().item():.1f}%"


def down_case(blk, x, b_up, zeros, timer, args):
    from sparsify.codegen.kernels.ffn_cpu import sparse_input_linear_cpu

    h = torch.relu(F.linear(x, blk.w_up, b_up))
    zero = torch.zeros(h.shape[1])
    ref = lambda: F.linear(h, blk.w_down, blk.b_down)  # noqa: E731
    providers = [
        H.Provider("dense", lambda: F.linear(h, blk.w_down, blk.b_down), "dense", ref=ref, baseline=True),
        H.Provider("torch-gather", lambda: gather_rows(h, blk.w_down_t, blk.b_down), f"relu {zeros:g}", ref=ref),
        H.Provider("torch-embedding_bag", lambda: bag_rows(h, blk.w_down_t, blk.b_down), f"relu {zeros:g}", ref=ref),
        H.Provider("sparsify-cpu", lambda: sparse_input_linear_cpu(h, blk.w_down_t, zero, blk.b_down),
                   f"relu {zeros:g}", ref=ref, note=zero_rate(h)),
    ]
    return H.run_case({"case": "down", "shape": f"{h.shape[1]}->{blk.w_down.shape[0]}", "M": x.shape[0]},
                      providers, timer, args.tol)


def _ffn(x, blk, b_up, thr, mode, gate=None, predictor=(None, None, None)):
    from sparsify.codegen.kernels.ffn_cpu import ffn_cpu_host

    return ffn_cpu_host(x, blk.w_up, b_up, blk.w_gate, None, blk.w_down_t, thr, "silu" if gate else "relu", mode,
                        *predictor, bias=blk.b_down)


def relu_case(blk, x, b_up, zeros, timer, args, predicted=None):
    from sparsify.codegen.kernels._ffn_common import ffn_reference

    f = blk.w_up.shape[0]
    zero = torch.zeros(f)
    dense = lambda: F.linear(torch.relu(F.linear(x, blk.w_up, b_up)), blk.w_down, blk.b_down)  # noqa: E731
    h = torch.relu(F.linear(x, blk.w_up, b_up))
    providers = [
        H.Provider("dense", dense, "dense", ref=dense, baseline=True),
        H.Provider("torch-gather", lambda: gather_rows(torch.relu(F.linear(x, blk.w_up, b_up)), blk.w_down_t,
                                                       blk.b_down), f"relu {zeros:g}", ref=dense),
        H.Provider("sparsify-cpu", lambda: _ffn(x, blk, b_up, zero, "ungated"), f"ExactZeros (relu {zeros:g})",
                   ref=dense, note=zero_rate(h)),
    ]
    if predicted is not None:
        pin, pout, pbias = predicted
        pred_ref = lambda: ffn_reference(x, blk.w_up, b_up, None, None, blk.w_down_t, zero, "relu", "predicted",  # noqa: E731
                                         pin, pout, pbias, bias=blk.b_down)
        kept = ((x @ pin @ pout + pbias > 0) & (h > 0)).any(0).float().mean().item()
        err = H.rel_err(pred_ref(), dense())
        providers.append(H.Provider("sparsify-cpu-predicted", lambda: _ffn(x, blk, b_up, zero, "predicted",
                                                                           predictor=predicted),
                                    f"PredictedActive(64) (relu {zeros:g})", ref=pred_ref,
                                    note=f"units read {100 * kept:.1f}%, error vs dense {err:.1e}"))
    return H.run_case({"case": "relu" if predicted is None else "relu, low-rank x", "shape":
                       f"{x.shape[1]}->{f}->{blk.w_down.shape[0]}", "M": x.shape[0]}, providers, timer, args.tol)


def swiglu_case(blk, x, calib, zeros, timer, args):
    from sparsify.codegen.kernels._ffn_common import ffn_reference

    f = blk.w_up.shape[0]
    s_cal = F.silu(calib @ blk.w_gate.T).abs().flatten()
    thr = torch.full((f,), s_cal.kthvalue(int(zeros * s_cal.numel())).values.item())
    dense = lambda: F.linear(F.silu(F.linear(x, blk.w_gate)) * F.linear(x, blk.w_up), blk.w_down, blk.b_down)  # noqa: E731
    ref = lambda: ffn_reference(x, blk.w_up, None, blk.w_gate, None, blk.w_down_t, thr, "silu", "gated",  # noqa: E731
                                bias=blk.b_down)

    def gather():
        s = F.silu(F.linear(x, blk.w_gate))
        keep = s.abs() > thr
        idx = keep.any(0).nonzero().squeeze(1)
        hh = torch.where(keep, s, 0).index_select(1, idx) * F.linear(x, blk.w_up.index_select(0, idx))
        return torch.addmm(blk.b_down, hh, blk.w_down_t.index_select(0, idx))

    from sparsify.passes.families.activation.calibration import topk_coefficient
    from sparsify.patterns import TopK

    coef = torch.full((f,), topk_coefficient(TopK(fraction=1 - zeros), F.silu(calib @ blk.w_gate.T)))
    topk_ref = lambda: ffn_reference(x, blk.w_up, None, blk.w_gate, None, blk.w_down_t, coef, "silu",  # noqa: E731
                                     "gated_topk", bias=blk.b_down)
    s = F.silu(F.linear(x, blk.w_gate))
    kept = (s.abs() > thr)
    a = s.abs()
    kept_topk = a > a.mean(-1, keepdim=True) + coef * a.std(-1, unbiased=False, keepdim=True)
    err = H.rel_err(ref(), dense())
    providers = [
        H.Provider("dense", dense, "dense", ref=dense, baseline=True),
        H.Provider("torch-gather", gather, f"threshold {zeros:g}", ref=ref),
        H.Provider("sparsify-cpu", lambda: _ffn(x, blk, None, thr, "gated", gate=True), f"threshold {zeros:g}",
                   ref=ref, note=f"zeros {100 * (1 - kept.float().mean().item()):.1f}%, union active "
                                 f"{100 * kept.any(0).float().mean().item():.1f}%, error vs dense {err:.1e}"),
        H.Provider("sparsify-cpu-topk", lambda: _ffn(x, blk, None, coef, "gated_topk", gate=True),
                   f"TopK(fraction={1 - zeros:g})", ref=topk_ref,
                   note=f"zeros {100 * (1 - kept_topk.float().mean().item()):.1f}%, union active "
                        f"{100 * kept_topk.any(0).float().mean().item():.1f}%, error vs dense "
                        f"{H.rel_err(topk_ref(), dense()):.1e}"),
    ]
    return H.run_case({"case": "swiglu", "shape": f"{x.shape[1]}->{f}->{blk.w_down.shape[0]}", "M": x.shape[0]},
                      providers, timer, args.tol)


def model_rows(args, device):
    """The demo's ReLU LM (sparsify.models.relu_lm) at one token, dense vs sparsify.compile with
    activation=Auto from fresh cost and plan caches, interleaved rounds."""
    import os
    import tempfile

    import sparsify
    from sparsify.models import lm_inputs, relu_lm
    from sparsify.timing import compare_rounds

    os.environ["SPARSIFY_CACHE_DIR"] = tempfile.mkdtemp(prefix="sparsify-cost-")
    shape = dict(d=64, ffn=256, layers=2, heads=2) if args.smoke else {}
    model, x = relu_lm(zeros=0.9, **shape), lm_inputs(1, 1)
    calib = [lm_inputs(1, 64, seed=s) for s in (1, 2)]
    sm = sparsify.compile(model, (x,), sparsify.Config(activation=sparsify.Auto()), calibration_data=calib,
                          progress=False)
    dense, compiled = compare_rounds([lambda: model(x), lambda: sm(x)], device, max(1, args.repeats // 2))
    with torch.no_grad():
        err = float((sm(x) - model(x)).norm() / model(x).norm())
    changed = ", ".join(f"{lp.fqn} ({lp.pattern.describe()}, {100 * lp.sparsity:.0f}% zeros, {lp.speedup:.2f}x)"
                        for lp in sm.plan.sparse_layers()) or "none"
    name = "ReLU LM (relu_lm: d=512, ffn=2048, 4 layers, 90% zeros)" if not args.smoke else "ReLU LM (smoke)"
    return [[name, "1x1", H.fmt_ms(dense.ms), H.fmt_ms(compiled.ms), H.fmt_ratio(compiled.ratio), f"{err:.1e}",
             changed]]


def low_rank_tokens(n, d, basis, gen):
    return torch.randn(n, basis.shape[0], generator=gen) @ basis + 0.05 * torch.randn(n, d, generator=gen)


def main(argv=None) -> int:
    from sparsify.codegen import registry
    from sparsify.passes.families.activation.calibration import fit_predictor

    registry.specs()
    args = parse_args(argv)
    device = torch.device("cpu")
    if args.gpu:
        device = H.pick_device("bench_ffn", smoke=args.smoke, cpu_needs_smoke=True)
        if device is None:
            return 2
    timer = H.Timer(device, repeats=args.repeats)
    d, f = SMOKE["shape"] if args.smoke else SHAPE
    batches = args.batches or (SMOKE["batches"] if args.smoke else BATCHES)
    zeros_list = args.zeros or (SMOKE["zeros"] if args.smoke else ZEROS)
    env = H.Environment(device, [("timing", timer.description), ("shape", f"D={d}, F={f}, fp32"),
                                 ("reference", f"float32 torch of the same computation; WRONG above {args.tol:g}")])
    path = H.results_path(device, "-ffn-gpu" if args.gpu else "-ffn", args.out, smoke=args.smoke,
                          no_write=args.no_write)
    results = H.Results(path, f"bench_ffn: {env.info['device']}", env)
    print(env.banner(), flush=True)
    table = H.ProviderTable((("case", "case"), ("shape", "shape"), ("M", "M")), args.tol)
    gen = torch.Generator().manual_seed(args.seed)
    ungated, gated = Block(d, f, gen), Block(d, f, gen, gated=True)
    calib = torch.randn(CALIB_TOKENS, d, generator=gen)
    basis = torch.randn(32, d, generator=gen) / 32 ** 0.5
    calib_lr = low_rank_tokens(CALIB_TOKENS, d, basis, gen)

    def emit(rows):
        for row in table.add(rows):
            print(table.line(row), flush=True)
        results.progress(table.markdown, table.rows)

    if args.gpu:
        gpu_cases(args, timer, table, emit, device)
        results.finish("bench_ffn", table.markdown(), table.rows, table.summary())
        return 1 if table.counts()["WRONG"] else 0
    for zeros in zeros_list:
        b_up = ungated.bias_for(calib, zeros)
        b_up_lr = ungated.bias_for(calib_lr, zeros)
        z_lr = calib_lr @ ungated.w_up.T + b_up_lr
        predictor = fit_predictor(calib_lr, ungated.w_up, b_up_lr, z_lr, torch.zeros(f), 64, 0.99)
        for m in batches:
            x = torch.randn(m, d, generator=gen)
            if "down" in args.cases:
                emit(down_case(ungated, x, b_up, zeros, timer, args))
            if "relu" in args.cases:
                emit(relu_case(ungated, x, b_up, zeros, timer, args))
                emit(relu_case(ungated, low_rank_tokens(m, d, basis, gen), b_up_lr, zeros, timer, args, predictor))
    if "swiglu" in args.cases:
        for zeros in [z for z in zeros_list if z <= 0.9] or zeros_list[:1]:
            for m in batches:
                emit(swiglu_case(gated, torch.randn(m, d, generator=gen), calib, zeros, timer, args))
    body = table.markdown()
    if "model" in args.cases:
        body += ("\n\nWhole model (sparsify.compile, Config(activation=Auto()), fresh cost and plan caches; dense and "
                 "compiled in interleaved rounds):\n\n")
        body += H.markdown_table(("model", "batch x seq", "dense ms", "compiled ms", "speedup", "rel err",
                                  "sparse sites"), model_rows(args, device), "llrrrll")
    results.finish("bench_ffn", body + "\n\n" + NOTES, table.rows, table.summary())
    return 1 if table.counts()["WRONG"] else 0


if __name__ == "__main__":
    sys.exit(main())
