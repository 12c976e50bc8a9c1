#!/usr/bin/env bash
# The GPU self-check in one command (see fasthvae/selfcheck.py): builds the CUDA kernels for the GPU
# present, runs every GPU test and the benchmarks on the GPU, writes OUT/report.md (default
# gpu-check/). Without a GPU it says so and exits 1.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" -m fasthvae.selfcheck "${1:-gpu-check}" "${@:2}"
