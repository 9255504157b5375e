"""Retrieval focus (SPEC §2.3a, §2.6): read-pass keys kept by the tree, query-aware block
scores, slot scores that enter the allocator, and the settle rounds that bring a block
inside an LOD2 gist to raw tokens."""

from __future__ import annotations

import dataclasses
import functools
import tempfile

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcjax import focus, retrieval
from mcjax import working_context as wcm
from mcjax.base import model as base
from mcjax.config import ConfigError, RetrievalConfig, get_config, override
from mcjax.gist import init_gist_params
from mcjax.runtime import CompileCounter, Session, focus_conditioning, lens_stream_scores
from mcjax.tree import BlockGister, MegaContextTree, MetadataError

CFG = get_config("tiny")
LLAMA = CFG.base_config
MC = CFG.mc
RC = CFG.retrieval  # layers (1, 2), chunk 64, 4 queries over a 32-token window
K = MC.block_size


@functools.lru_cache(maxsize=None)
def params():
    return base.init_params(LLAMA, jax.random.key(0))


@functools.lru_cache(maxsize=None)
def gister(rc=RC):
    """A gister whose one read pass also reads `rc`'s keys (None: no keys)."""
    g = init_gist_params(CFG.gist, LLAMA.hidden_size, jax.random.key(1), block_size=K)
    return BlockGister.from_base(CFG.gist, g, params(), LLAMA, block_size=K, retrieval=rc)


def keys(rc=RC):
    return retrieval.BlockKeys(rc, LLAMA, K)


def history(n, seed=0):
    return np.random.default_rng(seed).integers(3, LLAMA.vocab_size, n)


# --------------------------------------------------------------------------- read pass


def test_read_pass_keys_are_the_caches_keys_before_rope():
    """Independent reference: a plain prefill of one chunk at positions 0..C-1 caches
    post-RoPE keys; rotating the read pass's pre-RoPE keys must give them."""
    toks = jnp.asarray(history(RC.chunk)[None], jnp.int32)
    feats = base.read_pass(params(), LLAMA, toks, chunk=RC.chunk, qk_layers=(0, 2))
    cache = base.init_cache(LLAMA, 1, RC.chunk)
    _, cache = base.prefill(params(), LLAMA, cache, tokens=toks,
                            positions=jnp.arange(RC.chunk)[None], index=0)
    cos, sin = base.rope_cos_sin(jnp.arange(RC.chunk)[None], LLAMA)
    for i, layer in enumerate((0, 2)):
        rotated = base.apply_rope(feats["keys"][:, :, i], cos, sin)
        chex.assert_trees_all_close(rotated, cache.k[layer, :, :RC.chunk], atol=1e-5)


def test_read_pass_hidden_equals_layer_hidden_and_chunks_are_independent():
    toks = jnp.asarray(history(150)[None], jnp.int32)
    feats = base.read_pass(params(), LLAMA, toks, chunk=64, hidden_layer=2, qk_layers=(1,))
    chex.assert_trees_all_close(feats["hidden"],
                                base.layer_hidden(params(), LLAMA, toks, layer=2, chunk=64))
    # the second chunk read alone gives the same keys as inside the whole history
    alone = base.read_pass(params(), LLAMA, toks[:, 64:128], chunk=64, qk_layers=(1,))
    chex.assert_trees_all_close(alone["keys"], feats["keys"][:, 64:128], atol=1e-6)


def test_read_pass_rejects_bad_layers():
    toks = jnp.zeros((1, 8), jnp.int32)
    with pytest.raises(base.InputError, match="qk_layers"):
        base.read_pass(params(), LLAMA, toks, chunk=8, qk_layers=(2, 1))
    with pytest.raises(base.InputError, match="qk_layers"):
        base.read_pass(params(), LLAMA, toks, chunk=8, qk_layers=(LLAMA.num_layers,))


# --------------------------------------------------------------------------- tree keys


def test_tree_keys_whole_agree_with_pieces_and_the_read_pass():
    toks = history(700)
    whole = MegaContextTree.in_memory(MC, gister(), block_keys=keys())
    whole.append(toks)
    pieces, again = (MegaContextTree.in_memory(MC, gister(), block_keys=keys())
                     for _ in range(2))
    for t in (pieces, again):
        for a in range(0, 700, 45):
            t.append(toks[a:a + 45])
    nb = 700 // K
    assert whole.keys().shape == (nb, retrieval.key_width(RC, LLAMA, K))
    # complete chunks read whole, the open chunk by cached steps: equal to rounding (fp16
    # keys), and bit for bit for the same feeding
    np.testing.assert_array_equal(pieces.keys(), again.keys())
    np.testing.assert_allclose(whole.keys().astype(np.float32),
                               pieces.keys().astype(np.float32), atol=2e-3, rtol=2e-3)
    ref = base.read_pass(params(), LLAMA, jnp.asarray(toks[None]), chunk=RC.chunk,
                         qk_layers=RC.layers)["keys"][0, :nb * K]
    np.testing.assert_allclose(whole.keys().astype(np.float32),
                               np.asarray(ref).reshape(nb, -1), atol=2e-3, rtol=2e-3)
    view = whole.view()
    np.testing.assert_array_equal(np.asarray(view.keys[:nb]), whole.keys())


