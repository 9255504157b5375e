"""Evaluate MegaContext checkpoints against baselines on held-out data (SPEC §2.9).

All in one run, into --out:
  1. ΔNLL@H vs compression ratio: full context, trained GistNet, untrained GistNet (the
     trainer's init), mean-pooled embeddings and truncation on the same held-out windows
     and identical target tokens, at layouts of increasing compression;
  2. passkey accuracy vs history length at a fixed --w-max: MegaContext with LensNet,
     random and recency focus, the sliding window of W_max tokens, and full context where
     it fits (otherwise reported as "skipped: does not fit ...");
  3. focus quality: LensNet (and recency / random) scores vs measured counterfactual
     utility (Pearson, Spearman, sign agreement, counts);
  4. only when asked (--only ceiling): the embedding-space ceiling, free vectors optimised
     per window in the gist slots;
writing results.json, report.md and the plots of the sections run (dnll_vs_ratio.png,
accuracy_vs_length.png, focus_map.png; none is written for a section not run), plus
per_window_nll.npz / ceiling_per_window.npz.

Section 1 ("nll", alias "dnll") also writes results.json "dnll_paired": for every layout
and variant the paired difference to truncation on the same windows (± SE), ΔNLL ± SE,
`significant` (mean + 2·se < 0) and gap_recovered = 1 − ΔNLL_variant / ΔNLL_truncation.

--checkpoint is a train_gist / train_lens / train_joint workdir; what it holds decides
which nets are trained (a train_gist workdir leaves LensNet untrained, and the report says
so). --gist-checkpoint / --lens-checkpoint combine workdirs; --gist-params FILE.safetensors
takes a params-only GistNet (its FILE.json card gives the GistNet config, mcjax.assets);
with none of them the shipped GistNet (mcjax/assets/) is used when it fits --config;
--untrained evaluates the untrained nets on purpose.

Examples (SmolLM2 on a CPU; see --help for the sizes):
  python experiments/evaluate.py --checkpoint runs/gist --out runs/eval \\
      --lengths 1024,2048,4096 --cases 4 --nll-batches 2
  python experiments/evaluate.py --checkpoint runs/gist --out runs/eval_dnll \\
      --only dnll --windows 64 --keep-raw 1,4,17
  python experiments/evaluate.py --gist-params gist.safetensors --out runs/eval_ceiling \\
      --only ceiling --ceiling-windows 16 --ceiling-steps 300
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _cli  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    from mcjax.eval.tasks import PASSKEY_TASK_NOTES, PASSKEY_TASKS

    p = _cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="training workdir (train_gist / train_lens / "
                                        "train_joint) to evaluate")
    p.add_argument("--gist-checkpoint", help="workdir whose GistNet to use (overrides "
                                             "--checkpoint's)")
    p.add_argument("--lens-checkpoint", help="workdir whose LensNet to use (overrides "
                                             "--checkpoint's)")
    p.add_argument("--gist-params", metavar="FILE.safetensors",
                   help="params-only GistNet file with its FILE.json card (config: gist, mc); "
                        "overrides --checkpoint's GistNet")
    p.add_argument("--untrained", action="store_true",
                   help="evaluate the untrained GistNet and LensNet (no checkpoint)")
    p.add_argument("--out", required=True, help="output directory (created; checked "
                                                "writable before anything runs)")
    p.add_argument("--config", default="smollm2_135m_cpu",
                   help="registered experiment config (default: %(default)s)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.FIELD=VALUE", help="override a config field; repeatable")
    p.add_argument("--only", default=",".join(("nll", "passkey", "focus")),
                   help="comma-separated sections to run: nll (alias dnll), passkey, focus, "
                        "ceiling (default: %(default)s; the ceiling only when named)")
    g = p.add_argument_group("ΔNLL@H and focus quality")
    g.add_argument("--nll-batches", type=int, default=2,
                   help="held-out batches of train.batch_size windows (default: %(default)s; "
                        "--windows overrides)")
    g.add_argument("--windows", type=int, default=None,
                   help="held-out windows of the ΔNLL section, each inside one document (SPEC: "
                        ">= 64); any count, batched internally")
    g.add_argument("--nll-batch-size", type=int, default=None,
                   help="windows per ΔNLL forward (default: train.batch_size); the last batch "
                        "is padded")
    g.add_argument("--focus-batches", type=int, default=4,
                   help="held-out batches of train.batch_size windows for focus quality "
                        "(default: %(default)s)")
    g.add_argument("--focus-candidates", type=int, default=8,
                   help="candidate expand/collapse actions per window whose counterfactual "
                        "utility is measured (default: %(default)s)")
    g.add_argument("--keep-raw", default=None,
                   help="raw tail sizes in blocks of the ΔNLL layouts, e.g. 17,4,1 "
                        "(default: about half, an eighth and one block of the prefix); each "
                        "also with LOD2 where a complete 1,024-token group exists")
    g.add_argument("--variants", default=None,
                   help="comma-separated ΔNLL variants, e.g. gistnet (default: all of gistnet, "
                        "gistnet_untrained, mean_pool, mean_pool_hidden; full and truncation "
                        "always run)")
    g = p.add_argument_group("passkey retrieval")
    g.add_argument("--lengths", default=None,
                   help="history lengths in tokens, comma-separated; each must exceed "
                        "--w-max (default: the config's eval.history_lengths, 1024,2048,4096 "
                        "for smollm2_135m_cpu; a GPU takes e.g. 1024,...,32768)")
    g.add_argument("--w-max", type=int, default=None,
                   help="working-context budget of the MegaContext sessions and the sliding "
                        "window (default: the config's mc.w_max)")
    g.add_argument("--cases", type=int, default=4,
                   help="passkey cases per length, run as one batch of session streams "
                        "(default: %(default)s)")
    g.add_argument("--refocus-steps", type=int, default=2,
                   help="feed the last N blocks of each history one refocus at a time "
                        "(default: %(default)s)")
    g.add_argument("--max-new-tokens", type=int, default=None,
                   help="greedy tokens per answer (default: longest answer + 4)")
    g.add_argument("--methods", default=None,
                   help="passkey methods, comma-separated (default: all of megacontext_lens, "
                        "megacontext_random, megacontext_recency, megacontext_retrieval, "
                        "sliding_window, full_context)")
    g.add_argument("--haystack", choices=["filler", "held_out"], default="filler",
                   help="repeated filler text or held-out corpus text (default: %(default)s)")
    g.add_argument("--task", choices=list(PASSKEY_TASKS), default="passkey",
                   help="the passkey, or a look-alike task: " + "; ".join(
                       f"{k}: {v}" for k, v in PASSKEY_TASK_NOTES.items() if k != "passkey")
                   + " (default: %(default)s)")
    g.add_argument("--needles", type=_cli.count, default=8,
                   help="needles per case of the multikey / near_duplicate tasks "
                        "(default: %(default)s)")
    g.add_argument("--full-memory-gb", type=float, default=6.0,
                   help="memory limit of the full-context baseline's prefill; longer histories "
                        "are reported as skipped (default: %(default)s)")
    g = p.add_argument_group("ceiling (free vectors in the gist slots)")
    g.add_argument("--ceiling-windows", type=int, default=16,
                   help="held-out windows, the first of the ΔNLL sample (default: %(default)s)")
    g.add_argument("--ceiling-steps", type=int, default=300,
                   help="Adam steps per window (default: %(default)s)")
    g.add_argument("--ceiling-lr", type=float, default=0.1,
                   help="Adam step size in units of the token-embedding RMS, cosine-decayed to "
                        "a tenth (default: %(default)s)")
    g.add_argument("--ceiling-layouts", default="lod1_keep1",
                   help="comma-separated layout names, e.g. lod1_keep1,lod1_keep4,"
                        "lod1+lod2_keep1 (default: %(default)s)")
    g.add_argument("--ceiling-batch-size", type=int, default=None,
                   help="windows optimised per jitted step (default: min(windows, 8))")
    g.add_argument("--ceiling-init", choices=["mean_pool", "gistnet"], default="mean_pool",
                   help="start vectors: mean-pooled token embeddings, or the evaluated "
                        "GistNet's gists (never worse than the net; fewer steps needed) "
                        "(default: %(default)s)")
    g.add_argument("--ceiling-fit", choices=["continuation", "tail"], default="continuation",
                   help="targets the vectors are fitted on: the scored continuation itself "
                        "(an oracle that may overfit it), or the raw tail before it only "
                        "(the continuation held out) (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="passkey keys / random focus / candidate draws (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _git_state() -> dict:
    """Commit and dirtiness of the source tree (best effort: {} outside a git checkout)."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True,
                               text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"commit": commit, "dirty": bool(dirty)}


