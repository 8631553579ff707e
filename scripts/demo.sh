#!/usr/bin/env bash
# Set up (fresh machine OK) and run the demo: a tiny byte-level LM trained for a few seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/growmem demo "$@"