def test_one_read_pass_gives_gist_inputs_and_keys_reading_each_token_once():
    """GistNet's hidden input and the retrieval keys come from one forward per chunk (or
    per block of the open chunk): every history token passes through the base model once,
    as deep as the deeper of the two, and both outputs equal an independent reference — a
    plain prefill of each chunk (its cached keys, un-rotated) and `layer_hidden`."""
    rc = dataclasses.replace(RC, layers=(1,))
    gcfg = dataclasses.replace(CFG.gist, input="hidden", input_layer=2, read_chunk=rc.chunk)
    g = init_gist_params(gcfg, LLAMA.hidden_size, jax.random.key(1), block_size=K)
    gister_ = BlockGister.from_base(gcfg, g, params(), LLAMA, block_size=K, retrieval=rc)
    assert gister_.reader.outputs == ("hidden", "keys") and gister_.reader.depth == 2
    toks = history(300)
    bulk = MegaContextTree.in_memory(MC, gister_, block_keys=keys(rc))
    bulk.append(toks)
    nb = 300 // K  # 9 complete blocks: 4 whole 64-token chunks, one block stepped
    assert gister_.reader.tokens_read == nb * K and gister_.reader.calls == 4 + 1
    # streaming one token at a time still reads each token once (one step per block)
    before = gister_.reader.tokens_read
    stream = MegaContextTree.in_memory(MC, gister_, block_keys=keys(rc))
    for i in range(len(toks)):
        stream.append(toks[i:i + 1])
    assert gister_.reader.tokens_read - before == nb * K
    np.testing.assert_allclose(stream.keys().astype(np.float32),
                               bulk.keys().astype(np.float32), atol=2e-3, rtol=2e-3)
    # independent references, chunk by chunk
    R = rc.chunk
    ids = jnp.asarray(toks[None, :nb * K], jnp.int32)
    hidden = base.layer_hidden(params(), LLAMA, ids, layer=2, chunk=R)[0]
    from mcjax.gist import gist_blocks
    lod1 = gist_blocks(g, gcfg, hidden.reshape(nb, K, -1), 1)
    chex.assert_trees_all_close(bulk.gists(1), np.asarray(lod1), atol=1e-5, rtol=1e-5)
    cos, sin = base.rope_cos_sin(jnp.arange(R)[None], LLAMA)
    stored = bulk.keys().astype(np.float32).reshape(nb * K, LLAMA.num_kv_heads,
                                                    LLAMA.head_dim)
    for c in range(0, nb * K, R):
        n = min(R, nb * K - c)
        cache = base.init_cache(LLAMA, 1, R)
        _, cache = base.prefill(params(), LLAMA, cache, tokens=ids[:, c:c + n],
                                positions=jnp.arange(n)[None], index=0)
        rotated = base.apply_rope(jnp.asarray(stored[None, c:c + n]), cos[:, :n], sin[:, :n])
        np.testing.assert_allclose(np.asarray(rotated), np.asarray(cache.k[1, :, :n]),
                                   atol=5e-3, rtol=5e-3)  # float16 storage


def test_a_tree_keeping_keys_needs_them_in_its_read_pass():
    with pytest.raises(ValueError, match="reads none"):
        MegaContextTree.in_memory(MC, gister(None), block_keys=keys())
    with pytest.raises(ValueError, match="stored keys are layers"):
        MegaContextTree.in_memory(MC, gister(), block_keys=keys(
            dataclasses.replace(RC, layers=(0, 2))))
    hidden = dataclasses.replace(CFG.gist, input="hidden", read_chunk=2 * RC.chunk)
    g = init_gist_params(hidden, LLAMA.hidden_size, jax.random.key(1), block_size=K)
    with pytest.raises(ValueError, match="one chunk size"):
        BlockGister.from_base(hidden, g, params(), LLAMA, block_size=K, retrieval=RC)
    with pytest.raises(ConfigError, match="must equal gist.read_chunk"):
        override(CFG, ["gist.input=hidden", f"gist.read_chunk={2 * RC.chunk}"])
    # overrides apply together: both chunks can change at once
    both = override(CFG, ["gist.input=hidden", f"gist.read_chunk={2 * RC.chunk}",
                          f"retrieval.chunk={2 * RC.chunk}"])
    assert both.gist.read_chunk == both.retrieval.chunk == 2 * RC.chunk


