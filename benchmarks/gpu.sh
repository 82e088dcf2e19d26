#!/usr/bin/env bash
# The GPU benchmarks, each under its own timeout so the whole stays under 10 minutes on one
# H100/H200: bash benchmarks/gpu.sh [RESULTS_DIR] (default benchmarks/results).
set -u
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results}
py=${PYTHON:-python}
mkdir -p "$out"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}

# per-token maps of a 30-token answer on 7B-shaped LLaVA-1.5 and Qwen2.5-VL, bf16, random weights
for model in llava-7b qwen2.5-vl-7b; do
  timeout 270 "$py" benchmarks/vlm_tokens.py --model "$model" --device cuda --dtype bf16 \
    --tokens 30 --repeats 3 --out "$out/vlm_tokens_gpu_${model}_bf16.json" \
    || echo "vlm_tokens $model: failed or timed out (exit $?)"
done
