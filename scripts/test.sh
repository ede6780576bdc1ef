#!/usr/bin/env bash
# Set up (first time only), lint with ruff, then run the tests in two tiers:
#
#   bash scripts/test.sh [ARGS]               ruff, the unit tier, then the integration tier (what CI runs)
#   bash scripts/test.sh unit [ARGS]          ruff and the unit tier only (fast: no subprocesses)
#   bash scripts/test.sh integration [ARGS]   ruff and the integration tier only
#
# ARGS go to pytest. Tests marked `slow` are in neither tier (-m slow runs them). A tier that
# collects no test fails (pytest exit code 5): CI never passes on an empty selection.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

tier=all
case "${1:-}" in
  unit | integration | all) tier=$1; shift ;;
esac
PY=.venv/bin/python

echo "[test] ruff check"
"$PY" -m ruff check .
if [ "$tier" != integration ]; then
  echo "[test] unit tier"
  "$PY" -m pytest -m "not slow and not integration" "$@"
fi
if [ "$tier" != unit ]; then
  echo "[test] integration tier"
  "$PY" -m pytest -m "integration and not slow" "$@"
fi