def test_disk_store_keeps_keys_and_says_when_they_do_not_fit():
    toks = history(500)
    memory = MegaContextTree.in_memory(MC, gister(), block_keys=keys())
    memory.append(toks)
    with tempfile.TemporaryDirectory() as d:
        t = MegaContextTree.create(d, MC, gister(), block_keys=keys())
        t.append(toks[:200])
        t.close()
        t = MegaContextTree.open(d, MC, gister(), block_keys=keys())
        t.append(toks[200:])
        np.testing.assert_array_equal(t.keys(), memory.keys())
        t.close()
        with pytest.raises(MetadataError, match="keeps retrieval keys"):
            MegaContextTree.open(d, MC, gister())
        other = dataclasses.replace(RC, layers=(0, 2))
        with pytest.raises(MetadataError, match="asks for"):
            MegaContextTree.open(d, MC, gister(other), block_keys=keys(other))
    with tempfile.TemporaryDirectory() as d:
        MegaContextTree.create(d, MC, gister()).close()
        with pytest.raises(MetadataError, match="no retrieval keys"):
            MegaContextTree.open(d, MC, gister(), block_keys=keys())


# --------------------------------------------------------------------------- scores


def planted_keys(num_blocks, target_block, target_token, query):
    """Random small keys; one token of `target_block` holds `query` (max q·k there)."""
    nl, kvh, hd = len(RC.layers), LLAMA.num_kv_heads, LLAMA.head_dim
    keys = np.random.default_rng(3).normal(0, 0.1, (num_blocks, K, nl, kvh, hd))
    keys[target_block, target_token] = 5.0 * query
    return jnp.asarray(keys.reshape(num_blocks, -1), jnp.float32)


def test_block_relevance_finds_the_planted_block_and_skips_chunk_starts():
    nb, T = 40, 40 * K
    nl, G = len(RC.layers), LLAMA.num_heads // LLAMA.num_kv_heads
    direction = np.random.default_rng(4).normal(0, 1, (nl, LLAMA.num_kv_heads, LLAMA.head_dim))
    q = np.broadcast_to(direction[:, None, :, None, :],
                        (nl, RC.queries, LLAMA.num_kv_heads, G, LLAMA.head_dim))
    q = jnp.asarray(q.reshape(nl, RC.queries, LLAMA.num_heads, LLAMA.head_dim), jnp.float32)
    valid = jnp.ones((RC.queries,), bool)
    rel, ok = retrieval.block_relevance(planted_keys(nb, 13, 5, direction), jnp.int32(T), q,
                                        valid, RC, MC, LLAMA)
    assert int(jnp.argmax(rel)) == 13
    # sink block and protected tail are never scoreable
    assert not bool(ok[0]) and not bool(ok[nb - 1]) and bool(ok[1])
    assert np.all(np.isneginf(np.asarray(rel)[~np.asarray(ok)]))
    # the same key on a read chunk's first token (token 0 of block 14: 14·32 = 7·64) is
    # that chunk's own sink and ignored
    rel2, _ = retrieval.block_relevance(planted_keys(nb, 14, 0, direction), jnp.int32(T), q,
                                        valid, RC, MC, LLAMA)
    assert int(jnp.argmax(rel2)) != 14


def _relevance_reference(keys, T, q, valid, normalize_heads=True):
    """Plain numpy block relevance (the module docstring's step 2), block by block."""
    nl, kvh, hd = len(RC.layers), LLAMA.num_kv_heads, LLAMA.head_dim
    G = LLAMA.num_heads // kvh
    k = np.asarray(keys, np.float64).reshape(-1, K, nl, kvh, hd)
    qq = np.asarray(q, np.float64).reshape(nl, -1, kvh, G, hd)[:, np.asarray(valid)]
    nb = k.shape[0]
    s = np.full((nb, nl * kvh * G), -np.inf)
    for b in range(nb):
        for t in range(K):
            if (b * K + t) % RC.chunk == 0:
                continue
            dots = np.einsum("lqkgd,lkd->lkgq", qq, k[b, t]).max(-1).reshape(-1)
            s[b] = np.maximum(s[b], dots)
    ok = np.array([b >= MC.sink_blocks and (b + 1) * K <= T - MC.recent_protect
                   for b in range(nb)])
    if not normalize_heads:  # the raw max over heads, then z-scored
        s = s.max(1, keepdims=True)
    z = (s - s[ok].mean(0)) / (s[ok].std(0) + 1e-6)
    return np.where(ok, z.max(1), -np.inf), ok


