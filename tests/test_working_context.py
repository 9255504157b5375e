"""Working context (SPEC §2.4): fixed-shape layout, masked edits, append, materialize."""

from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mcjax import focus, lens
from mcjax import working_context as wcm
from mcjax.base import model as base_model
from mcjax.config import TINY_LLAMA, ConfigError, LensConfig, MCConfig
from mcjax.tree import TreeView

# Tiny, mutually distinct dims; B uses K=3 so nothing silently assumes powers of two.
CFG_A = MCConfig(block_size=4, num_levels=2, w_max=48, recent_protect=8, n_diff=3,
                 cooldown=2, tail_lod1=3, tail_lod2=1)
CFG_B = MCConfig(block_size=3, num_levels=2, w_max=31, recent_protect=5, n_diff=4,
                 cooldown=1, tail_lod1=2, tail_lod2=1)
CFG_L3 = MCConfig(block_size=3, num_levels=3, w_max=37, recent_protect=4, n_diff=2,
                  cooldown=3)
# Every config above keeps the default sink of one block (SPEC §2.4 invariant 7). Tests
# of hand-written layouts that predate the sink (a gist in slot 0) use CFG_A0.
CFG_A0 = dataclasses.replace(CFG_A, sink_blocks=0)
CONFIGS = [CFG_A, CFG_B, CFG_L3]
IDS = ["K4L2", "K3L2", "K3L3"]


@functools.lru_cache(maxsize=None)
def history_limit(cfg: MCConfig) -> int:
    """Largest T such that every history length up to T fits the budget."""
    T = 0
    while wcm.min_slots(T + 1, cfg) <= cfg.w_max:
        T += 1
    return T


def dyadic_scores(draw, n: int) -> np.ndarray:
    """Scores on a 1/32 grid in [-1, 1]: group sums are exact in fp32 (no order effects)."""
    return np.asarray(draw(st.lists(st.integers(-32, 32), min_size=n, max_size=n)),
                      np.float32) / 32


def random_layout(draw, cfg: MCConfig, *, stamps: bool = False) -> wcm.WorkingContext:
    """A legal WC: the initial layout of a random history under a random smaller budget
    (so there is free budget and a mix of levels), re-padded to w_max, then a few random
    expansions; optionally random cooldown stamps."""
    T = draw(st.integers(0, history_limit(cfg)))
    need = wcm.min_slots(T, cfg)
    floor = wcm.sink_tokens(cfg) + cfg.recent_protect + cfg.block_size
    budget = draw(st.integers(max(need, floor), cfg.w_max))
    small = wcm.initial_layout(T, dataclasses.replace(cfg, w_max=budget))
    entries = [e[:2] for e in wcm.to_entries(small)]
    step = draw(st.integers(0, 6)) if stamps else 0
    if stamps:
        entries = [e + (draw(st.integers(0, step)), draw(st.sampled_from([-1, 0, 1])))
                   for e in entries]
    wc = wcm.from_entries(entries, T, cfg, step=step)
    for _ in range(draw(st.integers(0, 3))):
        slot = draw(st.integers(0, max(int(wc.num_valid) - 1, 0)))
        wc, _ = wcm.expand(wc, slot, cfg)
    return wc


