"""Probe: which cheaper retrieval scoring keeps the needle's rank as the history grows.

Retrieval relevance today reads every block's keys at every refocus (cost and bytes linear
in the history). For passkey cases of a given length this reads every case once with the
read pass (`mcjax.base.model.read_pass`, the config's retrieval layers and chunk) and ranks
the needle's block among the scoreable blocks (outside the sink and the protected tail; a
read chunk's first token never scored) by the config's relevance rule (raw max over heads
or z-scored heads, `RetrievalConfig.normalize_heads`) under:

  flat            every block's exact keys (what the runtime does)
  hier/S/G        hierarchical: each group of `--group` blocks (an LOD2 node: 32 blocks,
                  1,024 tokens) is scored by a summary S, only the G best groups are
                  descended into and their blocks scored exactly; the needle's rank among
                  those blocks (a needle outside them is a miss). Summaries:
                    minmax  Quest's bound: per head, sum_d max(q_d·min_d, q_d·max_d) over
                            the group's keys (2 keys per head and group; never below the
                            exact score)
                    rep     per block its largest-norm key per head (32 keys per group)
                    mean    per block its mean key per head (32 keys per group)
  keys/P          flat with the keys stored at precision P: float16 (today), bfloat16,
                  float8_e4m3 (x per-row scale), int8 (x per-row scale)

z-scored relevance needs every block's statistics, so the hierarchical rows z-score over the
descended blocks only (stated in the output). JSON on stdout: per rule the needle's rank per
case, top-1 / top-4 counts and the median; for hier rules also how often the needle's group
was descended. A brief summary on stderr.

Example:
  python experiments/probe_scale.py --config qwen25_coder_05b_cpu --length 65536 --cases 8
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

SUMMARIES = ("minmax", "rep", "mean")
PRECISIONS = ("bfloat16", "float8_e4m3", "int8")


def main(argv=None) -> int:
    parser = _cli.Parser(description=__doc__,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="qwen25_coder_05b_cpu")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="config override; repeatable")
    parser.add_argument("--length", type=int, default=65536, help="history tokens per case")
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--haystack", choices=("held_out", "filler"), default="held_out")
    parser.add_argument("--group", type=int, default=32, help="blocks per scored group")
    parser.add_argument("--descend", default="1,2,4,8,16",
                        help="comma list of G: groups descended into")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    _cli.no_negative_ints(parser, args)
    try:
        descend = tuple(int(x) for x in args.descend.split(",") if x.strip())
    except ValueError:
        parser.error(f"--descend must be a comma list of integers, got {args.descend!r}")
    if not descend or min(descend) < 1:
        parser.error(f"--descend values must be >= 1, got {args.descend!r}")
    if args.group < 1:
        parser.error("--group must be >= 1")

    import jax
    import jax.numpy as jnp
    from tqdm.auto import tqdm

    from mcjax import data
    from mcjax.base import model as base
    from mcjax.eval import tasks
    from mcjax.scoring import load_frozen

    cfg = _cli.checked_config(parser, args.config, args.set)
    frozen = load_frozen(cfg)
    llama, mc, rc = frozen.cfg.base_config, frozen.cfg.mc, frozen.cfg.retrieval
    K, S = mc.block_size, args.group
    G = llama.num_heads // llama.num_kv_heads
    haystack = None
    if args.haystack == "held_out":
        haystack = data.tokenized_corpus(frozen.encode, frozen.tokenizer_id, "held_out",
                                         separator=frozen.separator, progress=False).tokens
    cases = tasks.passkey_cases(frozen.encode, args.length, args.cases, args.seed,
                                haystack=haystack)

    def quantize(k, precision):
        """k [n, ...] float32 stored at `precision` and read back (per-row absmax scale for
        the 8-bit formats: one float16 scale per token, layer and head)."""
        if precision == "bfloat16":
            return k.astype(jnp.bfloat16).astype(jnp.float32)
        scale = jnp.max(jnp.abs(k), axis=-1, keepdims=True).astype(jnp.float16)
        scale = jnp.maximum(scale.astype(jnp.float32), 1e-8)
        if precision == "int8":
            return jnp.round(k / scale * 127.0).astype(jnp.int8).astype(jnp.float32) * scale / 127.0
        return (k / scale * 448.0).astype(jnp.float8_e4m3fn).astype(jnp.float32) * scale / 448.0

    @jax.jit
    def per_block(keys, queries, pos):
        """keys [T, L, KVH, hd] (float16 as stored), queries [Q, L, H, hd], pos [T] → per
        block and head the exact max q·k [nb, L·H], and per precision the same from keys
        stored at that precision; per block its largest-norm key and mean key per head."""
        T = keys.shape[0]
        nb = T // K
        kb = keys[: nb * K].reshape(nb, K, *keys.shape[1:]).astype(jnp.float32)
        ok = (pos[: nb * K] != 0).reshape(nb, K)
        q = queries.reshape(queries.shape[0], queries.shape[1], llama.num_kv_heads, G, -1)
        q = q.astype(jnp.float32)

        def exact(k):
            s = jnp.einsum("qlkgd,ntlkd->nlkgqt", q, k)
            return jnp.where(ok[:, None, None, None, None, :], s, -jnp.inf).max(
                axis=(4, 5)).reshape(nb, -1)

        out = {"exact": exact(kb)}
        for p in PRECISIONS:
            out[p] = exact(quantize(kb, p))
        norm = jnp.where(ok[:, :, None, None], jnp.linalg.norm(kb, axis=-1), -1.0)
        top = jnp.argmax(norm, axis=1)  # [nb, L, KVH]
        out["rep_key"] = jnp.take_along_axis(kb, top[:, None, :, :, None], axis=1)[:, 0]
        out["mean_key"] = (kb * ok[:, :, None, None, None]).sum(1) / ok.sum(1)[:, None, None, None]
        okf = ok[:, :, None, None, None]
        out["kmin"] = jnp.where(okf, kb, jnp.inf).min(axis=1)
        out["kmax"] = jnp.where(okf, kb, -jnp.inf).max(axis=1)
        return out

    @jax.jit
    def group_scores(blk, queries):
        """Per group of S blocks and head, each summary's score [ngroups, L·H]."""
        q = queries.reshape(queries.shape[0], queries.shape[1], llama.num_kv_heads, G, -1)
        q = q.astype(jnp.float32)
        nb = blk["rep_key"].shape[0]
        ng = nb // S

        def grouped(x):  # [nb, ...] -> [ng, S, ...]
            return x[: ng * S].reshape(ng, S, *x.shape[1:])

        kmin = grouped(blk["kmin"]).min(axis=1)  # [ng, L, KVH, hd]
        kmax = grouped(blk["kmax"]).max(axis=1)
        bound = jnp.maximum(jnp.einsum("qlkgd,nlkd->nlkgqd", q, kmin),
                            jnp.einsum("qlkgd,nlkd->nlkgqd", q, kmax)).sum(-1).max(-1)
        rep = jnp.einsum("qlkgd,nslkd->nlkgqs", q, grouped(blk["rep_key"])).max(axis=(4, 5))
        mean = jnp.einsum("qlkgd,nslkd->nlkgqs", q, grouped(blk["mean_key"])).max(axis=(4, 5))
        return {"minmax": bound.reshape(ng, -1), "rep": rep.reshape(ng, -1),
                "mean": mean.reshape(ng, -1)}

    layers = tuple(rc.layers)

    def relevance(s, ok):
        """[nb] relevance from per-head scores s [nb, L·H] over the scoreable ok [nb]."""
        if not rc.normalize_heads:
            s = s.max(axis=1, keepdims=True)
        v = s[ok]
        return np.where(ok, ((s - v.mean(0)) / (v.std(0) + 1e-6)).max(axis=1), -np.inf)

    def rank(rel, needle):
        best = max(rel[b] for b in needle)
        return int(np.sum(rel > best)) if np.isfinite(best) else None

    rules = {"flat": []}
    rules.update({f"keys/{p}": [] for p in PRECISIONS})
    rules.update({f"hier/{m}/{g}": [] for m in SUMMARIES for g in descend})
    descended = {f"hier/{m}/{g}": [] for m in SUMMARIES for g in descend}
    group_rank = {m: [] for m in SUMMARIES}
    t0 = time.perf_counter()
    for c in tqdm(cases, desc="cases"):
        feats = base.read_pass(frozen.params, llama, c.tokens[None], chunk=rc.chunk,
                               qk_layers=layers)
        pos = jnp.arange(len(c.tokens)) % rc.chunk
        queries = feats["queries"][0, -rc.queries:]
        keys16 = feats["keys"][0].astype(jnp.float16)  # as the tree stores them
        blk = per_block(keys16, queries, pos)
        nb = int(blk["exact"].shape[0])
        ok = np.zeros(nb, bool)
        ok[mc.sink_blocks: max(mc.sink_blocks, (len(c.tokens) - mc.recent_protect) // K)] = True
        a, b = c.needle_span
        needle = [n for n in range(a // K, (b - 1) // K + 1) if ok[n]]
        exact = np.asarray(blk["exact"])
        rules["flat"].append(rank(relevance(exact, ok), needle))
        for p in PRECISIONS:
            rules[f"keys/{p}"].append(rank(relevance(np.asarray(blk[p]), ok), needle))
        gs = group_scores(blk, queries)
        ng = nb // S
        gok = ok[: ng * S].reshape(ng, S).any(axis=1)
        needle_groups = {n // S for n in needle}
        for m in SUMMARIES:
            g_rel = relevance(np.asarray(gs[m]), gok)
            group_rank[m].append(min(int(np.sum(g_rel > g_rel[g])) for g in needle_groups
                                     if g < ng) if any(g < ng for g in needle_groups) else None)
            order = np.argsort(-g_rel)
            for g in descend:
                chosen = np.zeros(nb, bool)
                for grp in order[:g]:
                    if gok[grp]:
                        chosen[grp * S:(grp + 1) * S] = True
                chosen &= ok
                hit = [n for n in needle if chosen[n]]
                descended[f"hier/{m}/{g}"].append(bool(hit))
                rules[f"hier/{m}/{g}"].append(rank(relevance(exact, chosen), hit)
                                              if hit else None)
    elapsed = time.perf_counter() - t0

    def summary(r):
        found = [x for x in r if x is not None]
        return {"top1": sum(x == 0 for x in found), "top4": sum(x < 4 for x in found),
                "median_rank": float(np.median(found)) if found else None, "ranks": r}

    report = {"config": cfg.name, "length": args.length, "cases": args.cases,
              "haystack": args.haystack, "layers": list(layers), "chunk": rc.chunk,
              "normalize_heads": rc.normalize_heads, "group_blocks": S,
              "hier_z_over": "the descended blocks only",
              "read_seconds_per_case": elapsed / len(cases),
              "rules": {k: summary(v) for k, v in rules.items()},
              "needle_group_descended": {k: int(sum(v)) for k, v in descended.items()},
              "needle_group_rank": {m: v for m, v in group_rank.items()}}
    brief = {k: (v["top1"], v["top4"]) for k, v in report["rules"].items()}
    print(json.dumps(brief), file=sys.stderr)
    json.dump(report, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
