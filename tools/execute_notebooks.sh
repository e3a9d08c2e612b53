#!/usr/bin/env bash
# Re-execute notebooks in place so that their stored outputs are the ones nbval compares against.
# Usage: bash tools/execute_notebooks.sh [notebooks/NN_name.ipynb ...]   (default: all)
# Runs as nbval does: progress bars off (TQDM_DISABLE), a fresh cache folder, the python3 kernel.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export TQDM_DISABLE=1 MPLBACKEND=module://matplotlib_inline.backend_inline OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export MICLIP_CACHE_DIR=${MICLIP_CACHE_DIR:-$(mktemp -d)}
notebooks=("$@")
[ ${#notebooks[@]} -gt 0 ] || notebooks=(notebooks/*.ipynb)
for nb in "${notebooks[@]}"; do
    start=$(date +%s)
    jupyter nbconvert --to notebook --execute --inplace --ExecutePreprocessor.timeout=1800 \
        --ExecutePreprocessor.kernel_name=python3 "$nb"
    echo "executed $nb in $(( $(date +%s) - start )) s"
done
