"""Greedy focus allocator (SPEC §2.6): turns LensNet scores into expand/collapse edits.

Policy (the jitted `allocate` and the plain-Python `reference_allocate` implement exactly
this, and tests hold them equal):

* Expansion candidates: valid gists (level ≥ 1) with score > τ_expand that were not created
  by a collapse within the last `cooldown` refocus steps. Strength = score.
* Collapse candidates: legal aligned sibling groups (K siblings in the WC, below the top
  level, outside the protected tail, parent span clear of the sink — `legal_collapse_heads`
  — and no member created by an expand within the cooldown)
  whose mean member score < −τ_collapse. Strength = −mean.
* `n_diff` rounds (fixed trip count). Each round takes the best remaining expansion
  (highest score, lowest slot on ties) and the best remaining collapse (lowest mean, lowest
  slot on ties) that overlap no action chosen so far:
    - the collapse is taken if it is strictly stronger than the expansion (or there is no
      expansion); it frees K−1 slots;
    - otherwise the expansion is taken if the free budget (w_max − valid slots, updated by
      the actions chosen so far) holds its K−1 extra slots; if not, it is paired with the
      best collapse not containing it, when one exists and two actions remain; if neither
      works the expansion is dropped for this refocus.
  At most `n_diff` actions in total.
* All chosen edits apply in one re-layout pass; new entries are stamped with the current
  step, then the step advances. Non-finite scores on valid slots → no action, `nan_scores`
  set in the info, layout untouched.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from mcjax.config import MCConfig
from mcjax.working_context import (
    WorkingContext, actions_from_masks, collapse_groups, relayout, window_sum_int,
    legal_expand_mask, to_entries)

__all__ = ["FocusInfo", "NO_ACTION", "ACT_EXPAND", "ACT_COLLAPSE", "allocate",
           "reference_allocate", "candidate_scores"]

NO_ACTION, ACT_EXPAND, ACT_COLLAPSE = 0, 1, 2


@flax.struct.dataclass
class FocusInfo:
    action_kind: jax.Array  # [n_diff] int32 NO_ACTION / ACT_EXPAND / ACT_COLLAPSE, in order
    action_slot: jax.Array  # [n_diff] int32 slot (a group's first slot for a collapse); -1
    num_expand: jax.Array  # [] int32
    num_collapse: jax.Array  # [] int32
    nan_scores: jax.Array  # [] bool: scores were not finite → no action
    expand_mask: jax.Array  # [W] bool slots (of the input WC) expanded
    collapse_heads: jax.Array  # [W] bool group heads (of the input WC) collapsed


def candidate_scores(wc: WorkingContext, scores: jax.Array, cfg: MCConfig):
    """Per-slot expansion eligibility and per-group collapse eligibility with their scores.

    Returns (expand_ok [W], scores [W], collapse_ok [W] at group heads, group_mean [W]).
    """
    scores = scores.astype(jnp.float32)
    fresh = wc.step - wc.edit_step < cfg.cooldown
    exp_blocked = (wc.edit_dir == -1) & fresh
    expand_ok = (legal_expand_mask(wc.level, wc.valid, cfg) & ~exp_blocked
                 & (scores > cfg.tau_expand))
    groups = collapse_groups(wc.level, wc.node, wc.valid, wc.edit_step, wc.edit_dir,
                             wc.num_tokens, wc.step, scores, cfg)
    collapse_ok = jnp.isfinite(groups.key("never")) & (groups.mean < -cfg.tau_collapse)
    return expand_ok, scores, collapse_ok, groups.mean


def _allocate_impl(wc: WorkingContext, scores: jax.Array, cfg: MCConfig):
    K, W, n_diff = cfg.block_size, cfg.w_max, cfg.n_diff
    scores = jnp.asarray(scores, jnp.float32)
    nan_scores = jnp.any(~jnp.isfinite(scores) & wc.valid)
    safe = jnp.where(wc.valid & ~nan_scores, scores, 0.0)
    expand_ok, safe, collapse_ok, mean = candidate_scores(wc, safe, cfg)
    expand_ok &= ~nan_scores
    collapse_ok &= ~nan_scores
    slots = jnp.arange(W, dtype=jnp.int32)

    def round_(t, s):
        occupied, dead, exp_sel, col_sel, free, left, kinds, where_, n_log = s
        e_mask = expand_ok & ~occupied & ~dead
        e = jnp.argmax(jnp.where(e_mask, safe, -jnp.inf)).astype(jnp.int32)
        has_e = jnp.any(e_mask)
        c_mask = collapse_ok & (window_sum_int(occupied, K) == 0)
        c = jnp.argmin(jnp.where(c_mask, mean, jnp.inf)).astype(jnp.int32)
        has_c = jnp.any(c_mask)
        c2_mask = c_mask & ~((slots <= e) & (e < slots + K))  # groups not containing e
        c2 = jnp.argmin(jnp.where(c2_mask, mean, jnp.inf)).astype(jnp.int32)
        has_c2 = jnp.any(c2_mask)

        can_act = left >= 1
        take_c = can_act & has_c & (~has_e | (-mean[c] > safe[e]))
        consider_e = can_act & has_e & ~take_c
        take_e_alone = consider_e & (free >= K - 1)
        take_pair = consider_e & ~take_e_alone & has_c2 & (left >= 2)
        drop_e = consider_e & ~take_e_alone & ~take_pair

        col_slot = jnp.where(take_pair, c2, c)
        take_col = take_c | take_pair
        take_exp = take_e_alone | take_pair
        group = (slots >= col_slot) & (slots < col_slot + K)
        occupied = occupied | (take_col & group) | (take_exp & (slots == e))
        col_sel = col_sel | (take_col & (slots == col_slot))
        exp_sel = exp_sel | (take_exp & (slots == e))
        dead = dead | (drop_e & (slots == e))
        free = free + (K - 1) * (take_col.astype(jnp.int32) - take_exp.astype(jnp.int32))
        left = left - take_col.astype(jnp.int32) - take_exp.astype(jnp.int32)
        # log: a pair is logged collapse first, then the expansion
        kinds = kinds.at[n_log].set(jnp.where(take_col, ACT_COLLAPSE, kinds[n_log]), mode="drop")
        where_ = where_.at[n_log].set(jnp.where(take_col, col_slot, where_[n_log]), mode="drop")
        n_log = n_log + take_col.astype(jnp.int32)
        kinds = kinds.at[n_log].set(jnp.where(take_exp, ACT_EXPAND, kinds[n_log]), mode="drop")
        where_ = where_.at[n_log].set(jnp.where(take_exp, e, where_[n_log]), mode="drop")
        n_log = n_log + take_exp.astype(jnp.int32)
        return occupied, dead, exp_sel, col_sel, free, left, kinds, where_, n_log

    none = jnp.zeros((W,), bool)
    init = (none, none, none, none, W - wc.num_valid, jnp.int32(n_diff),
            jnp.full((n_diff,), NO_ACTION, jnp.int32), jnp.full((n_diff,), -1, jnp.int32),
            jnp.int32(0))
    _, _, exp_sel, col_sel, _, _, kinds, where_, _ = jax.lax.fori_loop(0, n_diff, round_, init)

    action = actions_from_masks(exp_sel, col_sel, K)
    (level, node, valid, es, ed), _, _ = relayout(
        wc.level, wc.node, wc.valid, wc.edit_step, wc.edit_dir, action, wc.step, K)
    new_wc = wc.replace(level=level, node=node, valid=valid, edit_step=es, edit_dir=ed,
                        step=wc.step + 1)
    info = FocusInfo(action_kind=kinds, action_slot=where_,
                     num_expand=jnp.sum(exp_sel, dtype=jnp.int32),
                     num_collapse=jnp.sum(col_sel, dtype=jnp.int32), nan_scores=nan_scores,
                     expand_mask=exp_sel, collapse_heads=col_sel)
    return new_wc, info


@functools.partial(jax.jit, static_argnames=("cfg",))
def allocate(wc: WorkingContext, scores: jax.Array, cfg: MCConfig
             ) -> tuple[WorkingContext, FocusInfo]:
    """One refocus: choose ≤ n_diff non-overlapping edits from signed scores [W] (positive =
    expand, negative = collapse) and apply them in one re-layout pass (see module doc)."""
    return _allocate_impl(wc, scores, cfg)


# --------------------------------------------------------------------------- reference


def reference_allocate(wc: WorkingContext, scores, cfg: MCConfig):
    """Plain-Python reference of `allocate` over host lists (slow; tests only).

    Returns (entries, actions, nan_scores, step): entries as `to_entries` lists them after
    the edits, actions a list of ("expand"|"collapse", slot) in the order chosen.
    """
    K, L, W = cfg.block_size, cfg.num_levels, cfg.w_max
    S = cfg.sink_blocks * K
    f32 = np.float32
    tau_e, tau_c = f32(cfg.tau_expand), f32(cfg.tau_collapse)
    entries = to_entries(wc)
    T, step = int(wc.num_tokens), int(wc.step)
    n = len(entries)
    sc = [f32(x) for x in np.asarray(scores, np.float32)[:n]]
    if not all(np.isfinite(x) for x in sc):
        return entries, [], True, step + 1

    def fresh(i):
        return step - entries[i][2] < cfg.cooldown

    exp_ok = [entries[i][0] >= 1 and sc[i] > tau_e and not (entries[i][3] == -1 and fresh(i))
              for i in range(n)]
    group_mean = {}
    for h in range(n - K + 1):
        lvl, nd = entries[h][0], entries[h][1]
        if lvl >= L or nd % K:
            continue
        if not all(entries[h + j][0] == lvl and entries[h + j][1] == nd + j for j in range(K)):
            continue
        if (nd // K + 1) * K ** (lvl + 1) > T - cfg.recent_protect:
            continue
        if nd * K**lvl < S:  # the parent span would hold the sink
            continue
        if any(entries[h + j][3] == 1 and fresh(h + j) for j in range(K)):
            continue
        total = f32(0)
        for j in range(K):
            total = f32(total + sc[h + j])
        mean = f32(total / f32(K))
        if mean < -tau_c:
            group_mean[h] = mean

    occupied, dead = set(), set()
    free, left = W - n, cfg.n_diff
    actions = []
    for _ in range(cfg.n_diff):
        if left < 1:
            break
        es = [i for i in range(n) if exp_ok[i] and i not in occupied and i not in dead]
        e = max(es, key=lambda i: (sc[i], -i)) if es else None
        cs = [h for h in group_mean if not any(h + j in occupied for j in range(K))]
        c = min(cs, key=lambda h: (group_mean[h], h)) if cs else None
        if c is not None and (e is None or -group_mean[c] > sc[e]):
            actions.append(("collapse", c))
            occupied.update(range(c, c + K))
            free += K - 1
            left -= 1
        elif e is not None:
            if free >= K - 1:
                actions.append(("expand", e))
                occupied.add(e)
                free -= K - 1
                left -= 1
            else:
                c2s = [h for h in cs if not h <= e < h + K]
                if c2s and left >= 2:
                    c2 = min(c2s, key=lambda h: (group_mean[h], h))
                    actions += [("collapse", c2), ("expand", e)]
                    occupied.update(range(c2, c2 + K))
                    occupied.add(e)
                    left -= 2
                else:
                    dead.add(e)

    expand_at = {s for k, s in actions if k == "expand"}
    collapse_at = {s for k, s in actions if k == "collapse"}
    out, i = [], 0
    while i < n:
        lvl, nd, es_, ed_ = entries[i]
        if i in collapse_at:
            out.append((lvl + 1, nd // K, step, -1))
            i += K
            continue
        if i in expand_at:
            out.extend((lvl - 1, nd * K + r, step, 1) for r in range(K))
        else:
            out.append((lvl, nd, es_, ed_))
        i += 1
    return out, actions, False, step + 1
