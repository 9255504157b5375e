"""Probe: which read-pass keys and layers find the needle's block (issue: retrieval focus).

For passkey cases of a given history length, reads every case once with the read pass
(`mcjax.base.model.read_pass`: independent aligned chunks, pre-RoPE queries and keys) and
scores every 32-token block against the question's queries (the last --queries tokens)
under several block summaries:

  exact     per head, max over the block's tokens and the queries of q·k (every key kept)
  minmax    Quest's bound: per head, sum_d max(q_d·min_d, q_d·max_d) (2 keys per head)
  mean      per head, q·(mean key) (1 key per head)

A read chunk's first token (its own attention sink) is never scored; `--skip-first N,...`
adds exact-summary variants that leave each chunk's first N tokens unscored (reported as
`exact_skipN`), to measure whether tokens right after the chunk's sink carry outlier keys
that outrank the needle. Per summary, layer
(set) and normalisation — "raw" (max over heads) or "z" (each head z-scored over the
scoreable blocks, then the max) — it reports the needle block's rank among the scoreable
blocks (outside the sink and the protected recent tail): top-1 / top-4 counts, median rank
and every rank. Output: JSON on stdout (a brief summary on stderr).

Example:
  python experiments/probe_retrieval.py --length 16384 --cases 12 --haystack held_out
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _cli  # noqa: E402

import numpy as np


def main(argv=None) -> int:
    parser = _cli.Parser(description=__doc__,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="smollm2_135m_cpu")
    parser.add_argument("--length", type=int, default=16384, help="history tokens per case")
    parser.add_argument("--cases", type=int, default=12)
    parser.add_argument("--haystack", choices=("held_out", "filler"), default="held_out")
    parser.add_argument("--chunk", type=int, default=512, help="read-pass chunk (tokens)")
    parser.add_argument("--queries", type=int, default=8, help="newest tokens whose queries score")
    parser.add_argument("--layers", default="all", help="comma list of 0-based layers, or all")
    parser.add_argument("--combos", default="17,24;17,18,23,24;17;24;18;23",
                        help="';'-separated layer sets whose z-scored scores are summed")
    parser.add_argument("--skip-first", default="",
                        help="comma list of N > 1: also score exactly with each read chunk's "
                             "first N tokens unscored (exact_skipN)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        skips = tuple(int(x) for x in args.skip_first.split(",") if x.strip())
    except ValueError:
        parser.error(f"--skip-first must be a comma list of integers, got {args.skip_first!r}")
    if any(n < 2 or n >= args.chunk for n in skips):
        parser.error(f"--skip-first values must lie in 2..chunk-1={args.chunk - 1}, got {skips}")
    _cli.no_negative_ints(parser, args)

    import jax
    import jax.numpy as jnp
    from tqdm.auto import tqdm

    from mcjax.base import model as base
    from mcjax.config import get_config
    from mcjax.eval import tasks
    from mcjax import data
    from mcjax.scoring import load_frozen

    frozen = load_frozen(get_config(args.config))
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
    def head_scores(keys, queries, pos):
        """keys [T, L, KVH, hd], queries [Q, L, H, hd], pos [T] chunk positions → per
        summary [L, nblocks, H]: max over queries (and tokens) per head."""
        T = keys.shape[0]
        nb = T // K
        kb = keys[: nb * K].reshape(nb, K, *keys.shape[1:]).astype(jnp.float32)  # [n,K,L,kv,d]
        ok = (pos[: nb * K] != 0).reshape(nb, K)  # a chunk's first token is its own sink
        q = queries.reshape(queries.shape[0], queries.shape[1], llama.num_kv_heads, G, -1)
        q = q.astype(jnp.float32)
        s = jnp.einsum("qlkgd,ntlkd->lnqkgt", q, kb)
        exact = jnp.where(ok[None, :, None, None, None, :], s, -jnp.inf).max(axis=(2, 5))
        big = jnp.where(ok[:, :, None, None, None], kb, -jnp.inf).max(axis=1)
        small = jnp.where(ok[:, :, None, None, None], kb, jnp.inf).min(axis=1)
        bound = jnp.maximum(jnp.einsum("qlkgd,nlkd->lnqkgd", q, small),
                            jnp.einsum("qlkgd,nlkd->lnqkgd", q, big)).sum(-1).max(axis=2)
        mean_k = (kb * ok[:, :, None, None, None]).sum(1) / ok.sum(1)[:, None, None, None]
        mean = jnp.einsum("qlkgd,nlkd->lnqkg", q, mean_k).max(axis=2)
        out = [("exact", exact), ("minmax", bound), ("mean", mean)]
        for n in skips:
            ok_n = (pos[: nb * K] >= n).reshape(nb, K)
            out.append((f"exact_skip{n}",
                        jnp.where(ok_n[None, :, None, None, None, :], s, -jnp.inf)
                        .max(axis=(2, 5))))
        return {n: x.reshape(x.shape[0], nb, -1) for n, x in out}

    results = {name: [] for name in ("exact", "minmax", "mean")
               + tuple(f"exact_skip{n}" for n in skips)}
    needle_blocks, scoreable = [], []
    t0 = time.perf_counter()
    for c in tqdm(cases, desc="cases"):
        feats = base.read_pass(frozen.params, llama, c.tokens[None], chunk=args.chunk,
                               qk_layers=layers)
        pos = jnp.arange(len(c.tokens)) % args.chunk
        s = head_scores(feats["keys"][0], feats["queries"][0, -args.queries:], pos)
        for name in results:
            results[name].append(np.asarray(s[name]))  # [L, n, H]
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
        return {"top1": int(np.sum(r == 0)), "top4": int(np.sum(r < 4)),
                "median_rank": float(np.median(r)), "ranks": r.tolist()}

    def zscore(s, ok):
        """z-score every head's scores [n, H] over the scoreable blocks."""
        v = s[ok]
        return (s - v.mean(0)) / (v.std(0) + 1e-6)

    def relevance(rows, ids, norm):
        """[n] per case: max over the layers `ids` and their heads (raw or z-scored)."""
        out = []
        for r, ok in zip(rows, scoreable):
            per = [zscore(r[i], ok) if norm == "z" else r[i] for i in ids]
            out.append(np.concatenate(per, axis=1).max(axis=1))
        return out

    report = {"length": args.length, "cases": args.cases, "haystack": args.haystack,
              "chunk": args.chunk, "queries": args.queries,
              "scoreable_blocks": int(np.mean([ok.sum() for ok in scoreable])),
              "read_seconds_per_case": elapsed / len(cases), "per_layer": {}, "combos": {}}
    for name, rows in results.items():
        for norm in ("raw", "z"):
            report["per_layer"][f"{name}/{norm}"] = {
                str(layer): summary(ranks(relevance(rows, [i], norm)))
                for i, layer in enumerate(layers)}
            for combo in args.combos.split(";"):
                ids = [layers.index(int(x)) for x in combo.split(",") if int(x) in layers]
                if ids:
                    report["combos"].setdefault(f"{name}/{norm}", {})[combo] = summary(
                        ranks(relevance(rows, ids, norm)))
    brief = {name: {l: (v["top1"], v["median_rank"]) for l, v in per.items()}
             for name, per in report["combos"].items()}
    print(json.dumps(brief), file=sys.stderr)
    json.dump(report, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
