#!/usr/bin/env bash
# The GPU check: what the CPU machines cannot show, in at most 9 minutes on one CUDA GPU.
#
#   make setup && bash benchmarks/gpu_check.sh [PEAK_TFLOPS]      # e.g. 989 for an H100/H200 (bf16 dense)
#   PYTHON=python3 bash benchmarks/gpu_check.sh                    # another interpreter with the packages
#
# It prints, each step under its own time limit:
#   1. the loss benchmark on CUDA at V = 128k (chunked vs unchunked, ATKD vs forward KL);
#   2. the memory benchmark on CUDA in bf16: one optimizer step per variant at V = 128k and 152k,
#      N = 16k tokens, fused-linear vs plain logits (max_memory_allocated);
#   3. the training benchmark with a Pythia-1.4B-shaped teacher and a Pythia-160M-shaped student
#      (random init, 50,304-token vocabulary, ZeRO-2, bf16, DeepSpeed's fused Adam): tokens/s and
#      model FLOPs utilisation against PEAK_TFLOPS;
#   4. the demo pipeline on CUDA (bf16 where the config says auto): `atkd run` where Prefect and
#      MLflow import, else the same stages called directly (what `atkd run` orchestrates).
# A step that fails or runs past its limit is reported and the next one still runs; the exit code
# is the number of steps that failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
PEAK=${1:-989}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PREFECT_SERVER_ANALYTICS_ENABLED=false PYTHONUNBUFFERED=1
failed=0

step() {  # step SECONDS TITLE COMMAND...
  local limit=$1 title=$2
  shift 2
  echo
  echo "=== ${title} (limit ${limit} s)"
  local started=$SECONDS
  if timeout "$limit" "$@"; then
    echo "--- done in $((SECONDS - started)) s"
  else
    echo "--- FAILED or timed out after $((SECONDS - started)) s"
    failed=$((failed + 1))
  fi
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || failed=$((failed + 1))
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('torch', torch.__version__, torch.cuda.get_device_name())" || exit 1

step 45 "loss benchmark, CUDA, V=128256" \
  "$PY" benchmarks/loss_bench.py --device cuda --vocab 128256 --tokens 16384 --chunk 1024
step 200 "memory benchmark, CUDA, bf16" \
  "$PY" benchmarks/memory_bench.py --device cuda --dtype bfloat16 --vocab 128256 152064 --tokens 16384
step 180 "training: Pythia-1.4B-shaped teacher, Pythia-160M-shaped student, ZeRO-2, bf16, fused Adam" \
  "$PY" benchmarks/train_bench.py --teacher neox-1.4b --student neox-160m --steps 8 --peak-tflops "$PEAK" \
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
echo "gpu_check: ${failed} step(s) failed"
exit "$failed"
