#!/usr/bin/env bash
# Set up (first time only) and run the whole pipeline on the embedded demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/atkd run pipeline.yaml "$@"
