#!/bin/bash
set -e
cd /work/main
COMMON="--config smollm2_135m_cpu --no-resume --no-progress --eval-batches 1 --set train.steps=100 --set train.warmup_steps=10 --set train.eval_every=1000 --set train.checkpoint_every=25"
EV="--only dnll --windows 64 --nll-batch-size 8 --keep-raw 1 --variants gistnet --no-progress"
echo "=== l10_mlp eval $(date)"
.venv/bin/python experiments/evaluate.py --checkpoint runs/sweep_l10_mlp --set gist.head=mlp --out runs/eval_sweep_l10_mlp $EV
echo "=== l20_transformer $(date)"
.venv/bin/python experiments/train_gist.py $COMMON --set gist.input_layer=20 --workdir runs/sweep_l20_transformer
.venv/bin/python experiments/evaluate.py --checkpoint runs/sweep_l20_transformer --set gist.input_layer=20 --out runs/eval_sweep_l20_transformer $EV
echo "=== done $(date)"
