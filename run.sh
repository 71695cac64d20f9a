#!/usr/bin/env bash
# The two commands of neurokern, from a fresh clone, with only Python installed:
#
#   bash run.sh main    set up .venv, build, run the main job (demo + benchmarks)
#   bash run.sh test    set up .venv, build, run the test suite   [extra pytest arguments]
#
# Set-up: a virtual environment in .venv (or $NEUROKERN_VENV) with torch ($NEUROKERN_TORCH,
# default torch==2.13.0; if the Python running this already has torch, e.g. a CUDA build on a GPU
# machine, the venv reuses it), triton, the test tools, and neurokern itself built in place
# (`pip install --no-build-isolation -e .`, which compiles neurokern._C).
set -euo pipefail
cd "$(dirname "$0")"

VENV=${NEUROKERN_VENV:-.venv}
PYTHON=${PYTHON:-python3}

setup() {
    if [ ! -x "$VENV/bin/python" ]; then
        if "$PYTHON" -c "import torch" 2>/dev/null; then
            echo "[setup] creating $VENV (reusing the torch of $PYTHON)"
            "$PYTHON" -m venv --system-site-packages "$VENV"
        else
            echo "[setup] creating $VENV"
            "$PYTHON" -m venv "$VENV"
        fi
    fi
    PY="$VENV/bin/python"
    if ! "$PY" -c "import torch" 2>/dev/null; then
        echo "[setup] installing ${NEUROKERN_TORCH:-torch==2.13.0}"
        "$PY" -m pip install -q "${NEUROKERN_TORCH:-torch==2.13.0}"
    fi
    echo "[setup] installing build and test tools, triton"
    "$PY" -m pip install -q -r requirements-dev.txt
    echo "[setup] building neurokern (C++ extension; about a minute on 2 cores)"
    "$PY" -m pip install -q --no-build-isolation -e .
    "$PY" -m neurokern --summary
}

case "${1:-}" in
    main)
        setup
        echo "[setup] installing the plotting dependency"
        "$PY" -m pip install -q -r requirements-bench.txt
        shift
        "$PY" benchmarks/main.py "$@"
        ;;
    test)
        setup
        shift
        set +e
        "$PY" -m pytest tests "$@"
        rc=$?
        set -e
        if [ "$rc" -eq 5 ]; then
            echo "run.sh: pytest collected no tests; that is a failure" >&2
            exit 1
        fi
        exit "$rc"
        ;;
    *)
        echo "usage: bash run.sh main|test [args]" >&2
        exit 2
        ;;
esac
