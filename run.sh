#!/usr/bin/env bash
# The two commands of the README's Quick start:
#   bash run.sh walkthrough   set up, then execute every notebook headless into outputs/walkthrough/
#   bash run.sh test          set up, then run the default test suite (extra arguments go to pytest)
# and one for CI and authors:
#   bash run.sh notebooks     set up, then only the notebooks against their stored outputs (nbval)
# Setup = a .venv made with `python3 -m venv` if missing, and `pip install -e '.[dev]'` whenever
# pyproject.toml changed since the last install (a stamp file in .venv holds its hash).
set -euo pipefail

usage() {
    echo "usage: bash run.sh {walkthrough|test|notebooks} [pytest arguments]" >&2
    exit 2
}
[ $# -ge 1 ] || usage
command=$1
shift
case "$command" in
    walkthrough | test | notebooks) ;;
    *) usage ;;
esac

cd "$(dirname "${BASH_SOURCE[0]}")"
ROOT=$(pwd)
PYTHON=${PYTHON:-python3}

setup() {
    if [ ! -x .venv/bin/python ]; then
        echo "run.sh: creating .venv with $PYTHON"
        "$PYTHON" -m venv .venv
    fi
    local stamp=.venv/.miclip-install-stamp want
    want=$(.venv/bin/python -c 'import hashlib, sys; print(hashlib.sha256(open("pyproject.toml", "rb").read()).hexdigest())')
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! .venv/bin/python -c "import miclip_nb" 2>/dev/null; then
        echo "run.sh: installing miclip-nb and its dependencies into .venv (first time: a few minutes)"
        .venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
        .venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
        echo "$want" >"$stamp"
    fi
    # shellcheck disable=SC1091
    source .venv/bin/activate
    # The toy models are small: one torch thread per process is as fast on 2 cores, and two threads
    # competing with another busy process are many times slower (notebooks, tests). Override freely.
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    # Real photos for the tests that need them (skipped when absent).
    if [ -z "${MICLIP_IMAGENET_SAMPLE:-}" ] && [ -d "$ROOT/../shared/imagenet-sample-500" ]; then
        MICLIP_IMAGENET_SAMPLE=$(cd "$ROOT/../shared/imagenet-sample-500" && pwd)
        export MICLIP_IMAGENET_SAMPLE
    fi
}

run_tests() {
    # Unit tests and every notebook (nbval compares the stored, sanitized outputs), in one run; the
    # first argument names what to collect ("tests notebooks" or "notebooks").
    # Progress bars are off so that notebook outputs are comparable. The notebooks' kernels get a
    # fresh cache folder, so that they train and capture again rather than reuse a user's (or an
    # earlier run's) stores and encoders: nbval then checks what this machine computes.
    local paths=$1
    shift
    local cache
    cache=$(mktemp -d "${TMPDIR:-/tmp}/miclip-test-cache.XXXXXX")
    # shellcheck disable=SC2064
    trap "rm -rf '$cache'" EXIT
    # shellcheck disable=SC2086
    MICLIP_CACHE_DIR=$cache TQDM_DISABLE=1 python -m pytest $paths --nbval --nbval-sanitize-with notebooks/nbval_sanitize.cfg \
        --nbval-cell-timeout=900 "$@"
}

run_walkthrough() {
    local out=outputs/walkthrough notebooks=()
    shopt -s nullglob
    notebooks=(notebooks/*.ipynb)
    shopt -u nullglob
    if [ ${#notebooks[@]} -eq 0 ]; then
        echo "run.sh: no notebooks in notebooks/ yet; nothing to execute."
        return 0
    fi
    mkdir -p "$out"
    for nb in "${notebooks[@]}"; do
        echo "run.sh: executing $nb"
        jupyter nbconvert --to notebook --execute --ExecutePreprocessor.timeout=1800 \
            --ExecutePreprocessor.kernel_name=python3 --output-dir "$out" "$nb"
    done
    echo
    echo "run.sh: the executed notebooks are in $ROOT/$out/"
    ls -1 "$out"
}

setup
case "$command" in
    test) run_tests "tests notebooks" "$@" ;;
    notebooks) run_tests "notebooks" "$@" ;;
    walkthrough) run_walkthrough ;;
esac