@pytest.mark.parametrize("group,normalize_heads", [(4, True), (7, True), (256, True),
                                                   (7, False)])
def test_block_relevance_in_groups_equals_a_block_by_block_reference(monkeypatch, group,
                                                                     normalize_heads):
    """`block_relevance` scores blocks in groups (padded at the end); whatever the group
    size, it must equal a plain per-block computation (masked queries and chunk-start
    tokens excluded), with heads z-scored or not."""
    monkeypatch.setattr(retrieval, "RELEVANCE_GROUP", group)
    rc = dataclasses.replace(RC, normalize_heads=normalize_heads)
    nb, T = 23, 23 * K
    rng = np.random.default_rng(5)
    keys = jnp.asarray(rng.normal(0, 1, (nb, retrieval.key_width(RC, LLAMA, K))), jnp.float32)
    q = jnp.asarray(rng.normal(0, 1, (len(RC.layers), RC.queries, LLAMA.num_heads,
                                      LLAMA.head_dim)), jnp.float32)
    valid = jnp.asarray([True] * (RC.queries - 1) + [False])
    rel, ok = retrieval.block_relevance(keys, jnp.int32(T), q, valid, rc, MC, LLAMA)
    want_rel, want_ok = _relevance_reference(keys, T, q, valid, normalize_heads)
    np.testing.assert_array_equal(np.asarray(ok), want_ok)
    np.testing.assert_allclose(np.asarray(rel), want_rel, rtol=1e-4, atol=1e-4)


def test_raw_heads_rank_by_the_largest_dot_product_where_z_scores_lift_a_quiet_head():
    """Head 0 scores every block near 0 but block 9 a little higher; head 1 (every other
    head) scores blocks widely, block 21 highest. z-scored heads make head 0's small bump
    the most surprising (block 9 first); raw heads rank by the largest q·k (block 21)."""
    nb, T = 30, 30 * K
    H = len(RC.layers) * LLAMA.num_heads
    rng = np.random.default_rng(11)
    s = rng.normal(0.0, 1.0, (nb, H)) * 5.0
    s[:, 0] = rng.normal(0.0, 0.01, nb)
    s[9, 0] = 0.5  # ~50 standard deviations above head 0's mean, but small
    s[21, 1:] = 40.0
    nl, kvh, hd = len(RC.layers), LLAMA.num_kv_heads, LLAMA.head_dim
    G = LLAMA.num_heads // kvh
    assert G <= hd
    # head (l, k, g) reads key dimension g of token 1 with a unit query: q·k = its score
    keys = np.zeros((nb, K, nl, kvh, hd))
    keys[:, 1, :, :, :G] = s.reshape(nb, nl, kvh, G)
    q = np.zeros((nl, RC.queries, kvh, G, hd))
    for g in range(G):
        q[:, :, :, g, g] = 1.0
    q = jnp.asarray(q.reshape(nl, RC.queries, LLAMA.num_heads, hd), jnp.float32)
    keys = jnp.asarray(keys.reshape(nb, -1), jnp.float32)
    valid = jnp.ones((RC.queries,), bool)
    z, ok = retrieval.block_relevance(keys, jnp.int32(T), q, valid, RC, MC, LLAMA)
    raw, _ = retrieval.block_relevance(keys, jnp.int32(T), q, valid,
                                       dataclasses.replace(RC, normalize_heads=False),
                                       MC, LLAMA)
    assert int(jnp.argmax(z)) == 9
    assert int(jnp.argmax(raw)) == 21
    # raw relevance is z-scored after the max: mean 0, unit spread over scoreable blocks
    r = np.asarray(raw)[np.asarray(ok)]
    np.testing.assert_allclose([r.mean(), r.std()], [0.0, 1.0], atol=1e-3)


