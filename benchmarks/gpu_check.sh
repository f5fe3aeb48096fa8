#!/usr/bin/env bash
# The GPU check: what the CPU machines cannot show, in at most 9 minutes on one CUDA GPU.
#
#   bash benchmarks/gpu_check.sh [PEAK_TFLOPS]      # e.g. 989 for an H100/H200 (bf16 dense)
#
# The interpreter: PYTHON if set, else .venv/bin/python (after `make setup`), else python3 (a CUDA
# PyTorch image's). Packages it lacks are installed from .whl/ without a package index: run
# `make gpu-wheels` beforehand on a machine that reaches one, and bring .whl/ along.
#
# It prints, each step under its own time limit and with its time:
#   1. the loss benchmark on CUDA at V = 128k (chunked vs unchunked, eager vs compiled chunks);
#   2. the memory benchmark on CUDA in bf16: one optimizer step per variant at V = 128k and 152k,
#      N = 16k tokens, fused-linear vs plain logits (max_memory_allocated);
#   3. the training benchmark with a Pythia-1.4B-shaped teacher (its offline cache) and a
#      Pythia-160M-shaped student on Dolly-shaped lengths (random init, 50,304-token vocabulary,
#      ZeRO-2, bf16, DeepSpeed's fused Adam), padded vs packed: response tokens/s, model FLOPs
#      utilisation against PEAK_TFLOPS, and SFT through the model's own output layer as the
#      reference row;
#   4. the demo pipeline on CUDA: `atkd run` where Prefect and MLflow import, else the same stages
#      called directly (what `atkd run` orchestrates).
# A step that fails or runs past its limit is reported and the next one still runs; the exit code
# is the number of steps that failed.
set -uo pipefail
cd "$(dirname "$0")/.."
if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python3
fi
PEAK=${1:-989}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PREFECT_SERVER_ANALYTICS_ENABLED=false PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
failed=0
started_all=$SECONDS

step() {  # step SECONDS TITLE COMMAND...
  local limit=$1 title=$2
  shift 2
  echo
  echo "=== [$((SECONDS - started_all)) s] ${title} (limit ${limit} s)"
  local started=$SECONDS
  if timeout "$limit" "$@"; then
    echo "--- done in $((SECONDS - started)) s"
  else
    echo "--- FAILED or timed out after $((SECONDS - started)) s"
    failed=$((failed + 1))
  fi
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || failed=$((failed + 1))
if ! "$PY" -c "import deepspeed, datasets, pydantic, transformers" 2>/dev/null; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    echo "installing the carried wheels (.whl/) into /tmp/atkd-site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/atkd-site .whl/*.whl \
      || exit 1
    export PYTHONPATH="$PWD:/tmp/atkd-site"
  else
    echo "the interpreter $PY lacks packages and .whl/ holds no wheels: run make gpu-wheels first" >&2
    exit 1
  fi
fi
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('torch', torch.__version__, torch.cuda.get_device_name())" || exit 1
echo "code: $(git rev-parse --short HEAD 2>/dev/null || echo 'not a git checkout')$(git diff --quiet 2>/dev/null || echo ' (with uncommitted changes)')"

step 75 "loss benchmark, CUDA, V=128256" \
  "$PY" benchmarks/loss_bench.py --device cuda --vocab 128256 --tokens 16384 --chunk 1024
step 150 "memory benchmark, CUDA, bf16" \
  "$PY" benchmarks/memory_bench.py --device cuda --dtype bfloat16 --vocab 128256 152064 --tokens 16384
step 210 "training: Pythia-1.4B-shaped teacher, Pythia-160M-shaped student, Dolly-shaped, padded vs packed, bf16" \
  "$PY" benchmarks/train_bench.py --teacher neox-1.4b --student neox-160m --steps 8 --peak-tflops "$PEAK" \
  --cases sft "sft plain logits" "kd offline" "atkd offline" "atkd online" \
  --set tokenizer.pad_to=50304 --set distill.training.precision=bf16 \
  --set distill.training.optim.name=adamw_deepspeed --set distill.training.batch_size=64 \
  --set distill.training.micro_batch_size=64 --set scoring.top_k=64
DEMO_SETTINGS=(--set workdir=runs/demo-cuda --set finetune.training.precision=auto --set distill.training.precision=auto)
if "$PY" -c "import prefect, mlflow" 2>/dev/null; then
  step 90 "demo pipeline on CUDA" "$PY" -m flows.cli run configs/demo.yaml "${DEMO_SETTINGS[@]}"
else
  step 90 "demo pipeline on CUDA, its stages called directly (Prefect or MLflow do not import)" \
    "$PY" -m flows.cli run configs/demo.yaml --direct "${DEMO_SETTINGS[@]}"
fi

echo
echo "gpu_check: ${failed} step(s) failed in $((SECONDS - started_all)) s"
exit "$failed"
