#!/usr/bin/env bash
# One command for a GPU machine (e.g. the lent H100): build the extension with its CUDA part,
# run the test suite on the GPU with every kernel variant opted in (NEUROKERN_OPT_IN=all), write
# its results into the record of verified variants (neurokern/verified.json, from the JUnit XML;
# the summary says which variants passed and which failed with what), run the benchmarks at the
# paper's sizes, and copy the results (CSV, plots, logs, the record) to $OUT (default
# benchmarks/results). Uses the machine's own torch/triton. For one 10-minute device call:
#   COMMIT=$(git rev-parse --short HEAD) STEPS="build tests quick" OUT=$OUT bash benchmarks/gpu_run.sh
#   STEPS="build tests bench"  (default: all three; e.g. STEPS="build bench" skips the tests;
#                              "quick" instead of "bench": the activations at 64 M elements,
#                              the PLIF, compat-neuron and SpikGRU2+ headline sizes only,
#                              Python loops in forward+backward only, the stack also with
#                              split products,
#                              the SpikGRU2+ loops alone per step (probe_spikgru2plus_loops.py);
#                              meant to fit one 10-minute device call with the tests, untimed;
#                              "tune": the PLIF launch configurations and checkpoint intervals,
#                              fp32 and bf16 (probe_plif_tune.py))
#   TEST_TIMEOUT=300           seconds for the test suite (TEST_WORKERS=8 xdist workers); a
#                              failing suite does not stop the benchmarks, but the script
#                              then exits non-zero. The tests that finished are recorded.
#   BUDGET=570                 seconds for the whole script: the tests and the quick benchmarks
#                              are stopped (SIGINT) where they would run past it
#   COMMIT                     the commit under test, for the record (default: git's HEAD,
#                              "+dirty" with uncommitted changes; "unknown" without git)
# SpikingJelly and snnTorch (the compat benchmark's and tests' peers) are pure-Python wheels; a
# machine without them and without a package index gets them from .whl/ (carried, git-ignored):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#       spikingjelly==2.0.0 snntorch==1.0.0 loguru==0.7.3
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
STEPS=${STEPS:-build tests bench}
BUDGET=${BUDGET:-570}
if [ -z "${COMMIT:-}" ]; then
    COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
    [ "$COMMIT" = unknown ] || git diff --quiet HEAD 2>/dev/null || COMMIT="$COMMIT+dirty"
fi
export PYTHONUNBUFFERED=1
status=0
left() {  # seconds of the budget left, less a reserve (at least 1: timeout 0 never stops)
    local s=$((BUDGET - SECONDS - $1)); echo $((s > 1 ? s : 1)); }
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
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
    # names its failures. Every variant opted in, so that each runs and its tests decide its
    # record; SIGINT at the time limit lets pytest write the JUnit XML of the finished tests.
    parallel=()
    "$PY" -c "import xdist" 2>/dev/null && parallel=(-n "${TEST_WORKERS:-8}")
    limit=$(left 60)
    [ "$limit" -lt "${TEST_TIMEOUT:-300}" ] || limit=${TEST_TIMEOUT:-300}
    NEUROKERN_OPT_IN=all timeout -s INT -k 30 "$limit" "$PY" -m pytest tests -v \
        -p no:cacheprovider -rfE -o junit_family=xunit1 --junitxml="$OUT/tests.xml" \
        "${parallel[@]}" > "$OUT/tests.log" 2>&1 || status=1
    grep -E "^(FAILED|ERROR)|(passed|failed|error)(,| in )" "$OUT/tests.log" | tail -25
    [ $status = 0 ] || echo "tests: failed or cut short ($(grep -c PASSED "$OUT/tests.log") passed)"
    # the record of verified variants: which passed, which failed and with what
    "$PY" -m neurokern record "$OUT/tests.xml" --commit "$COMMIT" | tee "$OUT/variants.txt" \
        || status=1
    cp neurokern/verified.json "$OUT/verified.json"
fi
if [[ $STEPS == *bench* ]]; then
    "$PY" benchmarks/main.py 2>&1 | tee "$OUT/bench.log" || status=1
elif [[ $STEPS == *quick* ]]; then
    {
        failed=0
        for args in "bench_spike.py" "bench_plif.py --quick --skip-slow" "bench_compat.py --quick" \
                    "bench_spikgru2plus.py --quick --skip-slow" \
                    "bench_spikgru2plus.py --quick --skip-slow --split-products" \
                    "probe_spikgru2plus_loops.py" "plot.py"; do
            echo "== $args"
            # shellcheck disable=SC2086
            timeout -s INT -k 10 "$(left 20)" "$PY" benchmarks/$args 2>&1 || failed=1
        done
        exit $failed
    } | tee "$OUT/bench.log" || status=1
fi
if [[ $STEPS == *tune* ]]; then
    "$PY" benchmarks/probe_plif_tune.py 2>&1 | tee "$OUT/tune.log" || status=1
fi
if [ "$OUT" != benchmarks/results ]; then  # one archive: the device tool returns few files
    cp benchmarks/results/*.csv benchmarks/results/*.png "$OUT"/ 2>/dev/null
    (cd "$OUT" && tar czf results.tgz --remove-files ./*.csv ./*.png ./*.log ./*.txt ./*.xml \
        2>/dev/null)
fi
exit $status