def test_block_scores_rank_the_top_blocks():
    rel = jnp.asarray([-jnp.inf, 0.1, 3.0, 0.5, 2.0, 7.0, 0.0, 1.0])
    ok = jnp.isfinite(rel)
    rc = dataclasses.replace(RC, top_blocks=3, spread=0, follow=0)
    s = np.asarray(retrieval.block_scores(rel, ok, rc))
    np.testing.assert_allclose(s, [0, 0, 0.8, 0, retrieval.RELEVANT_FLOOR, 1.0, 0, 0])
    # neighbours come along at decay**distance of their top block (the larger one wins)
    d = retrieval.NEIGHBOUR_DECAY
    s = np.asarray(retrieval.block_scores(rel, ok, dataclasses.replace(rc, spread=1)))
    np.testing.assert_allclose(s, [0, 0.8 * d, 0.8, 0.8 * d, d, 1.0, d, 0], rtol=1e-6)
    # `follow`: only the blocks after a top block come along (top blocks 2, 4, 5; block 4
    # is also 2 after block 2, and 0.8·d² beats its own rank score 0.6)
    s = np.asarray(retrieval.block_scores(rel, ok, dataclasses.replace(rc, follow=2)))
    np.testing.assert_allclose(s, [0, 0, 0.8, 0.8 * d, 0.8 * d * d, 1.0, d, d * d], rtol=1e-6)
    # both: spread on each side, follow further after
    s = np.asarray(retrieval.block_scores(rel, ok, dataclasses.replace(rc, spread=1,
                                                                       follow=2)))
    np.testing.assert_allclose(s, [0, 0.8 * d, 0.8, 0.8 * d, d, 1.0, d, d * d], rtol=1e-6)


