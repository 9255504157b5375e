#!/bin/bash
# Issue 10: ℓ=20 step-matched against the shipped ℓ=10 GistNet — the shipped run's exact
# command and schedule (lr 1e-3, 20 warm-up steps, cosine over 600, same seed and data),
# only gist.input_layer changed (10 -> 20); the shipped net stopped at step 340.
set -e
cd /work/main
.venv/bin/python experiments/train_gist.py --config smollm2_135m_cpu --workdir runs/gist_l20_matched \
  --set gist.input_layer=20 --set train.steps=600 --set train.eval_every=100000 \
  --set train.checkpoint_every=20 --eval-batches 1 --no-progress "$@"
