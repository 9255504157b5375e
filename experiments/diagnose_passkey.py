"""Why a MegaContext passkey case is right or wrong: where the needle ranks under retrieval
relevance, and at which LOD focus holds it. The cases are the evaluation's
(`tasks.passkey_cases`: same --length, --cases, --seed, --haystack as `evaluate.py --only
passkey`), the needle's blocks are those holding any token of its span.

  rank    per case, the rank of each needle block among all blocks by retrieval relevance
          over the whole history (the stored keys, read once per case by the tree's read
          pass; the question read over the last `retrieval.query_window` tokens), for
          each window of --query-windows. JSON to --out: per case the ranks, the best
          rank and the 8 top blocks per window; per window how many cases rank the needle
          1st / in the top 4, the median best rank and the change against the first window.
  answer  the chosen cases through the evaluation's own MegaContext passkey path
          (`baselines.megacontext_passkey`, one session stream per case): when the answer
          starts, each needle block's LOD in the WC and its relevance rank from the
          session's stored keys, the 8 top blocks, the slots per LOD, and the answer.
          JSON to --out; one line per case on stdout.
  trace   one case fed as the evaluation feeds it (the bulk, then the last blocks one
          refocus at a time): after each refocus its allocator rounds and actions, and the
          LOD and relevance rank of the needle's blocks and of the 8 top blocks; then the
          answer. Text on stdout.

Networks: the shipped GistNet / LensNet (`--untrained`: random-init nets, e.g. with
`--config tiny`). Relevance ranks need a config whose trees keep retrieval keys.

Examples (the recorded runs in results/README.md):
  python experiments/diagnose_passkey.py rank --length 4096 --query-windows 128,64,32,16 \\
      --out runs/ranks_4k.json
  python experiments/diagnose_passkey.py answer --length 32768 --w-max 2048 \\
      --pick 2,4,5,8 --out runs/lods_32k.json
  python experiments/diagnose_passkey.py trace --length 32768 --w-max 2048 --case 11 \\
      --set retrieval.settle_rounds=12 > trace_case11.txt
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _cli  # noqa: E402

TOP = 8  # top blocks listed per case / refocus
POLICIES = ("retrieval", "lens", "recency", "random")


def int_list(text: str) -> list[int]:
    """argparse type: comma-separated integers >= 0, in the order given, no repeats."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"{text!r}: empty list")
    values = [_cli.nonneg(t) for t in items]
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"{text!r}: repeated values")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = _cli.Parser(description=__doc__,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    modes = {}
    for name, help_ in (("rank", "needle ranks under retrieval relevance, per case"),
                        ("answer", "needle LODs and ranks when the answer starts, per case"),
                        ("trace", "one case's refocuses")):
        p = modes[name] = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--config", default="smollm2_135m_cpu",
                       help="registered experiment config (default: %(default)s)")
        p.add_argument("--set", dest="overrides", action="append", default=[],
                       metavar="SECTION.FIELD=VALUE", help="config override; repeatable")
        p.add_argument("--length", type=_cli.count, default=4096,
                       help="history tokens per case (default: %(default)s)")
        p.add_argument("--cases", type=_cli.count, default=24,
                       help="cases generated, as evaluate.py --cases (default: %(default)s)")
        p.add_argument("--seed", type=_cli.nonneg, default=0, help="as evaluate.py --seed")
        p.add_argument("--haystack", choices=("held_out", "filler"), default="held_out",
                       help="as evaluate.py --haystack (default: %(default)s)")
    modes["rank"].add_argument("--query-windows", type=int_list, metavar="N,N,...",
                               help="question windows to rank under, the first the "
                                    "reference (default: the config's "
                                    "retrieval.query_window)")
    for name in ("rank", "answer"):
        modes[name].add_argument("--pick", type=int_list, metavar="I,J,...",
                                 help="case indices (0-based, of --cases; default: all)")
        modes[name].add_argument("--out", required=True, help="JSON file to write")
    modes["trace"].add_argument("--case", type=_cli.nonneg, required=True,
                                help="case index (0-based, of --cases)")
    for name in ("answer", "trace"):
        p = modes[name]
        p.add_argument("--untrained", action="store_true",
                       help="random-init GistNet / LensNet instead of the shipped nets")
        p.add_argument("--w-max", type=_cli.count,
                       help="working-context slots (default: the config's mc.w_max)")
        p.add_argument("--policy", choices=POLICIES, default="retrieval",
                       help="focus policy, as evaluate.py --methods megacontext_POLICY "
                            "(default: %(default)s)")
        p.add_argument("--refocus-steps", type=_cli.nonneg, default=2,
                       help="last blocks fed one refocus at a time (default: %(default)s)")
        p.add_argument("--max-new-tokens", type=_cli.count,
                       help="answer tokens (default: the longest key's tokens + 4, as "
                            "evaluate.py)")
    parser.modes = modes  # each mode's parser: its errors name it
    return parser


