#!/usr/bin/env bash
# The commands of neurokern, from a fresh clone, with only Python installed:
#
#   bash run.sh main    set up .venv, build, run the main job (demo + benchmarks)
#   bash run.sh test    set up .venv, build, run the test suite   [extra pytest arguments]
#   bash run.sh sdist   build the sdist, install it in a fresh venv, smoke-test the install
#   bash run.sh matrix  the supported-torch subset on the oldest and newest supported torch
#                       [torch versions; --full: the whole suite; --venvs: only the venvs
#                       with their torch, the downloads, e.g. in the background of other steps]
#
# Set-up: a virtual environment in .venv (or $NEUROKERN_VENV) with torch: $NEUROKERN_TORCH (a pip
# requirement, e.g. torch==2.15.0) if set, installed into the venv even over another torch;
# else torch==2.13.0, or, if the Python running this already has torch (e.g. a CUDA build on a
# GPU machine), the venv reuses that. Then triton, the test tools, and neurokern itself built in
# place (`pip install --no-build-isolation -e .`, which compiles neurokern._C).
set -euo pipefail
cd "$(dirname "$0")"

VENV=${NEUROKERN_VENV:-.venv}
PYTHON=${PYTHON:-python3}

# make_venv DIR: a venv in DIR with torch: exactly $NEUROKERN_TORCH if set, else that of $PYTHON
# if it has one, else torch==2.13.0
make_venv() {
    if [ ! -x "$1/bin/python" ]; then
        if [ -z "${NEUROKERN_TORCH:-}" ] && "$PYTHON" -c "import torch" 2>/dev/null; then
            echo "[setup] creating $1 (reusing the torch of $PYTHON)"
            "$PYTHON" -m venv --system-site-packages "$1"
        else
            echo "[setup] creating $1"
            "$PYTHON" -m venv "$1"
        fi
    fi
    if [ -n "${NEUROKERN_TORCH:-}" ]; then
        echo "[setup] installing $NEUROKERN_TORCH"
        "$1/bin/python" -m pip install -q "$NEUROKERN_TORCH"
    elif ! "$1/bin/python" -c "import torch" 2>/dev/null; then
        echo "[setup] installing torch==2.13.0"
        "$1/bin/python" -m pip install -q torch==2.13.0
    fi
}

setup() {
    make_venv "$VENV"
    PY="$VENV/bin/python"
    echo "[setup] installing build and test tools, triton"
    "$PY" -m pip install -q -r requirements-dev.txt
    # triton before 3.7 (torch 2.11 and 2.12 pin 3.6) converts arrays to Python scalars in its
    # interpreter, which numpy 2.4 refuses ("only 0-dimensional arrays can be converted")
    local old_triton="import sys, triton; sys.exit(tuple(map(int, triton.__version__.split('.')[:2])) >= (3, 7))"
    if "$PY" -c "$old_triton" 2>/dev/null; then
        echo "[setup] triton before 3.7: numpy<2.4"
        "$PY" -m pip install -q 'numpy<2.4'
    fi
    echo "[setup] installing SpikingJelly and snnTorch for the compat tests (--no-deps: their" \
         "requirements would replace torch)"
    "$PY" -m pip install -q --no-deps -r requirements-compat.txt
    echo "[setup] building neurokern (C++ extension; about 4 CPU-minutes, docs/install.md)"
    "$PY" -m pip install -q --no-build-isolation -e .
    "$PY" -m neurokern --summary
}

