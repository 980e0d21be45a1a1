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

"vs best dense" divides the faster of the two dense layouts by the provider's time: the best peer,
not a strawman. There is no PyTorch weight-sparse conv to compare with. Each provider's output is
checked against float32 F.conv2d on the masked weight (relative L2, WRONG above --tol).

Timing: the harness's Timer with cuda="model", i.e. `sparsify.timing.compare_ms`, the cost model's
own timer (CUDA: back-to-back calls between events, so host launch cost counts as it does inside a
model; CPU: all providers of a shape interleaved call by call, minimum of --repeats).
A --smoke run (tiny shapes, sparsify-csr at the first of --sparsities only) checks code paths
only; its timings are the interpreter's and mean nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as H  # noqa: E402
from harness import Provider  # noqa: E402

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
    p.add_argument("--sparsities", type=H.floats, default=SPARSITIES,
                   help=f"unstructured sparsities for sparsify-csr (default {SPARSITIES})")
    p.add_argument("--densities", type=H.floats, default=DENSITIES)
    p.add_argument("--blocks", type=H.ints, default=BLOCKS)
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default float16 on CUDA, float32 on CPU")
    p.add_argument("--smoke", action="store_true", help="tiny shapes; on CPU runs under TRITON_INTERPRET=1")
    p.add_argument("--repeats", type=int, default=20, help="CPU timing repeats")
    p.add_argument("--tol", type=float, default=2e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="results markdown (default benchmarks/results/<device>-conv.md; "
                                               "a smoke run writes only with --out)")
    return p.parse_args(argv)


def conv_view(w: torch.Tensor, stride: int, pad: int):
    """The planner's view of a conv weight (masks over the implicit-GEMM layout): the one import of
    ConvView."""
    from sparsify.passes.families.weight.views import ConvView

    return ConvView(w, None, {"stride": [stride] * 2, "padding": [pad] * 2, "dilation": [1, 1], "groups": 1})


def providers(args, x, w, k: int, stride: int, triton_rows: bool) -> list[Provider]:
    """Dense (both layouts, the baselines) and the sparse providers of one conv shape."""
    from sparsify.codegen.kernels import bsr_conv2d, csr_conv2d, nm_conv2d
    from sparsify.patterns import NM, Block, Unstructured

    pad = k // 2
    x_cl = x.contiguous(memory_format=torch.channels_last)
    w_cl = w.contiguous(memory_format=torch.channels_last)
    out = [Provider("dense-nchw", lambda: F.conv2d(x, w, None, stride, pad), baseline=True, note="F.conv2d NCHW"),
           Provider("dense-cl", lambda: F.conv2d(x_cl, w_cl, None, stride, pad), baseline=True,
                    note="F.conv2d channels-last")]
    cases = []
    if triton_rows:
        cases += [(f"block{b} d={d}", "sparsify-bsr", Block(b, d)) for b in args.blocks for d in args.densities]
        cases.append(("2:4", "sparsify-nm", NM(2, 4)))
    cases += [(f"unstructured {sp}", "sparsify-csr", Unstructured(sp))
              for sp in (args.sparsities[:1] if args.smoke else args.sparsities)]
    view = conv_view(w, stride, pad)
    for label, name, pattern in cases:
        prov = Provider(name, pattern=label)
        try:
            wm = view.sparse_weight(pattern, w.float().abs())
            prov.ref = lambda wm=wm: F.conv2d(x.float(), wm.float(), None, stride, pad)
            if name == "sparsify-bsr":
                packed = bsr_conv2d.pack_bsr_conv(wm, pattern.block)
                prov.fn = lambda p=packed: bsr_conv2d.bsr_conv2d(x_cl, p, None, stride, pad)
            elif name == "sparsify-nm":
                packed = nm_conv2d.pack_nm_conv(wm, 2, 4)
                prov.fn = lambda p=packed: nm_conv2d.nm_conv2d(x_cl, p, None, stride, pad)
            else:   # NCHW in and out, the layout MKL's im2col path wants
                packed = csr_conv2d.pack_csr_conv(wm)
                prov.fn = lambda p=packed: csr_conv2d.csr_conv2d(x, p, k, k, None, stride, pad)
        except Exception as e:  # noqa: BLE001 -- a provider that cannot be set up is a row
            prov.fn, prov.status = None, "error: setup " + H.short(e)
        out.append(prov)
    return out


def run(args, device, dtype, table: H.ProviderTable, timer: H.Timer, say) -> None:
    gen = torch.Generator().manual_seed(args.seed)
    batch = min(args.batch, 2) if args.smoke else args.batch
    for c, o, hw, k, stride in SMOKE if args.smoke else RESNET50:
        x = torch.randn(batch, c, hw, hw, generator=gen).to(device=device, dtype=dtype)
        w = (torch.randn(o, c, k, k, generator=gen) / (c * k * k) ** 0.5).to(device=device, dtype=dtype)
        provs = providers(args, x, w, k, stride, triton_rows=device.type == "cuda" or args.smoke)
        say(table.add(H.run_case({"shape": f"{batch}x{c}x{hw}x{hw} -> {o}, {k}x{k}/{stride}"}, provs, timer,
                                 args.tol)))


def main(argv=None) -> int:
    args = parse_args(argv)
    device = H.pick_device("bench_conv", smoke=args.smoke)
    H.import_sparsify()
    from sparsify.codegen import runtime

    args.dtype = args.dtype or ("float16" if device.type == "cuda" else "float32")
    args.batch = args.batch or (32 if device.type == "cuda" else 1)
    timer = H.Timer(device, cuda="model", repeats=args.repeats)
    env = H.Environment(device, [("dtype", args.dtype), ("batch", args.batch), ("timing", timer.description),
                                 ("vs best dense", "min(dense NCHW, dense channels-last) ms / provider ms"),
                                 ("rel err", f"vs float32 F.conv2d on the masked weight; WRONG above {args.tol:g}")])
    print(f"[bench_conv] {env.banner()}", flush=True)
    results = H.Results(H.results_path(device, "-conv", args.out, args.smoke), f"bench_conv: {env.info['device']}", env)
    table = H.ProviderTable(tol=args.tol, ms_head=timer.ms_head, ratio_head="vs best dense")

    def say(rows):
        for r in rows:
            print(f"[bench_conv] {table.line(r)}", flush=True)
        results.progress(table.markdown, table.rows)

    # On CPU under the interpreter the Triton kernels must be forced (the dense and CSR paths do not care).
    with runtime.force_triton() if timer.meaningless else contextlib.nullcontext():
        run(args, device, DTYPES[args.dtype], table, timer, say)
    results.finish("bench_conv", table.markdown(), table.rows, table.summary())
    return 1 if any(r["status"] != "ok" for r in table.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