def check(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """Every argument, before any model loads; returns the config."""
    from mcjax.eval import tasks

    mode = parser.modes[args.mode]
    overrides = list(args.overrides)
    if getattr(args, "w_max", None) is not None:
        overrides.append(f"mc.w_max={args.w_max}")
    cfg = _cli.checked_config(mode, args.config, overrides)
    picked = args.pick if args.mode != "trace" else [args.case]
    if picked and max(picked) >= args.cases:
        _cli.fail(mode, f"case index {max(picked)} is not below --cases {args.cases}")
    if args.length < 2 * cfg.mc.block_size:
        _cli.fail(mode, f"--length {args.length} must be >= 2 blocks "
                        f"({2 * cfg.mc.block_size} tokens)")
    if args.mode == "rank":
        for w in args.query_windows or ():
            _cli.checked_config(mode, args.config,
                                overrides + [f"retrieval.query_window={w}"])
    else:
        if cfg.mc.w_max % cfg.mc.block_size:
            _cli.fail(mode, f"--w-max {cfg.mc.w_max} must be a multiple of the block size "
                            f"{cfg.mc.block_size}")
        try:
            tasks.check_lengths([args.length], cfg.mc.w_max)
        except tasks.EvalInputError as e:
            _cli.fail(mode, f"--length: {e}")
    if getattr(args, "out", None):
        _cli.output_file(mode, args.out, "--out")
    return mode, cfg


def load(mode, cfg, args, *, nets: bool):
    """(frozen base, decode, cases, networks or None) — the evaluation's."""
    from mcjax import data
    from mcjax.eval import tasks
    from mcjax.nets import resolve_networks
    from mcjax.scoring import load_frozen

    frozen = load_frozen(cfg)
    decode = frozen.decode
    haystack = None
    if args.haystack == "held_out":
        haystack = data.tokenized_corpus(frozen.encode, frozen.tokenizer_id, "held_out",
                                         separator=frozen.separator, progress=False).tokens
    try:
        cases = tasks.passkey_cases(frozen.encode, args.length, args.cases, args.seed,
                                    haystack=haystack)
    except tasks.EvalInputError as e:
        _cli.fail(mode, str(e))
    found = None
    if nets:
        try:
            found = resolve_networks(frozen.cfg, frozen.params, untrained=args.untrained)
        except ValueError as e:
            _cli.fail(mode, str(e).splitlines()[0])
    return frozen, decode, cases, found


def relevance(frozen, rc, mc, tokens, num_tokens: int, keys):
    """Retrieval relevance [blocks] of the stored `keys` [blocks, width] to the question
    read over the first `num_tokens` of `tokens` (what a refocus ranks)."""
    import jax.numpy as jnp
    import numpy as np

    from mcjax import retrieval

    llama = frozen.cfg.base_config
    q, valid = retrieval.query_vectors(frozen.params, llama, rc, jnp.asarray(tokens, jnp.int32),
                                       jnp.int32(num_tokens))
    rel, _ = retrieval.block_relevance(jnp.asarray(keys), jnp.int32(num_tokens), q, valid, rc,
                                       mc, llama)
    return np.asarray(rel)


def top_blocks(rel) -> list[int]:
    import numpy as np

    return [int(b) for b in np.argsort(-np.asarray(rel), kind="stable")[:TOP]]


def run_rank(mode, cfg, args) -> dict:
    import dataclasses

    import numpy as np

    from mcjax import retrieval
    from mcjax.eval import metrics, tasks
    from mcjax.tree.read_pass import ChunkReader

    frozen, _, cases, _ = load(mode, cfg, args, nets=False)
    llama, mc, rc0 = frozen.cfg.base_config, frozen.cfg.mc, frozen.cfg.retrieval
    K = mc.block_size
    windows = args.query_windows or [rc0.query_window]
    reader = ChunkReader.from_base(frozen.params, llama, chunk=rc0.chunk, block_size=K,
                                   qk_layers=rc0.layers)
    block_keys = retrieval.BlockKeys(rc0, llama, K)
    rows = []
    for i in args.pick or range(len(cases)):
        c = cases[i]
        T = len(c.tokens)
        nb = T // K
        # the keys a tree stores for this history (the tree's read pass)
        keys = block_keys.rows(reader.read(c.tokens[: nb * K], 0, 0)["keys"])
        blocks = tasks.needle_blocks(c.needle_span, K)
        row = {"case": i, "span": list(c.needle_span), "blocks": blocks, "num_blocks": nb,
               "ranks": {}, "best_rank": {}, "top": {}}
        for w in windows:
            rc = dataclasses.replace(rc0, query_window=w)
            rel = relevance(frozen, rc, mc, c.tokens, T, keys)
            ranks = metrics.relevance_ranks(rel, blocks)
            row["ranks"][w], row["best_rank"][w], row["top"][w] = ranks, min(ranks), \
                top_blocks(rel)
        rows.append(row)
        print(i, row["span"], blocks, "of", nb, "ranks", row["ranks"], "top", row["top"],
              flush=True)
    summary = {w: {"rank1": sum(r["best_rank"][w] == 1 for r in rows),
                   "top4": sum(r["best_rank"][w] <= 4 for r in rows),
                   "median": float(np.median([r["best_rank"][w] for r in rows])),
                   "rank_diff_vs_first": [r["best_rank"][w] - r["best_rank"][windows[0]]
                                          for r in rows]}
               for w in windows}
    for w, s in summary.items():
        print("query_window", w, {k: v for k, v in s.items() if k != "rank_diff_vs_first"})
    return {"length": args.length, "cases": args.cases, "seed": args.seed,
            "haystack": args.haystack, "overrides": list(args.overrides),
            "query_windows": windows, "rows": rows, "summary": summary}


def _needle_state(session, stream, case, frozen, rc, mc, num_tokens: int) -> dict:
    """A stream's needle blocks: LODs in its WC now, relevance ranks from its stored keys
    and the question read over its first `num_tokens` tokens."""
    from mcjax.eval import metrics, tasks
    from mcjax.working_context import lod_at

    K = mc.block_size
    runs = [tuple(int(x) for x in r) for r in session.focus_runs(stream)]
    blocks = tasks.needle_blocks(case.needle_span, K)
    out = {"blocks": blocks, "lods": [lod_at(runs, b * K) for b in blocks], "runs": runs,
           "ranks": None, "top": None}
    tree = session.tree(stream)
    if tree.key_store is not None:
        rel = relevance(frozen, rc, mc, case.tokens, num_tokens, tree.keys())
        out["ranks"], out["top"] = metrics.relevance_ranks(rel, blocks), top_blocks(rel)
    return out


def run_answer(mode, cfg, args) -> dict:
    from mcjax.eval import baselines, pipeline

    frozen, decode, cases, nets = load(mode, cfg, args, nets=True)
    cfg, llama = frozen.cfg, frozen.cfg.base_config
    pick = args.pick or list(range(len(cases)))
    chosen = [cases[i] for i in pick]
    new = args.max_new_tokens or max(len(c.answer) for c in cases) + 4
    seen: list[dict] = []

    def at_answer(session):
        for b, c in enumerate(chosen):
            seen.append(_needle_state(session, b, c, frozen, cfg.retrieval, cfg.mc,
                                      int(session.num_tokens[b])))

    run = baselines.megacontext_passkey(
        (llama, frozen.params), nets.gist, nets.lens, cfg, chosen, policy=args.policy,
        max_new_tokens=new, decode=decode, eos_id=llama.eos_token_id,
        refocus_steps=args.refocus_steps,
        max_tokens=pipeline.passkey_max_tokens(args.length, new, cfg.mc),
        focus_seed=args.seed, at_answer=at_answer)
    diag = []
    for i, c, text, score, s in zip(pick, chosen, run.texts, run.scores, seen):
        slots: dict[int, int] = {}
        for level, _, _, n in s["runs"]:
            slots[level] = slots.get(level, 0) + n
        diag.append({"case": i, "found": score.found, "span": list(c.needle_span),
                     "blocks": s["blocks"], "lods": s["lods"], "ranks_at_answer": s["ranks"],
                     "top": s["top"], "slots_per_lod": slots, "cont": text,
                     "runs": [list(r) for r in s["runs"]]})
        print(i, score.found, list(c.needle_span), s["blocks"], "lods", s["lods"], "ranks",
              s["ranks"], "slots", slots, repr(text[:30]), flush=True)
    summary = run.summary()
    print("correct", summary["correct"], "/", summary["n"])
    return {"length": args.length, "w_max": cfg.mc.w_max, "policy": args.policy,
            "cases": args.cases, "seed": args.seed, "haystack": args.haystack,
            "overrides": list(args.overrides), "networks": nets.sources, "row": summary,
            "diag": diag}


def run_trace(mode, cfg, args) -> None:
    import numpy as np

    from mcjax.eval import pipeline, tasks
    from mcjax.working_context import lod_at
    from mcjax.runtime import Session

    frozen, decode, cases, nets = load(mode, cfg, args, nets=True)
    cfg, llama = frozen.cfg, frozen.cfg.base_config
    K = cfg.mc.block_size
    case = cases[args.case]
    print("needle", list(case.needle_span), "blocks", tasks.needle_blocks(case.needle_span, K),
          "key", case.key, flush=True)
    box = []

    def on_event(ev):
        session = box[0]
        s = _needle_state(session, 0, case, frozen, cfg.retrieval, cfg.mc,
                          int(ev.num_tokens[0]))
        kinds = [a[0][0] for a in ev.actions[0]]
        print(f"refocus {ev.index} {ev.trigger} tokens {ev.num_tokens[0]} settle_rounds "
              f"{ev.settle_rounds[0]} actions {len(kinds)} (expand {kinds.count('e')}, "
              f"collapse {kinds.count('c')}) append/headroom collapses "
              f"{ev.append_collapses[0]}/{ev.headroom_collapses[0]} lods "
              f"{ev.lod_histogram[0]}")
        ranks = s["ranks"] or [None] * len(s["blocks"])
        print("   needle (block, rank, lod):", list(zip(s["blocks"], ranks, s["lods"])))
        if s["top"] is not None:
            print("   top (block, lod):", [(b, lod_at(s["runs"], b * K)) for b in s["top"]])
        print("   raw spans:", [(a, z) for lvl, a, z, _ in s["runs"] if lvl == 0])
        print("   actions:", ev.actions[0][:40], flush=True)

    new = args.max_new_tokens or max(len(c.answer) for c in cases) + 4
    session = Session((llama, frozen.params), nets.gist, nets.lens, cfg, batch_size=1,
                      max_tokens=pipeline.passkey_max_tokens(args.length, new, cfg.mc),
                      focus_policy=args.policy, focus_seed=args.seed, on_event=on_event)
    box.append(session)
    for a, b in tasks.feed_schedule(args.length, K, args.refocus_steps):
        session.feed([case.tokens[a:b]])
        session.sync()
    out = session.generate(new, eos_id=llama.eos_token_id)
    print("answer", repr(decode(np.asarray(out)[0])), "key", case.key)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    mode, cfg = check(parser, args)
    if args.mode == "trace":
        run_trace(mode, cfg, args)
        return 0
    result = (run_rank if args.mode == "rank" else run_answer)(mode, cfg, args)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
