"""Trace one held-out-haystack passkey case through retrieval focus (the evaluation's
cases and feed schedule): after each refocus, the allocator rounds it ran, its actions,
and the LOD and relevance rank of the needle's blocks and of the top-ranked blocks.

    .venv/bin/python results/passkey_32k_diag/trace.py LENGTH W_MAX CASE [KEY=VALUE ...]
"""
import sys

import numpy as np

from mcjax import assets, retrieval
from mcjax.config import get_config
from mcjax.eval import pipeline, tasks
from mcjax.runtime import Session
from mcjax.train import data

L, W, idx = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
cfg = get_config("smollm2_135m_cpu", [f"mc.w_max={W}"] + sys.argv[4:])
frozen, decode = pipeline.load_base(cfg)
cfg = frozen.cfg
hay = data.tokenized_corpus(frozen.encode, frozen.tokenizer_id, "held_out",
                            separator=frozen.separator, progress=False).tokens
case = tasks.passkey_cases(frozen.encode, L, 24, 0, haystack=hay)[idx]
K = cfg.mc.block_size
s, e = case.needle_span
needle = sorted({t // K for t in range(s, e)})
print("needle", case.needle_span, "blocks", needle, flush=True)
gist, _ = assets.shipped_gist(cfg)
box = []


def lod_of(runs, block):
    return [lvl for lvl, a, z, n in runs if a <= block * K < z][0]


def on_event(ev):
    sess = box[0]
    view = sess._view
    rel = retrieval.stream_conditioning(sess._params, sess.llama, cfg.retrieval, cfg.mc,
                                        view.tokens[0], view.keys[0], view.counts[0])["rel"]
    order = np.argsort(-np.asarray(rel))
    runs = sess.focus_runs(0)
    kinds = [a[0][0] for a in ev.actions[0]]
    print(f"refocus {ev.index} {ev.trigger} tokens {ev.num_tokens[0]} settle_rounds "
          f"{ev.settle_rounds[0]} actions {len(kinds)} (expand {kinds.count('e')}, collapse "
          f"{kinds.count('c')}) append/headroom collapses {ev.append_collapses[0]}/"
          f"{ev.headroom_collapses[0]} lods {ev.lod_histogram[0]}")
    print("   needle (block, rank, lod):",
          [(b, int(np.where(order == b)[0][0]) + 1, lod_of(runs, b)) for b in needle])
    print("   top8 (block, lod):", [(int(b), lod_of(runs, int(b))) for b in order[:8]])
    print("   actions:", ev.actions[0][:40], flush=True)


sess = Session((cfg.base_config, frozen.params), gist, None, cfg, batch_size=1,
               max_tokens=L + 64, focus_policy="retrieval", on_event=on_event)
box.append(sess)
for a, b in tasks.feed_schedule(L, K, 2):
    sess.feed([case.tokens[a:b]])
    sess.sync()
out = sess.generate(10)
print("answer", repr(decode(np.asarray(out)[0])), "key", case.key)
