"""Greedy focus allocator (SPEC §2.6): jitted policy == plain-Python reference, and each rule."""

from __future__ import annotations

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mcjax import focus
from mcjax import working_context as wcm
from test_working_context import CFG_A, CFG_A0, CONFIGS, IDS, dyadic_scores, random_layout


def run(wc, scores, cfg):
    """Jitted allocator → (entries, [(kind, slot)], info, new wc)."""
    out, info = focus.allocate(wc, jnp.asarray(scores, jnp.float32), cfg)
    names = {focus.ACT_EXPAND: "expand", focus.ACT_COLLAPSE: "collapse"}
    acts = [(names[int(k)], int(s)) for k, s in zip(np.asarray(info.action_kind),
                                                     np.asarray(info.action_slot)) if k]
    return wcm.to_entries(out), acts, info, out


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
@settings(max_examples=150)
@given(data=st.data())
def test_jitted_allocator_equals_the_python_reference_on_random_scores_and_layouts(cfg, data):
    wc = random_layout(data.draw, cfg, stamps=True)
    if data.draw(st.booleans()):  # a full budget makes expansions pair with collapses
        T = int(wc.num_tokens)
        wc = wcm.initial_layout(T, cfg).replace(step=wc.step)
    scores = dyadic_scores(data.draw, cfg.w_max)
    if data.draw(st.booleans()):  # polarise: gists want in, raw tokens want out
        lv = np.asarray(wc.level)
        scores = np.where(lv > 0, np.abs(scores), -np.abs(scores)).astype(np.float32)
    entries, acts, info, out = run(wc, scores, cfg)
    ref_entries, ref_acts, ref_nan, ref_step = focus.reference_allocate(wc, scores, cfg)
    assert acts == ref_acts
    assert entries == ref_entries
    assert int(out.step) == ref_step and not bool(info.nan_scores) and not ref_nan
    wcm.check_invariants(out, None, cfg)
    assert len(acts) <= cfg.n_diff
    assert int(info.num_expand) == sum(k == "expand" for k, _ in acts)
    assert int(info.num_collapse) == sum(k == "collapse" for k, _ in acts)


def test_nan_scores_lead_to_no_action_and_a_flag_never_a_corrupted_wc():
    cfg = CFG_A
    wc = wcm.initial_layout(300, cfg)
    scores = np.where(np.asarray(wc.level) > 0, 0.9, -0.9).astype(np.float32)
    _, acts, info, _ = run(wc, scores, cfg)
    assert acts and not bool(info.nan_scores)  # these scores do act ...
    for bad in (np.nan, np.inf, -np.inf):
        s = scores.copy()
        s[7] = bad
        _, acts, info, out = run(wc, s, cfg)  # ... one bad value stops everything
        assert acts == [] and bool(info.nan_scores)
        chex.assert_trees_all_equal(out, wc.replace(step=wc.step + 1))
        assert focus.reference_allocate(wc, s, cfg)[2]
    s = scores.copy()
    s[int(wc.num_valid):] = np.nan  # garbage in padding slots is ignored
    _, acts, info, _ = run(wc, s, cfg)
    assert acts and not bool(info.nan_scores)


def _layout_full_budget():
    """CFG_A0 (K=4, W=48, protect 8, no sink): T=96 → LOD1 [0,48) as 12 gists, LOD0 [48,96) = 60 > 48,
    so: LOD1 [0,64) (16 gists) + LOD0 [64,96) (32 tokens) = 48 slots, budget full."""
    entries = [(1, n) for n in range(16)] + [(0, t) for t in range(64, 96)]
    return wcm.from_entries(entries, 96, CFG_A0)


def test_expansion_on_a_full_budget_pairs_with_the_best_collapse_outside_it():
    cfg = CFG_A0
    wc = _layout_full_budget()
    assert int(wc.num_valid) == cfg.w_max
    scores = np.zeros(cfg.w_max, np.float32)
    scores[5] = 0.9  # gist (1, 5) wants expanding ...
    scores[4:8] = [-0.9, 0.9, -0.9, -0.9]  # ... and its own group has mean -0.45
    scores[20:24] = -0.4  # tokens [68, 72): the best collapse *not* containing slot 5
    _, acts, info, out = run(wc, scores, cfg)
    assert acts == [("collapse", 20), ("expand", 5)]
    wcm.check_invariants(out, None, cfg)
    assert int(out.num_valid) == cfg.w_max
    assert focus.reference_allocate(wc, scores, cfg)[1] == acts
    # without any collapse candidate the expansion cannot happen: dropped, nothing else
    scores[4:8] = [0.0, 0.9, 0.0, 0.0]
    scores[20:24] = 0.0
    _, acts, _, out = run(wc, scores, cfg)
    assert acts == []
    chex.assert_trees_all_equal(out, wc.replace(step=wc.step + 1))


def test_stronger_collapse_goes_first_and_frees_budget_for_later_expansions():
    cfg = CFG_A0
    wc = _layout_full_budget()
    scores = np.zeros(cfg.w_max, np.float32)
    scores[16:20] = -0.95  # tokens [64, 68): strongest action
    scores[9] = 0.5
    scores[11] = 0.4
    _, acts, _, out = run(wc, scores, cfg)
    # the collapse frees K-1 = 3 slots: enough for one expansion alone; the second one
    # has no collapse candidate left to pair with and is dropped
    assert acts == [("collapse", 16), ("expand", 9)]
    wcm.check_invariants(out, None, cfg)