def check_args(parser, args) -> None:
    """What can be checked before the evaluation starts (one line, exit 2): the output
    directory (an existing file there used to fail only after the whole run), the config
    and its --set overrides, numbers out of range (checkpoints and params files: the
    pipeline's own checks, before any model loads)."""
    _cli.output_dir(parser, args.out, "--out")
    _cli.checked_config(parser, args.config, args.overrides)
    for flag in ("nll_batches", "focus_batches", "focus_candidates", "cases",
                 "ceiling_windows", "ceiling_steps"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    for flag in ("windows", "nll_batch_size", "w_max", "max_new_tokens",
                 "ceiling_batch_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if not args.full_memory_gb > 0 or not args.ceiling_lr > 0:
        parser.error("--full-memory-gb and --ceiling-lr must be > 0")
    _cli.no_negative_ints(parser, args)  # the rest (--seed, --refocus-steps)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)

    from mcjax.errors import CheckpointError
    from mcjax.eval import pipeline, report
    from mcjax.eval.tasks import EvalInputError, parse_int_list

    command = "python experiments/evaluate.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    try:
        opts = pipeline.EvalOptions(
            checkpoint=args.checkpoint, gist_checkpoint=args.gist_checkpoint,
            lens_checkpoint=args.lens_checkpoint, gist_params=args.gist_params,
            untrained=args.untrained, config=args.config,
            overrides=tuple(args.overrides),
            sections=tuple(s.strip() for s in args.only.split(",") if s.strip()),
            nll_batches=args.nll_batches, windows=args.windows,
            nll_batch_size=args.nll_batch_size, focus_batches=args.focus_batches,
            focus_candidates=args.focus_candidates,
            keep_raw=(None if args.keep_raw is None
                      else parse_int_list(args.keep_raw, "--keep-raw")),
            nll_variants=(None if args.variants is None else
                          tuple(v.strip() for v in args.variants.split(",") if v.strip())),
            lengths=(None if args.lengths is None
                     else parse_int_list(args.lengths, "--lengths")), w_max=args.w_max,
            cases=args.cases, refocus_steps=args.refocus_steps,
            max_new_tokens=args.max_new_tokens, haystack=args.haystack, task=args.task,
            needles=args.needles,
            methods=(pipeline.METHODS if args.methods is None else
                     tuple(m.strip() for m in args.methods.split(",") if m.strip())),
            full_memory_gb=args.full_memory_gb, ceiling_windows=args.ceiling_windows,
            ceiling_steps=args.ceiling_steps, ceiling_lr=args.ceiling_lr,
            ceiling_layouts=tuple(n.strip() for n in args.ceiling_layouts.split(",")
                                  if n.strip()),
            ceiling_batch_size=args.ceiling_batch_size, ceiling_init=args.ceiling_init,
            ceiling_fit=args.ceiling_fit,
            seed=args.seed,
            progress=not args.no_progress, command=command)
        results = pipeline.run_evaluation(opts)
    except (EvalInputError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results["meta"]["git"] = _git_state()
    paths = report.write_outputs(results, args.out)
    untrained = results["meta"]["untrained"]
    if untrained:
        names = " and ".join({"gist": "GistNet", "lens": "LensNet"}[p] for p in untrained)
        print(f"note: {names} {'is' if len(untrained) == 1 else 'are'} UNTRAINED in this "
              f"evaluation (see report.md)", file=sys.stderr)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
