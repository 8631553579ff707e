#!/usr/bin/env bash
# Set up (fresh machine OK) and run the demo: MQAR with a recurrent memory, its Memory-Caching (GRM)
# version and a Transformer (see README; ~10 min on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/growmem demo "$@"
