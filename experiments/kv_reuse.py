"""The NLL cost of approximate KV reuse (`Session(kv_reuse="approx")`) against exact
re-prefill, paired over held-out windows, teacher-forced (`mcjax.eval.kv_reuse`).

Writes DIR/results.json (per-window NLLs, the paired difference approx − exact with its
standard error and 95 % interval, per round too, re-prefilled slots per refocus, round
times) and prints it. Networks: the session's defaults (the shipped GistNet / LensNet when
they fit the config, else untrained; recorded under "provenance").

Example (the recorded run, results/kv_reuse/):
  .venv/bin/python experiments/kv_reuse.py --config smollm2_135m_cpu --windows 64 \\
      --history 2048 --rounds 4 --out results/kv_reuse
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="smollm2_135m_cpu", help="registered experiment config")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.FIELD=VALUE", help="config override; repeatable")
    p.add_argument("--windows", type=int, default=64, help="held-out windows (>= 64 to tell)")
    p.add_argument("--history", type=int, default=2048, help="tokens fed before scoring")
    p.add_argument("--rounds", type=int, default=4, help="scored blocks of K tokens per window")
    p.add_argument("--batch-size", type=int, default=8, help="streams per session")
    p.add_argument("--focus-policy", default="lens",
                   choices=["lens", "retrieval", "recency", "random"])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.windows < 2 or args.history < 1 or args.rounds < 1 or args.batch_size < 1:
        p.error("need --windows >= 2, --history >= 1, --rounds >= 1, --batch-size >= 1")

    import dataclasses

    from mcjax.config import ConfigError, get_config
    from mcjax.eval import pipeline
    from mcjax.eval.kv_reuse import kv_reuse_cost

    try:
        cfg = get_config(args.config, args.overrides)
    except ConfigError as e:
        p.error(str(e))
    frozen, _ = pipeline.load_base(cfg)
    cfg = frozen.cfg if cfg.base_config is None else cfg
    cfg = dataclasses.replace(cfg, base_config=frozen.cfg.base_config)
    K = cfg.mc.block_size
    windows, _ = pipeline.held_out_windows(frozen, args.windows, args.history + args.rounds * K)
    result = kv_reuse_cost((cfg.base_config, frozen.params), None, None, cfg,
                           windows, history=args.history, rounds=args.rounds,
                           batch_size=args.batch_size, focus_policy=args.focus_policy,
                           progress=not args.no_progress)
    result.update(config=args.config, overrides=args.overrides,
                  command=" ".join(["experiments/kv_reuse.py"]
                                                              + (argv or sys.argv[1:])))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    summary = {k: v for k, v in result.items() if k != "modes"}
    summary["modes"] = {m: {k: v for k, v in r.items() if k != "per_window_nll"}
                        for m, r in result["modes"].items()}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
