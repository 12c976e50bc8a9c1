#!/usr/bin/env bash
# Compile-only check of the CUDA kernels: builds fasthvae._C with the CUDA sources (sm_80, sm_90)
# into build/cuda-check, leaving the installed extension alone. Nothing built here is run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if ! command -v nvcc >/dev/null 2>&1 && [ ! -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]; then
  echo "check_cuda_build: nvcc not found; skipping the CUDA compile check"
  exit 0
fi
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export FASTHVAE_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0+PTX"}
export MAX_JOBS=${MAX_JOBS:-2}
start=$(date +%s)
"$PY" setup.py -q build_ext --build-temp build/cuda-check/tmp --build-lib build/cuda-check/lib
so=$(find build/cuda-check/lib -name '_C*.so' | head -n 1)
test -n "$so"
nm -DC "$so" | grep "fasthvae::forward_cuda" >/dev/null || { echo "no CUDA kernels in $so"; exit 1; }
# cuobjdump: the CUDA toolkit's, else the one Triton bundles.
CUOBJDUMP=$(command -v cuobjdump || "$PY" -c "import os, triton; print(os.path.join(os.path.dirname(triton.__file__), 'backends/nvidia/bin/cuobjdump'))")
if [ -x "$CUOBJDUMP" ]; then
  "$CUOBJDUMP" --list-elf "$so" | grep -E "sm_(80|90)"
  # Registers per thread and local memory (spills) of every kernel, as ptxas allotted them.
  "$CUOBJDUMP" --dump-resource-usage "$so" | grep -oE "REG:[0-9]+|LOCAL:[0-9]+" | awk -F: '
    $1 == "REG" { n++; if ($2 > regs) regs = $2 }
    $1 == "LOCAL" && $2 > 0 { spills++ }
    END { printf "check_cuda_build: %d kernels, at most %d registers per thread, %d with local memory (spills)\n", n, regs, spills
          exit spills > 0 }'
fi
echo "check_cuda_build: OK ($so, $(( $(date +%s) - start ))s, archs $TORCH_CUDA_ARCH_LIST)"