# The sdist holds everything the build needs: build it, install it in a fresh venv (only torch
# and the build tools: requirements-build.txt) ahead of time (--no-build-isolation), and run a
# fused op from the installed package; then the default isolated `pip install` of the sdist in
# another fresh venv: a pure-Python package whose first fused call compiles neurokern._C, two
# processes at once, one compile (tests/test_jit.py's install tests, which print the time from
# `pip install` to the first fused call).
sdist_check() {
    local work
    work=$(mktemp -d)
    make_venv "$work/venv"
    local py="$work/venv/bin/python"
    "$py" -m pip install -q -r requirements-build.txt
    echo "[sdist] building the sdist"
    "$py" setup.py -q sdist --dist-dir "$work/dist" >/dev/null
    echo "[sdist] installing $(basename "$work"/dist/*.tar.gz) in the fresh venv (compiles _C)"
    local start=$SECONDS
    "$py" -m pip install -q --no-cache-dir --no-build-isolation "$work"/dist/*.tar.gz
    echo "[sdist] built and installed in $((SECONDS - start)) s"
    (cd "$work" && "$py" -c '
import torch, neurokern
from neurokern import _extension, reference
assert neurokern.__file__.startswith(__import__("sys").prefix), neurokern.__file__
assert _extension.error is None, _extension.error
assert _extension.record["torch"] == torch.__version__, _extension.record
x = torch.randn(6, 2, 3, 4)
alpha = torch.rand(3) * 0.5 + 0.25
s = neurokern.functional.plif(x, alpha, backend="cpu")
torch.testing.assert_close(s, reference.plif(x, alpha))
print("[sdist] smoke test passed:", _extension.build_info())
')
    echo "[sdist] the isolated pip install, compiled on first use (tests/test_jit.py -k install)"
    "$py" -m pip install -q pytest hypothesis
    start=$SECONDS
    # from outside the tree: `python -m pytest` puts its working directory on sys.path, and the
    # tree's neurokern/ (without neurokern.triton_kernels) would shadow the installed package
    local tests=$PWD/tests
    (cd "$work" && NEUROKERN_TEST_INSTALL=1 "$py" -m pytest -q -s -p no:cacheprovider \
        "$tests/test_jit.py" -k install)
    echo "[sdist] install tests passed in $((SECONDS - start)) s"
    rm -rf "$work"
}

# The supported torch range (docs/install.md, "Supported torch versions"): CI runs MATRIX_TESTS
# on the oldest and the newest; the full suite runs on torch==2.13.0 (bash run.sh test).
MATRIX_TORCH=(2.11.0 2.15.0)
# the API, one fused-op file per op (PLIF, spike, SpikGRU2+), the model
MATRIX_TESTS=(tests/test_api.py tests/test_fused_plif.py tests/test_fused_spike.py
              tests/test_fused_spikgru2plus.py tests/test_models.py)

# matrix [--full] [VERSION...]: for each torch version (default: MATRIX_TORCH), a copy of this
# tree (a clone at HEAD, this tree's tracked and untracked-but-not-ignored files over it; the
# build writes neurokern/_C*.so into the tree it builds, so versions never share one) in
# .venv-matrix/src-VERSION, built in the venv
# .venv-matrix/pyX.Y-torch-VERSION (of $PYTHON; kept: a rerun installs nothing new), then
# MATRIX_TESTS (--full: the whole suite) there. Every version runs; fails if any failed.
# --venvs: only create the venvs with their torch (what is downloaded), nothing else.
# NEUROKERN_MATRIX_TIMEOUT=SECONDS: each version's time box; a version past it has failed.
matrix() {
    local full=0 venvs_only=0 versions=() version passed=() failed=()
    while [ $# -gt 0 ]; do
        case "$1" in
            --full) full=1 ;;
            --venvs) venvs_only=1 ;;
            -*) echo "run.sh matrix: unknown option $1 (usage: matrix [--full|--venvs] [VERSION...])" >&2
                exit 2 ;;
            *) versions+=("$1") ;;
        esac
        shift
    done
    [ ${#versions[@]} -gt 0 ] || versions=("${MATRIX_TORCH[@]}")
    local root=$PWD/.venv-matrix py
    py=$("$PYTHON" -c 'import sys; print("py%d.%d" % sys.version_info[:2])')
    mkdir -p "$root"
    for version in "${versions[@]}"; do
        local src=$root/src-$py-$version venv=$root/$py-torch-$version start=$SECONDS
        if [ "$venvs_only" -eq 1 ]; then
            NEUROKERN_TORCH=torch==$version make_venv "$venv"
            echo "[matrix] torch $version: venv $venv in $((SECONDS - start)) s"
            continue
        fi
        echo "[matrix] torch $version: copying the tree to $src"
        rm -rf "$src"
        # a clone at this commit, with its history (tests/test_install.py copies the files `git
        # ls-files` lists, which inside this ignored folder would be none; neurokern.verified
        # reads the benchmark rows' commits with `git blame`), then this tree's files over it
        git clone -q --shared --no-checkout . "$src"
        git -C "$src" checkout -q --detach "$(git rev-parse HEAD)"
        git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$src"
        # `run.sh test` always runs pytest on tests/: the subset is the rest of it --ignore'd
        local tests=() file
        if [ "$full" -eq 0 ]; then
            for file in tests/test_*.py; do
                [[ " ${MATRIX_TESTS[*]} " == *" $file "* ]] || tests+=("--ignore=$file")
            done
        fi
        # the time box: NEUROKERN_MATRIX_TIMEOUT seconds per version (set-up, build and tests)
        local box=()
        [ -z "${NEUROKERN_MATRIX_TIMEOUT:-}" ] || box=(timeout -k 30 "$NEUROKERN_MATRIX_TIMEOUT")
        local rc=0
        NEUROKERN_VENV=$venv NEUROKERN_TORCH=torch==$version \
            "${box[@]}" bash "$src/run.sh" test -q -p no:cacheprovider "${tests[@]}" || rc=$?
        if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
            echo "[matrix] torch $version: stopped at the time box of $NEUROKERN_MATRIX_TIMEOUT s" \
                 "(NEUROKERN_MATRIX_TIMEOUT): a failure" >&2
        fi
        if [ "$rc" -eq 0 ] &&
            "$venv/bin/python" -c "import sys, torch
if torch.__version__.split('+')[0] != sys.argv[1]:
    sys.exit(f'run.sh matrix: asked for torch {sys.argv[1]}, the venv has {torch.__version__}')
print('[matrix] passed on torch', torch.__version__, 'Python', sys.version.split()[0])" "$version"
        then
            passed+=("$version")
        else
            failed+=("$version")
        fi
        echo "[matrix] torch $version: $((SECONDS - start)) s (set-up, build and tests)"
    done
    [ "$venvs_only" -eq 0 ] || return 0
    echo "[matrix] $py, torch: passed ${passed[*]:-none}; failed ${failed[*]:-none}"
    [ ${#failed[@]} -eq 0 ]
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
    sdist)
        sdist_check
        ;;
    matrix)
        shift
        matrix "$@"
        ;;
    *)
        echo "usage: bash run.sh main|test|sdist|matrix [args]" >&2
        exit 2
        ;;
esac
