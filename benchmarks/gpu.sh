#!/usr/bin/env bash
# What to run when a GPU is lent (one call of the device tool; the whole script must end within
# 10 minutes). Each section has its own `timeout`; results go under $OUT (default ./gpu-out).
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
PY=${PY:-python}
export PYTHONPATH=${PYTHONPATH:-$PWD/src}

# vlm-tiny-shapes, longer than the CPU run (DESIGN §12, issue 19): 7 minutes of training (a killed
# run resumes from its checkpoint: rerun the same line), then caption BLEU-4/CIDEr-D and word
# pointing on 200 test scenes, 1.5 minutes.
timeout 420 $PY -m groundcam train vlm --out "$OUT/vlm-tiny-shapes" --steps 6000 \
  --batch-size 64 --lr 1e-3 --warmup 200 --seed 0 --pool 20000 --eval-every 1000 \
  --save-every 500 --precision fp32 > "$OUT/vlm-train.log" 2>&1
if [ -d "$OUT/vlm-tiny-shapes/model" ]; then
  timeout 90 $PY -m groundcam eval captions --model "$OUT/vlm-tiny-shapes/model" --split test \
    --scenes 200 --max-new-tokens 40 --out "$OUT/vlm-eval-test" > "$OUT/vlm-eval.log" 2>&1
fi