def test_a_larger_working_context_takes_more_top_blocks_by_relevant_share():
    mc512 = dataclasses.replace(MC, block_size=32, w_max=512)
    rc = dataclasses.replace(RC, top_blocks=3, follow=1, spread=0, relevant_share=0.5)
    # 0.5·512 = 256 raw slots; each top block brings its follower: 64 slots -> 4 blocks
    assert retrieval.top_blocks_for(rc, mc512) == 4
    assert retrieval.top_blocks_for(rc, dataclasses.replace(mc512, w_max=2048)) == 16
    # spread 1 adds a block on each side: 128 slots per top block
    assert retrieval.top_blocks_for(dataclasses.replace(rc, spread=1), mc512) == 3
    # share 0 (the off switch) and a share too small for one block keep top_blocks
    assert retrieval.top_blocks_for(dataclasses.replace(rc, relevant_share=0.0), mc512) == 3
    assert retrieval.top_blocks_for(dataclasses.replace(rc, relevant_share=0.01), mc512) == 3
    # the count reaches block_scores through stream_conditioning: a WC of 4 top blocks
    # marks 4 blocks (and their followers) relevant where top_blocks alone marks 3
    tree = MegaContextTree.in_memory(MC, gister(), block_keys=keys())
    tree.append(history(40 * K, seed=6))
    view = tree.view()
    rc0 = dataclasses.replace(RC, top_blocks=3, follow=0, spread=0)
    for share, want in ((0.0, 3), (1.0, MC.w_max // K)):  # tiny: 256 // 32 = 8 blocks
        r = dataclasses.replace(rc0, relevant_share=share)
        out = retrieval.stream_conditioning(params(), LLAMA, r, MC, view.tokens, view.keys,
                                            view.counts)
        assert int(jnp.sum(jnp.isfinite(out["rel"]))) > want
        assert int(jnp.sum(out["blocks"] > 0)) == want, share


def test_slot_scores_expand_the_span_holding_a_relevant_block_and_make_room_oldest_first():
    T = 1600
    wc = wcm.initial_layout(T, MC)
    entries = wcm.to_entries(wc)
    blocks = np.zeros(T // K)
    blocks[5] = 1.0  # inside the LOD2 gist over blocks 0..31 (its first LOD2 group)
    s = np.asarray(retrieval.slot_scores(wc, jnp.asarray(blocks, jnp.float32), MC))
    lod2 = [i for i, e in enumerate(entries) if e[0] == 2]
    holding = [i for i in range(len(entries))
               if entries[i][0] == 2 and entries[i][1] * K * K <= 5 * K < (entries[i][1] + 1)
               * K * K]
    others = [i for i in range(len(entries)) if i not in holding]
    if holding:
        assert s[holding[0]] == 1.0
    else:  # the sink keeps block 5 at a finer level: the LOD1 gist of block 5
        lod1 = [i for i, e in enumerate(entries) if e[0] == 1 and e[1] == 5]
        assert lod1 and s[lod1[0]] == 1.0
        others = [i for i in range(len(entries)) if i != lod1[0]]
    assert lod2 or holding is not None
    legal_collapse = [i for i in others if s[i] < 0]
    assert legal_collapse, "no room is made while a relevant gist waits"
    assert all(s[i] < -MC.tau_collapse for i in legal_collapse)
    assert s[legal_collapse[0]] <= s[legal_collapse[-1]]  # oldest lowest
    # nothing relevant in a gist: no action anywhere (every score above -tau_collapse)
    none_wc = retrieval.slot_scores(wc, jnp.zeros(T // K, jnp.float32), MC)
    none = np.asarray(none_wc)
    assert np.all((none <= 0.0) & (none > -MC.tau_collapse))
    after, _ = focus.allocate(wc, none_wc, MC)
    np.testing.assert_array_equal(np.asarray(after.level), np.asarray(wc.level))
    np.testing.assert_array_equal(np.asarray(after.node), np.asarray(wc.node))


def test_collapses_nobody_asked_for_never_take_a_relevant_raw_block_first():
    """With the needle's block raw and nothing left to expand, the collapse that budget
    and headroom make (`wcm.collapse_groups`' lowest mean, as `collapse_ahead` picks it)
    takes an irrelevant span — here a younger raw block; the needle's, tied with it at 0
    before, went first as the oldest — and the scores ask the allocator for nothing."""
    mc = dataclasses.replace(MC, w_max=384)
    T = 1600
    wc = wcm.initial_layout(T, mc)
    target, other = 3, 9  # both expanded to raw tokens; only `target` stays relevant
    blocks = jnp.zeros(T // K, jnp.float32).at[other].set(1.0).at[target].set(0.9)
    for _ in range(4):
        wc, _ = focus.allocate(wc, retrieval.slot_scores(wc, blocks, mc), mc)
    raw = {e[1] // K for e in wcm.to_entries(wc) if e[0] == 0}
    assert {other, target} <= raw, raw
    wc = wc.replace(step=wc.step + mc.cooldown)  # past every cooldown
    blocks = jnp.zeros(T // K, jnp.float32).at[target].set(1.0)
    s = retrieval.slot_scores(wc, blocks, mc)
    assert np.all(np.asarray(s) > -mc.tau_collapse)
    groups = wcm.collapse_groups(wc.level, wc.node, wc.valid, wc.edit_step, wc.edit_dir,
                                 wc.num_tokens, wc.step, s, mc)
    key = np.asarray(groups.key("never"))
    head = int(np.argmin(key))
    assert np.isfinite(key[head])
    level, node = int(wc.level[head]), int(wc.node[head])
    assert not (level == 0 and node // K == target), "the relevant raw block went first"
    # the other raw block (irrelevant now) is collapsible and goes before the relevant one
    heads = {(int(wc.level[i]), int(wc.node[i]) // K): i for i in np.flatnonzero(
        np.isfinite(key)) if int(wc.level[i]) == 0}
    assert (0, other) in heads and (0, target) in heads
    assert key[heads[(0, other)]] < key[heads[(0, target)]]


def test_two_refocuses_bring_a_block_inside_an_lod2_gist_to_raw_tokens():
    """The allocator alone, driven by retrieval scores: a needle block inside an LOD2 gist
    needs one expansion to LOD1 and one more to raw tokens (the settle rounds)."""
    mc = dataclasses.replace(MC, sink_blocks=0, w_max=256)
    T = 2048
    wc = wcm.initial_layout(T, mc)
    target = 7  # block 7 lies inside LOD2 node 0 (blocks 0..31)
    assert any(e[0] == 2 and e[1] == 0 for e in wcm.to_entries(wc))
    blocks = jnp.zeros(T // K, jnp.float32).at[target].set(1.0)
    levels = []
    for _ in range(3):
        wc, _ = focus.allocate(wc, retrieval.slot_scores(wc, blocks, mc), mc)
        wcm.check_invariants(wc, None, mc)
        entries = wcm.to_entries(wc)
        levels.append(min(e[0] for e in entries
                          if e[1] * K ** e[0] <= target * K < (e[1] + 1) * K ** e[0]))
    assert levels[0] == 1 and levels[1] == 0 and levels[2] == 0


def test_span_max_is_the_max_over_each_slot_span_of_a_hand_built_layout():
    T = 5120
    wc = wcm.initial_layout(T, MC)
    entries = wcm.to_entries(wc)
    assert {e[0] for e in entries} == {0, 1, 2}
    values = np.random.default_rng(3).normal(size=T // K).astype(np.float32)
    got = np.asarray(retrieval.span_max(wc, jnp.asarray(values), MC, fill=-7.0))
    for i, (level, node, *_rest) in enumerate(entries):
        first = node * K ** level // K  # first block of the span
        last = max(first, ((node + 1) * K ** level - 1) // K)
        assert got[i] == pytest.approx(values[first: last + 1].max()), (i, level, node)
    assert np.all(got[len(entries):] == -7.0)  # padding slots


def test_slot_retrieval_features_are_span_scores_and_scaled_relevance():
    T = 1600
    wc = wcm.initial_layout(T, MC)
    C1 = T // K
    rel = np.full(C1, -np.inf, np.float32)
    rel[3:40] = np.linspace(-2.0, 25.0, 37)  # scoreable blocks; the rest -inf (sink, tail)
    blocks = np.zeros(C1, np.float32)
    blocks[39] = 1.0
    f = np.asarray(retrieval.slot_retrieval_features(wc, jnp.asarray(rel),
                                                     jnp.asarray(blocks), MC))
    chex.assert_shape(f, (MC.w_max, retrieval.NUM_SLOT_RETRIEVAL_FEATURES))
    ref_score = np.asarray(retrieval.span_max(wc, jnp.asarray(blocks), MC))
    np.testing.assert_array_equal(f[:, 0], ref_score)
    scaled = np.where(np.isfinite(rel), np.clip(rel / 10, -1, 3), -np.inf)
    z = np.asarray(retrieval.span_max(wc, jnp.asarray(scaled), MC, fill=-np.inf))
    np.testing.assert_allclose(f[:, 1], np.where(np.isfinite(z), z, 0.0), rtol=1e-6)
    assert f[:, 1].max() == pytest.approx(2.5) and f[:, 1].min() >= -1.0
    assert np.all(f[~np.asarray(wc.valid)] == 0.0)


def test_tail_read_gives_the_newest_tokens_queries_and_hidden_states():
    ids = history(300, 11)
    tokens = jnp.asarray(np.pad(ids, (0, 212)), jnp.int32)  # a view with capacity 512
    out = retrieval.tail_read(params(), LLAMA, RC, tokens, jnp.int32(300), hidden_layer=2,
                              hidden_tokens=5)
    R = RC.query_window
    ref = base.read_pass_core(params(), LLAMA, jnp.asarray(ids[300 - R:])[None], chunk=R,
                              hidden_layer=2, qk_layers=RC.layers)
    np.testing.assert_allclose(out["hidden"], ref["hidden"][0, -5:], atol=1e-5)
    np.testing.assert_allclose(out["queries"],
                               np.transpose(ref["queries"][0, -RC.queries:], (1, 0, 2, 3)),
                               atol=1e-5)
    assert np.all(out["hidden_valid"]) and np.all(out["query_valid"])
    short = retrieval.tail_read(params(), LLAMA, RC, tokens, jnp.int32(3), hidden_layer=2,
                                hidden_tokens=5)
    np.testing.assert_array_equal(short["hidden_valid"], [False, False, True, True, True])
    assert np.all(np.asarray(short["hidden"])[:2] == 0.0)


# --------------------------------------------------------------------------- session


LENS_V2 = override(CFG, {"lens.query_tokens": 3, "lens.query_layer": 2,
                        "lens.retrieval_features": True})


@pytest.mark.parametrize("policy,cfg", [("retrieval", CFG), ("lens", LENS_V2)],
                         ids=["retrieval", "lensnet_v2"])
def test_session_with_query_aware_focus_settles_checks_and_never_recompiles(policy, cfg):
    s = Session((LLAMA, params()), None, None, cfg, batch_size=2, max_tokens=2048,
                debug_invariants=True, focus_policy=policy)
    assert s._plan.keeps_keys and s._plan.query_aware
    s.feed([history(1500, 1), history(1100, 2)])
    s.sync()
    (event,) = s.events  # the settle rounds run inside the one input refocus
    assert event.trigger == "input"
    assert all(0 <= r <= RC.settle_rounds for r in event.settle_rounds)
    s.generate(40)
    s.check()
    for seed in (3, 5):  # warm-up: the row buckets of 70-token feeds
        s.feed([history(70, seed), history(70, seed + 1)])
        s.generate(40)
    with CompileCounter() as cc:
        for seed in (7, 9):
            s.feed([history(70, seed), history(70, seed + 1)])
            s.generate(40)
    assert cc.count == 0
    s.check()
    assert s.provenance["focus_policy"]["policy"] == policy


@pytest.mark.parametrize("policy,cfg", [("retrieval", CFG), ("lens", LENS_V2)],
                         ids=["retrieval", "lensnet_v2"])
def test_settle_rounds_inside_the_refocus_equal_allocator_rounds_driven_by_hand(policy, cfg):
    """Independent reference: a session without settle rounds, then the public pure
    functions (scores, collapse_ahead, allocate) looped on the host while a stream's last
    round acted. The settling session's single refocus gives the same WC bit for bit,
    reports the rounds and actions, and re-prefills once: its cache equals a fresh prefill."""
    from mcjax.runtime import policy_scores
    from mcjax.runtime.programs import collapse_ahead

    feeds = [history(1500, 1), history(1100, 2), history(300, 3)]
    settled = Session((LLAMA, params()), None, None, cfg, batch_size=3, max_tokens=2048,
                      focus_policy=policy)
    settled.feed(feeds)
    settled.sync()
    (event,) = settled.events
    settled.check()
    ref = Session((LLAMA, params()), None, None,
                  override(cfg, {"retrieval.settle_rounds": 0}), batch_size=3,
                  max_tokens=2048, focus_policy=policy)
    ref.feed(feeds)
    ref.sync()
    assert ref._plan.settle_rounds == 0 and settled._plan.settle_rounds == RC.settle_rounds
    (first,) = ref.events
    assert first.settle_rounds == [0, 0, 0]
    plan, view = ref._plan, ref._view
    cond = focus_conditioning(plan, ref._params, view)
    wc = jax.device_get(ref._state.wc)
    settling = np.asarray([e + c > 0 for e, c in zip(first.num_expand, first.num_collapse)])
    kinds = {focus.ACT_EXPAND: "expand", focus.ACT_COLLAPSE: "collapse"}
    rounds, actions = np.zeros(3, int), [[(k, s) for k, s, _ in a] for a in first.actions]
    for _ in range(RC.settle_rounds):
        if not settling.any():
            break
        for b in np.flatnonzero(settling):
            one = jax.tree.map(lambda x: x[b], wc)
            view_b = jax.tree.map(lambda x: x[b], view)
            cond_b = jax.tree.map(lambda x: x[b], cond)
            scores = policy_scores(plan, ref._focus_params, ref._params, one, view_b,
                                   jnp.int32(b), 1, cond_b).astype(jnp.float32)
            one, scores, _ = collapse_ahead(plan, one, scores, jnp.bool_(True))
            one, info = focus.allocate(one, scores, MC)
            wc = jax.tree.map(lambda all_, x: np.concatenate(
                [np.asarray(all_)[:b], np.asarray(x)[None], np.asarray(all_)[b + 1:]]), wc, one)
            rounds[b] += 1
            acted = int(info.num_expand) + int(info.num_collapse)
            actions[b] += [(kinds[k], s) for k, s in zip(np.asarray(info.action_kind).tolist(),
                                                         np.asarray(info.action_slot).tolist())
                           if k in kinds]
            settling[b] = acted > 0
    assert rounds.max() >= 1, "no stream settled: the case does not exercise the rounds"
    assert event.settle_rounds == rounds.tolist()
    got = jax.device_get(settled._state.wc)
    for name in ("level", "node", "valid", "edit_step", "edit_dir", "num_tokens", "step"):
        np.testing.assert_array_equal(getattr(got, name), getattr(wc, name), err_msg=name)
    assert [[(k, s) for k, s, _ in a] for a in event.actions] == actions
    assert event.num_expand == [sum(k == "expand" for k, *_ in a) for a in event.actions]


def test_lensnet_v2_scores_in_the_session_see_the_question():
    """The same history with a different newest block: LensNet v2's first scores differ
    (v1 conditions on gists only, and the newest block is not gisted into the tail yet)."""
    hist = history(1500, 1)
    scores = []
    for last in (4, 8):
        s = Session((LLAMA, params()), None, None, LENS_V2, batch_size=1, max_tokens=2048,
                    focus_policy="lens")
        s.feed([np.concatenate([hist, history(20, last)])])
        view = s.tree(0).view()
        cond = jax.tree.map(lambda x: x[0], focus_conditioning(
            s._plan, s._params, jax.tree.map(lambda x: x[None], view)))
        wc = wcm.initial_layout(1520, LENS_V2.mc)
        scores.append(np.asarray(lens_stream_scores(s._plan, s._focus_params, s._params, wc, view,
                                               cond)))
    assert not np.allclose(scores[0], scores[1])


def test_session_rejects_a_lens_query_layer_beyond_the_base_model():
    cfg = override(LENS_V2, {"lens.query_layer": LLAMA.num_layers + 1})
    with pytest.raises(ConfigError, match="query_layer"):
        Session((LLAMA, params()), None, None, cfg, focus_policy="lens")


def test_session_rejects_retrieval_layers_beyond_the_base_model():
    cfg = override(CFG, {"retrieval.layers": (1, LLAMA.num_layers)})
    with pytest.raises(ConfigError, match="retrieval.layers"):
        Session((LLAMA, params()), None, None, cfg, focus_policy="retrieval")


def test_retrieval_config_rejects_bad_values():
    with pytest.raises(ConfigError):
        RetrievalConfig(layers=(3, 2))
    with pytest.raises(ConfigError):
        RetrievalConfig(queries=200, query_window=128)
    for bad in (-0.1, 1.5):
        with pytest.raises(ConfigError, match="relevant_share"):
            RetrievalConfig(relevant_share=bad)
