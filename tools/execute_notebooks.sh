#!/usr/bin/env bash
# Re-execute notebooks so that their stored outputs are the ones nbval compares against.
# Usage: bash tools/execute_notebooks.sh [notebooks/NN_name.py ...]   (default: all)
#
# The percent scripts notebooks/NN_*.py are the source an author edits (or the .ipynb in JupyterLab:
# `jupytext --sync` carries an edit either way; tests/test_notebooks.py fails when the two disagree).
# This script: syncs each script into its .ipynb (inputs only), executes it in place as nbval does
# (progress bars off, a fresh cache folder, one thread, the python3 kernel), then removes widget
# state from the file (a live panel's state belongs to a session, not to the notebook).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export TQDM_DISABLE=1 MPLBACKEND=module://matplotlib_inline.backend_inline OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export MICLIP_CACHE_DIR=${MICLIP_CACHE_DIR:-$(mktemp -d)}
scripts=("$@")
[ ${#scripts[@]} -gt 0 ] || scripts=(notebooks/[0-9]*.py)
for script in "${scripts[@]}"; do
    nb="${script%.py}.ipynb"
    start=$(date +%s)
    jupytext --quiet --to ipynb --update --output "$nb" "$script"
    jupyter nbconvert --log-level=WARN --to notebook --execute --inplace --ExecutePreprocessor.timeout=1800 \
        --ExecutePreprocessor.kernel_name=python3 "$nb"
    python tools/strip_widget_state.py "$nb"
    echo "executed $nb in $(( $(date +%s) - start )) s"
done
