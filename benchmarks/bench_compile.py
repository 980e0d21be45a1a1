"""Wall time of sparsify.compile on the six small Hugging Face models of the test suite.

    python benchmarks/bench_compile.py [--configs dense,auto] [--models gpt2,bert] [--out FILE.md]

Uses the model zoo of tests/models/test_hf_models.py (small configs, random weights, no downloads)
so the numbers describe exactly what the tests compile. Prints one markdown row per model and config:
compile seconds (first compile in a fresh cost cache, so planning timings are included), layers,
sparse layers, model error. The table also goes to a results file (default
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
HEADERS = ("model", "config", "compile s", "layers", "sparse", "model error")
ALIGN = "llrrrl"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", type=H.names_from(CONFIGS), default=tuple(CONFIGS))
    p.add_argument("--models", type=H.names_from(CASES), default=tuple(CASES))
    p.add_argument("--out", default=None, help="results markdown (default benchmarks/results/<device>-compile.md)")
    p.add_argument("--no-write", action="store_true", help="print only, write no results file")
    args = p.parse_args(argv)
    os.environ["SPARSIFY_CACHE_DIR"] = tempfile.mkdtemp(prefix="sparsify-cost-")  # cold cost cache
    device = torch.device("cpu")
    env = H.Environment(device, [("cost cache", "cold (a fresh SPARSIFY_CACHE_DIR): planning timings included"),
                                 ("configs", "; ".join(f"{c}: {CONFIGS[c]()!r}" for c in args.configs))])
    results = H.Results(H.results_path(device, "-compile", args.out, no_write=args.no_write),
                        f"bench_compile (sparsify.compile wall time): {env.info['device']}", env, every_s=0)
    print(f"{env.banner()}\n{H.markdown_table(HEADERS, [], ALIGN)}", flush=True)
    rows = []
    for name in args.models:
        case = CASES[name]
        for cfg_name in args.configs:
            torch.manual_seed(0)
            model = case.build().eval()
            inputs = case.inputs(1)
            t0 = time.perf_counter()
            sm = sparsify.compile(model, inputs, CONFIGS[cfg_name]())
            seconds = time.perf_counter() - t0
            err = sm.plan.model_error
            rows.append([name, cfg_name, f"{seconds:.2f}", len(sm.plan), len(sm.plan.sparse_layers()),
                         "-" if err is None else f"{err:.2e}"])
            print(H.markdown_row(rows[-1]), flush=True)
            results.progress(lambda: H.markdown_table(HEADERS, rows, ALIGN))
    results.save(H.markdown_table(HEADERS, rows, ALIGN))
    for written in results.written():
        print(f"[bench_compile] wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
