#!/usr/bin/env bash
# The whole check in one command, set-up included (fresh machine or not):
#   a venv in .venv (torch 2.14.1 + fasthvae with its C++ extension), ruff, the CUDA compile check
#   (when nvcc is present), the Triton ahead-of-time compile for sm_80/sm_90, and pytest.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${FASTHVAE_VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
export PATH="$(pwd)/$VENV/bin:${CUDA_HOME:-/usr/local/cuda}/bin:$PATH"
"$PY" -c "import torch, torchvision" 2>/dev/null || "$PY" -m pip install -q torch==2.14.1 torchvision==0.29.1
"$PY" -m pip install -q --no-build-isolation -e ".[dev,eval,dali,onednn]" 2>&1 | grep -v "is ignored" || true
"$PY" -c "import torch, fasthvae._C"  # the build above must have produced the extension

echo "== ruff"
"$PY" -m ruff check .
"$PY" -m ruff format --check .

echo "== CUDA compile check"
PYTHON="$PY" bash scripts/check_cuda_build.sh 2>&1 | grep -v "is ignored" | tail -n 3

echo "== Triton ahead-of-time compile (sm_80, sm_90; fp32, fp16, bf16; fails on spills or occupancy < 50%)"
mkdir -p build
env -u TRITON_INTERPRET "$PY" -m fasthvae.ops.triton_aot --arch 80 90 --also tests.triton_kernels \
  --report build --strict \
  > build/triton_aot.log || { tail -n 5 build/triton_aot.log; echo "see build/triton_resources.md"; exit 1; }
tail -n 1 build/triton_aot.log

echo "== pytest"
set +e
# pytest-xdist: one worker per core (FASTHVAE_TEST_WORKERS=0 runs the tests in this process).
"$PY" -m pytest -q -p no:cacheprovider -n "${FASTHVAE_TEST_WORKERS:-auto}" --dist worksteal "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests"
  rc=0
fi
exit "$rc"
