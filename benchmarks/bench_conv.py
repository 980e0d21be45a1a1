#!/usr/bin/env python
"""Weight-sparse conv2d (implicit GEMM) against dense cuDNN, in one run.

    python benchmarks/bench_conv.py                 # ResNet-50 3x3 / 1x1 layers, batch 32 (CUDA), 1 (CPU)
    python benchmarks/bench_conv.py --batch 1       # latency shapes
    python benchmarks/bench_conv.py --smoke         # CPU: tiny shapes through the Triton interpreter

Providers, all on the same random input and masked weight, all timed as a model calls them (the
sparsify ops through their torch custom op, inputs and outputs channels-last):

    dense-nchw     F.conv2d on contiguous NCHW tensors                       (cuDNN)
    dense-cl       F.conv2d on channels-last tensors                          (cuDNN; the usual fp16 best)
    sparsify-bsr   sparsify::bsr_conv2d on pack_bsr_conv(W, block)   at block densities --densities
    sparsify-nm    sparsify::nm_conv2d on pack_nm_conv(W, 2, 4)
    sparsify-csr   sparsify::csr_conv2d (im2col + torch's CSR matmul: MKL on CPU, cuSPARSE on CUDA)
                   at unstructured sparsities --sparsities

Without CUDA (and without --smoke) only the dense providers and sparsify-csr run, with real CPU
timings: the Triton providers would run in the interpreter there.

"vs dense" divides the faster of the two dense layouts by the provider's time: the best peer, not a
strawman. There is no PyTorch weight-sparse conv to compare with. Each provider's output is checked
against float32 F.conv2d on the masked weight (relative L2, WRONG above --tol).

Timing: `sparsify.timing.measure_ms`, the cost model's own timer (CUDA: back-to-back
calls between events, so host launch cost counts as it does inside a model; CPU: minimum of repeats).
A --smoke run checks code paths only; its timings are the interpreter's and mean nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_linear import (RESULTS, _short, command_line, device_slug, env_info, rel_err,  # noqa: E402
                          write_markdown)

# (C_in, C_out, H=W, kernel, stride): the 3x3 and 1x1 convs of ResNet-50's four stages.
RESNET50 = ((64, 64, 56, 3, 1), (128, 128, 28, 3, 1), (256, 256, 14, 3, 1), (512, 512, 7, 3, 1),
            (256, 64, 56, 1, 1), (64, 256, 56, 1, 1), (1024, 256, 14, 1, 1))
SMOKE = ((20, 24, 7, 3, 1), (32, 16, 5, 1, 1))
DENSITIES = (0.5, 0.25, 0.1)
SPARSITIES = (0.8, 0.9, 0.95)
BLOCKS = (32, 64)
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=None, help="default 32 on CUDA, 1 on CPU")
    p.add_argument("--sparsities", type=lambda s: tuple(float(v) for v in s.split(",")), default=SPARSITIES,
                   help=f"unstructured sparsities for sparsify-csr (default {SPARSITIES})")
    p.add_argument("--densities", type=lambda s: tuple(float(v) for v in s.split(",")), default=DENSITIES)
    p.add_argument("--blocks", type=lambda s: tuple(int(v) for v in s.split(",")), default=BLOCKS)
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default float16 on CUDA, float32 on CPU")
    p.add_argument("--smoke", action="store_true", help="tiny shapes; on CPU runs under TRITON_INTERPRET=1")
    p.add_argument("--repeats", type=int, default=20, help="CPU timing repeats")
    p.add_argument("--tol", type=float, default=2e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="results markdown (default benchmarks/results/<device>-conv.md; "
                                               "a smoke run writes only with --out)")
    return p.parse_args(argv)


def _sparsify():
    from sparsify.codegen import runtime
    from sparsify.codegen.kernels import bsr_conv2d, csr_conv2d, nm_conv2d
    from sparsify.passes.analysis.choose import ConvView
    from sparsify.timing import measure_ms
    from sparsify.patterns import NM, Block, Unstructured
    return runtime, bsr_conv2d, nm_conv2d, csr_conv2d, ConvView, measure_ms, NM, Block, Unstructured


def run(args, device, dtype, rows, say):
    runtime, bsr_mod, nm_mod, csr_mod, ConvView, measure_ms, NM, Block, Unstructured = _sparsify()
    gen = torch.Generator().manual_seed(args.seed)
    shapes = SMOKE if args.smoke else RESNET50
    batch = args.batch or (32 if device.type == "cuda" else 1)
    batch = min(batch, 2) if args.smoke else batch
    triton_rows = device.type == "cuda" or args.smoke
    for c, o, hw, k, stride in shapes:
        pad = k // 2
        shape = f"{batch}x{c}x{hw}x{hw} -> {o}, {k}x{k}/{stride}"
        x = torch.randn(batch, c, hw, hw, generator=gen).to(device=device, dtype=dtype)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        w = (torch.randn(o, c, k, k, generator=gen) / (c * k * k) ** 0.5).to(device=device, dtype=dtype)
        view = ConvView(w, None, {"stride": [stride] * 2, "padding": [pad] * 2, "dilation": [1, 1], "groups": 1})
        t = lambda fn: measure_ms(fn, device, args.repeats)  # noqa: E731
        dense_nchw = t(lambda: F.conv2d(x, w, None, stride, pad))
        w_cl = w.contiguous(memory_format=torch.channels_last)
        dense_cl = t(lambda: F.conv2d(x_cl, w_cl, None, stride, pad))
        best = min(dense_nchw, dense_cl)
        for name, ms in (("dense-nchw", dense_nchw), ("dense-cl", dense_cl)):
            rows.append(dict(shape=shape, pattern="dense", provider=name, ms=ms, ratio=best / ms, err=None,
                             status="ok"))
        cases = []
        if triton_rows:
            cases += [(f"block{b} d={d}", "sparsify-bsr", Block(b, d)) for b in args.blocks for d in args.densities]
            cases.append(("2:4", "sparsify-nm", NM(2, 4)))
        if not args.smoke:
            cases += [(f"unstructured {sp}", "sparsify-csr", Unstructured(sp)) for sp in args.sparsities]
        for label, provider, pattern in cases:
            row = dict(shape=shape, pattern=label, provider=provider, ms=None, ratio=None, err=None)
            try:
                wm = view.sparse_weight(pattern, w.float().abs())
                ref = F.conv2d(x.float(), wm.float(), None, stride, pad)
                if provider == "sparsify-bsr":
                    packed = bsr_mod.pack_bsr_conv(wm, pattern.block)
                    fn = lambda: bsr_mod.bsr_conv2d(x_cl, packed, None, stride, pad)  # noqa: E731
                elif provider == "sparsify-nm":
                    packed = nm_mod.pack_nm_conv(wm, 2, 4)
                    fn = lambda: nm_mod.nm_conv2d(x_cl, packed, None, stride, pad)  # noqa: E731
                else:   # NCHW in and out, the layout MKL's im2col path wants
                    packed = csr_mod.pack_csr_conv(wm)
                    fn = lambda: csr_mod.csr_conv2d(x, packed, k, k, None, stride, pad)  # noqa: E731
                with runtime.force_triton() if device.type == "cpu" and provider != "sparsify-csr" else contextlib.nullcontext():
                    row["err"] = rel_err(fn(), ref)
                    row["ms"] = t(fn)
                row["ratio"] = best / row["ms"]
                row["status"] = "ok" if row["err"] <= args.tol else "WRONG"
            except Exception as e:  # noqa: BLE001 -- a failing provider is a row, not the end of the run
                row["status"] = f"error: {_short(e)}"
                traceback.print_exc(limit=2)
            rows.append(row)
            say(row)


def table(rows, tol: float, smoke_cpu: bool) -> str:
    ms = "ms (CPU interpreter, meaningless)" if smoke_cpu else "ms"
    lines = [f"| shape | pattern | provider | {ms} | vs best dense | rel err |", "|---|---|---|---:|---:|---|"]
    for r in rows:
        err = "-" if r["err"] is None else f"{r['err']:.1e}"
        if r["status"] == "WRONG":
            err = f"**WRONG** {r['err']:.2e} (> {tol:g})"
        elif r["status"].startswith("error"):
            err = r["status"].replace("|", "/")
        ms_s = "-" if r["ms"] is None else f"{r['ms']:.4f}"
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        lines.append(f"| {r['shape']} | {r['pattern']} | {r['provider']} | {ms_s} | {ratio} | {err} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            os.execve(sys.executable, [sys.executable] + sys.argv, dict(os.environ, TRITON_INTERPRET="1"))
    args.dtype = args.dtype or ("float16" if device.type == "cuda" else "float32")
    dtype = DTYPES[args.dtype]
    info = env_info(device)
    started = datetime.datetime.now(datetime.timezone.utc)
    print(f"[bench_conv] {info}", flush=True)
    rows: list[dict] = []
    run(args, device, dtype, rows, lambda r: print(f"[bench_conv] {r}", flush=True))
    smoke_cpu = device.type == "cpu" and args.smoke
    text = table(rows, args.tol, smoke_cpu)
    print(text)
    if args.out or not args.smoke:
        if args.out:
            path = Path(args.out)
        elif device.type == "cpu":
            from sparsify.timing import device_name
            path = RESULTS / f"{device_name(device)}-conv.md"
        else:
            path = RESULTS / f"{device_slug(device)}-conv.md"
        items = [("device", info["device"]), ("versions", f"torch {info['torch']}, triton {info['triton']}, "
                                                          f"CUDA {info['cuda']}, python {info['python']}"),
                 ("date (UTC)", started.strftime("%Y-%m-%d %H:%M")), ("command", f"`{command_line()}`"),
                 ("dtype", args.dtype), ("batch", str(args.batch or (32 if device.type == "cuda" else 1))),
                 ("timing", "sparsify cost model measure_ms (back-to-back calls; host launch cost included)"),
                 ("vs best dense", "min(dense NCHW, dense channels-last) ms / provider ms")]
        write_markdown(path, {"title": f"bench_conv: {info['device']}", "items": items}, text)
        print(f"[bench_conv] wrote {path}")
    return 1 if any(r["status"] != "ok" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
