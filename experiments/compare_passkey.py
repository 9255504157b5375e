"""Paired comparison of passkey results: two `evaluate.py --only passkey` runs (or two
methods of one run) scored on the same cases (same --seed, --cases, --lengths,
--haystack). Per length: right by both / only A / only B, the paired difference A − B
± its standard error, and the exact McNemar p-value. Cases are matched by key and needle
span, so runs with different cases are an error, not a silent mismatch.

Example:
  python experiments/compare_passkey.py results/passkey_lensnet_v2/results.json:megacontext_lens \\
      results/passkey_retrieval_4k8k/results.json:megacontext_retrieval
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _cli  # noqa: E402


def _load(spec: str) -> tuple[str, dict]:
    path, _, method = spec.rpartition(":")
    if not path:
        raise SystemExit(f"expected RESULTS.json:METHOD, got {spec!r}")
    with open(path) as f:
        methods = json.load(f)["passkey"]["methods"]
    if method not in methods:
        raise SystemExit(f"{path} has no passkey method {method!r}; it has {sorted(methods)}")
    return f"{method} ({path})", methods[method]


def main(argv=None) -> int:
    p = _cli.Parser(description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", help="RESULTS.json:METHOD")
    p.add_argument("b", help="RESULTS.json:METHOD")
    args = p.parse_args(argv)
    _cli.no_negative_ints(p, args)
    from mcjax.eval.metrics import paired_accuracy

    (name_a, a), (name_b, b) = _load(args.a), _load(args.b)
    rows = []
    for length in sorted(set(a) & set(b), key=int):
        ea, eb = a[length].get("examples"), b[length].get("examples")
        if not ea or not eb:
            continue
        ids = lambda ex: [(e["key"], tuple(e["needle_span"])) for e in ex]  # noqa: E731
        if ids(ea) != ids(eb):
            raise SystemExit(f"length {length}: the two runs scored different cases")
        row = paired_accuracy([e["found"] for e in ea], [e["found"] for e in eb])
        rows.append({"length": int(length), **row})
    if not rows:
        raise SystemExit("no common lengths with per-case results")
    print(json.dumps({"a": name_a, "b": name_b, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
