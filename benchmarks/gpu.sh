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

# 2. vlm-tiny-shapes, longer than the CPU run (issue 19): 220 s of training (a killed run resumes
#    from its checkpoint: rerun the same line), then caption BLEU-4/CIDEr-D and word pointing on
#    200 test scenes in 60 s; the summary is copied into the results
timeout 220 "$py" -m groundcam train vlm --out "$work/vlm-tiny-shapes" --steps 6000 \
  --batch-size 64 --lr 1e-3 --warmup 200 --seed 0 --pool 20000 --eval-every 1000 \
  --save-every 500 --precision fp32 > "$work/vlm-train.log" 2>&1 \
  || echo "train vlm: stopped by its timeout or failed (exit $?); rerun to resume"
if [ -d "$work/vlm-tiny-shapes/model" ]; then
  timeout 60 "$py" -m groundcam eval captions --model "$work/vlm-tiny-shapes/model" --split test \
    --scenes 200 --max-new-tokens 40 --out "$work/vlm-eval-test" > "$work/vlm-eval.log" 2>&1 \
    && cp "$work/vlm-eval-test/summary.json" "$out/vlm_tiny_shapes_gpu_eval_test.json"
fi
