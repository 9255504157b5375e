"""Train LensNet on counterfactual focus utilities (SPEC §2.8.2); base model and GistNet frozen.

GistNet comes from the latest checkpoint of --gist-workdir (a train_gist or train_joint
workdir); without it an untrained GistNet is used, and the log says so. Resumes from the
latest checkpoint in --workdir by default. Writes metrics.jsonl (train rows and held-out
eval rows: lens loss and its terms, pair accuracy, score/utility correlation, ΔNLL@H of
the compressed working contexts) and summary.json into --workdir.

Example:
  python experiments/train_lens.py --config smollm2_135m_cpu --workdir runs/lens \\
      --gist-workdir runs/gist --set train.steps=100
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def build_parser(doc: str, *, gist_workdir: bool) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="smollm2_135m_cpu",
                        help="registered experiment config (see --list)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.FIELD=VALUE", help="override a config field; repeatable")
    parser.add_argument("--workdir", required=False, help="checkpoints, metrics, summary")
    if gist_workdir:
        parser.add_argument("--gist-workdir", default=None,
                            help="train_gist/train_joint workdir to load GistNet from "
                                 "(default: an untrained GistNet)")
    parser.add_argument("--candidates", type=int, default=4,
                        help="counterfactual candidate actions per window (half expansions)")
    parser.add_argument("--no-resume", action="store_true",
                        help="start from scratch even if --workdir has checkpoints")
    parser.add_argument("--eval-batches", type=int, default=4)
    parser.add_argument("--stop-after", type=int, default=None,
                        help="stop after this many steps (resume later)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--list", action="store_true", help="list registered configs")
    return parser


def run(parser: argparse.ArgumentParser, argv, train_fn_name: str) -> int:
    args = parser.parse_args(argv)

    from mcjax.config import ConfigError, get_config, list_configs
    from mcjax.train import loop

    if args.list:
        print("\n".join(list_configs()))
        return 0
    if not args.workdir:
        parser.error("--workdir is required")
    if args.candidates < 1:
        parser.error("--candidates must be >= 1")
    try:
        cfg = get_config(args.config, args.overrides)
    except ConfigError as e:
        parser.error(str(e))
    loop.maybe_initialize_distributed()
    kwargs = dict(resume=not args.no_resume, eval_batches=args.eval_batches,
                  stop_after=args.stop_after, candidates=args.candidates,
                  progress=not args.no_progress)
    if getattr(args, "gist_workdir", None) is not None:
        kwargs["gist_workdir"] = args.gist_workdir
    try:
        result = getattr(loop, train_fn_name)(cfg, args.workdir, **kwargs)
    except (ValueError, loop.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result.pop("state")
    summary = Path(args.workdir) / "summary.json"
    summary.write_text(json.dumps(result, indent=2))
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


def main(argv=None) -> int:
    return run(build_parser(__doc__, gist_workdir=True), argv, "train_lens")


if __name__ == "__main__":
    raise SystemExit(main())
