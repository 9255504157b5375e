"""Does the retrieval policy's question read need its 128-token window? (issue 11/12)

The question read (the last `retrieval.query_window` tokens through the base model up to
its deepest key layer) costs ~15 decode steps per refocus on CPU (`bench.py focus`). Per
case of the 24 held-out-haystack passkey cases at LENGTH tokens, the needle's best block
rank under retrieval relevance over the whole history, for each query window (the stored
keys are read once per case; they do not depend on the window).

    .venv/bin/python results/retrieval_query_window/rank_qw.py LENGTH OUT.json 128,64,32,16
"""
import dataclasses
import json
import sys

import jax.numpy as jnp
import numpy as np

from mcjax import retrieval
from mcjax.config import get_config
from mcjax.eval import pipeline, tasks
from mcjax.train import data

K = 32
L, out = int(sys.argv[1]), sys.argv[2]
windows = [int(x) for x in sys.argv[3].split(",")]

cfg = get_config("smollm2_135m_cpu", [])
frozen, _ = pipeline.load_base(cfg)
llama, mc, rc0 = frozen.cfg.base_config, frozen.cfg.mc, frozen.cfg.retrieval
hay = data.tokenized_corpus(frozen.encode, frozen.tokenizer_id, "held_out",
                            separator=frozen.separator, progress=False).tokens
cases = tasks.passkey_cases(frozen.encode, L, 24, 0, haystack=hay)
reader = retrieval.BlockKeyReader.from_base(rc0, frozen.params, llama, K)
rows = []
for i, c in enumerate(cases):
    T = len(c.tokens)
    nb = T // K
    keys = jnp.asarray(reader(c.tokens[: nb * K]))
    s, e = c.needle_span
    nbk = sorted({t // K for t in range(s, e)})
    row = {"case": i, "span": [s, e], "blocks": nbk, "num_blocks": int(nb), "best_rank": {}}
    for w in windows:
        rc = dataclasses.replace(rc0, query_window=w)
        q, v = retrieval.query_vectors(frozen.params, llama, rc, jnp.asarray(c.tokens),
                                       jnp.int32(T))
        rel, _ = retrieval.block_relevance(keys, jnp.int32(T), q, v, rc, mc, llama)
        order = np.argsort(-np.asarray(rel))
        row["best_rank"][w] = min(int(np.where(order == b)[0][0]) + 1 for b in nbk)
    rows.append(row)
    print(i, nbk, row["best_rank"], flush=True)
summary = {w: {"rank1": sum(r["best_rank"][w] == 1 for r in rows),
               "top4": sum(r["best_rank"][w] <= 4 for r in rows),
               "median": float(np.median([r["best_rank"][w] for r in rows])),
               "rank_diff_vs_first": [r["best_rank"][w] - r["best_rank"][windows[0]]
                                      for r in rows]}
           for w in windows}
for w, sm in summary.items():
    print(w, {k: v for k, v in sm.items() if k != "rank_diff_vs_first"})
json.dump({"length": L, "windows": windows, "rows": rows, "summary": summary},
          open(out, "w"), indent=1)
