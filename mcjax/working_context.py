"""Fixed-shape working context (SPEC §2.4).

The working context (WC) is what the frozen base model sees: `w_max` slots, each one entry
of the MegaContext tree — a raw token (LOD0) or a gist of level ℓ covering `K**ℓ` tokens.
Valid slots are packed at the front in history order (slot i covers tokens before slot
i+1); the tail of the arrays is padding in a canonical all-zero state, so two WCs with the
same layout are equal bit for bit.

Every operation is a masked, shape-preserving array program compiled once per config:
`expand`, `collapse` and `apply_edits` are thin wrappers around one re-layout pass
(`relayout`: per-slot output counts → cumsum offsets → scatter + cummax maps every output
slot to its source slot), so several non-overlapping edits cost one pass. `append` adds
tokens at LOD0 and, when the budget would overflow, collapses aligned sibling groups
(lowest score, else oldest; never the protected tail nor the sink) instead of dropping
history.

Sink (SPEC §2.4 invariant 7): the history's first `sink_blocks` blocks (S = sink_blocks·K
tokens) stay LOD0 and are never collapsed, so slot 0 holds a real token once T > 0 (the
frozen model's attention sink forms at the physically first slot). A group may collapse
only if its parent span starts at or after S (`legal_collapse_heads`, the one rule that
append, collapse-ahead, the allocator and training share), so the LOD(ℓ+1) group that
contains the sink never forms: with S = K the LOD1 gists of blocks 1..K−1 stay LOD1.
A token t's coarsest level is thus limited to the largest m with ⌊t/K^m⌋·K^m ≥ S (0 for
t < S); `initial_layout` and `min_slots` use that limit (the "sink ramp": after the sink
come LOD1 gists up to the first K²-aligned token, LOD2 gists up to the first K³-aligned
one, ...). `sink_blocks=0` is the old behaviour.

Content is by reference: a slot stores `(level, node)`; `materialize` gathers the token
embedding or the gist row from the tree's device view. Host-side helpers (`initial_layout`,
`check_invariants`, `min_slots`, `check_capacity`) use numpy and raise clear errors.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from mcjax.config import ConfigError, MCConfig

__all__ = [
    "KEEP", "EXPAND", "COLLAPSE", "ABSORBED",
    "WorkingContext", "AppendInfo", "InvariantError", "CapacityError",
    "empty", "from_entries", "to_entries", "focus_runs", "lod_at", "format_focus_map",
    "initial_layout", "min_slots", "check_capacity",
    "check_config", "sink_tokens", "sink_mask",
    "capacity_message", "span_start", "span_size", "span_positions", "slot_positions",
    "next_position",
    "protected_mask",
    "legal_expand_mask", "legal_collapse_heads", "group_windows", "window_sum_int",
    "relayout", "actions_from_masks", "group_cover", "legal_directions", "span_end_fraction",
    "apply_edits", "expand", "collapse", "append", "append_checked", "materialize",
    "check_invariants",
]

# Per-slot actions of one re-layout pass.
KEEP, EXPAND, COLLAPSE, ABSORBED = 0, 1, 2, 3  # COLLAPSE marks a group's first slot
_NEVER = 0  # edit_dir of an entry no refocus has created


class InvariantError(AssertionError):
    """A working context breaks one of the invariants of SPEC §2.4."""


class CapacityError(ValueError):
    """The history no longer fits the budget even with every complete span at the top level."""


@flax.struct.dataclass
class WorkingContext:
    """`w_max` slots; valid ones first, in history order. A leading batch axis may be added."""

    level: jax.Array  # [W] int32 LOD of the entry
    node: jax.Array  # [W] int32 index of the entry within its level
    valid: jax.Array  # [W] bool
    edit_step: jax.Array  # [W] int32 refocus step of the edit that created the entry
    edit_dir: jax.Array  # [W] int32 +1 created by an expand, -1 by a collapse, 0 never edited
    num_tokens: jax.Array  # [] int32 T: tokens ingested so far; valid slots tile [0, T)
    step: jax.Array  # [] int32 refocus counter (cooldown clock)

    @property
    def capacity(self) -> int:
        return self.level.shape[-1]

    @property
    def num_valid(self) -> jax.Array:
        return jnp.sum(self.valid, axis=-1, dtype=jnp.int32)


@flax.struct.dataclass
class AppendInfo:
    overflow: jax.Array  # [] bool: history no longer fits; the WC was returned unchanged
    num_collapses: jax.Array  # [] int32 budget collapses performed
    nan_scores: jax.Array  # [] bool: scores were not finite; fell back to oldest-first


# --------------------------------------------------------------------------- config helpers


def _check_cfg(cfg: MCConfig) -> None:
    if not isinstance(cfg, MCConfig):
        raise ConfigError(f"expected an MCConfig, got {type(cfg).__name__}")
    if cfg.block_size ** (cfg.num_levels + 1) >= 2**31:
        raise ConfigError(f"block_size**(num_levels+1) = {cfg.block_size}**{cfg.num_levels + 1} "
                          "overflows int32 token indices")


def sink_tokens(cfg: MCConfig) -> int:
    """S: tokens of the sink (the history's first `sink_blocks` blocks, always LOD0)."""
    return cfg.sink_blocks * cfg.block_size


def check_config(cfg: MCConfig) -> None:
    """Raise ConfigError when `w_max` cannot hold the LOD0 parts every long history keeps:
    the sink (sink_blocks·K tokens), the protected tail, a partial block of up to K−1 tokens
    sharing a block with the tail, and one gist. (`MCConfig` checks the same without the
    sink.) Called by `empty` and the runtime."""
    _check_cfg(cfg)
    K, S = cfg.block_size, sink_tokens(cfg)
    need = S + cfg.recent_protect + K
    if cfg.w_max < need:
        raise ConfigError(
            f"w_max ({cfg.w_max}) cannot hold the sink of sink_blocks={cfg.sink_blocks} "
            f"block(s) ({S} tokens), the protected tail of recent_protect="
            f"{cfg.recent_protect} tokens, a partial block of up to block_size-1={K - 1} "
            f"tokens and a gist: need w_max >= {need} (or fewer sink_blocks)")


def _pow_table(cfg: MCConfig) -> jax.Array:
    # K**l for l = 0..L+1 (L+1: span of a collapse's parent while checking legality)
    return jnp.asarray([cfg.block_size**l for l in range(cfg.num_levels + 2)], jnp.int32)


def span_size(level: jax.Array, cfg: MCConfig) -> jax.Array:
    """Tokens covered by an entry of `level` (K**level)."""
    return _pow_table(cfg)[level]


def span_end_fraction(wc, cfg: MCConfig) -> jax.Array:
    """[..., W] where each slot's span ends, as a fraction of the history (1 = newest)."""
    end = (wc.node + 1) * span_size(wc.level, cfg)
    return jnp.clip(end.astype(jnp.float32) / jnp.maximum(
        jnp.asarray(wc.num_tokens, jnp.float32)[..., None], 1.0), 0.0, 1.0)


def span_start(level: jax.Array, node: jax.Array, cfg: MCConfig) -> jax.Array:
    """First token of entry (level, node); entries are block aligned by construction."""
    return node * span_size(level, cfg)


def span_positions(start, size, scheme: str):
    """The positions rule: position ids [..., N] of N slots holding the spans [start,
    start + size) [..., N], oldest first — `absolute` = token index (a span: its centre,
    start + size // 2), `compact` = running index over the slots. numpy in, numpy out
    (host layouts); jax arrays otherwise."""
    xp = np if isinstance(start, np.ndarray) else jnp
    if scheme == "absolute":
        return start + size // 2
    if scheme == "compact":
        return xp.broadcast_to(xp.arange(start.shape[-1], dtype=xp.int32), start.shape)
    raise ConfigError(f"position scheme must be absolute|compact, got {scheme!r}")


def slot_positions(wc: WorkingContext, cfg: MCConfig, scheme: str | None = None) -> jax.Array:
    """Position ids [W] of the WC's slots (`span_positions`, valid slots packed first);
    padding slots get 0."""
    size = span_size(wc.level, cfg)
    pos = span_positions(wc.node * size, size, scheme or cfg.position_scheme)
    return jnp.where(wc.valid, pos, 0).astype(jnp.int32)


def next_position(wc: WorkingContext, cfg: MCConfig, scheme: str | None = None) -> jax.Array:
    """[...] position id of the first token after the WC (a pending or continuation token):
    `absolute` = its token index T, `compact` = the running index after the valid slots."""
    scheme = scheme or cfg.position_scheme
    if scheme == "compact":
        return wc.num_valid
    if scheme == "absolute":
        return jnp.asarray(wc.num_tokens, jnp.int32)
    raise ConfigError(f"position scheme must be absolute|compact, got {scheme!r}")


def sink_mask(level, node, valid, cfg: MCConfig) -> jax.Array:
    """Slots that may never collapse because of the sink: their sibling group's parent span
    starts before S = sink_blocks·K (the sink blocks themselves and, one level up, the
    gists whose parent group holds the sink)."""
    K = cfg.block_size
    L = cfg.num_levels
    parent_start = (node // K) * _pow_table(cfg)[jnp.minimum(level + 1, L + 1)]
    return valid & (parent_start < sink_tokens(cfg))


def protected_mask(level, node, valid, num_tokens, cfg: MCConfig) -> jax.Array:
    """Slots whose span reaches into the newest `recent_protect` tokens."""
    end = (node + 1) * span_size(level, cfg)
    return valid & (end > jnp.asarray(num_tokens)[..., None] - cfg.recent_protect)


# --------------------------------------------------------------------------- construction


def empty(cfg: MCConfig) -> WorkingContext:
    """A WC holding no history (T = 0)."""
    check_config(cfg)
    W = cfg.w_max
    z = jnp.zeros((W,), jnp.int32)
    return WorkingContext(level=z, node=z, valid=jnp.zeros((W,), bool), edit_step=z,
                          edit_dir=z, num_tokens=jnp.int32(0), step=jnp.int32(0))


def from_entries(entries: Sequence[tuple], num_tokens: int, cfg: MCConfig, *,
                 step: int = 0) -> WorkingContext:
    """Build a WC from host entries `(level, node[, edit_step, edit_dir])`, oldest first."""
    _check_cfg(cfg)
    W = cfg.w_max
    if len(entries) > W:
        raise CapacityError(f"{len(entries)} entries do not fit w_max={W}")
    arr = np.zeros((4, W), np.int32)
    for i, e in enumerate(entries):
        arr[: len(e), i] = e
    valid = np.arange(W) < len(entries)
    return WorkingContext(level=jnp.asarray(arr[0]), node=jnp.asarray(arr[1]),
                          valid=jnp.asarray(valid), edit_step=jnp.asarray(arr[2]),
                          edit_dir=jnp.asarray(arr[3]), num_tokens=jnp.int32(num_tokens),
                          step=jnp.int32(step))


def to_entries(wc: WorkingContext) -> list[tuple[int, int, int, int]]:
    """Host list of `(level, node, edit_step, edit_dir)` of the valid slots, oldest first."""
    level, node, valid, es, ed = (np.asarray(x) for x in
                                  (wc.level, wc.node, wc.valid, wc.edit_step, wc.edit_dir))
    n = int(valid.sum())
    return [(int(level[i]), int(node[i]), int(es[i]), int(ed[i])) for i in range(n)]


# Focus maps: which stretches of a stream's history its WC holds at which LOD, as runs and
# as text (reports, `generate.py`, `Session.focus_map`).


def focus_runs(wc: WorkingContext, mc: MCConfig) -> list[tuple[int, int, int, int]]:
    """Runs of consecutive entries of one level in one stream's WC (host):
    (level, first token, end token, number of entries)."""
    runs: list[list[int]] = []
    for level, node, _, _ in to_entries(jax.device_get(wc)):
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


def _min_boundaries(num_tokens: int, cfg: MCConfig) -> list[int]:
    """Region boundaries b[0]=T >= b[1] >= ... >= b[L+1]=0 of the coarsest legal layout:
    tokens [b[l+1], b[l]) sit at level l (finer where the sink limits them, see
    `_sink_steps`); b[l] is a multiple of K**l."""
    K, L, T = cfg.block_size, cfg.num_levels, num_tokens
    b = [T, (max(T - cfg.recent_protect, 0) // K) * K]
    for lvl in range(2, L + 1):
        b.append((b[-1] // K**lvl) * K**lvl)
    return b + [0]


def _sink_steps(cfg: MCConfig) -> list[int]:
    """c[m], m = 0..L: the first token an entry of level m may start at — the smallest
    multiple of K**m that is >= S (c[0] = 0). Token t's level is capped at the largest m
    with t >= c[m]: an entry of level m must not share its span with the sink."""
    K, S = cfg.block_size, sink_tokens(cfg)
    return [0] + [-(-S // K**m) * K**m for m in range(1, cfg.num_levels + 1)]


def _layout_pieces(b: list[int], cfg: MCConfig):
    """(level, start, stop) runs of a layout, oldest first: region l' = [b[l'+1], b[l'])
    at level min(l', sink cap). Every run is K**level aligned at both ends."""
    c = _sink_steps(cfg)
    out = []
    for top in range(cfg.num_levels, -1, -1):  # oldest region (top level) first
        lo, hi = b[top + 1], b[top]
        for m in range(top + 1):
            start = max(lo, c[m])
            stop = hi if m == top else min(hi, c[m + 1])
            if stop > start:
                out.append((m, start, stop))
    return out


def _layout_cost(b: list[int], cfg: MCConfig) -> int:
    K = cfg.block_size
    return sum((stop - start) // K**lvl for lvl, start, stop in _layout_pieces(b, cfg))


def _coarsen_below(b: list[int], lvl: int, cfg: MCConfig) -> list[int]:
    """Boundaries with b[:lvl+1] fixed and everything older at its coarsest."""
    b = list(b[: lvl + 1])
    for m in range(lvl + 1, cfg.num_levels + 1):
        b.append((b[-1] // cfg.block_size**m) * cfg.block_size**m)
    return b + [0]


def min_slots(num_tokens: int, cfg: MCConfig) -> int:
    """Fewest slots any legal layout of `num_tokens` tokens needs (everything complete,
    outside the protected tail and the sink at the coarsest level the sink allows)."""
    return _layout_cost(_min_boundaries(int(num_tokens), cfg), cfg)


def _levels_needed(num_tokens: int, cfg: MCConfig) -> int | None:
    """Smallest num_levels whose coarsest layout fits w_max (None: no depth suffices)."""
    levels = cfg.num_levels
    while cfg.block_size ** (levels + 2) < 2**31:
        levels += 1
        if min_slots(num_tokens, dataclasses.replace(cfg, num_levels=levels)) <= cfg.w_max:
            return levels
    return None


def capacity_message(num_tokens: int, cfg: MCConfig) -> str:
    need = min_slots(num_tokens, cfg)
    levels = _levels_needed(num_tokens, cfg)
    hint = f" or num_levels >= {levels}" if levels is not None else ""
    return (f"history of {num_tokens} tokens needs at least {need} working-context slots even "
            f"with every complete span at LOD{cfg.num_levels}, but w_max={cfg.w_max}: "
            f"use w_max >= {need}{hint}")


def check_capacity(num_tokens: int, cfg: MCConfig) -> None:
    """Raise CapacityError when no legal layout of `num_tokens` fits `w_max` (host, no sync)."""
    if min_slots(num_tokens, cfg) > cfg.w_max:
        raise CapacityError(capacity_message(num_tokens, cfg))


def initial_layout(num_tokens: int, cfg: MCConfig) -> WorkingContext:
    """Layout for a history of `num_tokens` tokens (may be ≫ w_max): recent tokens LOD0, then
    LOD1, oldest at the top level, as fine as the budget allows (newest spans first); the
    sink blocks stay LOD0 and the spans right after them only as coarse as the sink allows
    (module docstring).

    Greedy over region boundaries: lower b[1] (more LOD0) as far as the budget allows with
    everything older at its coarsest, then b[2], ... Cost is monotone in each boundary, so
    each one is a binary search. Raises CapacityError when even the coarsest layout overflows.
    """
    _check_cfg(cfg)
    T, K, L = int(num_tokens), cfg.block_size, cfg.num_levels
    if T < 0:
        raise ValueError(f"num_tokens must be >= 0, got {T}")
    check_capacity(T, cfg)
    b = _min_boundaries(T, cfg)
    for lvl in range(1, L + 1):
        unit = K**lvl
        lo, hi = 0, b[lvl] // unit  # smallest m with cost(m * unit) <= w_max; hi always fits
        while lo < hi:
            mid = (lo + hi) // 2
            trial = list(b)
            trial[lvl] = mid * unit
            if _layout_cost(_coarsen_below(trial, lvl, cfg), cfg) <= cfg.w_max:
                hi = mid
            else:
                lo = mid + 1
        b[lvl] = lo * unit
        b = _coarsen_below(b, lvl, cfg)
    levels, nodes = [np.zeros(0, np.int32)], [np.zeros(0, np.int32)]
    for lvl, start, stop in _layout_pieces(b, cfg):
        unit = K**lvl
        n = np.arange(start // unit, stop // unit, dtype=np.int64)
        levels.append(np.full(n.shape, lvl, np.int32))
        nodes.append(n.astype(np.int32))
    level = np.concatenate(levels)
    node = np.concatenate(nodes)
    n = level.shape[0]
    W = cfg.w_max
    pad = lambda x: np.concatenate([x, np.zeros(W - n, np.int32)])  # noqa: E731
    z = jnp.zeros((W,), jnp.int32)
    return WorkingContext(level=jnp.asarray(pad(level)), node=jnp.asarray(pad(node)),
                          valid=jnp.asarray(np.arange(W) < n), edit_step=z, edit_dir=z,
                          num_tokens=jnp.int32(T), step=jnp.int32(0))


# --------------------------------------------------------------------------- legality


def _shift_left(x: jax.Array, k: int, fill) -> jax.Array:
    """y[i] = x[i + k] (fill past the end)."""
    if k == 0:
        return x
    return jnp.concatenate([x[k:], jnp.full((k,), fill, x.dtype)])


def window_sum_int(x: jax.Array, k: int) -> jax.Array:
    """s[i] = sum(x[i:i+k]) for integer x (exact, via cumsum)."""
    cs = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(x.astype(jnp.int32))])
    end = jnp.minimum(jnp.arange(x.shape[0]) + k, x.shape[0])
    return cs[end] - cs[:-1]


def group_windows(x: jax.Array, k: int, fill) -> jax.Array:
    """[N, k] windows x[i:i+k] (fill past the end): per-head views of sibling groups."""
    n = x.shape[0]
    idx = jnp.arange(n)[:, None] + jnp.arange(k)[None, :]
    return jnp.where(idx < n, x[jnp.minimum(idx, n - 1)], fill)


def legal_expand_mask(level, valid, cfg: MCConfig) -> jax.Array:
    """Any valid gist may be expanded: its children are complete, hence in the tree."""
    del cfg
    return valid & (level >= 1)


def legal_collapse_heads(level, node, valid, num_tokens, cfg: MCConfig) -> jax.Array:
    """Slots that start a collapsible group: K aligned siblings below the top level, all in
    the WC, whose parent span ends before the protected tail and starts at or after the
    sink (S = sink_blocks·K tokens; with S = 0 every group clears that).

    Slot i heads a group iff its node is K-aligned and slot i+K-1 holds the last sibling at
    the same level; contiguity then forces the K-2 slots between to be the other siblings.
    """
    K, L = cfg.block_size, cfg.num_levels
    last_level = _shift_left(level, K - 1, -1)
    last_node = _shift_left(node, K - 1, -1)
    last_valid = _shift_left(valid, K - 1, False)
    parent_end = (node // K + 1) * _pow_table(cfg)[jnp.minimum(level + 1, L + 1)]
    return (valid & last_valid & (level < L) & (node % K == 0) & (last_level == level)
            & (last_node == node + K - 1)
            & (parent_end <= jnp.asarray(num_tokens) - cfg.recent_protect)
            & ~sink_mask(level, node, valid, cfg))


class CollapseGroups(NamedTuple):
    """The one rule for choosing sibling groups to collapse (append's budget collapses,
    the runtime's collapse-ahead, the allocator; training draws from `heads`), per slot i:
    heads[i]: a group starting at i may collapse (`legal_collapse_heads`); cooled[i]: one
    of its members was created by an expansion within the last `cooldown` refocus steps;
    mean[i]: its mean score (lower = collapse first; ties: the oldest)."""

    heads: jax.Array
    cooled: jax.Array
    mean: jax.Array

    def key(self, cooled: str) -> jax.Array:
        """Collapse priority [N] (argmin = the group to collapse; inf = none): `cooled`
        groups go "last" (when the budget must be met) or "never" (optional collapses)."""
        if cooled == "never":
            return jnp.where(self.heads & ~self.cooled, self.mean, jnp.inf)
        if cooled == "last":  # scores are in [-1, 1]: +4 puts them after every other group
            return jnp.where(self.heads, self.mean + 4.0 * self.cooled, jnp.inf)
        raise ValueError(f"cooled must be 'last' or 'never', got {cooled!r}")


def collapse_groups(level, node, valid, edit_step, edit_dir, num_tokens, step, scores,
                    cfg: MCConfig) -> CollapseGroups:
    """`CollapseGroups` of one WC's slot arrays (any length N) at refocus step `step`."""
    K = cfg.block_size
    heads = legal_collapse_heads(level, node, valid, num_tokens, cfg)
    fresh = (edit_dir == 1) & (step - edit_step < cfg.cooldown) & valid
    cooled = window_sum_int(fresh, K) > 0
    mean = jnp.mean(group_windows(jnp.asarray(scores, jnp.float32), K, 0.0), axis=1)
    return CollapseGroups(heads=heads, cooled=cooled, mean=mean)


def legal_directions(wc: WorkingContext, cfg: MCConfig) -> tuple[jax.Array, jax.Array]:
    """([W] may expand, [W] may collapse) of one WC — the allocator's rules, per slot: a
    slot may expand iff `legal_expand_mask` (and it is outside the protected tail); it may
    collapse iff it lies in a sibling group `legal_collapse_heads` allows. Scorers mask
    their scores with these (`lens.mask_illegal`), so no score asks for an edit the
    allocator could never make. Cooldown is the allocator's own (it depends on the step)."""
    K = cfg.block_size
    prot = protected_mask(wc.level, wc.node, wc.valid, wc.num_tokens, cfg)
    expand = legal_expand_mask(wc.level, wc.valid, cfg) & ~prot
    heads = legal_collapse_heads(wc.level, wc.node, wc.valid, wc.num_tokens, cfg)
    return expand, group_cover(heads, K) > 0


# --------------------------------------------------------------------------- re-layout


def relayout(level, node, valid, edit_step, edit_dir, action, step, K: int):
    """Apply per-slot actions in one pass; returns new arrays (same length) and `src`.

    Output counts per slot (KEEP 1, EXPAND K, COLLAPSE 1, ABSORBED/invalid 0) → cumsum
    offsets; each output slot finds its source by a scatter of source ids at their first
    output slot followed by a running max. Outputs past the total are canonical padding.
    """
    n = level.shape[0]
    count = jnp.where(~valid | (action == ABSORBED), 0,
                      jnp.where(action == EXPAND, K, 1)).astype(jnp.int32)
    ends = jnp.cumsum(count)
    starts = ends - count
    total = ends[-1]
    first_out = jnp.where(count > 0, starts, n)  # n: out of bounds, dropped
    marks = jnp.zeros((n,), jnp.int32).at[first_out].max(jnp.arange(n, dtype=jnp.int32),
                                                          mode="drop")
    src = jax.lax.cummax(marks)
    j = jnp.arange(n, dtype=jnp.int32)
    r = j - starts[src]  # index of the output within its source's outputs
    act = action[src]
    is_exp, is_col = act == EXPAND, act == COLLAPSE
    new_level = level[src] + is_col.astype(jnp.int32) - is_exp.astype(jnp.int32)
    new_node = jnp.where(is_exp, node[src] * K + r, jnp.where(is_col, node[src] // K, node[src]))
    edited = is_exp | is_col
    new_edit_step = jnp.where(edited, step, edit_step[src])
    new_edit_dir = jnp.where(is_exp, 1, jnp.where(is_col, -1, edit_dir[src]))
    out_valid = j < total
    z = lambda x: jnp.where(out_valid, x, 0).astype(jnp.int32)  # noqa: E731
    return (z(new_level), z(new_node), out_valid, z(new_edit_step), z(new_edit_dir)), src, total


def group_cover(collapse_heads, K: int) -> jax.Array:
    """How many chosen sibling groups (K slots from each head) cover each slot."""
    h = collapse_heads.astype(jnp.int32)
    return jnp.cumsum(h - jnp.concatenate([jnp.zeros((K,), jnp.int32), h[:-K]])[: h.shape[0]])


def actions_from_masks(expand_mask, collapse_heads, K: int) -> jax.Array:
    """Per-slot action codes; a group head's K-1 followers become ABSORBED."""
    in_group = group_cover(collapse_heads, K) > 0
    return jnp.where(collapse_heads, COLLAPSE,
                     jnp.where(in_group, ABSORBED, jnp.where(expand_mask, EXPAND, KEEP)))


def _edits_ok(wc: WorkingContext, expand_mask, collapse_heads, cfg: MCConfig) -> jax.Array:
    """Edits are applicable: all legal, no overlap, budget holds afterwards."""
    K = cfg.block_size
    legal_e = legal_expand_mask(wc.level, wc.valid, cfg)
    legal_c = legal_collapse_heads(wc.level, wc.node, wc.valid, wc.num_tokens, cfg)
    covered = group_cover(collapse_heads, K)
    n_exp = jnp.sum(expand_mask, dtype=jnp.int32)
    n_col = jnp.sum(collapse_heads, dtype=jnp.int32)
    new_count = wc.num_valid + (K - 1) * (n_exp - n_col)
    return (jnp.all(~expand_mask | legal_e) & jnp.all(~collapse_heads | legal_c)
            & jnp.all(covered <= 1) & jnp.all(~(expand_mask & (covered > 0)))
            & (new_count <= cfg.w_max))


def _apply_edits_impl(wc: WorkingContext, expand_mask, collapse_heads, cfg: MCConfig):
    ok = _edits_ok(wc, expand_mask, collapse_heads, cfg)
    action = actions_from_masks(expand_mask & ok, collapse_heads & ok, cfg.block_size)
    (level, node, valid, es, ed), _, _ = relayout(
        wc.level, wc.node, wc.valid, wc.edit_step, wc.edit_dir, action, wc.step, cfg.block_size)
    return wc.replace(level=level, node=node, valid=valid, edit_step=es, edit_dir=ed), ok


@functools.partial(jax.jit, static_argnames=("cfg",))
def apply_edits(wc: WorkingContext, expand_mask: jax.Array, collapse_heads: jax.Array,
                cfg: MCConfig) -> tuple[WorkingContext, jax.Array]:
    """Apply several non-overlapping edits in one re-layout pass.

    expand_mask [W] bool: gists to expand into their K children; collapse_heads [W] bool:
    first slots of sibling groups to collapse into their parent. New entries are stamped
    with `wc.step` for cooldown. Returns (wc, ok); when any edit is illegal, overlaps another
    or would break the budget, nothing is applied and ok is False.
    """
    return _apply_edits_impl(wc, expand_mask, collapse_heads, cfg)


@functools.partial(jax.jit, static_argnames=("cfg",))
def expand(wc: WorkingContext, slot: jax.Array, cfg: MCConfig
           ) -> tuple[WorkingContext, jax.Array]:
    """Expand the gist at `slot` into its K children (later slots shift right).
    Returns (wc, applied); illegal or over-budget requests leave the WC unchanged."""
    slot = jnp.asarray(slot, jnp.int32)
    mask = jnp.arange(cfg.w_max) == slot
    new_wc, ok = _apply_edits_impl(wc, mask, jnp.zeros_like(mask), cfg)
    return new_wc, ok & jnp.any(mask)


@functools.partial(jax.jit, static_argnames=("cfg",))
def collapse(wc: WorkingContext, slot: jax.Array, cfg: MCConfig
             ) -> tuple[WorkingContext, jax.Array]:
    """Collapse the sibling group containing `slot` into its parent (later slots shift
    left). Returns (wc, applied); an incomplete, protected or top-level group is refused."""
    K = cfg.block_size
    slot = jnp.asarray(slot, jnp.int32)
    in_range = (slot >= 0) & (slot < cfg.w_max)
    head = slot - wc.node[jnp.clip(slot, 0, cfg.w_max - 1)] % K
    mask = (jnp.arange(cfg.w_max) == head) & in_range
    new_wc, ok = _apply_edits_impl(wc, jnp.zeros_like(mask), mask, cfg)
    return new_wc, ok & jnp.any(mask)


# --------------------------------------------------------------------------- append


def _append_impl(wc: WorkingContext, num_new, scores, cfg: MCConfig):
    K, W = cfg.block_size, cfg.w_max
    N = W + K  # scratch room for one chunk of ≤ K new tokens before collapsing
    num_new = jnp.asarray(num_new, jnp.int32)
    if scores is None:
        scores = jnp.zeros((W,), jnp.float32)
    scores = jnp.asarray(scores, jnp.float32)
    nan_scores = jnp.any(~jnp.isfinite(scores) & wc.valid)
    scores = jnp.where(nan_scores | ~wc.valid, 0.0, scores)  # bad scores: oldest first

    pad = lambda x: jnp.concatenate([x, jnp.zeros((K,), x.dtype)])  # noqa: E731
    init = dict(level=pad(wc.level), node=pad(wc.node), valid=pad(wc.valid),
                edit_step=pad(wc.edit_step), edit_dir=pad(wc.edit_dir), score=pad(scores),
                T=wc.num_tokens, remaining=num_new, overflow=jnp.bool_(False),
                collapses=jnp.int32(0))
    j = jnp.arange(N, dtype=jnp.int32)
    max_collapses = -(-K // (K - 1))  # a chunk of ≤ K tokens needs at most this many

    def chunk(s):
        n_valid = jnp.sum(s["valid"], dtype=jnp.int32)
        c = jnp.minimum(s["remaining"], K)
        new = (j >= n_valid) & (j < n_valid + c)
        s = dict(s, level=jnp.where(new, 0, s["level"]),
                 node=jnp.where(new, s["T"] + j - n_valid, s["node"]),
                 valid=s["valid"] | new, edit_step=jnp.where(new, 0, s["edit_step"]),
                 edit_dir=jnp.where(new, 0, s["edit_dir"]),
                 score=jnp.where(new, 0.0, s["score"]), T=s["T"] + c,
                 remaining=s["remaining"] - c)
        for _ in range(max_collapses):  # static, tiny: collapses per chunk, not slots
            n_valid = jnp.sum(s["valid"], dtype=jnp.int32)
            groups = collapse_groups(s["level"], s["node"], s["valid"], s["edit_step"],
                                     s["edit_dir"], s["T"], wc.step, s["score"], cfg)
            mean = groups.mean
            # a group an expand created within the cooldown goes last, but the budget wins
            best = jnp.argmin(groups.key("last"))  # first minimum: the oldest among equals
            do = (n_valid > W) & groups.heads[best]
            action = jnp.where(do, actions_from_masks(jnp.zeros((N,), bool), j == best, K),
                               KEEP)
            (lv, nd, va, es, ed), src, _ = relayout(
                s["level"], s["node"], s["valid"], s["edit_step"], s["edit_dir"], action,
                wc.step, K)
            score = jnp.where(action[src] == COLLAPSE, mean[src], s["score"][src])
            s = dict(s, level=lv, node=nd, valid=va, edit_step=es, edit_dir=ed,
                     score=jnp.where(va, score, 0.0), collapses=s["collapses"] + do)
        n_valid = jnp.sum(s["valid"], dtype=jnp.int32)
        return dict(s, overflow=n_valid > W)

    out = jax.lax.while_loop(lambda s: (s["remaining"] > 0) & ~s["overflow"], chunk, init)
    overflow = out["overflow"]
    keep = lambda new, old: jnp.where(overflow, old, new)  # noqa: E731
    new_wc = WorkingContext(
        level=keep(out["level"][:W], wc.level), node=keep(out["node"][:W], wc.node),
        valid=keep(out["valid"][:W], wc.valid), edit_step=keep(out["edit_step"][:W], wc.edit_step),
        edit_dir=keep(out["edit_dir"][:W], wc.edit_dir), num_tokens=keep(out["T"], wc.num_tokens),
        step=wc.step)
    info = AppendInfo(overflow=overflow, num_collapses=jnp.where(overflow, 0, out["collapses"]),
                      nan_scores=nan_scores)
    return new_wc, info


@functools.partial(jax.jit, static_argnames=("cfg",))
def append(wc: WorkingContext, num_new: jax.Array, cfg: MCConfig,
           scores: jax.Array | None = None) -> tuple[WorkingContext, AppendInfo]:
    """Append `num_new` tokens (any number, traced) at LOD0; the tree must already hold them
    (and the gists of every block they complete).

    Whenever the budget would overflow, collapse the legal sibling group with the lowest
    mean score (`scores` [W], e.g. LensNet's; zeros/None → oldest first; groups an expand
    created within the cooldown go last), never touching the protected tail or the sink. Tokens are
    added in chunks of ≤ K so every chunk needs at most two collapses. If the history no
    longer fits even fully collapsed, the WC is returned unchanged with `info.overflow`
    set (use `append_checked` or `check_capacity` for an exception).
    """
    return _append_impl(wc, num_new, scores, cfg)


def append_checked(wc: WorkingContext, num_new, cfg: MCConfig, scores=None
                   ) -> tuple[WorkingContext, AppendInfo]:
    """`append`, raising CapacityError (naming the w_max / num_levels needed) on overflow."""
    new_wc, info = append(wc, num_new, cfg, scores)
    if bool(np.any(np.asarray(info.overflow))):
        total = int(np.max(np.asarray(wc.num_tokens) + np.asarray(num_new)))
        raise CapacityError(capacity_message(total, cfg))
    return new_wc, info


# --------------------------------------------------------------------------- materialize


def _materialize_impl(wc, tree_view, base_params, cfg: MCConfig, scheme: str):
    from mcjax.base.model import embed_tokens  # deferred: keeps this module light

    valid = wc.valid
    tok_ids = tree_view.tokens[jnp.clip(wc.node, 0, tree_view.tokens.shape[0] - 1)]
    emb = embed_tokens(base_params, jnp.where(valid & (wc.level == 0), tok_ids, 0))
    for lvl in range(1, cfg.num_levels + 1):
        table = tree_view.gists[lvl - 1]
        rows = table[jnp.clip(wc.node, 0, table.shape[0] - 1)].astype(emb.dtype)
        emb = jnp.where((wc.level == lvl)[:, None], rows, emb)
    emb = jnp.where(valid[:, None], emb, 0)
    return emb, slot_positions(wc, cfg, scheme), valid


@functools.partial(jax.jit, static_argnames=("cfg", "scheme"))
def materialize(wc: WorkingContext, tree_view, base_params, cfg: MCConfig,
                scheme: str | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Slot embeddings [W, D] (token embedding of a LOD0 slot, the gist row of a gist slot;
    zeros for padding), positions [W] (`scheme`, default `cfg.position_scheme`) and the
    validity mask [W]."""
    if len(tree_view.gists) < cfg.num_levels:
        raise ConfigError(f"tree view has {len(tree_view.gists)} gist levels, the config "
                          f"needs {cfg.num_levels}")
    return _materialize_impl(wc, tree_view, base_params, cfg, scheme or cfg.position_scheme)


# --------------------------------------------------------------------------- invariants


def _fail(name: str, slot: int | None, detail: str, prefix: str = ""):
    where = f" at slot {slot}" if slot is not None else ""
    raise InvariantError(f"{prefix}WC invariant '{name}' broken{where}: {detail}")


def check_invariants(wc: WorkingContext, tree=None, cfg: MCConfig | None = None, *,
                     positions=None, scheme: str | None = None) -> None:
    """Check every invariant of SPEC §2.4 on the host; raise InvariantError naming it.

    tree: a TreeView, a `counts` array [L+1] of valid entries per level, or None (then the
    counts a consistent tree holds for T tokens are assumed). positions: materialized
    position ids to check against `scheme` (default: those `slot_positions` computes).
    A leading batch axis is checked stream by stream.
    """
    if cfg is None:
        raise ConfigError("check_invariants needs the MCConfig")
    if np.ndim(wc.level) == 2:
        counts = None if tree is None else np.asarray(getattr(tree, "counts", tree))
        for b in range(np.shape(wc.level)[0]):
            sub = jax.tree_util.tree_map(lambda x: x[b], wc)
            try:
                check_invariants(sub, None if counts is None else counts[b], cfg,
                                 positions=None if positions is None else positions[b],
                                 scheme=scheme)
            except InvariantError as e:
                raise InvariantError(f"stream {b}: {e}") from None
        return
    K, L, W, rp = cfg.block_size, cfg.num_levels, cfg.w_max, cfg.recent_protect
    level, node, valid, es, ed = (np.asarray(x).astype(np.int64) for x in
                                  (wc.level, wc.node, wc.valid, wc.edit_step, wc.edit_dir))
    valid = valid.astype(bool)
    T, step = int(wc.num_tokens), int(wc.step)
    if level.shape != (W,):
        _fail("shape", None, f"slot arrays have shape {level.shape}, expected ({W},)")
    n = int(valid.sum())
    # 1. budget (and the packed layout that makes it checkable)
    if n > W:
        _fail("budget", None, f"{n} valid slots > w_max={W}")
    bad = np.flatnonzero(valid != (np.arange(W) < n))
    if bad.size:
        _fail("budget", int(bad[0]), "valid slots must be packed at the front (a hole or a "
              "valid slot after padding)")
    pad = ~valid
    for name, arr in (("level", level), ("node", node), ("edit_step", es), ("edit_dir", ed)):
        bad = np.flatnonzero(pad & (arr != 0))
        if bad.size:
            _fail("budget", int(bad[0]), f"padding slot has {name}={arr[bad[0]]} (must be 0)")
    # 3. block alignment (levels in range; spans derive from aligned node indices)
    for i in range(n):
        if not 0 <= level[i] <= L:
            _fail("block alignment", i, f"level {level[i]} outside [0, {L}]")
        if node[i] < 0:
            _fail("block alignment", i, f"negative node {node[i]}")
    size = np.asarray([K**int(x) for x in level[:n]], np.int64)
    start = node[:n] * size
    end = start + size
    if np.any(start % size):
        i = int(np.flatnonzero(start % size)[0])
        _fail("block alignment", i, f"LOD{level[i]} entry starts at {start[i]}, not a multiple "
              f"of {size[i]}")
    # 2. contiguity
    if n == 0:
        if T != 0:
            _fail("contiguity", None, f"no valid slots but T={T} tokens were ingested")
    else:
        if start[0] != 0:
            _fail("contiguity", 0, f"first entry starts at token {start[0]}, not 0")
        gaps = np.flatnonzero(start[1:] != end[:-1])
        if gaps.size:
            i = int(gaps[0]) + 1
            kind = "gap" if start[i] > end[i - 1] else "overlap"
            _fail("contiguity", i, f"{kind}: entry starts at {start[i]} but the previous one "
                  f"ends at {end[i - 1]}")
        if end[-1] != T:
            _fail("contiguity", n - 1, f"last entry ends at {end[-1]} but T={T}")
    # 4. tree consistency: every entry is an existing node of its level
    if tree is None:
        counts = np.asarray([T // K**lvl for lvl in range(L + 1)], np.int64)
    else:
        counts = np.asarray(getattr(tree, "counts", tree)).astype(np.int64)
        if counts.shape[0] < L + 1:
            _fail("tree consistency", None, f"tree has {counts.shape[0]} levels, need {L + 1}")
        if counts[0] != T:
            _fail("tree consistency", None, f"tree holds {counts[0]} tokens but the WC has T={T}")
    for i in range(n):
        if node[i] >= counts[level[i]]:
            _fail("tree consistency", i, f"entry (LOD{level[i]}, node {node[i]}) is not in the "
                  f"tree, which holds {counts[level[i]]} entries at that level")
    # 5. positions
    scheme = scheme or cfg.position_scheme
    if positions is None:
        positions = slot_positions(wc, cfg, scheme)
    positions = np.asarray(positions).astype(np.int64)
    expect = start + size // 2 if scheme == "absolute" else np.arange(n)
    bad = np.flatnonzero(positions[:n] != expect)
    if bad.size:
        i = int(bad[0])
        _fail("positions", i, f"{scheme} position {positions[i]} != expected {expect[i]} for "
              f"(LOD{level[i]}, node {node[i]})")
    # 6. recent tail stays LOD0
    bad = np.flatnonzero((end > T - rp) & (level[:n] != 0))
    if bad.size:
        i = int(bad[0])
        _fail("recent tail", i, f"LOD{level[i]} entry [{start[i]}, {end[i]}) covers one of the "
              f"newest {rp} tokens [{max(T - rp, 0)}, {T})")
    # 7. sink: the first sink_blocks blocks stay LOD0, so slot 0 holds a real token
    S = sink_tokens(cfg)
    if S and n:
        if level[0] != 0:
            _fail("sink", 0, f"slot 0 holds a LOD{level[0]} gist [{start[0]}, {end[0]}), not a "
                  f"real token: with sink_blocks={cfg.sink_blocks} the history's first {S} "
                  f"tokens stay LOD0")
        bad = np.flatnonzero((start < S) & (level[:n] != 0))
        if bad.size:
            i = int(bad[0])
            _fail("sink", i, f"LOD{level[i]} entry [{start[i]}, {end[i]}) covers sink tokens: "
                  f"with sink_blocks={cfg.sink_blocks} the first {S} tokens [0, {S}) stay LOD0")
    # bookkeeping
    bad = np.flatnonzero(~np.isin(ed[:n], (-1, 0, 1)) | (es[:n] > step) | (es[:n] < 0))
    if bad.size:
        i = int(bad[0])
        _fail("edit bookkeeping", i, f"edit_dir={ed[i]}, edit_step={es[i]} at refocus step {step}")
