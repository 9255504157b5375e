#!/bin/bash
# Issue 10 item 4: GistNet input layer and head, short runs from scratch with equal steps,
# seed and data; each evaluated on 64 in-document held-out windows (paired vs truncation).
set -e
cd /work/main
COMMON="--config smollm2_135m_cpu --no-resume --no-progress --eval-batches 1 --set train.steps=100 --set train.warmup_steps=10 --set train.eval_every=1000 --set train.checkpoint_every=25"
for spec in "l10_transformer:" "l10_mlp:--set gist.head=mlp" "l20_transformer:--set gist.input_layer=20" "l4_transformer:--set gist.input_layer=4"; do
  name=${spec%%:*}; extra=${spec#*:}
  echo "=== $name $(date)"
  if [ ! -f runs/sweep_$name/summary.json ]; then
    .venv/bin/python experiments/train_gist.py $COMMON $extra --workdir runs/sweep_$name
  fi
  .venv/bin/python experiments/evaluate.py --checkpoint runs/sweep_$name --out runs/eval_sweep_$name \
      --only dnll --windows 64 --nll-batch-size 8 --keep-raw 1 --variants gistnet --no-progress
  echo "=== $name done $(date)"
done
