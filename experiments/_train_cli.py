"""The command line shared by train_gist.py, train_lens.py and train_joint.py."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _cli  # noqa: E402


def build_parser(doc: str, *, gist_workdir: bool = False, lens: bool = True,
                 layouts: bool = False) -> argparse.ArgumentParser:
    """`gist_workdir`: --gist-workdir (LensNet on a trained GistNet); `lens`: --candidates
    (counterfactual actions per window); `layouts`: --single-layout (GistNet layouts)."""
    parser = _cli.Parser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="smollm2_135m_cpu",
                        help="registered experiment config (see --list)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.FIELD=VALUE", help="override a config field; repeatable")
    parser.add_argument("--workdir", required=False,
                        help="checkpoints, metrics.jsonl, tensorboard/ event files, summary.json")
    if gist_workdir:
        parser.add_argument("--gist-workdir", default=None,
                            help="train_gist/train_joint workdir to load GistNet from "
                                 "(default: an untrained GistNet)")
        parser.add_argument("--gist-params", default=None, metavar="PARAMS.safetensors",
                            help="params-only GistNet file instead (e.g. "
                                 "mcjax/assets/gistnet_smollm2_135m.safetensors)")
        parser.add_argument("--init-lens", default=None, metavar="PARAMS.safetensors",
                            help="fine-tune a params-only LensNet file (e.g. the shipped "
                                 "v2) instead of the random init: fresh optimizer and "
                                 "schedule")
    if lens:
        parser.add_argument("--candidates", type=_cli.count, default=4,
                            help="counterfactual candidate actions per window (half expansions)")
    if layouts:
        parser.add_argument("--init-gist", default=None, metavar="PARAMS.safetensors",
                            help="warm start from a params-only GistNet file (e.g. "
                                 "mcjax/assets/gistnet_smollm2_135m.safetensors): fresh "
                                 "optimizer and schedule")
        parser.add_argument("--single-layout", action="store_true",
                            help="train on one layout only: LOD1 gists with "
                                 "train.gist_keep_raw[0] raw blocks (same as --set "
                                 "train.gist_lod2=false with a single keep-raw count)")
    parser.add_argument("--no-resume", action="store_true",
                        help="start from scratch even if --workdir has checkpoints")
    parser.add_argument("--eval-batches", type=_cli.nonneg, default=4,
                        help="held-out batches for the evaluations before / during / after")
    parser.add_argument("--stop-after", type=_cli.count, default=None,
                        help="stop after this many steps (resume later)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--list", action="store_true", help="list registered configs")
    return parser


def run(parser: argparse.ArgumentParser, argv, train_fn_name: str) -> int:
    """Parse, build the config, call `mcjax.train.loop.<train_fn_name>`, write summary.json."""
    args = parser.parse_args(argv)

    from mcjax.config import ConfigError, list_configs, override
    from mcjax.errors import CheckpointError
    from mcjax.train import loop

    if args.list:
        print("\n".join(list_configs()))
        return 0
    if not args.workdir:
        parser.error("--workdir is required")
    _cli.output_dir(parser, args.workdir, "--workdir")  # before any model loads
    _cli.net_paths(parser, args, files=("gist_params", "init_gist", "init_lens"),
                   workdirs=("gist_workdir",))
    cfg = _cli.checked_config(parser, args.config, args.overrides)
    try:
        if getattr(args, "single_layout", False):
            cfg = override(cfg, {"train.gist_lod2": False,
                                 "train.gist_keep_raw": (cfg.train.gist_keep_raw[0],)})
    except ConfigError as e:
        parser.error(str(e))
    loop.maybe_initialize_distributed()
    kwargs = dict(resume=not args.no_resume, eval_batches=args.eval_batches,
                  stop_after=args.stop_after, progress=not args.no_progress)
    if hasattr(args, "candidates"):
        kwargs["candidates"] = args.candidates
    if getattr(args, "init_gist", None) is not None:
        kwargs["init_gist"] = args.init_gist
    for name in ("gist_workdir", "gist_params", "init_lens"):
        if getattr(args, name, None) is not None:
            kwargs[name] = getattr(args, name)
    try:
        result = getattr(loop, train_fn_name)(cfg, args.workdir, **kwargs)
    except (ValueError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result.pop("state")
    summary = Path(args.workdir) / "summary.json"
    summary.write_text(json.dumps(result, indent=2))
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0