def reference_append(entries, scores, T, step, num_new, cfg):
    """Plain-Python append policy: chunks of ≤ K tokens; while over budget collapse the legal
    group with the lowest (mean score + 4·recently-expanded), oldest first; never a group
    whose parent span holds the sink."""
    K, L, W = cfg.block_size, cfg.num_levels, cfg.w_max
    S = cfg.sink_blocks * K
    ents = [list(e) for e in entries]
    sc = [float(s) for s in scores[: len(ents)]]
    remaining = num_new
    while remaining > 0:
        c = min(remaining, K)
        ents += [[0, T + i, 0, 0] for i in range(c)]
        sc += [0.0] * c
        T += c
        remaining -= c
        while len(ents) > W:
            best = None
            for h in range(len(ents) - K + 1):
                lvl, nd = ents[h][0], ents[h][1]
                if lvl >= L or nd % K or (nd // K + 1) * K ** (lvl + 1) > T - cfg.recent_protect:
                    continue
                if nd * K**lvl < S:
                    continue
                if not all(ents[h + j][:2] == [lvl, nd + j] for j in range(K)):
                    continue
                mean = float(np.mean(np.float32(sc[h:h + K])))
                recent = any(ents[h + j][3] == 1 and step - ents[h + j][2] < cfg.cooldown
                             for j in range(K))
                key = mean + 4.0 * recent
                if best is None or key < best[0]:
                    best = (key, h, mean)
            if best is None:
                return None  # overflow
            _, h, mean = best
            lvl, nd = ents[h][:2]
            ents[h:h + K] = [[lvl + 1, nd // K, step, -1]]
            sc[h:h + K] = [mean]
    return [tuple(e) for e in ents], T


def reference_collapse_keys(entries, scores, T, step, cfg, cooled: str) -> list[float]:
    """Plain-Python collapse priority per entry (inf: may not collapse): the legal sibling
    groups (K aligned siblings below the top level, parent span before the protected tail
    and clear of the sink) by mean score; a group holding an expansion younger than the
    cooldown goes last (+4) or never."""
    K, L = cfg.block_size, cfg.num_levels
    keys = [np.inf] * cfg.w_max
    for h in range(len(entries) - K + 1):
        lvl, nd = entries[h][0], entries[h][1]
        if lvl >= L or nd % K or (nd // K + 1) * K ** (lvl + 1) > T - cfg.recent_protect:
            continue
        if nd * K**lvl < cfg.sink_blocks * K:
            continue
        if not all(tuple(entries[h + j][:2]) == (lvl, nd + j) for j in range(K)):
            continue
        recent = any(entries[h + j][3] == 1 and step - entries[h + j][2] < cfg.cooldown
                     for j in range(K))
        mean = float(np.mean(np.float32(scores[h:h + K])))
        keys[h] = np.inf if (recent and cooled == "never") else mean + 4.0 * recent
    return keys


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
@settings(max_examples=15)
@given(data=st.data())
def test_append_collapse_ahead_allocator_and_training_share_one_collapse_rule(cfg, data):
    """On random layouts with cooldown stamps: `collapse_groups` equals a plain-Python
    reference; the allocator's collapse candidates, the runtime's collapse-ahead (its first
    collapse) and training's layout-bank heads follow it (append: see the append tests)."""
    import types

    from mcjax import focus
    from mcjax.runtime import collapse_ahead
    from mcjax.counterfactuals import _collapsible_heads

    wc = random_layout(data.draw, cfg, stamps=True)
    scores = dyadic_scores(data.draw, cfg.w_max)
    entries = wcm.to_entries(wc)
    T, step = int(wc.num_tokens), int(wc.step)
    groups = wcm.collapse_groups(wc.level, wc.node, wc.valid, wc.edit_step, wc.edit_dir,
                                 wc.num_tokens, wc.step, scores, cfg)
    for cooled in ("last", "never"):  # (K = 3: a mean may differ in the last bit)
        np.testing.assert_allclose(
            np.asarray(groups.key(cooled)),
            np.asarray(reference_collapse_keys(entries, scores, T, step, cfg, cooled),
                       np.float32), rtol=1e-6)
    never = np.asarray(reference_collapse_keys(entries, scores, T, step, cfg, "never"))
    # allocator: a collapse candidate iff collapsible now and its mean is below -tau
    _, _, collapse_ok, _ = focus.candidate_scores(wc, jnp.asarray(scores), cfg)
    want = np.isfinite(never) & (np.asarray(groups.mean) < -cfg.tau_collapse)
    np.testing.assert_array_equal(np.asarray(collapse_ok), want)
    # training's layout bank draws its collapses from the legal heads
    assert _collapsible_heads([e[:2] for e in entries], T, cfg) == [
        i for i, k in enumerate(reference_collapse_keys(entries, scores, T, step, cfg,
                                                        "last")) if np.isfinite(k)]
    # collapse-ahead: fill the WC to K - 1 free slots (appended tokens score 0), then with
    # headroom for exactly one collapse it collapses the "never" argmin
    K, n = cfg.block_size, int(wc.num_valid)
    full, info = wcm.append(wc, jnp.int32(max(0, cfg.w_max - n - (K - 1))), cfg,
                            jnp.asarray(scores))
    assert int(info.num_collapses) == 0
    full_scores = np.where(np.arange(cfg.w_max) < n, scores, 0.0).astype(np.float32)
    never = np.asarray(reference_collapse_keys(wcm.to_entries(full), full_scores,
                                               int(full.num_tokens), step, cfg, "never"))
    plan = types.SimpleNamespace(mc=cfg, headroom=cfg.w_max - int(full.num_valid) + 1)
    after, _, count = collapse_ahead(plan, full, jnp.asarray(full_scores), jnp.bool_(True))
    if np.isfinite(never).any():
        want, _ = wcm.collapse(full, jnp.int32(int(np.argmin(never))), cfg)
        assert int(count) == 1
        chex.assert_trees_all_equal(after, want)
    else:
        assert int(count) == 0


# --------------------------------------------------------------------------- construction


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
@settings(max_examples=60)
@given(data=st.data())
def test_initial_layout_keeps_invariants_and_fills_budget_newest_first(cfg, data):
    T = data.draw(st.integers(0, history_limit(cfg)))
    wc = wcm.initial_layout(T, cfg)
    wcm.check_invariants(wc, None, cfg)
    n = int(wc.num_valid)
    level, node = np.asarray(wc.level)[:n], np.asarray(wc.node)[:n]
    K, S = cfg.block_size, wcm.sink_tokens(cfg)
    if T <= cfg.w_max:
        assert np.all(level == 0), "a history that fits must stay all LOD0"
    # recent LOD0, then LOD1, oldest at the top level: levels never rise toward the present,
    # except on the sink ramp right after the sink, where each entry is as coarse as the
    # sink allows (its parent span would hold sink tokens)
    start = node * K**level.astype(np.int64)
    rise = np.flatnonzero(np.diff(level) > 0)
    for i in rise:
        assert (node[i] // K) * K ** (int(level[i]) + 1) < S, (i, level)
    if rise.size:
        assert np.all(np.diff(level[rise[-1] + 1:]) <= 0), level
    assert np.all(level[start < S] == 0)
    if np.any(level > 0):  # greedy: expanding the newest gist would break the budget
        assert n + cfg.block_size - 1 > cfg.w_max


def test_initial_layout_of_history_longer_than_budget_uses_every_level():
    T = history_limit(CFG_A) - 3
    assert T > 10 * CFG_A.w_max
    wc = wcm.initial_layout(T, CFG_A)
    wcm.check_invariants(wc, None, CFG_A)
    levels = set(np.asarray(wc.level)[: int(wc.num_valid)].tolist())
    assert levels == {0, 1, 2}


def test_config_whose_budget_cannot_hold_the_protected_tail_errors_when_built():
    with pytest.raises(ConfigError, match="protected tail"):
        MCConfig(block_size=4, w_max=64, recent_protect=64)
    with pytest.raises(ConfigError, match="w_max >= 68"):
        MCConfig(block_size=4, w_max=67, recent_protect=64)  # tail + partial block + gist
    MCConfig(block_size=4, w_max=68, recent_protect=64)  # just enough


def test_history_that_no_longer_fits_raises_naming_the_w_max_and_num_levels_it_needs():
    cfg = CFG_A
    T = history_limit(cfg) + 1
    need = wcm.min_slots(T, cfg)
    assert need > cfg.w_max
    msg = rf"{T} tokens needs at least {need} .*w_max=48: use w_max >= {need} or num_levels >= 3"
    with pytest.raises(wcm.CapacityError, match=msg):
        wcm.check_capacity(T, cfg)
    with pytest.raises(wcm.CapacityError, match=msg):
        wcm.initial_layout(T, cfg)
    # the suggested fixes really fit
    wcm.check_capacity(T, dataclasses.replace(cfg, w_max=need))
    wcm.check_capacity(T, dataclasses.replace(cfg, num_levels=3))
    # append at the limit: the jitted op flags overflow and returns the WC untouched ...
    full = wcm.initial_layout(T - 1, cfg)
    out, info = wcm.append(full, 1, cfg)
    assert bool(info.overflow)
    chex.assert_trees_all_equal(out, full)
    # ... and the checked wrapper raises the same clear error (never a silent drop)
    with pytest.raises(wcm.CapacityError, match=msg):
        wcm.append_checked(full, 1, cfg)


# --------------------------------------------------------------------------- edits


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
@settings(max_examples=40)
@given(data=st.data())
def test_expand_then_matching_collapse_restores_the_wc_bit_for_bit(cfg, data):
    wc = random_layout(data.draw, cfg, stamps=True)
    gists = np.flatnonzero(np.asarray(wc.valid) & (np.asarray(wc.level) >= 1))
    free = cfg.w_max - int(wc.num_valid)
    if gists.size == 0 or free < cfg.block_size - 1:
        return
    slot = int(data.draw(st.sampled_from(gists.tolist())))
    expanded, ok = wcm.expand(wc, slot, cfg)
    assert bool(ok)
    wcm.check_invariants(expanded, None, cfg)
    K = cfg.block_size
    assert int(expanded.num_valid) == int(wc.num_valid) + K - 1
    kids = wcm.to_entries(expanded)[slot:slot + K]
    lvl, nd = int(wc.level[slot]), int(wc.node[slot])
    assert kids == [(lvl - 1, nd * K + r, int(wc.step), 1) for r in range(K)]
    restored, ok = wcm.collapse(expanded, slot + data.draw(st.integers(0, K - 1)), cfg)
    assert bool(ok)
    # every layout field bit for bit; the parent's stamp now records the collapse
    want = wc.replace(edit_step=wc.edit_step.at[slot].set(wc.step),
                      edit_dir=wc.edit_dir.at[slot].set(-1))
    chex.assert_trees_all_equal(restored, want)


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
@settings(max_examples=40)
@given(data=st.data())
def test_several_edits_in_one_pass_equal_the_same_edits_applied_one_by_one(cfg, data):
    wc = random_layout(data.draw, cfg)
    n, K = int(wc.num_valid), cfg.block_size
    heads = np.asarray(wcm.legal_collapse_heads(wc.level, wc.node, wc.valid, wc.num_tokens, cfg))
    gists = np.asarray(wcm.legal_expand_mask(wc.level, wc.valid, cfg))
    col = np.zeros(cfg.w_max, bool)
    exp = np.zeros(cfg.w_max, bool)
    taken = np.zeros(cfg.w_max, bool)
    for h in np.flatnonzero(heads):
        if data.draw(st.booleans()):
            col[h] = True
            taken[h:h + K] = True
    budget = cfg.w_max - n + (K - 1) * int(col.sum())
    for g in np.flatnonzero(gists & ~taken):
        if budget >= K - 1 and data.draw(st.booleans()):
            exp[g] = True
            budget -= K - 1
    out, ok = wcm.apply_edits(wc, jnp.asarray(exp), jnp.asarray(col), cfg)
    assert bool(ok)
    wcm.check_invariants(out, None, cfg)
    # one by one, newest first so earlier slot indices stay put; collapses free room first
    seq = wc
    for s in sorted(np.flatnonzero(col), reverse=True):
        seq, ok = wcm.collapse(seq, int(s), cfg)
        assert bool(ok)
    shift = lambda s: int(s) - (K - 1) * int(np.sum(np.flatnonzero(col) < s))  # noqa: E731
    for s in sorted(np.flatnonzero(exp), reverse=True):
        seq, ok = wcm.expand(seq, shift(s), cfg)
        assert bool(ok)
    chex.assert_trees_all_equal(out, seq)


def test_illegal_edits_are_refused_and_leave_the_wc_unchanged():
    cfg = CFG_A0  # K=4, L=2, W=48, protect 8, no sink
    # T=40: LOD2 [0,16), LOD1 [16,24) as 2 entries, LOD0 [24,40)
    entries = [(2, 0), (1, 4), (1, 5)] + [(0, t) for t in range(24, 40)]
    wc = wcm.from_entries(entries, 40, cfg)
    wcm.check_invariants(wc, None, cfg)
    cases = {
        "expand LOD0": wcm.expand(wc, 3, cfg),
        "expand padding": wcm.expand(wc, 30, cfg),
        "expand out of range": wcm.expand(wc, 99, cfg),
        "collapse top level": wcm.collapse(wc, 0, cfg),
        "collapse incomplete sibling group": wcm.collapse(wc, 1, cfg),
        "collapse protected tail": wcm.collapse(wc, 18, cfg),  # tokens [36, 40)
        "collapse padding": wcm.collapse(wc, 40, cfg),
    }
    for name, (out, ok) in cases.items():
        assert not bool(ok), name
        chex.assert_trees_all_equal(out, wc)
    # the same collapse just outside the protected tail is accepted (the test can fail)
    out, ok = wcm.collapse(wc, 10, cfg)  # tokens [28, 32) → LOD1 node 7, ends at 32 = 40-8
    assert bool(ok)
    wcm.check_invariants(out, None, cfg)
    # overlapping edits in one pass are refused as a whole
    exp = jnp.zeros(cfg.w_max, bool).at[1].set(True)
    col = jnp.zeros(cfg.w_max, bool).at[3].set(True).at[7].set(True)  # two blocks: ok ...
    out, ok = wcm.apply_edits(wc, exp, col, cfg)
    assert bool(ok)
    wcm.check_invariants(out, None, cfg)
    out, ok = wcm.apply_edits(wc, exp, col.at[4].set(True), cfg)  # ... 4 is not a head
    assert not bool(ok)
    chex.assert_trees_all_equal(out, wc)
    # an expansion that breaks the budget is refused
    full = wcm.from_entries([(1, i) for i in range(8)] + [(0, t) for t in range(32, 72)], 72, cfg)
    assert int(full.num_valid) == 48
    out, ok = wcm.expand(full, 0, cfg)
    assert not bool(ok)
    chex.assert_trees_all_equal(out, full)


# --------------------------------------------------------------------------- append


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
@settings(max_examples=50)
@given(data=st.data())
def test_append_collapses_lowest_score_else_oldest_exactly_like_the_reference(cfg, data):
    wc = random_layout(data.draw, cfg, stamps=True)
    T = int(wc.num_tokens)
    num_new = data.draw(st.integers(0, min(3 * cfg.block_size + 1, history_limit(cfg) - T)))
    scored = data.draw(st.booleans())
    scores = dyadic_scores(data.draw, cfg.w_max) if scored else np.zeros(cfg.w_max, np.float32)
    out, info = wcm.append(wc, num_new, cfg, jnp.asarray(scores) if scored else None)
    assert not bool(info.overflow)
    wcm.check_invariants(out, None, cfg)
    assert int(out.num_tokens) == T + num_new
    want = reference_append(wcm.to_entries(wc), scores, T, int(wc.step), num_new, cfg)
    assert want is not None
    assert wcm.to_entries(out) == want[0]


def test_append_never_collapses_the_protected_tail_and_prefers_the_lowest_score():
    cfg = CFG_A  # K=4, W=48, protect 8
    wc = wcm.initial_layout(48, cfg)  # 48 LOD0 tokens: full
    assert int(wc.num_valid) == 48
    scores = np.zeros(48, np.float32)
    scores[20:24] = -0.5  # block 5: the lowest-scored group
    scores[40:48] = -1.0  # the protected tail after the append: must not be chosen
    out, info = wcm.append(wc, 1, cfg, jnp.asarray(scores))
    wcm.check_invariants(out, None, cfg)
    assert int(info.num_collapses) == 1
    ents = wcm.to_entries(out)
    assert (1, 5, 0, -1) in ents and sum(e[0] == 1 for e in ents) == 1
    sink = [(0, t, 0, 0) for t in range(cfg.block_size)]  # block 0 is the sink: never
    out, info = wcm.append(wc, 1, cfg)  # no scores: oldest first after the sink
    assert wcm.to_entries(out)[:5] == sink + [(1, 1, 0, -1)]
    nan = scores.copy()
    nan[3] = np.nan  # bad scores fall back to oldest-first, flagged
    out, info = wcm.append(wc, 1, cfg, jnp.asarray(nan))
    assert bool(info.nan_scores) and wcm.to_entries(out)[:5] == sink + [(1, 1, 0, -1)]
    low_sink = np.zeros(48, np.float32)
    low_sink[:4] = -1.0  # the sink scored lowest: still never collapsed
    out, _ = wcm.append(wc, 1, cfg, jnp.asarray(low_sink))
    wcm.check_invariants(out, None, cfg)
    assert wcm.to_entries(out)[:5] == sink + [(1, 1, 0, -1)]
    out, _ = wcm.append(wc, 1, CFG_A0)  # without a sink, block 0 is the oldest group
    assert wcm.to_entries(out)[0] == (1, 0, 0, -1)


# --------------------------------------------------------------------------- random programs


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
@settings(max_examples=120)
@given(data=st.data())
def test_random_sequences_of_appends_expands_collapses_and_refocus_keep_every_invariant(
        cfg, data):
    K, W = cfg.block_size, cfg.w_max
    wc = random_layout(data.draw, cfg, stamps=True)
    wcm.check_invariants(wc, None, cfg)
    for _ in range(data.draw(st.integers(1, 12))):
        op = data.draw(st.sampled_from(["append", "expand", "collapse", "refocus", "edits"]))
        before, n = wc, int(wc.num_valid)
        if op == "append":
            num = data.draw(st.integers(0, min(2 * K + 1, history_limit(cfg)
                                               - int(wc.num_tokens))))
            scores = jnp.asarray(dyadic_scores(data.draw, W))
            wc, info = wcm.append(wc, num, cfg, scores)
            assert not bool(info.overflow)
            assert int(wc.num_tokens) == int(before.num_tokens) + num
        elif op in ("expand", "collapse"):
            slot = data.draw(st.integers(-1, W))
            wc, ok = (wcm.expand if op == "expand" else wcm.collapse)(wc, slot, cfg)
            if bool(ok):
                assert int(wc.num_valid) == n + (K - 1) * (1 if op == "expand" else -1)
            else:
                chex.assert_trees_all_equal(wc, before)
        elif op == "refocus":
            wc, info = focus.allocate(wc, jnp.asarray(dyadic_scores(data.draw, W)), cfg)
            assert int(info.num_expand) + int(info.num_collapse) <= cfg.n_diff
            assert int(wc.step) == int(before.step) + 1
        else:  # random (mostly illegal) multi-edit masks: all or nothing
            exp = jnp.asarray(data.draw(st.lists(st.booleans(), min_size=W, max_size=W)))
            col = jnp.asarray(data.draw(st.lists(st.booleans(), min_size=W, max_size=W)))
            wc, ok = wcm.apply_edits(wc, exp & (jnp.arange(W) % 5 == 0),
                                     col & (jnp.arange(W) % 7 == 0), cfg)
            if not bool(ok):
                chex.assert_trees_all_equal(wc, before)
        wcm.check_invariants(wc, None, cfg)


CFG_B2 = dataclasses.replace(CFG_B, sink_blocks=2)  # K=3: a 6-token sink


@pytest.mark.parametrize("cfg", [CFG_A, CFG_B2], ids=["K4L2-sink1", "K3L2-sink2"])
@settings(max_examples=60)
@given(data=st.data())
def test_random_op_sequences_never_collapse_the_sink(cfg, data):
    """Scores push the sink (and the gists right after it) hardest toward collapse, and
    collapse requests aim at it; still the first S tokens stay LOD0 in slots 0..S-1 and
    no entry of level l starts before S (its span would hold sink tokens)."""
    K, W, S = cfg.block_size, cfg.w_max, wcm.sink_tokens(cfg)
    wc = random_layout(data.draw, cfg, stamps=True)
    for _ in range(data.draw(st.integers(1, 10))):
        op = data.draw(st.sampled_from(["append", "collapse", "refocus", "edits"]))
        scores = dyadic_scores(data.draw, W)
        scores[: S + K * K] = -1.0  # the sink and its ramp: the most collapsible by score
        scores = jnp.asarray(scores)
        before = wc
        if op == "append":
            num = data.draw(st.integers(0, min(2 * K + 1, history_limit(cfg)
                                               - int(wc.num_tokens))))
            wc, info = wcm.append(wc, num, cfg, scores)
            assert not bool(info.overflow)
        elif op == "collapse":
            slot = data.draw(st.integers(0, S + K * K))
            wc, ok = wcm.collapse(wc, slot, cfg)
            if slot < min(S, int(wc.num_tokens)):
                assert not bool(ok), "a sink block was collapsed"
                chex.assert_trees_all_equal(wc, before)
        elif op == "refocus":
            wc, _ = focus.allocate(wc, scores, cfg)
        else:
            col = jnp.asarray(data.draw(st.lists(st.booleans(), min_size=W, max_size=W)))
            wc, _ = wcm.apply_edits(wc, jnp.zeros(W, bool), col & (jnp.arange(W) < S + K * K),
                                    cfg)
        wcm.check_invariants(wc, None, cfg)
        ents = [e[:2] for e in wcm.to_entries(wc)]
        T = int(wc.num_tokens)
        assert ents[: min(S, T)] == [(0, t) for t in range(min(S, T))]
        assert all(lvl == 0 or nd * K**lvl >= S for lvl, nd in ents)


def test_check_invariants_rejects_a_layout_without_the_sink():
    cfg = CFG_A  # K=4, protect 8, sink_blocks=1: tokens [0, 4) stay LOD0
    no_sink = [(1, 0), (1, 1)] + [(0, t) for t in range(8, 20)]
    wcm.check_invariants(wcm.from_entries(no_sink, 20, CFG_A0), None, CFG_A0)  # legal w/o sink
    with pytest.raises(wcm.InvariantError, match="'sink' broken at slot 0: slot 0 holds a "
                                                 "LOD1 gist"):
        wcm.check_invariants(wcm.from_entries(no_sink, 20, cfg), None, cfg)
    sink = [(0, t) for t in range(4)] + [(1, 1)] + [(0, t) for t in range(8, 20)]
    wc = wcm.from_entries(sink, 20, cfg)
    wcm.check_invariants(wc, None, cfg)
    # two sink blocks: slot 0 is a token, but the LOD1 gist of block 1 covers sink tokens
    two = dataclasses.replace(cfg, sink_blocks=2)
    with pytest.raises(wcm.InvariantError, match=r"'sink' broken at slot 4: LOD1 entry "
                                                 r"\[4, 8\) covers sink tokens"):
        wcm.check_invariants(wc, None, two)
    # a LOD2 gist holding the sink block (slot 0 is then no token either)
    lod2 = wcm.from_entries([(2, 0)] + [(0, t) for t in range(16, 28)], 28, cfg)
    wcm.check_invariants(lod2, None, CFG_A0)
    with pytest.raises(wcm.InvariantError, match="'sink' broken at slot 0"):
        wcm.check_invariants(lod2, None, cfg)
    # a history shorter than the sink is all LOD0 anyway; an empty one has no slot 0
    wcm.check_invariants(wcm.from_entries([(0, 0), (0, 1)], 2, two), None, two)
    wcm.check_invariants(wcm.empty(cfg), None, cfg)


def test_layouts_keep_the_sink_and_the_gists_after_it_only_as_coarse_as_it_allows():
    cfg = CFG_A  # K=4, L=2, protect 8, sink [0, 4)
    T = 200
    need = wcm.min_slots(T, cfg)
    # coarsest: sink [0,4) LOD0, [4,16) LOD1 (the LOD2 group 0 holds the sink: never forms),
    # [16,192) LOD2, the tail [192,200) LOD0
    want = ([(0, t) for t in range(4)] + [(1, n) for n in (1, 2, 3)]
            + [(2, n) for n in range(1, 12)] + [(0, t) for t in range(192, 200)])
    assert need == len(want) == 26
    wc = wcm.initial_layout(T, dataclasses.replace(cfg, w_max=need))
    assert [e[:2] for e in wcm.to_entries(wc)] == want
    assert wcm.min_slots(T, CFG_A0) == 12 + 8  # without the sink: LOD2 [0,192), the tail
    # min_slots is what the sink really costs: one slot less never fits
    with pytest.raises(wcm.CapacityError):
        wcm.initial_layout(T, dataclasses.replace(cfg, w_max=need - 1))
    # a budget that cannot hold the sink, the tail, a partial block and a gist is refused
    small = MCConfig(block_size=4, w_max=68, recent_protect=64)  # fine without a sink ...
    with pytest.raises(ConfigError, match="sink_blocks=1 .* need w_max >= 72"):
        wcm.empty(small)  # ... not with one
    wcm.empty(dataclasses.replace(small, sink_blocks=0))
    wcm.empty(dataclasses.replace(small, w_max=72))


def test_streaming_ten_times_w_max_tokens_stays_in_budget_and_covers_the_history():
    cfg = CFG_A
    rng = np.random.default_rng(7)
    wc, total = wcm.empty(cfg), 0
    while total < 10 * cfg.w_max:
        num = int(rng.integers(1, 2 * cfg.block_size))
        scores = jnp.asarray(rng.integers(-32, 33, cfg.w_max) / 32, jnp.float32)
        wc, info = wcm.append(wc, num, cfg, scores)
        total += num
        assert not bool(info.overflow)
        wc, _ = focus.allocate(wc, scores, cfg)
        assert int(wc.num_tokens) == total
        assert int(wc.num_valid) <= cfg.w_max
        wcm.check_invariants(wc, None, cfg)  # contiguity: valid entries tile [0, total)
    levels = np.asarray(wc.level)[: int(wc.num_valid)]
    assert levels.max() == cfg.num_levels  # it really had to compress


# --------------------------------------------------------------------------- materialize


def _random_tree(cfg: MCConfig, T: int, capacity: int, dim: int, rng) -> TreeView:
    K = cfg.block_size
    gists = tuple(jnp.asarray(rng.normal(size=(capacity // K**lvl + 1, dim)), jnp.float32)
                  for lvl in range(1, cfg.num_levels + 1))
    return TreeView(tokens=jnp.asarray(rng.integers(0, TINY_LLAMA.vocab_size, capacity),
                                       jnp.int32), gists=gists,
                    counts=jnp.asarray([T // K**lvl for lvl in range(cfg.num_levels + 1)],
                                       jnp.int32))


@pytest.fixture(scope="module")
def base_params():
    return jax.jit(base_model.init_params, static_argnums=0)(TINY_LLAMA, jax.random.PRNGKey(0))


@pytest.mark.parametrize("scheme", ["absolute", "compact"])
def test_materialized_slots_equal_tree_rows_and_token_embeddings(base_params, scheme):
    cfg = CFG_A
    rng = np.random.default_rng(3)
    T = 301
    tree = _random_tree(cfg, T, 512, TINY_LLAMA.hidden_size, rng)
    wc = wcm.initial_layout(T, dataclasses.replace(cfg, w_max=40))
    wc = wcm.from_entries(wcm.to_entries(wc), T, cfg)  # leaves padding slots
    first_lod2 = int(np.argmax(np.asarray(wc.level) == 2))
    wc, ok = wcm.expand(wc, first_lod2, cfg)  # a LOD2 → LOD1 expansion: all levels appear
    assert bool(ok)
    emb, pos, mask = wcm.materialize(wc, tree, base_params, cfg, scheme)
    chex.assert_shape(emb, (cfg.w_max, TINY_LLAMA.hidden_size))
    chex.assert_shape(pos, (cfg.w_max,))
    wcm.check_invariants(wc, tree, cfg, positions=pos, scheme=scheme)
    table = np.asarray(base_params["embed"]["embedding"])
    emb, pos, mask = np.asarray(emb), np.asarray(pos), np.asarray(mask)
    tokens = np.asarray(tree.tokens)
    seen = set()
    for i, (lvl, nd, _, _) in enumerate(wcm.to_entries(wc)):
        want = table[tokens[nd]] if lvl == 0 else np.asarray(tree.gists[lvl - 1])[nd]
        np.testing.assert_array_equal(emb[i], want, err_msg=f"slot {i}")
        start, size = nd * cfg.block_size**lvl, cfg.block_size**lvl
        assert pos[i] == (start + size // 2 if scheme == "absolute" else i)
        seen.add(lvl)
    n = int(wc.num_valid)
    assert seen == {0, 1, 2} and n < cfg.w_max
    assert mask[:n].all() and not mask[n:].any()
    assert not emb[n:].any() and not pos[n:].any()


def test_materialize_uses_the_configured_position_scheme_by_default(base_params):
    cfg = dataclasses.replace(CFG_A, position_scheme="compact")
    tree = _random_tree(cfg, 100, 128, TINY_LLAMA.hidden_size, np.random.default_rng(1))
    wc = wcm.initial_layout(100, cfg)
    _, pos, _ = wcm.materialize(wc, tree, base_params, cfg)
    np.testing.assert_array_equal(np.asarray(pos)[: int(wc.num_valid)],
                                  np.arange(int(wc.num_valid)))


# --------------------------------------------------------------------------- no recompiles


def test_no_recompilation_over_200_append_and_refocus_rounds(base_params):
    cfg = CFG_A  # shares compiled functions with the tests above
    lens_cfg = LensConfig(width=12, num_latents=5, num_heads=2, num_latent_layers=1)
    K = cfg.block_size
    rng = np.random.default_rng(11)
    capacity = 1024
    tree_full = _random_tree(cfg, 0, capacity, TINY_LLAMA.hidden_size, rng)
    lens_params = lens.init_lens(lens_cfg, cfg, TINY_LLAMA.hidden_size, jax.random.PRNGKey(2))

    def tree_at(T):  # same arrays, growing counts: the tree's fixed-capacity device view
        return tree_full.replace(counts=jnp.asarray(
            [T // K**lvl for lvl in range(cfg.num_levels + 1)], jnp.int32))

    jit_tail = jax.jit(lens.tail_gists, static_argnames=("cfg",))
    wc, scores, sizes = wcm.empty(cfg), jnp.zeros(cfg.w_max, jnp.float32), None
    for rnd in range(200):
        num = jnp.int32(K - 1 if rnd % 2 else 1)  # blocks complete at varying offsets
        wc, info = wcm.append(wc, num, cfg, scores)
        tree = tree_at(int(wc.num_tokens))
        emb, pos, mask = wcm.materialize(wc, tree, base_params, cfg)
        scores = lens.lens_scores(lens_params, emb, wc, jit_tail(tree, cfg), lens_cfg, cfg)
        wc, finfo = focus.allocate(wc, scores, cfg)
        if rnd == 0:
            sizes = [f._cache_size() for f in (wcm.append, wcm.materialize, focus.allocate,
                                               lens.lens_scores, jit_tail)]
    assert not bool(info.overflow)
    assert int(wc.num_tokens) == 100 * K
    assert int(wc.num_tokens) > 8 * cfg.w_max  # the history outgrew the budget
    wcm.check_invariants(wc, tree, cfg)
    after = [f._cache_size() for f in (wcm.append, wcm.materialize, focus.allocate,
                                       lens.lens_scores, jit_tail)]
    assert after == sizes, f"recompiled: cache sizes {sizes} -> {after}"
    assert jit_tail._cache_size() == 1  # a fresh jit: compiled exactly once in 200 rounds


# --------------------------------------------------------------------------- check_invariants


def _expect_broken(wc, cfg, name, slot, **kw):
    pattern = f"'{name}' broken" + (f" at slot {slot}:" if slot is not None else "")
    with pytest.raises(wcm.InvariantError, match=pattern):
        wcm.check_invariants(wc, kw.pop("tree", None), cfg, **kw)


def test_check_invariants_names_each_broken_invariant_and_slot():
    cfg = CFG_A0  # K=4, L=2, protect 8, no sink (the sink has its own test)
    good = [(1, 0), (1, 1)] + [(0, t) for t in range(8, 20)]
    wc = wcm.from_entries(good, 20, cfg)
    wcm.check_invariants(wc, None, cfg)
    _expect_broken(wc.replace(valid=wc.valid.at[3].set(False)), cfg, "budget", 3)
    _expect_broken(wc.replace(node=wc.node.at[30].set(5)), cfg, "budget", 30)
    gap = wcm.from_entries([(1, 0), (1, 1), (0, 9)] + [(0, t) for t in range(10, 20)], 20, cfg)
    _expect_broken(gap, cfg, "contiguity", 2)
    overlap = wcm.from_entries([(1, 0), (0, 3)] + [(0, t) for t in range(4, 20)], 20, cfg)
    _expect_broken(overlap, cfg, "contiguity", 1)
    _expect_broken(wc.replace(num_tokens=jnp.int32(21)), cfg, "contiguity", 13)
    _expect_broken(wc.replace(level=wc.level.at[0].set(3)), cfg, "block alignment", 0)
    _expect_broken(wc, cfg, "tree consistency", 1, tree=np.asarray([20, 1, 0]))
    _expect_broken(wc, cfg, "tree consistency", None, tree=np.asarray([19, 4, 1]))
    pos = np.asarray(wcm.slot_positions(wc, cfg)).copy()
    pos[5] += 1
    _expect_broken(wc, cfg, "positions", 5, positions=pos)
    tail = wcm.from_entries([(1, 0), (1, 1), (1, 2), (1, 3), (1, 4)], 20, cfg)
    _expect_broken(tail, cfg, "recent tail", 3)
    _expect_broken(wc.replace(edit_step=wc.edit_step.at[2].set(5)), cfg, "edit bookkeeping", 2)
    with pytest.raises(wcm.InvariantError, match="stream 1: .*'contiguity'"):
        batch = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), wc, gap)
        wcm.check_invariants(batch, None, cfg)


def test_append_and_refocus_vmap_over_a_batch_of_streams():
    cfg = CFG_A
    rng = np.random.default_rng(4)
    wcs = [wcm.initial_layout(T, cfg) for T in (37, 300)]
    batch = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *wcs)
    scores = jnp.asarray(rng.integers(-32, 33, (2, cfg.w_max)) / 32, jnp.float32)
    num = jnp.asarray([5, 9], jnp.int32)
    appended, info = jax.vmap(lambda w, n, s: wcm.append(w, n, cfg, s))(batch, num, scores)
    refocused, _ = jax.vmap(lambda w, s: focus.allocate(w, s, cfg))(appended, scores)
    wcm.check_invariants(refocused, None, cfg)
    for b in range(2):
        one, _ = wcm.append(wcs[b], num[b], cfg, scores[b])
        one, _ = focus.allocate(one, scores[b], cfg)
        chex.assert_trees_all_equal(jax.tree_util.tree_map(lambda x: x[b], refocused), one)
