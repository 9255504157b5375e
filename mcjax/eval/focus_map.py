"""Focus maps: which stretches of a stream's history its working context holds at which
LOD, as runs and as text (reports, `generate.py`, `Session.focus_map`)."""

from __future__ import annotations

from typing import Sequence

import jax

from mcjax import working_context as wcm


def focus_runs(wc: wcm.WorkingContext, mc) -> list[tuple[int, int, int, int]]:
    """Runs of consecutive entries of one level in one stream's WC (host):
    (level, first token, end token, number of entries)."""
    entries = wcm.to_entries(jax.device_get(wc))
    runs: list[list[int]] = []
    for level, node, _, _ in entries:
        size = mc.block_size**level
        if runs and runs[-1][0] == level:
            runs[-1][2] = (node + 1) * size
            runs[-1][3] += 1
        else:
            runs.append([level, node * size, (node + 1) * size, 1])
    return [tuple(r) for r in runs]


def lod_at(runs: Sequence[tuple[int, int, int, int]], position: int) -> int | None:
    """The LOD at which a WC with focus runs `runs` (`focus_runs`) holds the history token
    at `position` (0: raw); None when no entry covers it."""
    for level, start, end, _ in runs:
        if start <= position < end:
            return int(level)
    return None


def format_focus_map(runs: Sequence[tuple[int, int, int, int]], width: int = 64) -> str:
    """Compact focus map: one line per run (`[start, end) LODℓ × n`) plus a bar of the
    history, each character the finest LOD covering that stretch ('0' = raw tokens)."""
    if not runs:
        return "(empty)"
    total = runs[-1][2]
    lines = [f"  [{s:>7}, {e:>7})  LOD{l} x {n}" + (" tokens" if l == 0 else " gists")
             for l, s, e, n in runs]
    bar = []
    for i in range(min(width, total)):
        lo, hi = i * total // min(width, total), (i + 1) * total // min(width, total)
        bar.append(str(min(l for l, s, e, _ in runs if s < hi and e > lo)))
    return "\n".join(lines + [f"  history |{''.join(bar)}| {total} tokens (oldest left)"])
