"""The import graph of mcjax/ (module-level and deferred imports alike) against its layers.

Layers, lowest first (SPEC §3; a module may import only its own layer or lower ones):

  0  config, checks, errors, statistics, sharding, hlo_cost, benchmarking
  1  base/                       5  assets, checkpoint
  2  gist, working_context, data   6  nets, scoring, counterfactuals
  3  lens, focus, retrieval      7  runtime/
  4  tree/                       8  train/
                                 9  eval/, projection (compiles both the runtime's and a
                                    training step's programs, so it sits above both)

Reports as JSON: import circles between top-level modules/packages, arrows from a lower
layer back up, arrows from eval/ into train/, modules in no layer, and the lines of every
module. Run from a checkout's root, or name one:

  python experiments/import_graph.py [--root PATH]
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _cli  # noqa: E402

LAYERS = [
    (0, ("config", "checks", "errors", "statistics", "sharding", "hlo_cost", "benchmarking")),
    (1, ("base",)), (2, ("gist", "working_context", "data")),
    (3, ("lens", "focus", "retrieval")), (4, ("tree",)), (5, ("assets", "checkpoint")),
    (6, ("nets", "scoring", "counterfactuals")), (7, ("runtime",)), (8, ("train",)),
    (9, ("eval", "projection")),
]
LAYER_OF = {f"mcjax.{name}": level for level, names in LAYERS for name in names}


def modules(root: Path) -> dict[str, Path]:
    out = {}
    for p in sorted((root / "mcjax").rglob("*.py")):
        name = ".".join(p.relative_to(root).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


def unit(name: str) -> str:
    """The top-level module or package a module belongs to (mcjax.tree.core -> mcjax.tree)."""
    return ".".join(name.split(".")[:2])


def edges(mods: dict[str, Path]) -> dict[str, set[str]]:
    def resolve(target: str) -> str | None:
        parts = target.split(".")
        for i in range(len(parts), 0, -1):
            if ".".join(parts[:i]) in mods:
                return ".".join(parts[:i])
        return None

    out: dict[str, set[str]] = {}
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                    and node.module.startswith("mcjax"):
                targets = [resolve(f"{node.module}.{a.name}") for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [resolve(a.name) for a in node.names if a.name.startswith("mcjax")]
            for t in targets:
                if t and t not in (name, "mcjax"):
                    out.setdefault(name, set()).add(t)
    return out


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in list(graph):
        if v not in index:
            visit(v)
    return found


def main(argv=None) -> int:
    parser = _cli.Parser(description=__doc__,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=".", help="checkout root holding mcjax/")
    args = parser.parse_args(argv)
    root = Path(args.root)
    if not (root / "mcjax").is_dir():
        _cli.fail(parser, f"--root {root}: no mcjax/ package there")
    mods = modules(root)
    arrows = edges(mods)
    units: dict[str, set[str]] = {}
    for a, bs in arrows.items():
        for b in bs:
            if unit(a) != unit(b):
                units.setdefault(unit(a), set()).add(unit(b))
    back_up = sorted(f"{a} -> {b}" for a, bs in arrows.items() for b in bs
                     if unit(a) in LAYER_OF and unit(b) in LAYER_OF
                     and LAYER_OF[unit(b)] > LAYER_OF[unit(a)])
    report = {
        "import_circles": circles(units),
        "arrows_back_up": back_up,
        "eval_to_train": sorted(f"{a} -> {b}" for a, bs in arrows.items() for b in bs
                                if a.startswith("mcjax.eval") and b.startswith("mcjax.train")),
        "modules_in_no_layer": sorted({unit(m) for m in mods} - set(LAYER_OF) - {"mcjax"}),
        "lines": {m: len(p.read_text().splitlines()) for m, p in mods.items()},
    }
    json.dump(report, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
