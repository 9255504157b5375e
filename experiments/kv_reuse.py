"""The NLL cost of the runtime's speed options against exact re-prefill with focus at every
refocus, paired over held-out windows, teacher-forced (`mcjax.eval.kv_reuse`): approximate
KV reuse (`Session(kv_reuse="approx")`), decode-time focus only when room is made
(`decode_focus="on_collapse"`) and the collapse headroom.

A variant is `KV_REUSE[/DECODE_FOCUS[/HEADROOM]]`, e.g. `exact`, `approx/on_collapse/128`;
the first listed is the reference every other is paired with. `--teacher decode` enters each
scored block as decoded tokens (the generation path, `Session.force`), `feed` as input.

Writes DIR/results.json (per-window NLLs per variant, each variant − reference with its
standard error and 95 % interval, per round too, re-prefilled slots per refocus, the share
of refocuses that re-prefill, round times) and prints it without the per-window rows.
Networks: the session's defaults (the shipped GistNet / LensNet when they fit the config,
else untrained; recorded under "provenance").

Examples (the recorded runs):
  .venv/bin/python experiments/kv_reuse.py --config smollm2_135m_cpu --windows 64 \\
      --history 1024 --rounds 3 --batch-size 16 --out results/kv_reuse
  .venv/bin/python experiments/kv_reuse.py --config smollm2_135m_cpu --windows 64 \\
      --history 1024 --rounds 12 --batch-size 16 --teacher decode \\
      --variants exact approx exact/on_collapse approx/on_collapse --out results/decode_focus
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _cli  # noqa: E402


def parse_variant(spec: str) -> dict:
    """`KV_REUSE[/DECODE_FOCUS[/HEADROOM]]` → Session settings."""
    from mcjax.runtime.state import DECODE_FOCUS, KV_REUSE

    parts = spec.split("/")
    if not 1 <= len(parts) <= 3 or parts[0] not in KV_REUSE \
            or (len(parts) > 1 and parts[1] not in DECODE_FOCUS) \
            or (len(parts) > 2 and not parts[2].isdigit()):
        raise ValueError(f"variant {spec!r}: expected KV_REUSE[/DECODE_FOCUS[/HEADROOM]] with "
                         f"KV_REUSE in {KV_REUSE}, DECODE_FOCUS in {DECODE_FOCUS}, HEADROOM "
                         f"a slot count")
    settings = {"kv_reuse": parts[0]}
    if len(parts) > 1:
        settings["decode_focus"] = parts[1]
    if len(parts) > 2:
        settings["collapse_headroom"] = int(parts[2])
    return settings


def main(argv=None) -> int:
    p = _cli.Parser(description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="smollm2_135m_cpu", help="registered experiment config")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.FIELD=VALUE", help="config override; repeatable")
    p.add_argument("--windows", type=int, default=64, help="held-out windows (>= 64 to tell)")
    p.add_argument("--history", type=int, default=2048, help="tokens fed before scoring")
    p.add_argument("--rounds", type=int, default=4, help="scored blocks of K tokens per window")
    p.add_argument("--batch-size", type=int, default=8, help="streams per session")
    p.add_argument("--variants", nargs="+", default=["exact", "approx"],
                   metavar="KV_REUSE[/DECODE_FOCUS[/HEADROOM]]",
                   help="session settings to compare; the first is the reference")
    p.add_argument("--teacher", choices=["feed", "decode"], default="feed",
                   help="scored blocks enter as input (feed) or as decoded tokens (decode)")
    p.add_argument("--focus-policy", default="lens",
                   choices=["lens", "retrieval", "recency", "random"])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    _cli.no_negative_ints(p, args)
    _cli.output_dir(p, args.out, "--out")
    _cli.checked_config(p, args.config, args.overrides)
    if args.windows < 2 or args.history < 1 or args.rounds < 1 or args.batch_size < 1:
        p.error("need --windows >= 2, --history >= 1, --rounds >= 1, --batch-size >= 1")
    try:
        variants = {v: parse_variant(v) for v in args.variants}
    except ValueError as e:
        p.error(str(e))
    if len(variants) < 2:
        p.error("--variants needs at least two distinct settings to compare")

    import dataclasses

    from mcjax.config import ConfigError, get_config
    from mcjax.eval import pipeline
    from mcjax.eval.kv_reuse import session_variants_nll
    from mcjax.scoring import load_frozen

    try:
        cfg = get_config(args.config, args.overrides)
    except ConfigError as e:
        p.error(str(e))
    frozen = load_frozen(cfg)
    cfg = frozen.cfg if cfg.base_config is None else cfg
    cfg = dataclasses.replace(cfg, base_config=frozen.cfg.base_config)
    K = cfg.mc.block_size
    windows, _ = pipeline.held_out_windows(frozen, args.windows, args.history + args.rounds * K)
    result = session_variants_nll((cfg.base_config, frozen.params), None, None, cfg,
                                  windows, history=args.history, rounds=args.rounds,
                                  variants=variants, teacher=args.teacher,
                                  batch_size=args.batch_size, focus_policy=args.focus_policy,
                                  progress=not args.no_progress)
    result.update(config=args.config, overrides=args.overrides,
                  command=" ".join(["experiments/kv_reuse.py"]
                                                              + (argv or sys.argv[1:])))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    summary = {k: v for k, v in result.items() if k != "variants"}
    summary["variants"] = {m: {k: v for k, v in r.items() if k != "per_window_nll"}
                           for m, r in result["variants"].items()}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
