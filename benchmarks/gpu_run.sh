#!/usr/bin/env bash
# One command for a GPU machine (e.g. the lent H100): build the extension with its CUDA part,
# run the test suite on the GPU, run the benchmarks at the paper's sizes, and copy the results
# (CSV, plots, logs) to $OUT (default benchmarks/results). Uses the machine's own torch/triton.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
"$PY" -m pip install --no-build-isolation -e . > "$OUT/build.log" 2>&1 || {
    tail -30 "$OUT/build.log"; exit 1; }
"$PY" -m neurokern | tee "$OUT/backends.txt"
"$PY" -m pytest tests -q -x -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -5
"$PY" benchmarks/main.py 2>&1 | tee "$OUT/bench.log"
if [ "$OUT" != benchmarks/results ]; then cp benchmarks/results/* "$OUT"/; fi
