#!/bin/bash
# issue 11 item 3(c): fine-tune the shipped LensNet v2 on counterfactual utilities (real text)
cd /work/main
exec .venv/bin/python experiments/train_lens.py --config smollm2_135m_cpu --workdir runs/lens_v2_cf \
  --gist-params mcjax/assets/gistnet_smollm2_135m.safetensors \
  --init-lens mcjax/assets/lensnet_smollm2_135m.safetensors \
  --set train.steps=80 --set train.learning_rate=1e-4 --set train.warmup_steps=5 \
  --set train.checkpoint_every=10 --set train.eval_every=40 --set train.log_every=2 \
  --candidates 4 --no-progress
