"""Wall time of sparsify.compile on the six small Hugging Face models of the test suite.

    python benchmarks/bench_compile.py [--configs dense,auto] [--repeats 1]

Uses the model zoo of tests/models/test_hf_models.py (small configs, random weights, no downloads)
so the numbers describe exactly what the tests compile. Prints one markdown row per model and config:
compile seconds (first compile in a fresh cost cache, so planning timings are included), layers,
sparse layers, model error.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.models (the model zoo)

import torch  # noqa: E402

import sparsify  # noqa: E402
from tests.models.test_hf_models import CASES  # noqa: E402

CONFIGS = {
    "dense": lambda: sparsify.Config(weight=sparsify.Dense()),
    "auto": lambda: sparsify.Config(weight=sparsify.Auto(), max_error=0.05),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--configs", default="dense,auto")
    p.add_argument("--models", default=",".join(CASES))
    args = p.parse_args(argv)
    os.environ["SPARSIFY_CACHE_DIR"] = tempfile.mkdtemp(prefix="sparsify-cost-")  # cold cost cache
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device cpu")
    print("| model | config | compile s | layers | sparse | model error |")
    print("|---|---|---|---|---|---|")
    for name in args.models.split(","):
        case = CASES[name]
        for cfg_name in args.configs.split(","):
            torch.manual_seed(0)
            model = case.build().eval()
            inputs = case.inputs(1)
            t0 = time.perf_counter()
            sm = sparsify.compile(model, inputs, CONFIGS[cfg_name]())
            seconds = time.perf_counter() - t0
            err = sm.plan.model_error
            print(f"| {name} | {cfg_name} | {seconds:.2f} | {len(sm.plan)} | {len(sm.plan.sparse_layers())} | "
                  f"{'-' if err is None else f'{err:.2e}'} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
