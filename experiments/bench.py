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
    import _cli

    parser = _cli.Parser(description=__doc__)
    sub = parser.add_subparsers(dest="suite", required=True)
    modules = {name: importlib.import_module(f"bench_{name}") for name in SUITES}
    suites = {}
    for name, module in modules.items():
        p = suites[name] = sub.add_parser(name, help=module.__doc__.strip().splitlines()[0])
        module.add_args(p)
        p.add_argument("--out", help="also write the JSON to this file")
    p_all = suites["all"] = sub.add_parser("all", help="run every suite with its defaults")
    p_all.add_argument("--out", help="also write the JSON to this file")
    args = parser.parse_args(argv)
    # checked before any work: one line, exit 2
    chosen = suites[args.suite]
    if args.out:
        _cli.output_file(chosen, args.out, "--out")
    _cli.no_negative_ints(chosen, args)
    for flag in ("iters", "histories", "history", "decode_tokens", "batch", "block_size",
                 "w_max", "tokens", "chunk", "prefill_lengths", "decode_prompt"):
        value = getattr(args, flag, None)
        if any(v is not None and v < 1 for v in (value if isinstance(value, list)
                                                  else [value])):
            chosen.error(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if getattr(args, "overrides", None):
        from mcjax.config import ConfigError, get_config, override

        try:
            override(get_config("smollm2_135m_cpu"), args.overrides)
        except ConfigError as e:
            chosen.error(str(e).splitlines()[0])
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
