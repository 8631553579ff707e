#!/usr/bin/env bash
# Create .venv (if missing) and install growmem with its dev extras. Torch is pinned to 2.13.0:
# on our machines that resolves to a local CPU wheel. GPU users: see README ("Installing on a GPU").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet "torch==${GROWMEM_TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install --quiet -e ".[dev,exp,hf,eval]" "torch==${GROWMEM_TORCH_VERSION:-2.13.0}"
