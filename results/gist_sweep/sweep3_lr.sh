#!/bin/bash
# Issue 10 item 5: peak learning rate, ℓ=20 transformer head, 100 steps at lr 3e-3 (the
# sweep's l20_transformer run is the same at 1e-3: same seed, data and schedule).
set -e
cd /work/main
PY=.venv/bin/python
COMMON="--config smollm2_135m_cpu --no-resume --no-progress --eval-batches 1 --set train.steps=100 --set train.warmup_steps=10 --set train.eval_every=1000 --set train.checkpoint_every=25"
EV="--only dnll --windows 64 --nll-batch-size 8 --keep-raw 1 --variants gistnet --no-progress"
$PY experiments/train_gist.py $COMMON --set gist.input_layer=20 --set train.learning_rate=3e-3 --workdir runs/sweep_l20_lr3e-3
$PY experiments/evaluate.py --checkpoint runs/sweep_l20_lr3e-3 --set gist.input_layer=20 --out runs/eval_sweep_l20_lr3e-3 $EV
# paired against the 1e-3 run, window by window:
python3 results/gist_sweep/paired.py results/gist_sweep/l20_transformer runs/eval_sweep_l20_lr3e-3
