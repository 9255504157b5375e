"""Probe: which read-pass keys and layers find the needle's block (issue: retrieval focus).

For passkey cases of a given history length, reads every case once with the read pass
(`mcjax.base.model.read_pass`: independent aligned chunks, pre-RoPE queries and keys) and
scores every 32-token block against the question's queries (the last --queries tokens)
under several block summaries:

  exact     max over the block's tokens, the queries and all heads of q·k (stores every key)
  minmax    Quest's bound: per head, sum_d max(q_d·min_d, q_d·max_d) (2 keys per head)
  mean      q·(mean key) (1 key per head)

It reports, per layer and summary, the needle block's rank among the scoreable blocks
(those outside the sink and the protected recent tail), top-1 / top-8 counts and the
median rank, plus the same for z-scored sums over layer sets. Output: JSON on stdout.

Example:
  python experiments/probe_retrieval.py --length 16384 --cases 12 --haystack held_out
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="smollm2_135m_cpu")
    parser.add_argument("--length", type=int, default=16384, help="history tokens per case")
    parser.add_argument("--cases", type=int, default=12)
    parser.add_argument("--haystack", choices=("held_out", "filler"), default="held_out")
    parser.add_argument("--chunk", type=int, default=512, help="read-pass chunk (tokens)")
    parser.add_argument("--queries", type=int, default=24, help="newest tokens whose queries score")
    parser.add_argument("--layers", default="all", help="comma list of 0-based layers, or all")
    parser.add_argument("--combos", default="17,18,23;16,17,18,23;18;17",
                        help="';'-separated layer sets whose z-scored scores are summed")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp
    from tqdm.auto import tqdm

    from mcjax.base import model as base
    from mcjax.config import get_config
    from mcjax.eval import tasks
    from mcjax.train import data, loop

    frozen = loop.load_frozen(get_config(args.config))
    llama, mc = frozen.cfg.base_config, frozen.cfg.mc
    K = mc.block_size
    layers = (tuple(range(llama.num_layers)) if args.layers == "all"
              else tuple(int(x) for x in args.layers.split(",")))
    haystack = None
    if args.haystack == "held_out":
        haystack = data.tokenized_corpus(frozen.encode, frozen.tokenizer_id, "held_out",
                                         separator=frozen.separator, progress=False).tokens
    cases = tasks.passkey_cases(frozen.encode, args.length, args.cases, args.seed,
                                haystack=haystack)
    G = llama.num_heads // llama.num_kv_heads

    @jax.jit
    def block_scores(keys, queries):
        """keys [T, L, KVH, hd], queries [Q, L, H, hd] → dict of [L, nblocks]."""
        T = keys.shape[0]
        nb = T // K
        kb = keys[: nb * K].reshape(nb, K, *keys.shape[1:]).astype(jnp.float32)  # [n,K,L,kv,d]
        q = queries.reshape(queries.shape[0], queries.shape[1], llama.num_kv_heads, G, -1)
        q = q.astype(jnp.float32)
        exact = jnp.einsum("qlkgd,ntlkd->lnqkgt", q, kb).max(axis=(2, 3, 4, 5))
        mn, mx = kb.min(axis=1), kb.max(axis=1)  # [n, L, kv, d]
        bound = jnp.maximum(jnp.einsum("qlkgd,nlkd->lnqkgd", q, mn),
                            jnp.einsum("qlkgd,nlkd->lnqkgd", q, mx)).sum(-1)
        minmax = bound.max(axis=(2, 3, 4))
        mean = jnp.einsum("qlkgd,nlkd->lnqkg", q, kb.mean(axis=1)).max(axis=(2, 3, 4))
        return {"exact": exact, "minmax": minmax, "mean": mean}

    results = {name: [] for name in ("exact", "minmax", "mean")}
    needle_blocks, scoreable = [], []
    t0 = time.perf_counter()
    for c in tqdm(cases, desc="cases"):
        feats = base.read_pass(frozen.params, llama, c.tokens[None], chunk=args.chunk,
                               qk_layers=layers)
        s = block_scores(feats["keys"][0], feats["queries"][0, -args.queries:])
        for name in results:
            results[name].append(np.asarray(s[name]))
        a, b = c.needle_span
        needle_blocks.append(list(range(a // K, (b - 1) // K + 1)))
        nb = len(c.tokens) // K
        ok = np.zeros(nb, bool)
        ok[mc.sink_blocks: max(mc.sink_blocks, (len(c.tokens) - mc.recent_protect) // K)] = True
        scoreable.append(ok)
    elapsed = time.perf_counter() - t0

    def ranks(score_rows):
        """Needle rank (0 = first) per case among scoreable blocks, best needle block."""
        out = []
        for s, nbs, ok in zip(score_rows, needle_blocks, scoreable):
            cand = np.where(ok, s, -np.inf)
            best = max(cand[n] for n in nbs if ok[n]) if any(ok[n] for n in nbs) else -np.inf
            out.append(int(np.sum(cand > best)))
        return np.asarray(out)

    def summary(r):
        return {"top1": int(np.sum(r == 0)), "top8": int(np.sum(r < 8)),
                "median_rank": float(np.median(r)), "ranks": r.tolist()}

    def zscore(s, ok):
        v = s[ok]
        return (s - v.mean()) / (v.std() + 1e-6)

    report = {"length": args.length, "cases": args.cases, "haystack": args.haystack,
              "chunk": args.chunk, "queries": args.queries,
              "scoreable_blocks": int(np.mean([ok.sum() for ok in scoreable])),
              "read_seconds_per_case": elapsed / len(cases), "per_layer": {}, "combos": {}}
    for name, rows in results.items():
        report["per_layer"][name] = {
            str(layer): summary(ranks([r[i] for r in rows])) for i, layer in enumerate(layers)}
        for combo in args.combos.split(";"):
            ids = [layers.index(int(x)) for x in combo.split(",") if int(x) in layers]
            if not ids:
                continue
            comb = [sum(zscore(r[i], ok) for i in ids) for r, ok in zip(rows, scoreable)]
            report["combos"].setdefault(name, {})[combo] = summary(ranks(comb))
    brief = {name: {l: (v["top1"], v["median_rank"]) for l, v in per.items()}
             for name, per in report["per_layer"].items()}
    print(json.dumps(brief), file=sys.stderr)
    json.dump(report, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
