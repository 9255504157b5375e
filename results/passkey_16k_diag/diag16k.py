"""Why retrieval focus misses at 16k with W_max 2,048 (13/24 in passkey_retrieval_follow/).

Part 1 (`rank`): per case of the 24 held-out-haystack cases, the rank of the needle's blocks
under retrieval relevance over the whole history (the key read every block gets).
Part 2 (`lods CASES`): the chosen cases run through the evaluation's own
`megacontext_retrieval` path at W_max 2,048, recording each needle block's LOD in the WC when
the answer starts (the focus runs just before `generate`).

    .venv/bin/python results/passkey_16k_diag/diag16k.py rank OUT.json
    .venv/bin/python results/passkey_16k_diag/diag16k.py lods OUT.json 0,1,4,6 [KEY=VALUE ...]

Other lengths and windows: DIAG_LENGTH=32768 DIAG_W_MAX=2048 (the defaults are 16,384 and 2,048).
"""
import json
import os
import sys

import jax.numpy as jnp
import numpy as np

from mcjax import retrieval
from mcjax.config import get_config
from mcjax.eval import pipeline, tasks
from mcjax.runtime import Session
from mcjax.train import data

L, W, K = int(os.environ.get("DIAG_LENGTH", 16384)), int(os.environ.get("DIAG_W_MAX", 2048)), 32
mode, out = sys.argv[1], sys.argv[2]


def all_cases(frozen):
    hay = data.tokenized_corpus(frozen.encode, frozen.tokenizer_id, "held_out",
                                separator=frozen.separator, progress=False).tokens
    return tasks.passkey_cases(frozen.encode, L, 24, 0, haystack=hay)


if mode == "rank":
    cfg = get_config("smollm2_135m_cpu", [f"mc.w_max={W}"])
    frozen, decode = pipeline.load_base(cfg)
    llama, mc, rc = frozen.cfg.base_config, frozen.cfg.mc, frozen.cfg.retrieval
    reader = retrieval.BlockKeyReader.from_base(rc, frozen.params, llama, K)
    rows = []
    for i, c in enumerate(all_cases(frozen)):
        T = len(c.tokens)
        nb = T // K
        keys = reader(c.tokens[: nb * K])
        q, v = retrieval.query_vectors(frozen.params, llama, rc, jnp.asarray(c.tokens),
                                       jnp.int32(T))
        rel, ok = retrieval.block_relevance(jnp.asarray(keys), jnp.int32(T), q, v, rc, mc, llama)
        rel = np.asarray(rel)
        order = np.argsort(-rel)
        s, e = c.needle_span
        nbk = sorted({t // K for t in range(s, e)})
        ranks = [int(np.where(order == b)[0][0]) + 1 for b in nbk]
        rows.append({"case": i, "span": [s, e], "blocks": nbk, "ranks": ranks,
                     "top8": order[:8].tolist(), "num_blocks": int(nb)})
        print(i, s, e, nbk, "ranks", ranks, "of", nb, "top8", order[:8].tolist(), flush=True)
    json.dump(rows, open(out, "w"), indent=1)
else:
    pick = [int(x) for x in sys.argv[3].split(",")]
    extra = tuple(sys.argv[4:])
    real = tasks.passkey_cases
    tasks.passkey_cases = lambda *a, **k: [real(*a, **k)[i] for i in pick]  # noqa: E731
    rec = []
    orig_generate = Session.generate

    ranks_at_answer = []

    def generate(self, *a, **k):
        rec.append([self.focus_runs(b) for b in range(self.batch_size)])
        # relevance over the whole history at the answer's start, from the session's own
        # view (stored keys, the question read) — what the last refocus ranked
        view = self._view
        ranks_at_answer.append([np.asarray(retrieval.stream_conditioning(
            self._params, self.llama, self.cfg.retrieval, self.mc, view.tokens[b],
            view.keys[b], view.counts[b])["rel"]) for b in range(self.batch_size)])
        return orig_generate(self, *a, **k)

    Session.generate = generate
    opts = pipeline.EvalOptions(sections=("passkey",), lengths=(L,), w_max=W, cases=24,
                                haystack="held_out", methods=("megacontext_retrieval",),
                                overrides=extra, progress=False)
    res = pipeline.run_evaluation(opts)
    row = res["passkey"]["methods"]["megacontext_retrieval"][str(L)]
    runs = [r for batch in rec[:1] for r in batch]
    diag = []
    for i, ex, r in zip(pick, row["examples"], runs):
        s, e = ex["needle_span"]
        blocks = sorted({t // K for t in range(s, e)})
        lods = [[l for (l, a, z, n) in r if a <= b * K < z][0] for b in blocks]
        hist = {}
        for (l, a, z, n) in r:
            hist[l] = hist.get(l, 0) + n
        rel = ranks_at_answer[0][len(diag)]
        order = np.argsort(-rel)
        ranks = [int(np.where(order == b)[0][0]) + 1 for b in blocks]
        diag.append({"case": i, "found": ex["found"], "span": [s, e], "blocks": blocks,
                     "lods": lods, "ranks_at_answer": ranks, "top8": order[:8].tolist(),
                     "cont": ex["continuation"], "slots_per_lod": hist})
        print(i, ex["found"], s, e, blocks, lods, "ranks", ranks, hist,
              repr(ex["continuation"][:30]), flush=True)
    print("correct", row["correct"], "/", row["n"])
    json.dump({"row": row, "diag": diag, "overrides": list(extra)}, open(out, "w"), indent=1)
