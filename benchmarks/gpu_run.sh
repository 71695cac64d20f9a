#!/usr/bin/env bash
# One command for a GPU machine (e.g. the lent H100): build the extension with its CUDA part,
# run the test suite on the GPU, run the benchmarks at the paper's sizes, and copy the results
# (CSV, plots, logs) to $OUT (default benchmarks/results). Uses the machine's own torch/triton.
#   STEPS="build tests bench"  (default: all three; e.g. STEPS="build bench" skips the tests;
#                              "quick" instead of "bench": the activations at 64 M elements,
#                              the PLIF and SpikGRU2+ headline sizes only, Python loops
#                              in forward+backward only, the stack also with split products,
#                              the SpikGRU2+ loops alone per step (probe_spikgru2plus_loops.py);
#                              meant to fit one 10-minute device call with the tests, untimed;
#                              "tune": the PLIF launch configurations and checkpoint intervals,
#                              fp32 and bf16 (probe_plif_tune.py))
#   TEST_TIMEOUT=300           seconds for the test suite (TEST_WORKERS=8 xdist workers); a
#                              failing suite does not stop the benchmarks, but the script
#                              then exits non-zero.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
STEPS=${STEPS:-build tests bench}
export PYTHONUNBUFFERED=1
status=0
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv \
    | tee "$OUT/gpu.txt"
if [[ $STEPS == *build* ]]; then
    start=$SECONDS
    "$PY" -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || {
        tail -30 "$OUT/build.log"; exit 1; }
    echo "build: $((SECONDS - start)) s"
fi
"$PY" -m neurokern | tee "$OUT/backends.txt"
if [[ $STEPS == *tests* ]]; then
    # TEST_WORKERS (8) workers where pytest-xdist is installed (the device machine has it):
    # about 3 minutes; one line per test in tests.log, so a run cut short by TEST_TIMEOUT still
    # names its failures
    parallel=()
    "$PY" -c "import xdist" 2>/dev/null && parallel=(-n "${TEST_WORKERS:-8}")
    timeout "${TEST_TIMEOUT:-300}" "$PY" -m pytest tests -v -p no:cacheprovider -rfE \
        "${parallel[@]}" > "$OUT/tests.log" 2>&1 || status=1
    grep -E "^(FAILED|ERROR)|(passed|failed|error)(,| in )" "$OUT/tests.log" | tail -25
    [ $status = 0 ] || echo "tests: failed or cut short ($(grep -c PASSED "$OUT/tests.log") passed)"
fi
if [[ $STEPS == *bench* ]]; then
    "$PY" benchmarks/main.py 2>&1 | tee "$OUT/bench.log" || status=1
elif [[ $STEPS == *quick* ]]; then
    {
        failed=0
        for args in "bench_spike.py" "bench_plif.py --quick --skip-slow" \
                    "bench_spikgru2plus.py --quick --skip-slow" \
                    "bench_spikgru2plus.py --quick --skip-slow --split-products" \
                    "probe_spikgru2plus_loops.py" "plot.py"; do
            echo "== $args"
            # shellcheck disable=SC2086
            "$PY" benchmarks/$args 2>&1 || failed=1
        done
        exit $failed
    } | tee "$OUT/bench.log" || status=1
fi
if [[ $STEPS == *tune* ]]; then
    "$PY" benchmarks/probe_plif_tune.py 2>&1 | tee "$OUT/tune.log" || status=1
fi
if [ "$OUT" != benchmarks/results ]; then  # one archive: the device tool returns few files
    cp benchmarks/results/*.csv benchmarks/results/*.png "$OUT"/ 2>/dev/null
    (cd "$OUT" && tar czf results.tgz --remove-files ./*.csv ./*.png ./*.log ./*.txt 2>/dev/null)
fi
exit $status
