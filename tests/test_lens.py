"""LensNet (SPEC §2.5): Perceiver-IO scoring of working-context slots."""

from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcjax import lens
from mcjax import working_context as wcm
from mcjax.config import LensConfig, MCConfig, get_config, list_configs
from mcjax.tree import TreeView
from test_working_context import CFG_A, CFG_L3

DIM = 13  # embedding width of the slots (prime, distinct from every other dim)
LENS = get_config("tiny").lens  # one LensNet init (a slow compile) shared by most tests


@functools.lru_cache(maxsize=None)
def _setup(cfg: MCConfig, lens_cfg: LensConfig = LENS, *, seed: int = 0, T: int | None = None,
           fill: int | None = None):
    """A WC with every level, padding slots, random slot embeddings and a random tree."""
    rng = np.random.default_rng(seed)
    K = cfg.block_size
    T = T if T is not None else min(wcm.min_slots(0, cfg) + 40 * K**cfg.num_levels // 3,
                                    _limit(cfg))
    fill = fill or max(wcm.min_slots(T, cfg), cfg.recent_protect + K, cfg.w_max - 2 * K)
    small = wcm.initial_layout(T, dataclasses.replace(cfg, w_max=min(fill, cfg.w_max)))
    wc = wcm.from_entries(wcm.to_entries(small), T, cfg)
    gists = tuple(jnp.asarray(rng.normal(size=(T // K**lvl + 2, DIM)), jnp.float32)
                  for lvl in range(1, cfg.num_levels + 1))
    tree = TreeView(tokens=jnp.zeros((T + 1,), jnp.int32), gists=gists,
                    counts=jnp.asarray([T // K**lvl for lvl in range(cfg.num_levels + 1)],
                                       jnp.int32))
    emb = jnp.where(wc.valid[:, None],
                    jnp.asarray(rng.normal(size=(cfg.w_max, DIM)), jnp.float32), 0.0)
    params = lens.init_lens(lens_cfg, cfg, DIM, jax.random.PRNGKey(seed))
    return wc, tree, emb, params


def _limit(cfg):
    T = 0
    while wcm.min_slots(T + 1, cfg) <= cfg.w_max:
        T += 1
    return T


def _scores(params, emb, wc, tail, cfg, lens_cfg=LENS):
    return lens.lens_scores(params, emb, wc, tail, lens_cfg, cfg)


def _check_legal(scores, wc, cfg):
    s = np.asarray(scores)
    lv, nd, va = (np.asarray(x) for x in (wc.level, wc.node, wc.valid))
    end = (nd + 1) * cfg.block_size ** lv
    prot = va & (end > int(wc.num_tokens) - cfg.recent_protect)
    assert np.all(s[~va] == 0), "padding slots must score 0"
    assert np.all(s[va & (lv == 0)] <= 0), "LOD0 cannot expand"
    assert np.all(s[va & (lv == cfg.num_levels)] >= 0), "the top level cannot collapse"
    assert np.all(s[prot] == 0), "the protected tail can do neither"


LENS_CASES = {
    "K4L2": (CFG_A, LENS),
    "L1": (MCConfig(block_size=5, num_levels=1, w_max=41, recent_protect=6, tail_lod1=4,
                    tail_lod2=1), LensConfig(width=6, num_latents=3, num_heads=3,
                                             num_latent_layers=2, query_mlp_ratio=2)),
    "registry-tiny": (get_config("tiny").mc, get_config("tiny").lens),
}


@pytest.mark.parametrize("name", list_configs())
def test_output_shape_and_dtype_for_every_registered_config(name):
    """Abstract evaluation (no compile): shapes hold at full size, e.g. w_max = 8,192."""
    exp = get_config(name)
    dim = exp.base_config.hidden_size if exp.base_config else 576
    for mc in (exp.mc, CFG_L3):
        W, nt = mc.w_max, mc.num_tail_gists
        wc = jax.eval_shape(lambda: wcm.initial_layout(0, mc))
        tail = lens.TailGists(embeds=jax.ShapeDtypeStruct((nt, dim), jnp.float32),
                              level=jax.ShapeDtypeStruct((nt,), jnp.int32),
                              valid=jax.ShapeDtypeStruct((nt,), bool))
        emb = jax.ShapeDtypeStruct((W, dim), jnp.float32)
        q = exp.lens.query_tokens
        query = (lens.QueryTokens(hidden=jnp.zeros((q, dim)), valid=jnp.ones((q,), bool))
                 if q else None)
        feats = (jnp.zeros((W, lens.NUM_SLOT_RETRIEVAL_FEATURES))
                 if exp.lens.retrieval_features else None)
        params = jax.eval_shape(lambda: lens.LensNet(exp.lens, mc).init(
            jax.random.key(0), jnp.zeros((W, dim)), wcm.empty(mc), _concrete(tail), query,
            feats))
        out = jax.eval_shape(lambda p, e, w, t: lens.LensNet(exp.lens, mc).apply(
            {"params": p}, e, w, t, query, feats), params["params"], emb, wc, tail)
        assert out.shape == (W,) and out.dtype == jnp.float32


def _concrete(tail):
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), tail)


@pytest.mark.parametrize("name", list(LENS_CASES))
def test_output_shape_and_range_for_every_tiny_config(name):
    cfg, lens_cfg = LENS_CASES[name]
    wc, tree, emb, params = _setup(cfg, lens_cfg)
    tail = lens.tail_gists(tree, cfg)
    chex.assert_shape(tail.embeds, (cfg.num_tail_gists, DIM))
    scores = _scores(params, emb, wc, tail, cfg, lens_cfg)
    chex.assert_shape(scores, (cfg.w_max,))
    chex.assert_tree_all_finite(scores)
    assert np.all(np.abs(np.asarray(scores)) <= 1.0)
    assert np.any(np.asarray(scores) != 0), "an untrained LensNet still scores something"
    _check_legal(scores, wc, cfg)
    if name != "K4L2":
        return
    # a leading batch axis of independent streams
    wc2, tree2, emb2, _ = _setup(cfg, lens_cfg, seed=1)
    stack = lambda a, b: jax.tree_util.tree_map(lambda x, y: jnp.stack([x, y]), a, b)  # noqa
    batched = _scores(params, jnp.stack([emb, emb2]), stack(wc, wc2),
                      stack(tail, lens.tail_gists(tree2, cfg)), cfg, lens_cfg)
    chex.assert_shape(batched, (2, cfg.w_max))
    np.testing.assert_allclose(batched[0], scores, atol=1e-5)


def test_scores_change_when_the_tail_gists_change():
    cfg = CFG_A
    wc, tree, emb, params = _setup(cfg)
    tail = lens.tail_gists(tree, cfg)
    assert bool(tail.valid.all())
    base = np.asarray(_scores(params, emb, wc, tail, cfg))
    rng = np.random.default_rng(5)
    other = tail.replace(embeds=jnp.asarray(rng.normal(size=tail.embeds.shape), jnp.float32))
    changed = np.asarray(_scores(params, emb, wc, other, cfg))
    movable = np.asarray(wc.valid) & (base != 0)
    assert np.abs(changed - base)[movable].min() > 0, "every scored slot sees the tail"
    # an invalid tail gist is masked: changing it changes nothing
    masked = tail.replace(valid=tail.valid.at[0].set(False))
    a = _scores(params, emb, wc, masked, cfg)
    b = _scores(params, emb, wc, masked.replace(embeds=masked.embeds.at[0].set(1e3)), cfg)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(np.asarray(a), base)


def test_invalid_slots_do_not_affect_the_scores_of_valid_slots():
    cfg = CFG_A
    wc, tree, emb, params = _setup(cfg)
    tail = lens.tail_gists(tree, cfg)
    n = int(wc.num_valid)
    assert n < cfg.w_max - 3
    base = np.asarray(_scores(params, emb, wc, tail, cfg))
    pad = ~wc.valid
    rng = np.random.default_rng(9)
    junk_emb = jnp.where(pad[:, None], jnp.asarray(rng.normal(size=emb.shape) * 1e3,
                                                   jnp.float32), emb)
    junk_emb = junk_emb.at[n + 1].set(jnp.nan)
    junk_wc = wc.replace(level=jnp.where(pad, 2, wc.level), node=jnp.where(pad, 7, wc.node),
                         edit_dir=jnp.where(pad, 1, wc.edit_dir))
    got = np.asarray(_scores(params, junk_emb, junk_wc, tail, cfg))
    np.testing.assert_array_equal(got, base)
    # nor does their number: the same history in a larger budget scores the same
    big = dataclasses.replace(cfg, w_max=cfg.w_max + 13)
    wc_big = wcm.from_entries(wcm.to_entries(wc), int(wc.num_tokens), big)
    emb_big = jnp.concatenate([emb, jnp.ones((13, DIM), jnp.float32)])
    got = np.asarray(_scores(params, emb_big, wc_big, tail, big))
    np.testing.assert_allclose(got[:n], base[:n], atol=1e-6)
    assert not got[n:].any()
    # control: valid slots' contents do reach a valid slot's score (via the latents)
    j = int(np.flatnonzero(base != 0)[0])
    others = (jnp.arange(cfg.w_max) != j) & wc.valid
    fresh = jnp.asarray(rng.normal(size=emb.shape), jnp.float32)
    moved = np.asarray(_scores(params, jnp.where(others[:, None], fresh, emb), wc, tail, cfg))
    assert abs(moved[j] - base[j]) > 1e-3


def test_illegal_directions_are_masked():
    cfg = CFG_A
    wc, tree, emb, params = _setup(cfg)
    tail = lens.tail_gists(tree, cfg)
    lv = np.asarray(wc.level)
    va = np.asarray(wc.valid)
    assert {0, 1, 2} <= set(lv[va].tolist())
    prot = np.asarray(lens.slot_features(wc, cfg))[:, 2] > 0
    assert prot.sum() >= cfg.recent_protect
    for bias, sign in ((10.0, 1), (-10.0, -1)):  # saturate the head: every raw score = sign
        p = jax.tree_util.tree_map(lambda x: x, params)
        p["head"]["bias"] = jnp.full_like(p["head"]["bias"], bias)
        p["head"]["kernel"] = jnp.zeros_like(p["head"]["kernel"])
        s = np.asarray(_scores(p, emb, wc, tail, cfg))
        _check_legal(s, wc, cfg)
        if sign > 0:  # expand: every gist keeps it, LOD0 (incl. the tail) loses it
            assert np.all(s[va & (lv >= 1)] > 0.99) and np.all(s[va & (lv == 0)] == 0)
        else:  # collapse: slots of collapsible sibling groups keep it, all others lose it
            keep = _collapsible_ref(wc, cfg)
            assert keep.any() and np.all(s[keep] < -0.99)
            assert np.all(s[va & ~keep] == 0)
            assert not np.any(keep & ((lv == cfg.num_levels) | prot))
    # the mask itself on hand-made scores
    raw = jnp.asarray(np.where(np.arange(cfg.w_max) % 2, 0.5, -0.5), jnp.float32)
    _check_legal(lens.mask_illegal(raw, wc, cfg), wc, cfg)


def _collapsible_ref(wc, cfg):
    """Slots inside a sibling group the allocator may collapse, from the entries by hand:
    K aligned siblings below the top level, parent span before the protected tail and at
    or after the sink."""
    K, L = cfg.block_size, cfg.num_levels
    entries = wcm.to_entries(wc)
    T, S = int(wc.num_tokens), cfg.sink_blocks * K
    out = np.zeros(cfg.w_max, bool)
    for h in range(len(entries) - K + 1):
        lvl, nd = entries[h][0], entries[h][1]
        if lvl >= L or nd % K or nd * K**lvl < S:
            continue
        if not all(entries[h + j][:2] == (lvl, nd + j) for j in range(K)):
            continue
        if (nd // K + 1) * K ** (lvl + 1) > T - cfg.recent_protect:
            continue
        out[h: h + K] = True
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_mask_is_the_allocators_legality_on_edited_layouts(seed):
    """After random edits (misaligned groups, partly expanded parents): a slot keeps a
    negative score iff the allocator could collapse its group, a positive one iff it is a
    gist outside the protected tail; batched the same as one by one."""
    from mcjax import focus

    cfg = dataclasses.replace(CFG_A, sink_blocks=1)
    wc = _setup(cfg)[0]
    rng = np.random.default_rng(seed)
    for _ in range(3):
        wc, _ = focus.allocate(wc, jnp.asarray(rng.uniform(-1, 1, cfg.w_max), jnp.float32),
                               cfg)
    neg = np.asarray(lens.mask_illegal(jnp.full((cfg.w_max,), -1.0), wc, cfg))
    pos = np.asarray(lens.mask_illegal(jnp.full((cfg.w_max,), 1.0), wc, cfg))
    collapsible = _collapsible_ref(wc, cfg)
    np.testing.assert_array_equal(neg < 0, collapsible)
    lv, va = np.asarray(wc.level), np.asarray(wc.valid)
    prot = np.asarray(lens.slot_features(wc, cfg))[:, 2] > 0
    np.testing.assert_array_equal(pos > 0, va & (lv >= 1) & ~prot)
    both = jax.tree_util.tree_map(lambda x: jnp.stack([x, x]), wc)
    np.testing.assert_array_equal(
        lens.mask_illegal(jnp.stack([jnp.full((cfg.w_max,), -1.0)] * 2), both, cfg)[1], neg)


def _collect_shapes(jaxpr, out):
    """Shapes of every intermediate, descending into nested jaxprs (pjit, custom_jvp, ...)."""
    for eqn in jaxpr.eqns:
        out.extend(tuple(getattr(v.aval, "shape", ())) for v in eqn.outvars)
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (list, tuple)) else (p,)):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    _collect_shapes(inner, out)
    return out


def test_cost_is_linear_in_w_max_no_slot_by_slot_intermediate():
    W = 97  # prime, distinct from every other dim
    cfg = dataclasses.replace(CFG_A, w_max=W)
    params = lens.init_lens(LENS, cfg, DIM, jax.random.PRNGKey(0))
    wc = wcm.initial_layout(600, cfg)
    tail = lens.TailGists(embeds=jnp.zeros((cfg.num_tail_gists, DIM)),
                          level=jnp.ones((cfg.num_tail_gists,), jnp.int32),
                          valid=jnp.ones((cfg.num_tail_gists,), bool))
    emb = jax.ShapeDtypeStruct((W, DIM), jnp.float32)
    jaxpr = jax.make_jaxpr(lambda p, e, w, t: lens.LensNet(LENS, cfg).apply(
        {"params": p}, e, w, t))(params, emb, wc, tail)
    shapes = _collect_shapes(jaxpr.jaxpr, [])
    assert any(W in s for s in shapes)
    quadratic = [s for s in shapes if sum(d >= W for d in s) >= 2]
    assert not quadratic, f"intermediates quadratic in w_max: {quadratic[:3]}"
    # the same check does catch slot-slot attention
    bad = jax.make_jaxpr(lambda e: e @ e.T)(emb)
    assert [s for s in _collect_shapes(bad.jaxpr, []) if sum(d >= W for d in s) >= 2]


def test_tail_gists_are_the_newest_rows_and_masked_while_the_history_is_short():
    cfg = CFG_A  # tail: 3 LOD1 + 1 LOD2
    rng = np.random.default_rng(2)
    g1 = jnp.asarray(rng.normal(size=(30, DIM)), jnp.float32)
    g2 = jnp.asarray(rng.normal(size=(8, DIM)), jnp.float32)
    tree = TreeView(tokens=jnp.zeros((120,), jnp.int32), gists=(g1, g2),
                    counts=jnp.asarray([100, 25, 6], jnp.int32))
    tail = lens.tail_gists(tree, cfg)
    np.testing.assert_array_equal(tail.embeds, jnp.concatenate([g1[22:25], g2[5:6]]))
    np.testing.assert_array_equal(tail.level, [1, 1, 1, 2])
    assert bool(tail.valid.all())
    short = lens.tail_gists(tree.replace(counts=jnp.asarray([9, 2, 0], jnp.int32)), cfg)
    np.testing.assert_array_equal(short.valid, [False, True, True, False])
    np.testing.assert_array_equal(short.embeds[1:3], g1[0:2])
    assert not np.asarray(short.embeds)[[0, 3]].any()


# --------------------------------------------------------------------------- LensNet v2

LENS_V2 = dataclasses.replace(LENS, query_tokens=3, retrieval_features=True)
QDIM = 11  # the question's hidden width (prime, distinct from DIM)


@functools.lru_cache(maxsize=None)
def _v2_setup():
    cfg = CFG_A
    wc, tree, emb, _ = _setup(cfg)
    params = lens.init_lens(LENS_V2, cfg, DIM, jax.random.PRNGKey(3), hidden_dim=QDIM)
    rng = np.random.default_rng(9)
    query = lens.QueryTokens(hidden=jnp.asarray(rng.normal(size=(3, QDIM)), jnp.float32),
                             valid=jnp.asarray([False, True, True]))
    feats = jnp.where(wc.valid[:, None], jnp.asarray(rng.uniform(size=(cfg.w_max, 2)),
                                                     jnp.float32), 0.0)
    return cfg, wc, lens.tail_gists(tree, cfg), emb, params, query, feats


def test_lensnet_v2_scores_see_the_question_and_ignore_its_masked_tokens():
    cfg, wc, tail, emb, params, query, feats = _v2_setup()
    base = np.asarray(lens.lens_scores(params, emb, wc, tail, LENS_V2, cfg, query, feats))
    _check_legal(base, wc, cfg)
    other = query.replace(hidden=query.hidden.at[2].set(5.0))
    changed = np.asarray(lens.lens_scores(params, emb, wc, tail, LENS_V2, cfg, other, feats))
    movable = np.asarray(wc.valid) & (base != 0)
    assert np.abs(changed - base)[movable].min() > 0, "every scored slot sees the question"
    masked = query.replace(hidden=query.hidden.at[0].set(1e3))  # token 0 is not valid
    np.testing.assert_array_equal(
        lens.lens_scores(params, emb, wc, tail, LENS_V2, cfg, masked, feats), base)


def test_lensnet_v2_scores_change_with_a_slots_retrieval_features():
    cfg, wc, tail, emb, params, query, feats = _v2_setup()
    base = np.asarray(lens.lens_scores(params, emb, wc, tail, LENS_V2, cfg, query, feats))
    slot = int(np.flatnonzero(np.asarray(wc.valid) & (base != 0))[0])
    bumped = feats.at[slot].set(jnp.asarray([1.0, 2.5]))
    new = np.asarray(lens.lens_scores(params, emb, wc, tail, LENS_V2, cfg, query, bumped))
    assert new[slot] != base[slot]


def test_lensnet_requires_exactly_the_conditioning_its_config_names():
    cfg, wc, tail, emb, params, query, feats = _v2_setup()
    with pytest.raises(ValueError, match="query tokens must be given"):
        lens.LensNet(LENS_V2, cfg).apply({"params": params}, emb, wc, tail, None, feats)
    with pytest.raises(ValueError, match="slot_retrieval must be given"):
        lens.LensNet(LENS_V2, cfg).apply({"params": params}, emb, wc, tail, query, None)
    v1 = _setup(cfg)[3]
    with pytest.raises(ValueError, match="must be None"):
        lens.LensNet(LENS, cfg).apply({"params": v1}, emb, wc, tail, query, None)
