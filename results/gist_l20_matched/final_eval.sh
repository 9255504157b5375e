#!/bin/bash
# Issue 10: stop the ℓ=20 run after its step-340 checkpoint (the shipped ℓ=10 net's step),
# export it as fp16 like the shipped file, score it on the same 64 held-out windows as
# results/eval_gist_v2 and pair it window by window with the shipped GistNet.
set -e
cd /work/main
W=runs/gist_l20_matched
PY=.venv/bin/python
until [ -d $W/checkpoints/340 ] && grep -q '"step": 344' $W/metrics.jsonl; do sleep 20; done
pkill -f "workdir $W" || true
sleep 5
$PY experiments/export_gist.py --workdir $W --step 340 --out runs/gist_l20_matched_340.safetensors --dtype float16
$PY experiments/evaluate.py --config smollm2_135m_cpu --gist-params runs/gist_l20_matched_340.safetensors \
  --out runs/eval_l20_matched --only dnll --windows 64 --nll-batch-size 8 --keep-raw 1 --variants gistnet --no-progress
echo "=== ℓ=20 step 340 (B) vs shipped ℓ=10 step 340 (A)"
python3 results/gist_sweep/paired.py results/eval_gist_v2 runs/eval_l20_matched
echo "=== done $(date)"
