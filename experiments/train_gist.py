"""Train GistNet on substitutability (SPEC §2.8.1) with the base model frozen.

Resumes from the latest checkpoint in --workdir by default. Writes metrics.jsonl (train
and held-out eval rows: ΔNLL@H of GistNet vs truncation and mean-pooled gists at LOD1 and
LOD1+LOD2) and summary.json into --workdir.

Example:
  python experiments/train_gist.py --config smollm2_135m_cpu --workdir runs/gist \\
      --set train.steps=100
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="smollm2_135m_cpu",
                        help="registered experiment config (see --list)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.FIELD=VALUE", help="override a config field; repeatable")
    parser.add_argument("--workdir", required=False, help="checkpoints, metrics, summary")
    parser.add_argument("--no-resume", action="store_true",
                        help="start from scratch even if --workdir has checkpoints")
    parser.add_argument("--eval-batches", type=int, default=4)
    parser.add_argument("--stop-after", type=int, default=None,
                        help="stop after this many steps (resume later)")
    parser.add_argument("--single-layout", action="store_true",
                        help="train on the LOD1+LOD2 layout only (default: alternate it with "
                             "the LOD1-only layout step by step)")
    parser.add_argument("--list", action="store_true", help="list registered configs")
    args = parser.parse_args(argv)

    from mcjax.config import ConfigError, get_config, list_configs
    from mcjax.train.loop import maybe_initialize_distributed, train_gist

    if args.list:
        print("\n".join(list_configs()))
        return 0
    if not args.workdir:
        parser.error("--workdir is required")
    try:
        cfg = get_config(args.config, args.overrides)
    except ConfigError as e:
        parser.error(str(e))
    maybe_initialize_distributed()
    result = train_gist(cfg, args.workdir, resume=not args.no_resume,
                        eval_batches=args.eval_batches, stop_after=args.stop_after,
                        alternate=not args.single_layout)
    result.pop("state")
    summary = Path(args.workdir) / "summary.json"
    summary.write_text(json.dumps(result, indent=2))
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