def test_collapse_uses_the_mean_score_of_the_sibling_group():
    cfg = CFG_A0
    wc = _layout_full_budget()
    scores = np.zeros(cfg.w_max, np.float32)
    scores[16:20] = [-1.0, 0.25, 0.0, 0.0]  # one member at -1, but mean -0.1875 > -τ
    assert run(wc, scores, cfg)[1] == []
    scores[16:20] = [-1.0, 0.125, 0.0, 0.0]  # mean -0.21875 < -τ
    assert run(wc, scores, cfg)[1] == [("collapse", 16)]
    scores[16:20] = [-0.125, -0.3125, -0.3125, -0.25]  # one member above -τ, mean -0.25
    assert run(wc, scores, cfg)[1] == [("collapse", 16)]


def test_thresholds_are_strict_and_n_diff_bounds_the_actions():
    cfg = CFG_A0  # n_diff = 3
    wc = wcm.from_entries([(1, n) for n in range(8)] + [(0, t) for t in range(32, 40)], 40,
                          cfg)  # 16 slots, plenty of budget
    scores = np.zeros(cfg.w_max, np.float32)
    scores[:8] = np.float32(cfg.tau_expand)  # exactly at τ: not above it
    assert run(wc, scores, cfg)[1] == []
    scores[:8] = [0.3, 0.9, 0.5, 0.7, 0.8, 0.6, 0.25, 0.4]
    assert run(wc, scores, cfg)[1] == [("expand", 1), ("expand", 4), ("expand", 3)]


def test_cooldown_blocks_reversing_an_edit_for_cooldown_steps():
    cfg = CFG_A0  # cooldown 2
    wc = wcm.from_entries([(1, n) for n in range(8)] + [(0, t) for t in range(32, 40)], 40,
                          cfg)
    expand = np.zeros(cfg.w_max, np.float32)
    expand[2] = 0.9
    _, acts, _, wc = run(wc, expand, cfg)  # step 0: (1, 2) → tokens [8, 12) in slots 2..5
    assert acts == [("expand", 2)]
    collapse = np.zeros(cfg.w_max, np.float32)
    collapse[2:6] = -0.9
    _, acts, _, wc = run(wc, collapse, cfg)  # step 1: 1 step after the expand → blocked
    assert acts == []
    _, acts, _, wc = run(wc, collapse, cfg)  # step 2: cooldown over
    assert acts == [("collapse", 2)]
    _, acts, _, wc = run(wc, expand, cfg)  # step 3: re-expanding the fresh collapse: blocked
    assert acts == []
    _, acts, _, wc = run(wc, expand, cfg)  # step 4 = 2 + cooldown: allowed again
    assert acts == [("expand", 2)] and int(wc.step) == 5


def test_chosen_actions_never_overlap():
    cfg = CFG_A0
    wc = wcm.from_entries([(1, n) for n in range(8)] + [(0, t) for t in range(32, 40)], 40,
                          cfg)
    scores = np.zeros(cfg.w_max, np.float32)
    scores[:4] = [0.5, -1.0, -1.0, -1.0]  # group mean -0.625 beats slot 0's 0.5
    _, acts, _, out = run(wc, scores, cfg)
    assert acts == [("collapse", 0)]  # slot 0 sits inside the chosen group: not expanded
    wcm.check_invariants(out, None, cfg)
    scores[0] = 0.875  # now the expansion is stronger (mean -0.53125)
    _, acts, _, out = run(wc, scores, cfg)
    assert acts == [("expand", 0)]  # and its group can no longer collapse
    wcm.check_invariants(out, None, cfg)


def test_ties_go_to_the_expansion_then_to_the_oldest_slot():
    cfg = CFG_A0
    wc = wcm.from_entries([(1, n) for n in range(8)] + [(0, t) for t in range(32, 48)], 48,
                          cfg)
    scores = np.zeros(cfg.w_max, np.float32)
    scores[5] = scores[6] = 0.5  # equal expansions: the older slot first
    scores[8:12] = -0.5  # tokens [32, 36): a collapse exactly as strong
    _, acts, _, _ = run(wc, scores, cfg)
    assert acts == [("expand", 5), ("expand", 6), ("collapse", 8)]
    assert focus.reference_allocate(wc, scores, cfg)[1] == acts


def test_the_sink_never_collapses_however_low_it_scores():
    cfg = CFG_A  # sink_blocks=1: tokens [0, 4) stay LOD0; LOD2 group 0 can never form
    wc = wcm.from_entries([(0, t) for t in range(4)] + [(1, n) for n in range(1, 8)]
                          + [(0, t) for t in range(32, 40)], 40, cfg)
    wcm.check_invariants(wc, None, cfg)
    scores = np.zeros(cfg.w_max, np.float32)
    scores[:7] = -1.0  # the sink and the LOD1 gists of its LOD2 group want out the most
    scores[7:11] = -0.5  # LOD1 nodes 4..7 → LOD2 node 1: legal, weaker
    _, acts, _, out = run(wc, scores, cfg)
    assert acts == [("collapse", 7)]
    assert focus.reference_allocate(wc, scores, cfg)[1] == acts
    wcm.check_invariants(out, None, cfg)
    # without the sink the same scores collapse the oldest group first
    _, acts, _, _ = run(wc, scores, CFG_A0)
    assert acts[0] == ("collapse", 0)
