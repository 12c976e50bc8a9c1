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
if command -v cuobjdump >/dev/null 2>&1; then cuobjdump --list-elf "$so" | grep -E "sm_(80|90)"; fi
echo "check_cuda_build: OK ($so, $(( $(date +%s) - start ))s, archs $TORCH_CUDA_ARCH_LIST)"
