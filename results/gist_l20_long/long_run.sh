#!/bin/bash
# Issue 10 item 7: the longer GistNet run at ℓ=20 with an EMA of its params (decay 0.99).
# As run this session the schedule length was cut three times to fit the session, each
# time on resuming from a checkpoint: train.steps=560 for steps 0-20, 400 for 20-60, 320
# for 60-100, 250 from 100; stopped after the step-220 checkpoint. The warm-up (20 steps)
# is identical in all; the cosine factor jumped 0.95 -> 0.91 at step 60 and 0.85 -> 0.79
# at step 100. metrics.jsonl keeps every segment's rows (steps 20-24 and 60-76 twice).
set -e
cd /work/main
.venv/bin/python experiments/train_gist.py --config smollm2_135m_cpu --workdir runs/gist_l20_long \
  --set gist.input_layer=20 --set train.learning_rate=1e-3 --set train.steps=250 \
  --set train.warmup_steps=20 --set train.ema_decay=0.99 --set train.eval_every=100000 \
  --set train.checkpoint_every=20 --eval-batches 1 --no-progress
