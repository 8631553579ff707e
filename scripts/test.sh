#!/usr/bin/env bash
# Set up (fresh machine OK) and run the whole test suite: ruff, then pytest on 2 workers, 1 thread each.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
.venv/bin/ruff check src tests bench
.venv/bin/python -m pytest -n 2 -q "$@"
