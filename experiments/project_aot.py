"""Project the session's and the trainer's cost at real sizes by AOT compilation — no
accelerator, no weights (SPEC §2.1 "Accelerators").

For each named base model (bf16) under a registered experiment config with W_max set
(default: `smollm2_135m_cpu` at W_max 8,192, retrieval layers moved to the same fractions
of the model's depth), compiles from abstract inputs only: the plain model's decode step
over a W_max-slot cache, the session's decode and refocus programs (one stream; focus
policies "lens" and "retrieval") and one GistNet train step. Reports XLA's
memory_analysis / cost_analysis as compiled for this machine's CPU, the loop-aware bf16
cost of each program (`mcjax.hlo_cost`), an analytic decode count, and H100 time bounds
(`mcjax.projection`). Writes JSON to --out and prints Markdown tables.

Example:
  python experiments/project_aot.py --out results/aot_projection/results.json
  python experiments/project_aot.py --models llama-3.1-8b --programs plain_decode,session_decode
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _cli  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    from mcjax.projection import MODELS, PROGRAMS

    p = _cli.Parser(description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS),
                   help=f"comma-separated base models (known: {', '.join(MODELS)})")
    p.add_argument("--programs", default=",".join(PROGRAMS),
                   help=f"comma-separated programs (known: {', '.join(PROGRAMS)}; "
                        f"refocus:<policy> takes any focus policy)")
    p.add_argument("--experiment", default="smollm2_135m_cpu",
                   help="registered experiment config whose MegaContext settings are used")
    p.add_argument("--w-max", type=int, default=8192, help="working-context budget W_max")
    p.add_argument("--out", required=True, help="JSON output path")
    p.add_argument("--markdown", default=None, help="also write the tables to this file")
    return p


def _git_state() -> str:
    """HEAD's commit, "+dirty" when the working tree differs from it (what was projected)."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True,
                               check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _cli.no_negative_ints(parser, args)
    _cli.output_file(parser, args.out, "--out")
    if args.markdown:
        _cli.output_file(parser, args.markdown, "--markdown")
    import jax

    from mcjax import projection
    from mcjax.config import ConfigError

    # compile times are part of the report: a persistent compilation cache (as the tests
    # keep) would make them load times
    jax.config.update("jax_enable_compilation_cache", False)

    t0 = time.perf_counter()
    try:
        result = projection.project(
            [m.strip() for m in args.models.split(",") if m.strip()],
            experiment=args.experiment, w_max=args.w_max,
            programs=[p.strip() for p in args.programs.split(",") if p.strip()],
            log=lambda msg: print(msg, file=sys.stderr, flush=True))
    except (ValueError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result["meta"]["command"] = " ".join(["experiments/project_aot.py", *(argv or sys.argv[1:])])
    result["meta"]["git"] = _git_state()
    result["meta"]["wall_s"] = round(time.perf_counter() - t0, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=float) + "\n")
    table = projection.markdown(result)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
