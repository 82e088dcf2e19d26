#!/usr/bin/env bash
# Every GPU benchmark and training run we owe, in one call of the device tool: each section under
# its own timeout so the whole ends within 10 minutes on one H100/H200.
#   bash benchmarks/gpu.sh [RESULTS_DIR]   (default benchmarks/results; work files in gpu-out/)
set -u
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results}
work=${WORK:-gpu-out}
py=${PYTHON:-python}
mkdir -p "$out" "$work"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}

# 1. per-token maps of a 30-token answer on 7B-shaped LLaVA-1.5 and Qwen2.5-VL, bf16, random
#    weights (issue 18's speed goals): 2 x 140 s at most
for model in llava-7b qwen2.5-vl-7b; do
  timeout 140 "$py" benchmarks/vlm_tokens.py --model "$model" --device cuda --dtype bf16 \
    --tokens 30 --repeats 3 --out "$out/vlm_tokens_gpu_${model}_bf16.json" \
    || echo "vlm_tokens $model: failed or timed out (exit $?)"
done
