#!/usr/bin/env bash
# Everything a lent GPU session should run, in one call of the device tool (its limit is 10 minutes
# a call): install, the GPU-marked tests, the linear and conv benchmarks, the demo on CUDA.
# Results files and logs land under $OUT (the device tool brings that folder back).
#
#   run(command="bash benchmarks/gpu_session.sh", timeout_s=600)
#
# Each step has its own time limit so a hang in one still leaves the others' results; the steps
# are ordered by what the open work needs first (correctness of never-run kernels, then ratios).
set -uo pipefail
OUT=${OUT:-/tmp/sparsify-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}

step() {   # step NAME SECONDS CMD...: run with a limit, log to $OUT/NAME.log, record the status
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name: exit $rc in $((SECONDS - t0)) s" | tee -a "$OUT/steps.txt"
    tail -n 25 "$OUT/$name.log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/device.txt" 2>&1
$PY -m pip install -q -e . --no-deps --no-build-isolation >"$OUT/install.log" 2>&1 \
    || { echo "install failed"; tail -n 30 "$OUT/install.log"; exit 1; }

# 1. kernels on the real compiler: the GPU tests (nm_conv2d and sell_linear never ran on a GPU before)
step gpu-tests 140 $PY -m pytest -q -m gpu -x -p no:cacheprovider tests
# 2. linear ratios (issue 3's goal table), then conv ratios
step bench-linear 180 $PY benchmarks/bench_linear.py --quick --json "$OUT/bench_linear.json" --plot "$OUT/speedup.png"
step bench-conv 100 $PY benchmarks/bench_conv.py
# 2b. why our cuSPARSELt provider costs ~1 ms a call: the calling conventions side by side
step probe-cslt 60 $PY benchmarks/probe_cslt.py --out "$OUT/probe_cslt.md"
# 3. the planner end to end on the built-in demo model
step demo 80 $PY -m sparsify demo --device cuda --dtype float16

cp benchmarks/results/*.md "$OUT/" 2>/dev/null
echo "--- steps"; cat "$OUT/steps.txt"
