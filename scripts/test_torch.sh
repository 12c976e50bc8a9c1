#!/usr/bin/env bash
# The CPU test suite under another Python environment: another torch (CI runs 2.14.1; 2.11 is the
# oldest supported and the GPU machine's), another Triton or numpy. The environment needs torch,
# Triton, numpy, pytest, pytest-xdist and the test extras, and no fasthvae install: the tree as it
# is now (tracked and new files) is copied to a temporary folder, with ../shared beside it where
# this checkout has one, the C++ extension is built there against that torch (CPU kernels only),
# and pytest runs there. Tests that need fasthvae installed (tests/test_cli.py) fail in such an
# environment.
#   bash scripts/test_torch.sh PYTHON [pytest arguments]     e.g. ~/venv211/bin/python
set -euo pipefail
PY=${1:?usage: bash scripts/test_torch.sh PYTHON [pytest arguments]}
shift
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
[ -d "$ROOT/../shared" ] && ln -s "$(cd "$ROOT/../shared" && pwd)" "$WORK/shared"
# The self-check rehearsal's copy: what git lists (tracked, and new files it does not ignore).
(cd "$ROOT" && "$PY" -c 'import sys; from pathlib import Path
from fasthvae.selfcheck.rehearsal import copy_tree
copy_tree(Path.cwd(), Path(sys.argv[1]), with_extension=False)' "$WORK/tree")
cd "$WORK/tree"
git init -q && git add -A  # a checkout of its own: the self-check's rehearsal copies what git lists
"$PY" -c "import sys, numpy, torch, triton
print(f'Python {sys.version.split()[0]}, torch {torch.__version__}, Triton {triton.__version__}, numpy {numpy.__version__}')"
FASTHVAE_BUILD_CUDA=0 "$PY" setup.py -q build_ext --inplace > "$WORK/build.log" 2>&1 ||
  { tail -n 20 "$WORK/build.log"; exit 1; }
"$PY" -m pytest -q -p no:cacheprovider -n "${FASTHVAE_TEST_WORKERS:-auto}" --dist worksteal "${@:-tests}"
