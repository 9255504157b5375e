#!/bin/bash
# Issue 10: the long ℓ=20 run's params vs their EMA, paired with the shipped GistNet.
set -e
cd /work/main
W=runs/gist_l20_long
PY=.venv/bin/python
$PY experiments/export_gist.py --workdir $W --out runs/gist_l20_long_raw.safetensors --dtype float16
$PY experiments/export_gist.py --workdir $W --out runs/gist_l20_long_ema.safetensors --dtype float16 --ema
EV="--config smollm2_135m_cpu --only dnll --windows 64 --nll-batch-size 8 --keep-raw 1 --variants gistnet --no-progress"
$PY experiments/evaluate.py --gist-params runs/gist_l20_long_ema.safetensors --out runs/eval_l20_long_ema $EV
$PY experiments/evaluate.py --gist-params runs/gist_l20_long_raw.safetensors --out runs/eval_l20_long_raw $EV
echo "=== EMA vs shipped"; python3 results/gist_sweep/paired.py results/eval_gist_v2 runs/eval_l20_long_ema
echo "=== raw vs shipped"; python3 results/gist_sweep/paired.py results/eval_gist_v2 runs/eval_l20_long_raw
echo "=== EMA vs raw"; python3 results/gist_sweep/paired.py runs/eval_l20_long_raw runs/eval_l20_long_ema
echo "=== done $(date)"
