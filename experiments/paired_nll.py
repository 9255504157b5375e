"""Paired ΔNLL comparison of two evaluations on the same windows: run B − run A.

A and B are `evaluate.py --only dnll` output directories (or their per_window_nll.npz
files) scored on the same held-out windows (`--windows`, same seed: the window offsets
are checked and must match). Per layout both runs have, the variant's per-window NLL of B
minus that of A, its mean ± standard error, and each run's share of truncation's gap it
recovers (`metrics.paired_vs_truncation`: 1 − ΔNLL_variant / ΔNLL_truncation, against its
own truncation and full-context NLLs). Negative B − A: B is better.

Example (results/README.md, gist_sweep/l20_lr3e-3):
  python experiments/paired_nll.py results/gist_sweep/l20_transformer \\
      results/gist_sweep/l20_lr3e-3
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _cli  # noqa: E402

FILE = "per_window_nll.npz"


def _load(parser, path: str, flag: str):
    import numpy as np

    p = Path(path)
    if p.is_dir():
        p = p / FILE
    if not p.is_file():
        _cli.fail(parser, f"{flag} {path}: no {FILE} there")
    try:
        with np.load(p) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        _cli.fail(parser, f"{flag} {path}: cannot read {p.name} ({e})")


def paired_rows(a: dict, b: dict, variant: str) -> list[dict]:
    """Per layout with `variant` in both: B − A (mean, stderr, n) and each run's gap
    recovered (with its stderr)."""
    from mcjax.eval import metrics
    from mcjax.statistics import mean_stderr

    rows = []
    for key in sorted(k for k in a if k.startswith("nll/") and k.endswith(f"/{variant}")):
        if key not in b:
            continue
        layout = key.split("/")[1]

        def gap(run):
            return metrics.paired_vs_truncation(run[key], run[f"nll/{layout}/truncation"],
                                                run[f"nll/{layout}/full"])

        ga, gb = gap(a), gap(b)
        rows.append({"layout": layout, "b_minus_a": mean_stderr(b[key] - a[key]),
                     "gap_recovered_a": ga["gap_recovered"],
                     "gap_recovered_a_se": ga["gap_recovered_se"],
                     "gap_recovered_b": gb["gap_recovered"],
                     "gap_recovered_b_se": gb["gap_recovered_se"]})
    return rows


def main(argv=None) -> int:
    parser = _cli.Parser(description=__doc__,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", help=f"run A: an evaluate.py output directory or its {FILE}")
    parser.add_argument("b", help="run B: the same")
    parser.add_argument("--variant", default="gistnet",
                        help="the ΔNLL variant compared (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    a, b = _load(parser, args.a, "A"), _load(parser, args.b, "B")
    for name, run in (("A", a), ("B", b)):
        if "window/offset" not in run:
            _cli.fail(parser, f"{name} holds no window offsets (not a {FILE})")
    if a["window/offset"].shape != b["window/offset"].shape \
            or (a["window/offset"] != b["window/offset"]).any():
        _cli.fail(parser, "A and B were scored on different windows")
    rows = paired_rows(a, b, args.variant)
    if not rows:
        _cli.fail(parser, f"no layout has the variant {args.variant!r} in both runs")
    if args.json:
        print(json.dumps({"a": args.a, "b": args.b, "variant": args.variant, "rows": rows},
                         indent=2))
        return 0
    for r in rows:
        d = r["b_minus_a"]
        se = "n/a" if d["stderr"] is None else f"{d['stderr']:.4f}"
        gap = lambda g: "n/a" if g is None else f"{g:.3f}"  # noqa: E731
        print(f"{r['layout']:18s} B-A {d['mean']:+.4f} ± {se}  gap A "
              f"{gap(r['gap_recovered_a'])} B {gap(r['gap_recovered_b'])}  n={d['n']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
