"""Benchmarks. `python experiments/bench.py {base,gist,focus,e2e,all} [--out FILE]` prints JSON.

Every speed goal is a ratio of two measurements taken side by side in the same run; every
timer calls `block_until_ready` (see `mcjax.benchmarking`). Each suite lives in its own
module `experiments/bench_<suite>.py` exposing `add_args(parser)` and `run(args) -> dict`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

SUITES = ("base", "gist", "focus", "e2e")


def main(argv=None) -> int:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="suite", required=True)
    modules = {name: importlib.import_module(f"bench_{name}") for name in SUITES}
    for name, module in modules.items():
        p = sub.add_parser(name, help=module.__doc__.strip().splitlines()[0])
        module.add_args(p)
        p.add_argument("--out", help="also write the JSON to this file")
    p_all = sub.add_parser("all", help="run every suite with its defaults")
    p_all.add_argument("--out", help="also write the JSON to this file")
    args = parser.parse_args(argv)
    if args.suite == "all":
        result = {}
        for name in SUITES:
            sp = argparse.ArgumentParser()
            modules[name].add_args(sp)
            result[name] = modules[name].run(sp.parse_args([]))
    else:
        result = modules[args.suite].run(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
