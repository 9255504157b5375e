"""The one scorer (`mcjax.scoring.score_continuation`) against independent references: a
hand-built working context over a hand-built tree view, scored by a plain base forward over
the same embeddings, positions and mask; a KV cache holding the same slots; a GistNet
window's compressed context; and the level-by-level gisting of a window."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcjax import scoring
from mcjax import working_context as wcm
from mcjax.base import model as base
from mcjax.config import TINY_LLAMA, MCConfig
from mcjax.gist import gist_levels
from mcjax.tree import TreeView

K = 4  # block size of the hand-built contexts: a few slots of every kind, cheap forwards


def _mc(scheme: str) -> MCConfig:
    return MCConfig(block_size=K, num_levels=2, w_max=24, horizon=4, recent_protect=4,
                    sink_blocks=1, position_scheme=scheme)


def _view(T: int, rng) -> TreeView:
    """A tree view of T = 64 tokens with random gist rows (content is by reference: the
    scorer never looks at how the rows were made)."""
    D = TINY_LLAMA.hidden_size
    return TreeView(tokens=jnp.asarray(rng.integers(3, 256, T), jnp.int32),
                    gists=(jnp.asarray(rng.normal(0, 0.02, (T // K, D)), jnp.float32),
                           jnp.asarray(rng.normal(0, 0.02, (T // K ** 2, D)), jnp.float32)),
                    counts=jnp.asarray([T, T // K, T // K ** 2], jnp.int32))


# 64 tokens: the sink block (LOD0 0..3), LOD1 gists of blocks 1..3, the LOD2 gist of
# tokens 16..31, LOD1 gists of blocks 8..14, the raw block 60..63
ENTRIES = ([(0, t) for t in range(4)] + [(1, b) for b in (1, 2, 3)] + [(2, 1)]
           + [(1, b) for b in range(8, 15)] + [(0, t) for t in range(60, 64)])


def _reference_slots(view: TreeView, params, scheme: str):
    """Embeddings [n, D] and positions [n] of ENTRIES written out by hand: the token's
    embedding or the gist row; the token index or the span's centre (absolute), the running
    index (compact)."""
    emb, pos = [], []
    for i, (lvl, node) in enumerate(ENTRIES):
        if lvl == 0:
            emb.append(base.embed_tokens(params, view.tokens[node]))
            pos.append(node if scheme == "absolute" else i)
        else:
            emb.append(view.gists[lvl - 1][node].astype(emb[0].dtype))
            size = K ** lvl
            pos.append(node * size + size // 2 if scheme == "absolute" else i)
    return jnp.stack(emb), np.asarray(pos)


@pytest.mark.parametrize("scheme", ["compact", "absolute"])
def test_score_continuation_after_a_working_context_is_a_plain_forward_over_its_slots(
        tiny_llama, scheme):
    cfg, params = tiny_llama
    mc = _mc(scheme)
    rng = np.random.default_rng(1)
    view = _view(64, rng)
    wc = wcm.from_entries(ENTRIES, 64, mc)
    wcm.check_invariants(wc, None, mc)
    B, C, n = 2, 5, len(ENTRIES)
    cont = jnp.asarray(rng.integers(3, 256, (B, C)), jnp.int32)
    batch = jax.tree.map(lambda x: jnp.stack([x] * B), wc)
    context, newest, positions = scoring.working_context_input(batch, view, params, mc, C)
    logp = scoring.score_continuation(params, cfg, cont, positions, context=context,
                                      newest=newest)
    assert logp.shape == (B, C, cfg.vocab_size) and logp.dtype == jnp.float32

    # independent reference: the valid slots only (no padding), the continuation after them
    # at the next positions, one plain forward; token 0 from the newest slot
    emb, pos = _reference_slots(view, params, scheme)
    first = 64 if scheme == "absolute" else n
    ref_pos = np.r_[pos, first + np.arange(C - 1)]
    want = []
    for b in range(B):
        embeds = jnp.concatenate([emb, base.embed_tokens(params, cont[b, :-1])])[None]
        logits = base.forward(params, cfg, embeds=embeds, positions=jnp.asarray(ref_pos)[None])
        want.append(jax.nn.log_softmax(logits[0, n - 1:], -1))
    chex.assert_trees_all_close(logp, jnp.stack(want), atol=2e-4, rtol=2e-4)
    np.testing.assert_array_equal(np.asarray(newest), [n - 1] * B)
    np.testing.assert_array_equal(np.asarray(positions), [first + np.arange(C)] * B)

    # a masked continuation token changes nothing before it
    mask = jnp.asarray([[True] * C, [True] * 3 + [False] * (C - 3)])
    masked = scoring.score_continuation(params, cfg, cont, positions, mask, context=context,
                                        newest=newest)
    chex.assert_trees_all_close(masked[:, :4], logp[:, :4], atol=1e-5)


def test_score_continuation_from_a_cache_equals_scoring_after_the_slots_it_holds(tiny_llama):
    cfg, params = tiny_llama
    mc = _mc("compact")
    rng = np.random.default_rng(2)
    view = _view(64, rng)
    wc = jax.tree.map(lambda x: jnp.stack([x] * 2), wcm.from_entries(ENTRIES, 64, mc))
    context, newest, positions = scoring.working_context_input(wc, view, params, mc, K)
    cont = jnp.asarray(rng.integers(3, 256, (2, K)), jnp.int32)
    W = mc.w_max
    cache = base.init_cache(cfg, 2, W + K, jnp.float32)
    _, cache = base.prefill(params, cfg, cache, embeds=context.embeds,
                            positions=context.positions, mask=context.valid)
    from_cache = scoring.score_continuation(params, cfg, cont, positions, cache=cache,
                                            cache_index=jnp.int32(W))
    from_slots = scoring.score_continuation(params, cfg, cont, positions, context=context)
    assert from_cache.shape == (2, K - 1, cfg.vocab_size)
    chex.assert_trees_all_close(from_cache, from_slots, atol=2e-4, rtol=2e-4)
    with pytest.raises(ValueError, match="not both"):
        scoring.score_continuation(params, cfg, cont, positions, cache=cache,
                                   cache_index=jnp.int32(W), context=context)


@pytest.mark.parametrize("scheme", ["compact", "absolute"])
def test_substitution_nll_is_a_plain_forward_over_the_windows_compressed_context(
        tiny_llama, scheme):
    cfg, params = tiny_llama
    mc = dataclasses.replace(_mc(scheme), horizon=5)
    layout = scoring.GistLayout.build(mc, prefix_len=80, keep_raw_blocks=2)
    # 20 blocks: the sink, four LOD2 groups (blocks 1..16), the LOD1 gist of block 17 and
    # two raw blocks
    assert (layout.sink_blocks, layout.lod2_groups, layout.lod1_blocks) == (1, 4, 1)
    rng = np.random.default_rng(3)
    tokens = jnp.asarray(rng.integers(3, 256, (2, layout.window_len)), jnp.int32)
    gists = jnp.asarray(rng.normal(0, 0.02, (2, layout.num_gists, cfg.hidden_size)),
                        jnp.float32)
    for dense in (False, True):
        nll, _ = scoring.substitution_nll_from_gists(params, cfg, tokens, layout, gists,
                                                     dense=dense)
        # reference: [sink ‖ gists ‖ raw tail ‖ continuation] written out, one plain forward
        emb = base.embed_tokens(params, tokens[:, : layout.window_len - 1])
        embeds = jnp.concatenate([emb[:, : layout.sink_len], gists.astype(emb.dtype),
                                  emb[:, layout.raw_start:]], 1)
        S = layout.sink_len
        if scheme == "absolute":
            K2 = K * K
            gist_pos = np.r_[S + np.arange(layout.lod2_groups) * K2 + K2 // 2,
                             S + layout.lod2_groups * K2 + np.arange(layout.lod1_blocks) * K
                             + K // 2]
            pos = np.r_[np.arange(S), gist_pos, np.arange(layout.raw_start,
                                                          layout.window_len - 1)]
        else:
            pos = np.arange(embeds.shape[1])
        n = layout.scored(dense)
        logits = base.forward(params, cfg, embeds=embeds,
                              positions=jnp.broadcast_to(jnp.asarray(pos), embeds.shape[:2]))
        logp = jax.nn.log_softmax(logits[:, -n:], -1)
        want = -jnp.take_along_axis(logp, tokens[:, layout.window_len - n:, None], -1)[..., 0]
        chex.assert_trees_all_close(nll, want, atol=2e-4, rtol=2e-4)


def test_gists_of_a_window_are_built_level_by_level_as_a_trees(tiny_llama):
    _, params = tiny_llama
    mc = _mc("compact")
    layout = scoring.GistLayout.build(mc, prefix_len=80, keep_raw_blocks=1)
    rng = np.random.default_rng(4)
    children = jnp.asarray(rng.normal(size=(2, layout.raw_start, 6)), jnp.float32)
    got = scoring.make_gists(scoring.mean_pool_gist_fn, children, layout)
    # reference: numpy means — LOD1 of each block of the span, LOD2 of each group of K
    span = np.asarray(children)[:, layout.sink_len: layout.raw_start]
    lod1 = span.reshape(2, -1, K, 6).mean(2)
    g = layout.lod2_groups
    lod2 = lod1[:, : g * K].reshape(2, g, K, 6).mean(2)
    np.testing.assert_allclose(np.asarray(got), np.concatenate([lod2, lod1[:, g * K:]], 1),
                               rtol=1e-5, atol=1e-6)
    # every level of a history: incomplete groups are not gisted, an empty level is one
    # zero row; with a dtype each level is stored (cast) before the next is built from it
    levels = gist_levels(scoring.mean_pool_gist_fn, children[:, :20], K, 3,
                         dtype=jnp.bfloat16)
    assert [lv.shape[1] for lv in levels] == [5, 1, 1]
    assert all(lv.dtype == jnp.bfloat16 for lv in levels)
    np.testing.assert_allclose(np.asarray(levels[1][:, 0], np.float32),
                               np.asarray(levels[0][:, :K], np.float32).mean(1), rtol=1e-2)
    assert not np.asarray(levels[2], np.float32).any()
