"""Command line: `python -m sparsify demo` (the main job on built-in models) and `report PLAN.json`."""
from __future__ import annotations

import argparse
import sys
import time

import torch

from . import models
from .config import Config
from .patterns import NM, Auto, Block, Dense, Unstructured
from .plan import Plan
from .report import plan_table


def parse_pattern(text: str):
    """auto | dense | 2:4 (any n:m) | block32:0.25 | unstructured:0.9"""
    t = text.strip().lower()
    try:
        if t == "auto":
            return Auto()
        if t == "dense":
            return Dense()
        if t.startswith("block"):
            size, _, dens = t[5:].partition(":")
            return Block(int(size), float(dens or 0.25))
        if t.startswith("unstructured"):
            return Unstructured(float(t.partition(":")[2] or 0.9))
        if ":" in t:
            n, m = t.split(":")
            return NM(int(n), int(m))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--pattern {text!r}: {e}") from None
    raise argparse.ArgumentTypeError(f"--pattern {text!r}: expected auto, dense, N:M, blockB:D or "
                                     f"unstructured:S")


def _number(kind, low=None, high=None, low_open=False, high_open=False):
    """argparse type: a number of `kind` within [low, high] (ends open where asked), else a usage error."""
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n int' if kind is int else ' number'}") from None
        if v != v or (low is not None and (v <= low if low_open else v < low)) or \
                (high is not None and (v >= high if high_open else v > high)):
            lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
            hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
            raise argparse.ArgumentTypeError(f"{text} is out of range (must be {' and '.join(x for x in (lo, hi) if x)})")
        return v
    return parse


def _demo_one(name, model, inputs, calib, cfg, device):
    from .api import compile
    from .timing import compare_rounds

    print(f"\n### {name}", flush=True)
    t0 = time.perf_counter()
    sm = compile(model, (inputs,), cfg, calibration_data=calib, verbose=True)
    print(sm.report())
    with torch.no_grad():
        dense_out, sparse_out = model(inputs), sm(inputs)
    err = float((sparse_out.double() - dense_out.double()).norm() / dense_out.double().norm())
    # dense and compiled called in turn, in rounds until the ratio is steady (the planner's timer)
    dense, compiled = compare_rounds([lambda: model(inputs), lambda: sm(inputs)], device)
    print(f"{name}: compile {time.perf_counter() - t0:.1f} s; output rel. L2 error vs dense {err:.3e}; "
          f"forward dense {dense.ms:.3f} ms, compiled {compiled.ms:.3f} ms ({compiled.ratio:.2f}x, interleaved) "
          f"on {device}")
    return err <= cfg.max_error + 1e-12


def cmd_demo(a) -> int:
    if a.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    device = torch.device(a.device)
    dtype = getattr(torch, a.dtype)
    # The model is converted before compiling, so the dense baseline runs in the same dtype.
    cfg = Config(weight=a.pattern, max_error=a.max_error)
    large = a.size == "large" or (a.size == "auto" and device.type == "cuda")
    ok = True
    if a.model in ("lm", "both", "all"):
        shape = dict(d=1024, ffn=4096, heads=16, max_len=512) if large else {}
        batch, seq = (8, 512) if large else (a.batch, a.seq)
        m = models.tiny_lm(ffn_sparsity=a.ffn_sparsity, **shape).to(device, dtype)
        x = models.lm_inputs(batch, seq, device=device)
        calib = [models.lm_inputs(batch, seq, seed=s, device=device) for s in range(1, 3)]
        name = "transformer LM" + (" (d=1024, ffn=4096)" if large else "")
        ok &= _demo_one(name, m, x, calib, cfg, device)
    if a.model in ("convnet", "both", "all"):
        m = models.tiny_convnet(width=128 if large else 32).to(device, dtype)
        x = models.image_inputs(batch=32 if large else 8, size=64 if large else 32, device=device).to(dtype)
        ok &= _demo_one("convnet", m, x, [x], cfg, device)
    if a.model in ("relu-lm", "all"):
        # one token a step, as a decoder generates: where skipping the FFN units a ReLU zeroes pays
        m = models.relu_lm(zeros=a.relu_zeros).to(device, dtype)
        x = models.lm_inputs(1, 1, device=device)
        calib = [models.lm_inputs(1, 64, seed=s, device=device) for s in range(1, 3)]
        relu_cfg = Config(weight=a.pattern, activation=Auto(), max_error=a.max_error)
        ok &= _demo_one(f"ReLU transformer LM, one token (d=512, ffn=2048, {a.relu_zeros:.0%} zeros after ReLU; "
                        f"activation=Auto)", m, x, calib, relu_cfg, device)
    return 0 if ok else 1


def cmd_report(a) -> int:
    try:
        plan = Plan.from_json(a.plan)
    except (OSError, ValueError, KeyError) as e:
        print(f"error: cannot read plan {a.plan!r}: {e}", file=sys.stderr)
        return 2
    print(plan_table(plan))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sparsify", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="compile the built-in models, verify against dense, print the report")
    d.add_argument("--model", choices=("lm", "convnet", "relu-lm", "both", "all"), default="all",
                   help="lm: the LM with block-pruned FFN weights (weight family); convnet; relu-lm: a ReLU LM "
                        "at one token (activation family); both: lm and convnet; all (default)")
    d.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    d.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    d.add_argument("--pattern", type=parse_pattern, default=Auto(), help="auto, dense, 2:4, block32:0.25, "
                   "unstructured:0.9 (default auto)")
    d.add_argument("--max-error", type=_number(float, 0), default=0.05,
                   help="budget for the model output's relative L2 error vs dense (>= 0)")
    d.add_argument("--ffn-sparsity", type=_number(float, 0, 1, high_open=True), default=0.9,
                   help="block-prune the demo LM's FFN weights to this sparsity, in [0, 1) (0 = plain random weights)")
    d.add_argument("--size", choices=("auto", "small", "large"), default="auto",
                   help="model size: small (CPU-friendly), large (GPU-sized layers); auto picks by device")
    d.add_argument("--batch", type=_number(int, 1), default=4, help="batch size (>= 1)")
    d.add_argument("--seq", type=_number(int, 1, models.TinyLM.MAX_LEN), default=128,
                   help=f"LM sequence length, 1..{models.TinyLM.MAX_LEN} (the LM's position table)")
    d.add_argument("--relu-zeros", type=_number(float, 0, 1, high_open=True), default=0.9,
                   help="fraction of the ReLU LM's hidden units that are zero, in [0, 1)")
    d.set_defaults(func=cmd_demo)
    r = sub.add_parser("report", help="print the table of a saved plan (Plan.to_json)")
    r.add_argument("plan", help="path to a plan JSON file")
    r.set_defaults(func=cmd_report)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
