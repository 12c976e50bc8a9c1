#!/usr/bin/env bash
# The GPU self-check in one command (see fasthvae/selfcheck.py): builds the CUDA kernels for the GPU
# present, runs every GPU test and the benchmarks on the GPU, writes OUT/report.md (default
# gpu-check/). Without a GPU it says so and exits 1. The interpreter is $PYTHON when set, else the
# first of python3 and python that imports torch.
set -euo pipefail
cd "$(dirname "$0")/.."
for candidate in ${PYTHON:-python3 python}; do
  if command -v "$candidate" >/dev/null && "$candidate" -c "import torch" 2>/dev/null; then
    exec "$candidate" -m fasthvae.selfcheck "${1:-gpu-check}" "${@:2}"
  fi
done
echo "gpu_check.sh: no Python here imports torch (tried: ${PYTHON:-python3 python}); set PYTHON=/path/to/python" >&2
exit 2
