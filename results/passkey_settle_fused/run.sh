#!/bin/bash
# before/after: the settle rounds fused into the refocus program (passkey 4k, W_max 512)
set -x
ARGS="--config smollm2_135m_cpu --only passkey --w-max 512 --lengths 4096 --cases 24 --haystack held_out --methods megacontext_retrieval"
(cd /tmp/old && PYTHONPATH=/tmp/old /work/main/.venv/bin/python experiments/evaluate.py $ARGS --out /work/main/runs/s27/pk4k_old) > runs/s27/pk4k_old.log 2>&1
.venv/bin/python experiments/evaluate.py $ARGS --out runs/s27/pk4k_new > runs/s27/pk4k_new.log 2>&1
echo CHAIN2 DONE
