"""Streaming MegaContext runtime (SPEC §2.7): a `Session` over a batch of streams.

A session serves B independent streams with one frozen base model. Per stream it keeps a
MegaContext tree of the whole history (host side, `mcjax.tree`, gisting every completed
block once) and a fixed-shape working context (WC, `mcjax.working_context`); the WC
operations run vmapped over the leading stream axis. All streams share one KV cache of
`w_max + K` slots (K = block size = refocus cadence):

    slots [0, w_max)          the materialized WC (each stream's valid slots packed at the
                              front, its padding slots invalid)
    slots [w_max, w_max + K)  "pending": the tokens decoded since the last refocus

Every stream writes its decoded token at the same slot (the base model's cache write index
is one shared scalar, so a decode step is an in-place update); streams of different
lengths stay exact because attention ignores invalid slots, and positions (which only feed
RoPE) are per stream: a pending token sits at its absolute index (`absolute` scheme) or
right after the WC (`compact`).

Refocus — every K decoded tokens, and once after new input:
  1. host: append the new tokens to each stream's tree (GistNet gists the blocks they
     complete) and write the new rows into a batched device view of the trees with a fixed
     capacity (`max_tokens`), so no device shape ever depends on the history length;
  2. one jitted program: LensNet scores the WC → `append` adds the new tokens at LOD0,
     collapsing the lowest-scored sibling groups when the budget would overflow → LensNet
     scores the result → if the next block would not fit, collapse ahead until
     `collapse_headroom` slots are free (so most refocuses only append) → the focus
     allocator applies ≤ n_diff expand/collapse edits →
     materialize → re-prefill the cache from the first slot that changed in any stream
     (rounded down to a multiple of K) through the last valid slot, in fixed-shape chunks
     inside `while_loop`s (K-slot chunks up to a multiple of C = `prefill_chunk`, C-slot
     chunks, a K-slot tail: big matmuls for bulk, < K wasted slots at either end) → the
     next token of each stream whose newest slot was recomputed. A stream whose only change
     is the append of its pending tokens re-prefills nothing: their KV entries are copied
     from the pending slots (same context, same positions).
With `kv_reuse="approx"` the cache is instead rebuilt from the entries it already holds —
each kept entry moved to its new slot, its key re-rotated to its new position — and only the
K-slot chunks holding new entries plus each changed stream's newest chunk are recomputed
(falling back to the exact range when that is not cheaper); see `Session`.
Unchanged slots before the first change keep their cache entries. Slots a stream did not
need re-prefilled (the range is shared by the batch) are recomputed from identical inputs,
so they can differ from their old values only in the last bits (chunk shapes differ).

Decoding (`generate` / `stream`): one jitted `lax.while_loop` runs up to K greedy steps over
a fixed-shape `StreamState`; the host reads the block's tokens, then refocuses when K are
pending. Generating n tokens in pieces equals generating them at once.

Input (`feed`) is ingested into the trees at once (gisting happens as text arrives) and the
WC is brought up to date lazily, by one refocus before the next generation (or `sync()`):
a fresh stream starts from `initial_layout` (recent tokens LOD0, older LOD1, oldest LOD2 —
any length, even ≫ w_max — and the sink, the history's first `sink_blocks` blocks, LOD0 in
slot 0 onward, never collapsed) followed by a refocus; a running stream appends.

GistNet's LOD1 children are the blocks' token embeddings or, with `GistConfig.input =
"hidden"`, the frozen base model's read-pass hidden states after `input_layer` layers
(chunks of `read_chunk` tokens aligned to each stream's history start; `BlockGister.
from_base` builds either, and the trees compute them as blocks complete). Feeding a text
in pieces therefore equals feeding it at once, bit for bit.

Programs are compiled once per plan (configs, batch size, capacity, headroom, chunk size,
mesh) and shared by every session with that plan; with a mesh the decode step and the
refocus are jitted with `NamedSharding`s over ("data", "model") — streams on `data`, base
weights split on `model` by `mcjax.sharding`'s rules. After warm-up nothing recompiles as
the history grows (`CompileCounter` counts XLA compilations to prove it).

Telemetry: one `RefocusEvent` per refocus (actions, swap rate, LOD histogram, budget use,
residency, re-prefilled slots, timings) in `session.events` and to an optional callback.
`debug_invariants=True` runs `check_invariants` (and a cache/WC consistency check) after
every refocus.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mcjax import focus, lens, retrieval, sharding
from mcjax import working_context as wcm
from mcjax.base import model as base
from mcjax.assets import check_params, flatten_params, unflatten_params
from mcjax.base.model import InputError, KVCache
from mcjax.checkpoint import (_arch_without_dtype, default_params,  # noqa: F401 (re-exported)
                              load_trained_params, untrained_params)
from mcjax.checkpoint import CheckpointError, config_to_json
from mcjax.config import ConfigError, ExperimentConfig, LlamaConfig, config_from_json
from mcjax.tree import BlockGister, MegaContextTree, TreeView, copy_rows

__all__ = [
    "Session", "StreamState", "RefocusEvent", "CompileCounter", "InputError",
    "load_trained_params", "untrained_params", "default_params",
    "DEFAULT_MAX_TOKENS", "FOCUS_POLICIES", "KV_REUSE", "SAVE_VERSION", "recency_scores",
    "random_scores",
]

DEFAULT_MAX_TOKENS = 1 << 17  # per-stream history capacity of the device view (131,072)
# Where refocus scores come from: LensNet (the design), or a baseline policy that replaces
# its scores inside the same session machinery (see `recency_scores`, `random_scores`).
FOCUS_POLICIES = ("lens", "random", "recency", "retrieval")
# How a refocus rebuilds the cache after edits: "exact" re-prefills every slot from the first
# change on; "approx" keeps the entries of unchanged slots (moved and re-rotated) and
# recomputes only the chunks with new entries and the newest one (CacheBlend-style).
KV_REUSE = ("exact", "approx")
_MIN_GIST_ROWS = 8  # smallest row bucket of a gist-level view update (one compile serves all)


# --------------------------------------------------------------------------- state


@flax.struct.dataclass
class StreamState:
    """Everything the jitted programs carry between calls; leading axis B = streams."""

    wc: wcm.WorkingContext  # [B, W] working contexts (what cache slots [0, W) hold)
    cache: KVCache  # k/v [layers, B, W + K, kv_heads, head_dim]; valid [B, W + K]
    next_token: jax.Array  # [B] int32 greedy prediction after the newest history token
    pending: jax.Array  # [B, K] int32 tokens decoded since the last refocus (pad if done)
    num_pending: jax.Array  # [] int32 pending slots used (shared by all streams)
    done: jax.Array  # [B] bool stream emitted EOS in the current generation


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static, hashable description of a session's programs (the jit cache key)."""

    llama: LlamaConfig
    mc: Any  # MCConfig
    lens: Any  # LensConfig
    batch_size: int
    max_tokens: int
    pad_id: int
    headroom: int  # slots to free ahead when the next block would not fit (0: off)
    prefill_chunk: int  # C: slots per bulk re-prefill chunk (a multiple of K dividing w_max)
    focus_policy: str = "lens"  # one of FOCUS_POLICIES
    retrieval: Any = None  # RetrievalConfig (focus_policy "retrieval", or LensNet v2)
    kv_reuse: str = "exact"  # one of KV_REUSE (see `_kv_sources`, `_moved_kv`)

    @property
    def keeps_keys(self) -> bool:
        """The trees keep read-pass keys: retrieval focus, or LensNet v2's relevance."""
        return self.focus_policy == "retrieval" or (self.focus_policy == "lens"
                                                    and self.lens.retrieval_features)

    @property
    def query_aware(self) -> bool:
        """Scores depend on the newest tokens' read (so focus can settle after input)."""
        return self.focus_policy == "retrieval" or (self.focus_policy == "lens"
                                                    and self.lens.conditioned)

    @property
    def num_slots(self) -> int:
        return self.mc.w_max + self.mc.block_size

    def view_rows(self, level: int) -> int:
        return max(1, -(-self.max_tokens // self.mc.block_size**level))


# --------------------------------------------------------------------------- jitted programs


def _focus_conditioning(plan: _Plan, base_params, view: TreeView) -> dict | None:
    """What query-aware scoring needs per stream, computed once per refocus from the whole
    history (new tokens too): for "retrieval" the block scores; for LensNet v2 the
    question's hidden states and/or the blocks' relevance and scores. None otherwise."""
    if not plan.query_aware:
        return None
    lc = plan.lens
    v2_query = plan.focus_policy == "lens" and lc.query_tokens > 0
    one = functools.partial(retrieval.stream_conditioning, base_params, plan.llama,
                            plan.retrieval, plan.mc,
                            hidden_layer=lc.query_layer if v2_query else None,
                            hidden_tokens=lc.query_tokens)
    return jax.vmap(one)(view.tokens, view.keys, view.counts)


def _score_stream(plan: _Plan, lens_params, base_params, wc, view, cond=None):
    """LensNet scores [W] of one stream's WC (materialized from its tree view; v2 also
    from the stream's `_focus_conditioning`)."""
    emb, _, _ = wcm.materialize(wc, view, base_params, plan.mc)
    tail = lens.tail_gists(view, plan.mc)
    query = feats = None
    if plan.lens.query_tokens:
        query = lens.QueryTokens(hidden=cond["hidden"].astype(emb.dtype),
                                 valid=cond["hidden_valid"])
    if plan.lens.retrieval_features:
        feats = retrieval.slot_retrieval_features(wc, cond["rel"], cond["blocks"], plan.mc)
    return lens.lens_scores(lens_params, emb, wc, tail, plan.lens, plan.mc, query, feats)


def recency_scores(wc, mc) -> jax.Array:
    """Recency-focus baseline scores [..., W]: linear in the age of a slot's span, from +1
    (span ends at the newest token: expand) to -1 (oldest: collapse), legality-masked like
    LensNet's. No learned parts; jittable."""
    return lens.mask_illegal(2.0 * wcm.span_end_fraction(wc, mc) - 1.0, wc, mc)


def random_scores(key: jax.Array, wc, mc) -> jax.Array:
    """Random-focus baseline scores [W] of one WC: uniform in (-1, 1) from `key`,
    legality-masked like LensNet's."""
    return lens.mask_illegal(jax.random.uniform(key, wc.level.shape, jnp.float32, -1.0, 1.0),
                             wc, mc)


def _policy_scores(plan: _Plan, focus_params, base_params, wc, view, stream, call: int,
                   cond=None):
    """Scores [W] of one stream's WC under the plan's focus policy, from the policy's own
    inputs: `focus_params` are LensNet's params ("lens") or the seed ([] uint32,
    "random"; unused by "recency" and "retrieval"). For "random" the key folds in the
    stream, the WC's refocus step and which scoring of the refocus this is, so it is
    deterministic given the seed and differs from refocus to refocus. `cond`: the stream's
    `_focus_conditioning` (computed once per refocus) for "retrieval" and LensNet v2."""
    if plan.focus_policy == "retrieval":
        return retrieval.slot_scores(wc, cond["blocks"], plan.mc)
    if plan.focus_policy == "lens":
        return _score_stream(plan, focus_params, base_params, wc, view, cond)
    if plan.focus_policy == "recency":
        return recency_scores(wc, plan.mc)
    key = jax.random.key(focus_params)
    for x in (stream, wc.step, call):
        key = jax.random.fold_in(key, x)
    return random_scores(key, wc, plan.mc)


def _pending_base_position(plan: _Plan, wc) -> jax.Array:
    """[B] position of the first pending slot: the next token index, or (compact) the next
    running index after the WC."""
    if plan.mc.position_scheme == "compact":
        return wc.num_valid
    return wc.num_tokens


def _decode_block(plan: _Plan, base_params, state: StreamState, num_steps, eos_id):
    """Up to `num_steps` (≤ K − num_pending) greedy steps: emit `next_token`, write it at the
    next pending slot, predict the next one. Stops early once every stream is done.
    Returns (state, tokens [B, K] emitted (pad beyond the steps run), steps run)."""
    W, K, B = plan.mc.w_max, plan.mc.block_size, plan.batch_size
    first_position = _pending_base_position(plan, state.wc)

    def cond(carry):
        s, i, _ = carry
        return (i < num_steps) & ~jnp.all(s.done)

    def body(carry):
        s, i, out = carry
        p = s.num_pending
        live = ~s.done
        token = s.next_token
        hidden, cache = base.prefill_core(
            base_params, plan.llama, s.cache, token[:, None], None,
            (first_position + p)[:, None], live[:, None], W + p, return_hidden=True)
        logits = base.logits_from_hidden(base_params, plan.llama, hidden[:, 0])
        emitted = jnp.where(live, token, plan.pad_id).astype(jnp.int32)
        out = jax.lax.dynamic_update_slice(out, emitted[:, None], (0, i))
        pending = jax.lax.dynamic_update_slice(s.pending, emitted[:, None], (0, p))
        s = s.replace(cache=cache, next_token=jnp.argmax(logits, -1).astype(jnp.int32),
                      pending=pending, num_pending=p + 1,
                      done=s.done | (live & (token == eos_id)))
        return s, i + 1, out

    out0 = jnp.full((B, K), plan.pad_id, jnp.int32)
    state, steps_run, out = jax.lax.while_loop(cond, body, (state, jnp.int32(0), out0))
    return state, out, steps_run


def _collapse_ahead(plan: _Plan, wc, scores, trigger):
    """Free `plan.headroom` slots at once when fewer than K are free (and `trigger`).

    Without it a full WC collapses one group per refocus — the oldest LOD0 group, right
    after the gists — so nearly the whole cache is re-prefilled every K tokens. Collapsing
    ahead (the one rule, `wcm.collapse_groups`: lowest mean score, else oldest; never the
    protected tail, the sink, nor — unlike `append`, which must meet the budget — a group an
    expansion created within the cooldown) lets the next headroom/K refocuses
    only append, re-prefilling just the new tokens. Returns (wc, scores realigned, count).
    """
    mc = plan.mc
    K, W = mc.block_size, mc.w_max
    slots = jnp.arange(W)
    trigger = trigger & (W - wc.num_valid < K)

    def group_keys(wc, scores):
        groups = wcm.collapse_groups(wc.level, wc.node, wc.valid, wc.edit_step, wc.edit_dir,
                                     wc.num_tokens, wc.step, scores, mc)
        return groups.key("never"), groups.mean

    def cond(carry):
        wc, scores, _ = carry
        key, _ = group_keys(wc, scores)
        return trigger & (wc.num_valid > W - plan.headroom) & jnp.any(jnp.isfinite(key))

    def body(carry):
        wc, scores, count = carry
        key, mean = group_keys(wc, scores)
        head = jnp.argmin(key).astype(jnp.int32)  # first minimum: the oldest among equals
        wc, _ = wcm.collapse(wc, head, mc)
        later = scores[jnp.minimum(slots + K - 1, W - 1)]
        scores = jnp.where(slots < head, scores, jnp.where(slots == head, mean[head], later))
        return wc, jnp.where(wc.valid, scores, 0.0), count + 1

    if plan.headroom == 0:
        return wc, scores, jnp.int32(0)
    return jax.lax.while_loop(cond, body, (wc, scores, jnp.int32(0)))


def _copy_pending_kv(plan: _Plan, cache: KVCache, copy, dest, count) -> KVCache:
    """For streams with `copy`: cache slots [dest, dest + count) ← pending slots
    [W, W + count). One in-place K-slot update per stream (a scalar offset each)."""
    W, K = plan.mc.w_max, plan.mc.block_size
    first_k = jnp.arange(K)[None, None, :, None, None]

    def one(b, kv):
        def move(buf):
            block = jax.lax.dynamic_slice_in_dim(
                jax.lax.dynamic_slice_in_dim(buf, b, 1, axis=1), W, K, axis=2)
            here = jax.lax.dynamic_slice(buf, (0, b, dest[b], 0, 0), block.shape)
            new = jnp.where(copy[b] & (first_k < count[b]), block, here)
            return jax.lax.dynamic_update_slice(buf, new, (0, b, dest[b], 0, 0))

        return tuple(move(buf) for buf in kv)

    k, v = jax.lax.fori_loop(0, plan.batch_size, one, (cache.k, cache.v))
    return cache.replace(k=k, v=v)


def _kv_sources(plan: _Plan, old_wc, cached_valid, new_wc, new_pos, new_valid,
                from_pending):
    """Where each new WC slot's KV entry already is in the cache, per stream (approximate
    reuse). src [B, W]: an old WC slot holding the same entry (same level and span: entries
    are immutable, so the same inputs), a pending slot W + p holding the same appended
    token when the new tokens are the decoded ones, or -1 (the slot must be computed).
    delta [B, W]: the slot's new position minus the one its entry was computed at."""
    mc = plan.mc
    W, K = mc.w_max, mc.block_size
    big = jnp.iinfo(jnp.int32).max
    old_pos = jax.vmap(lambda wc: wcm.slot_positions(wc, mc))(old_wc)
    pending_pos = _pending_base_position(plan, old_wc)  # [B] position of pending slot 0

    def one(old_level, old_node, cached, new_level, new_node, valid, npos, opos, ppos,
            old_tokens):
        old_start = jnp.where(cached, wcm.span_start(old_level, old_node, mc), big)
        new_start = wcm.span_start(new_level, new_node, mc)
        # valid slots are packed at the front in span order, so old_start is sorted
        i = jnp.clip(jnp.searchsorted(old_start, new_start), 0, W - 1)
        same = valid & cached[i] & (old_start[i] == new_start) & (old_level[i] == new_level)
        p = new_node - old_tokens
        pend = from_pending & valid & ~same & (new_level == 0) & (p >= 0) & (p < K)
        src = jnp.where(same, i, jnp.where(pend, W + p, -1))
        src_pos = jnp.where(same, opos[i], ppos + p)
        return src.astype(jnp.int32), jnp.where(src >= 0, npos - src_pos, 0)

    return jax.vmap(one)(old_wc.level, old_wc.node, cached_valid, new_wc.level, new_wc.node,
                         new_valid, new_pos, old_pos, pending_pos, old_wc.num_tokens)


def _moved_kv(plan: _Plan, cache: KVCache, src, delta) -> KVCache:
    """cache slots [0, W) ← their entries' old slots `src` (where >= 0), keys re-rotated by
    `delta` positions (RoPE rotations compose, so a moved key equals one computed at the new
    position from the same input); other slots are left as they are."""
    llama, W = plan.llama, plan.mc.w_max
    idx = jnp.clip(src, 0, cache.k.shape[2] - 1)[None, :, :, None, None]
    keep = (src >= 0)[None, :, :, None, None]
    cos, sin = base.rope_cos_sin(delta, llama.head_dim, llama.rope_theta)

    def move(buf, rotate: bool):
        moved = jnp.take_along_axis(buf, idx, axis=2)
        if rotate:
            moved = jax.vmap(lambda x: base.apply_rope(x, cos, sin))(moved)
        head = jnp.where(keep, moved.astype(buf.dtype), buf[:, :, :W])
        return jax.lax.dynamic_update_slice_in_dim(buf, head, 0, axis=2)

    return cache.replace(k=move(cache.k, True), v=move(cache.v, False))


def _refocus(plan: _Plan, base_params, focus_params, state: StreamState, view: TreeView,
             num_new, reset, layout, revive, from_pending, settle):
    """One refocus of every stream (module docstring, step 2).

    num_new [B]: tokens the trees gained since the WC was last updated; reset [B]: the
    stream starts from `layout` (its initial layout; its cache holds nothing yet); revive
    [B]: clear the stream's EOS flag (it got new input); from_pending []: the new tokens are
    the decoded ones in the pending slots (their KV entries can be reused); settle [B]: the
    stream refocuses without new tokens (the rounds after input that let focus reach
    raw tokens, e.g. two expansions for a block inside an LOD2 gist).
    """
    mc, llama = plan.mc, plan.llama
    W, K, B, L = mc.w_max, mc.block_size, plan.batch_size, mc.num_levels

    def pick(new, old):
        return jnp.where(reset.reshape(reset.shape + (1,) * (new.ndim - 1)), new, old)

    wc0 = jax.tree.map(pick, layout, state.wc)
    cached_valid = state.wc.valid & ~reset[:, None]  # what cache slots [0, W) hold now

    streams = jnp.arange(B, dtype=jnp.int32)
    cond = _focus_conditioning(plan, base_params, view)  # the whole history, new tokens too

    def score(focus_params, base_params, wc, view, call):
        def fn(focus_params, base_params, wc, view, stream, cond):
            return _policy_scores(plan, focus_params, base_params, wc, view, stream, call,
                                  cond)

        return jax.vmap(fn, in_axes=(None, None, 0, 0, 0, 0))(focus_params, base_params, wc,
                                                               view, streams, cond)

    scores0 = score(focus_params, base_params, wc0, view, 0)
    wc1, append_info = jax.vmap(lambda wc, n, s: wcm.append(wc, n, mc, s))(wc0, num_new, scores0)
    scores1 = score(focus_params, base_params, wc1, view, 1)
    # Only streams with new tokens (or a fresh layout) refocus, so a stream's focus never
    # depends on its batch neighbours (e.g. one that already emitted EOS).
    active = reset | (num_new > 0) | settle
    wc1, scores1, ahead = jax.vmap(functools.partial(_collapse_ahead, plan))(wc1, scores1,
                                                                          active)
    wc2, focus_info = jax.vmap(lambda wc, s: focus.allocate(wc, s, mc))(wc1, scores1)
    wc2 = jax.tree.map(lambda new, old: jnp.where(
        active.reshape(active.shape + (1,) * (new.ndim - 1)), new, old), wc2, wc1)
    focus_info = jax.tree.map(lambda x: jnp.where(
        active.reshape(active.shape + (1,) * (x.ndim - 1)), x, jnp.zeros_like(x)), focus_info)
    emb, pos, valid = jax.vmap(lambda wc, v: wcm.materialize(wc, v, base_params, mc))(wc2, view)

    both = valid & cached_valid
    changed = (valid != cached_valid) | (both & ((wc2.level != state.wc.level)
                                                 | (wc2.node != state.wc.node)))
    first_changed = jnp.where(jnp.any(changed, -1), jnp.argmax(changed, -1), W).astype(jnp.int32)
    num_valid = wc2.num_valid
    # A stream whose only change is the append of its pending tokens (no collapse, no edit
    # before them) needs no re-prefill: their KV entries, computed over the same context at
    # the same positions, are copied from the pending slots to their WC slots.
    old_valid = state.wc.num_valid
    slots = jnp.arange(W)[None, :]
    appended = (slots >= old_valid[:, None]) & (slots < num_valid[:, None])
    as_tokens = (wc2.level == 0) & (wc2.node == state.wc.num_tokens[:, None]
                                    + slots - old_valid[:, None])
    append_only = (from_pending & ~reset & (num_new > 0) & (first_changed >= old_valid)
                   & (num_valid == old_valid + num_new)
                   & jnp.all(~appended | as_tokens, axis=1))
    cache = jax.lax.cond(jnp.any(append_only), functools.partial(_copy_pending_kv, plan),
                         lambda c, *_: c, state.cache, append_only, old_valid, num_new)
    needs = (first_changed < W) & ~append_only
    start = (jnp.min(jnp.where(needs, first_changed, W)) // K) * K  # shared by the batch
    stop = jnp.max(jnp.where(needs, num_valid, 0))
    newest = num_valid - 1

    full_valid = jnp.concatenate([valid, jnp.zeros((B, K), bool)], 1)

    def prefill_chunk(cache, s, size: int, newest_hidden, got):
        """Re-prefill slots [s, s + size), keeping the hidden state of each stream's newest
        slot when it lies there."""
        chunk = lambda x: jax.lax.dynamic_slice_in_dim(x, s, size, axis=1)  # noqa: E731
        hidden, cache = base.prefill_core(base_params, llama, cache, None, chunk(emb),
                                          chunk(pos), chunk(valid), s, return_hidden=True)
        inside = (newest >= s) & (newest < s + size)
        row = jnp.clip(newest - s, 0, size - 1)
        h = jnp.take_along_axis(hidden, row[:, None, None], axis=1)[:, 0]
        return cache, jnp.where(inside[:, None], h, newest_hidden), got | inside

    no_hidden = (jnp.zeros((B, llama.hidden_size), jnp.dtype(llama.dtype)),
                 jnp.zeros((B,), bool))
    exact_slots = jnp.where(start < stop, -(-stop // K) * K - start, 0).astype(jnp.int32)

    def exact(cache):
        """Every slot from `start` (the first change, K-aligned) through `stop`."""
        def prefill_chunks(carry, size: int, more):
            def body(carry):
                cache, s, newest_hidden, got = carry
                cache, newest_hidden, got = prefill_chunk(cache, s, size, newest_hidden, got)
                return cache, s + size, newest_hidden, got

            return jax.lax.while_loop(lambda c: more(c[1]), body, carry)

        carry = (cache.replace(valid=full_valid), start.astype(jnp.int32)) + no_hidden
        C = plan.prefill_chunk
        if C > K:  # K-slot chunks up to a multiple of C, C-slot chunks, then a K-slot tail
            stop_k = -(-stop // K) * K
            carry = prefill_chunks(carry, K, lambda s: (s < stop) & (s % C != 0))
            carry = prefill_chunks(carry, C, lambda s: s + C <= stop_k)
        cache, _, newest_hidden, got = prefill_chunks(carry, K, lambda s: s < stop)
        return cache, newest_hidden, got, exact_slots

    if plan.kv_reuse == "approx":
        src, delta = _kv_sources(plan, state.wc, cached_valid, wc2, pos, valid, from_pending)
        changed_any = (first_changed < W) | (num_new > 0) | reset
        fresh = valid & (src < 0)  # entries not in the cache anywhere: computed
        dirty = jnp.any(fresh.reshape(B, W // K, K), axis=2)  # [B, chunks]
        # the newest chunk of every changed stream, so its next token sees the new context
        dirty = dirty | (changed_any[:, None] & (jnp.arange(W // K)[None, :]
                                                 == (jnp.maximum(newest, 0) // K)[:, None]))
        dirty = jnp.any(dirty, axis=0)  # the chunk index is shared by the batch
        num_dirty = jnp.sum(dirty, dtype=jnp.int32)
        order = jnp.argsort(~dirty, stable=True).astype(jnp.int32)  # dirty chunks, in order

        def approx(_):
            moved = _moved_kv(plan, state.cache, src, delta).replace(valid=full_valid)

            def body(carry):
                cache, i, newest_hidden, got = carry
                cache, newest_hidden, got = prefill_chunk(cache, order[i] * K, K,
                                                          newest_hidden, got)
                return cache, i + 1, newest_hidden, got

            cache, _, newest_hidden, got = jax.lax.while_loop(
                lambda c: c[1] < num_dirty, body, (moved, jnp.int32(0)) + no_hidden)
            return cache, newest_hidden, got, num_dirty * K

        # exact when it recomputes no more (a fresh layout, or only pending tokens appended)
        approximate = num_dirty * K < exact_slots
        cache, newest_hidden, got, reprefilled = jax.lax.cond(
            approximate, approx, lambda _: exact(cache), None)
    else:
        cache, newest_hidden, got, reprefilled = exact(cache)
        approximate = jnp.bool_(False)
    logits = base.logits_from_hidden(base_params, llama, newest_hidden)
    next_token = jnp.where(got, jnp.argmax(logits, -1).astype(jnp.int32), state.next_token)
    new_state = StreamState(wc=wc2, cache=cache, next_token=next_token, pending=state.pending,
                            num_pending=jnp.int32(0), done=state.done & ~revive)
    # A stream that could not absorb its new tokens: the host raises CapacityError, and the
    # state it keeps (the input was donated) must be the one before this refocus.
    new_state = jax.lax.cond(jnp.any(append_info.overflow), lambda: state, lambda: new_state)

    levels = jnp.arange(L + 1)
    in_level = (wc2.level[..., None] == levels) & valid[..., None]  # [B, W, L+1]
    span = wcm.span_size(wc2.level, mc)
    slot = jnp.clip(focus_info.action_slot, 0, W - 1)
    telemetry = dict(
        num_tokens=wc2.num_tokens, num_valid=num_valid,
        level_hist=jnp.sum(in_level, axis=1, dtype=jnp.int32),
        level_tokens=jnp.sum(in_level * span[..., None], axis=1, dtype=jnp.int32),
        action_kind=focus_info.action_kind, action_slot=focus_info.action_slot,
        action_level=jnp.take_along_axis(wc1.level, slot, axis=1),
        num_expand=focus_info.num_expand, num_collapse=focus_info.num_collapse,
        append_collapses=append_info.num_collapses, append_overflow=append_info.overflow,
        headroom_collapses=ahead,
        nan_scores=focus_info.nan_scores | append_info.nan_scores,
        first_changed=first_changed, reprefill_start=start, reprefill_stop=stop,
        reprefill_slots=reprefilled, approximate=approximate,
        active=active, kv_reused=append_only)
    return new_state, telemetry


def _scatter_rows(buf, rows, start, count):
    """buf[b, start[b] + i] = rows[b, i] for i < count[b] (other rows dropped)."""
    B, R = rows.shape[:2]
    i = jnp.arange(R)[None, :]
    idx = jnp.where(i < count[:, None], start[:, None] + i, buf.shape[1])  # out of range: dropped
    return buf.at[jnp.arange(B)[:, None], idx].set(rows.astype(buf.dtype), mode="drop")


def _write_view(view: TreeView, token_rows, gist_rows, start, count, counts, key_rows=None
                ) -> TreeView:
    """Write each stream's new tree rows into the batched fixed-capacity view (retrieval
    keys, when kept, share LOD1's rows)."""
    tokens = _scatter_rows(view.tokens, token_rows, start[:, 0], count[:, 0])
    gists = tuple(_scatter_rows(g, r, start[:, l + 1], count[:, l + 1])
                  for l, (g, r) in enumerate(zip(view.gists, gist_rows)))
    keys = view.keys
    if key_rows is not None:
        keys = _scatter_rows(view.keys, key_rows, start[:, 1], count[:, 1])
    return TreeView(tokens=tokens, gists=gists, counts=counts, keys=keys)


class _Programs(NamedTuple):
    decode: Callable
    refocus: Callable
    write_view: Callable
    shardings: dict | None


def _abstract_base_params(llama: LlamaConfig):
    return jax.eval_shape(lambda k: base.init_params(llama, k), jax.random.key(0))


def _shardings(plan: _Plan, mesh: Mesh) -> dict:
    """NamedShardings of every program argument: streams on `data` (when B divides), base
    weights by `mcjax.sharding` rules, small nets and scalars replicated."""
    data = "data" if plan.batch_size % mesh.shape["data"] == 0 else None
    rep = NamedSharding(mesh, P())

    def lead(ndim):
        return NamedSharding(mesh, P(data, *([None] * (ndim - 1))))

    wc = wcm.WorkingContext(level=lead(2), node=lead(2), valid=lead(2), edit_step=lead(2),
                            edit_dir=lead(2), num_tokens=lead(1), step=lead(1))
    kv = NamedSharding(mesh, P(None, data))
    state = StreamState(wc=wc, cache=KVCache(k=kv, v=kv, valid=lead(2)), next_token=lead(1),
                        pending=lead(2), num_pending=rep, done=lead(1))
    view = TreeView(tokens=lead(2), gists=tuple(lead(3) for _ in range(plan.mc.num_levels)),
                    counts=lead(2), keys=lead(3) if plan.keeps_keys else None)
    return dict(rep=rep, lead=lead, wc=wc, state=state, view=view,
                params=sharding.param_shardings(_abstract_base_params(plan.llama), mesh))


@functools.lru_cache(maxsize=32)
def _programs(plan: _Plan, mesh: Mesh | None) -> _Programs:
    """The jitted programs of a plan (shared by every session with that plan)."""
    decode = functools.partial(_decode_block, plan)
    refocus = functools.partial(_refocus, plan)
    # A fresh wrapper per plan: jit shares its compilation cache among jits of the same
    # function object, so `compiled_programs()` would count other plans' compilations.
    write_view = functools.partial(_write_view)
    if mesh is None:
        return _Programs(jax.jit(decode, donate_argnums=1), jax.jit(refocus, donate_argnums=2),
                         jax.jit(write_view, donate_argnums=0), None)
    sh = _shardings(plan, mesh)
    rep, lead = sh["rep"], sh["lead"]
    return _Programs(
        decode=jax.jit(decode, donate_argnums=1,
                       in_shardings=(sh["params"], sh["state"], rep, rep),
                       out_shardings=(sh["state"], lead(2), rep)),
        refocus=jax.jit(refocus, donate_argnums=2,
                        in_shardings=(sh["params"], rep, sh["state"], sh["view"], lead(1),
                                      lead(1), sh["wc"], lead(1), rep, lead(1)),
                        out_shardings=(sh["state"], rep)),
        write_view=jax.jit(write_view, donate_argnums=0,
                           in_shardings=(sh["view"], lead(2), tuple(
                               lead(3) for _ in range(plan.mc.num_levels)), lead(2), lead(2),
                               lead(2), lead(3) if plan.keeps_keys else None),
                           out_shardings=sh["view"]),
        shardings=sh)


# --------------------------------------------------------------------------- telemetry


@dataclasses.dataclass(frozen=True)
class RefocusEvent:
    """What one refocus did, per stream (lists have one entry per stream).

    swap_rate: share of the WC's entries this refocus created by an edit (an expansion
    creates K, a collapse 1; budget and headroom collapses included). residency: share of
    the history's tokens resident at each LOD (index 0 = raw tokens). reprefill_slots:
    cache slots recomputed (per stream; the same K-aligned range for all, or with
    `reprefill_approximate` the K-slot chunks recomputed). timings (s):
    ingest_s (tree appends incl. GistNet), refocus_s (view upload + the jitted refocus,
    waited for), decode_s (the decode block before a "decode" refocus).
    """

    index: int  # refocus number in this session
    trigger: str  # "input" (after feed), "settle" (a round after input) or "decode"
    num_tokens: list[int]
    num_new: list[int]
    actions: list[list[tuple[str, int, int]]]  # (expand|collapse, slot, level before)
    num_expand: list[int]
    num_collapse: list[int]
    append_collapses: list[int]  # budget collapses while appending
    headroom_collapses: list[int]  # collapses ahead of need (see `_collapse_ahead`)
    swap_rate: list[float]
    lod_histogram: list[list[int]]
    budget_use: list[float]
    residency: list[list[float]]
    first_changed_slot: list[int]
    kv_reused: list[bool]  # only the pending tokens were appended: their KV was copied
    reprefill_start: int
    reprefill_slots: int
    reprefill_approximate: bool  # kv_reuse="approx" kept moved entries instead (see Session)
    nan_scores: list[bool]
    timings: dict[str, float]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _event_from(index: int, trigger: str, num_new, t: dict, mc, timings: dict) -> RefocusEvent:
    K, W = mc.block_size, mc.w_max
    kinds = {focus.ACT_EXPAND: "expand", focus.ACT_COLLAPSE: "collapse"}
    num_valid = t["num_valid"].astype(np.int64)
    created = (K * t["num_expand"] + t["num_collapse"] + t["append_collapses"]
               + t["headroom_collapses"])
    start, slots = int(t["reprefill_start"]), int(t["reprefill_slots"])
    approximate = bool(t["approximate"])
    tokens = np.maximum(t["num_tokens"], 1)
    return RefocusEvent(
        index=index, trigger=trigger,
        num_tokens=[int(x) for x in t["num_tokens"]], num_new=[int(x) for x in num_new],
        actions=[[(kinds[int(k)], int(s), int(l))
                  for k, s, l in zip(t["action_kind"][b], t["action_slot"][b],
                                     t["action_level"][b]) if int(k) in kinds]
                 for b in range(len(num_valid))],
        num_expand=[int(x) for x in t["num_expand"]],
        num_collapse=[int(x) for x in t["num_collapse"]],
        append_collapses=[int(x) for x in t["append_collapses"]],
        headroom_collapses=[int(x) for x in t["headroom_collapses"]],
        swap_rate=[float(c / max(n, 1)) for c, n in zip(created, num_valid)],
        lod_histogram=t["level_hist"].astype(int).tolist(),
        budget_use=[float(n / W) for n in num_valid],
        residency=(t["level_tokens"] / tokens[:, None]).round(6).tolist(),
        first_changed_slot=[int(x) for x in t["first_changed"]],
        kv_reused=[bool(x) for x in t["kv_reused"]],
        reprefill_start=start if slots and not approximate else W, reprefill_slots=slots,
        reprefill_approximate=approximate,
        nan_scores=[bool(x) for x in t["nan_scores"]], timings=timings)


class CompileCounter:
    """Counts XLA compilations in this process while active: `with CompileCounter() as c:`.

    Listens to JAX's backend-compile monitoring event, so it sees every compilation — of
    jitted functions and of eager ops alike. `c.names` lists what compiled.
    """

    _EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        self.count = 0
        self.names: list[str] = []

    def _listener(self, event: str, duration: float, **kwargs) -> None:
        if event == self._EVENT:
            self.count += 1
            self.names.append(str(kwargs.get("fun_name", "?")))

    def __enter__(self) -> "CompileCounter":
        jax.monitoring.register_event_duration_secs_listener(self._listener)
        return self

    def __exit__(self, *exc) -> None:
        jax.monitoring.unregister_event_duration_listener(self._listener)


# --------------------------------------------------------------------------- checkpoints


# --------------------------------------------------------------------------- persistence

_SAVE_FORMAT = "mcjax-session"
SAVE_VERSION = 1


def _keyed_leaves(tree) -> tuple[dict[str, np.ndarray], Any]:
    """({keystr path: host array} of a pytree's leaves, its treedef)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}, treedef


def _write_arrays(path: Path, arrays: dict[str, np.ndarray]) -> dict:
    """Arrays as raw bytes in one .npz (bit-exact for every dtype, bfloat16 included);
    returns the manifest (name -> dtype, shape) that `_read_arrays` needs."""
    manifest, raw = {}, {}
    for i, (name, a) in enumerate(arrays.items()):
        a = np.asarray(a, order="C")  # (ascontiguousarray makes a 0-d array 1-d)
        manifest[name] = {"key": f"a{i}", "dtype": str(a.dtype), "shape": list(a.shape)}
        raw[f"a{i}"] = a.reshape(-1).view(np.uint8)
    with open(path, "wb") as f:
        np.savez(f, **raw)
        f.flush()
        os.fsync(f.fileno())
    return manifest


def _read_arrays(path: Path, manifest: dict) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {name: data[m["key"]].view(jnp.dtype(m["dtype"])).reshape(tuple(m["shape"]))
                for name, m in manifest.items()}


def _write_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- session


@functools.partial(jax.jit, static_argnames=("config",))
def _cache_logprobs(params, cache: KVCache, tokens, positions, mask, index, *,
                    config: LlamaConfig):
    """log p(tokens[:, i + 1] | context, tokens[:, :i + 1]) [B, T - 1] with the tokens
    written after `index` slots of `cache` (not donated: the caller's cache is unchanged)."""
    hidden, _ = base.prefill_core(params, config, cache, tokens, None, positions, mask, index,
                                  return_hidden=True)
    logits = base.logits_from_hidden(params, config, hidden[:, :-1]).astype(jnp.float32)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), tokens[:, 1:, None], -1)[..., 0]
    return jnp.where(mask[:, 1:], logp, 0.0)


def _bucket(n: int, minimum: int) -> int:
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


class Session:
    """A batch of MegaContext streams over one frozen base model (module docstring).

    base: a `BaseModel` (gives text encoding) or `(LlamaConfig, params)`. gist_params /
    lens_params: trained params, or None: the shipped params when they fit `cfg`
    (`mcjax.assets.shipped_gist` / `shipped_lens`, provenance "shipped"), else — and with
    `untrained=True` always — the untrained networks the trainers start from
    (`self.untrained` names them). cfg: the experiment config (`mc`, `gist`, `lens`).
    max_tokens: per-stream history capacity (fixes the device view's shapes).
    collapse_headroom: slots freed at once when the next block would not fit (default
    w_max/8 in whole blocks; 0 = collapse only as needed): trades up to that much budget
    for re-prefilling only the new tokens on most refocuses (see `_collapse_ahead`).
    prefill_chunk: slots per bulk re-prefill chunk (default: the largest K·2^i <= 256 that
    divides w_max); bigger chunks use the hardware better, K-slot chunks trim the ends.
    focus_policy: where refocus scores come from — "lens" (LensNet, the default; LensNet v2,
    `cfg.lens.query_tokens` / `retrieval_features`, also reads the newest tokens and, with
    retrieval features, makes the trees keep read-pass keys, and settles like
    "retrieval"), or the
    baselines "random" (uniform scores, deterministic given `focus_seed`, new ones every
    refocus) and "recency" (newer spans toward expand, older toward collapse); both are
    legality-masked like LensNet's and go through the same allocator and budget logic; or
    "retrieval" (training-free and query-aware, `mcjax.retrieval`: the trees also keep
    read-pass keys per block, the newest tokens' queries score them, and new input is
    followed by up to `cfg.retrieval.settle_rounds` extra refocuses while focus still moves).
    kv_reuse: "exact" (the default) re-prefills every slot from a refocus's first change on,
    so the cache equals a fresh prefill of the WC. "approx" keeps the cache entries of the
    slots whose entry did not change — moved to their new slot, keys re-rotated to their new
    position — and recomputes only the K-slot chunks holding new entries (an expansion's
    tokens, a collapse's gist, fed tokens) plus each changed stream's newest chunk; kept
    entries were computed over the old context, so the cache only approximates the WC's
    (CacheBlend, arXiv 2405.16444). It falls back to exact when that recomputes no more.
    `results/kv_reuse/` measures its cost in NLL and its speed.
    """

    def __init__(self, base_model, gist_params, lens_params, cfg: ExperimentConfig, *,
                 batch_size: int = 1, max_tokens: int = DEFAULT_MAX_TOKENS,
                 mesh: Mesh | None = None, debug_invariants: bool = False,
                 collapse_headroom: int | None = None, prefill_chunk: int | None = None,
                 gist_batch: int | None = None, pad_id: int = 0,
                 on_event: Callable[[RefocusEvent], None] | None = None,
                 max_events: int = 100_000, provenance: dict | None = None,
                 focus_policy: str = "lens", focus_seed: int = 0, untrained: bool = False,
                 kv_reuse: str = "exact"):
        if focus_policy not in FOCUS_POLICIES:
            raise ConfigError(f"focus_policy must be one of {FOCUS_POLICIES}, got "
                              f"{focus_policy!r}")
        if kv_reuse not in KV_REUSE:
            raise ConfigError(f"kv_reuse must be one of {KV_REUSE}, got {kv_reuse!r}")
        if hasattr(base_model, "config") and hasattr(base_model, "params"):
            llama, params = base_model.config, base_model.params
            self._encode = getattr(base_model, "encode", None)
            self.decode_text = getattr(base_model, "decode", None)
        else:
            try:
                llama, params = base_model
            except (TypeError, ValueError):
                raise TypeError("base must be a BaseModel or a (LlamaConfig, params) pair"
                                ) from None
            self._encode, self.decode_text = None, None
        if not isinstance(llama, LlamaConfig):
            raise TypeError(f"base config must be a LlamaConfig, got {type(llama).__name__}")
        if not isinstance(cfg, ExperimentConfig):
            raise TypeError(f"cfg must be an ExperimentConfig, got {type(cfg).__name__}")
        if cfg.base_config is None:
            cfg = dataclasses.replace(cfg, base_config=llama)
        elif _arch_without_dtype(dataclasses.asdict(cfg.base_config)) != \
                _arch_without_dtype(dataclasses.asdict(llama)):
            raise ConfigError(f"config {cfg.name!r} describes a different base model "
                              f"({cfg.base_config}) than the one given ({llama})")
        mc = cfg.mc
        K = mc.block_size
        if mc.w_max % K:
            raise ConfigError(f"w_max ({mc.w_max}) must be a multiple of the block size K "
                              f"({K}): the working context is re-prefilled in chunks of K "
                              f"slots and K tokens are decoded between refocuses")
        if int(batch_size) < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if int(max_tokens) < mc.w_max:
            raise ConfigError(f"max_tokens ({max_tokens}) must be >= w_max ({mc.w_max})")
        if not 0 <= pad_id < llama.vocab_size:
            raise ConfigError(f"pad_id {pad_id} is outside the vocabulary")
        wcm.check_config(mc)  # w_max holds the sink, the protected tail and a gist
        if collapse_headroom is None:  # default: an eighth of the budget, whole blocks
            collapse_headroom = (mc.w_max // 8) // K * K
        most = mc.w_max - mc.recent_protect - K - wcm.sink_tokens(mc)
        if not 0 <= collapse_headroom <= most:
            raise ConfigError(f"collapse_headroom must lie in [0, w_max - recent_protect - K - "
                              f"sink_blocks*K] = [0, {most}], got {collapse_headroom}")
        if prefill_chunk is None:  # default: the largest K·2^i <= 256 that divides w_max
            prefill_chunk = K
            while prefill_chunk * 2 <= max(256, K) and mc.w_max % (prefill_chunk * 2) == 0:
                prefill_chunk *= 2
        if prefill_chunk % K or mc.w_max % prefill_chunk or prefill_chunk <= 0:
            raise ConfigError(f"prefill_chunk ({prefill_chunk}) must be a positive multiple of "
                              f"K ({K}) that divides w_max ({mc.w_max})")
        self.cfg, self.mc, self.llama = cfg, mc, llama
        self.batch_size, self.max_tokens = int(batch_size), int(max_tokens)
        self.debug_invariants = debug_invariants
        self.mesh = mesh
        self.on_event = on_event
        self.events: collections.deque[RefocusEvent] = collections.deque(maxlen=max_events)
        self.provenance = dict(provenance or {})

        gist_params, lens_params, resolved = default_params(
            cfg, gist_params, lens_params, params, untrained=untrained,
            focus_policy=focus_policy)
        self.provenance.update(resolved)
        for part in ("gist", "lens"):
            self.provenance.setdefault(part, {"source": "given"})
        self.focus_policy, self.focus_seed = focus_policy, int(focus_seed)
        self.provenance["focus_policy"] = (
            {"policy": focus_policy} if focus_policy == "lens"
            else {"policy": focus_policy, "seed": self.focus_seed, "lens": "not used"})
        # Which networks are untrained (their gists / focus decisions mean nothing yet); an
        # untrained LensNet does not count when a baseline policy replaces its scores.
        self.untrained: tuple[str, ...] = tuple(
            p for p in ("gist", "lens") if self.provenance[p]["source"] == "untrained"
            and (p == "gist" or focus_policy == "lens"))
        check_params(gist_params, cfg, "gist", exc=ValueError)
        check_params(lens_params, cfg, "lens", exc=ValueError)

        self._plan = _Plan(llama=llama, mc=mc, lens=cfg.lens, batch_size=self.batch_size,
                           max_tokens=self.max_tokens, pad_id=int(pad_id),
                           headroom=int(collapse_headroom),
                           prefill_chunk=int(prefill_chunk), focus_policy=focus_policy,
                           retrieval=cfg.retrieval if focus_policy in ("retrieval", "lens")
                           else None, kv_reuse=kv_reuse)
        self._programs = _programs(self._plan, mesh)
        sh = self._programs.shardings
        resolved_lens = lens_params
        # What the refocus program's `focus_params` are: LensNet's params for "lens", the
        # seed for "random" (its key), unused by "recency" and "retrieval".
        if focus_policy == "random":
            lens_params = np.uint32(self.focus_seed % (1 << 32))
        if sh is None:
            self._params = jax.device_put(params)
            self._focus_params = jax.device_put(lens_params)
        else:
            self._params = jax.device_put(params, sh["params"])
            self._focus_params = jax.device_put(lens_params, sh["rep"])
        self._gister = BlockGister.from_base(cfg.gist, gist_params, self._params, llama,
                                             block_size=K, gist_batch=gist_batch)
        self._key_reader = None
        if self._plan.keeps_keys:
            from mcjax.retrieval import BlockKeyReader

            if max(cfg.retrieval.layers) >= llama.num_layers:
                raise ConfigError(f"retrieval.layers {cfg.retrieval.layers} exceed the base "
                                  f"model's {llama.num_layers} layers")
            self._key_reader = BlockKeyReader.from_base(cfg.retrieval, self._params, llama, K)
        if focus_policy == "lens" and cfg.lens.query_tokens \
                and cfg.lens.query_layer > llama.num_layers:
            raise ConfigError(f"lens.query_layer {cfg.lens.query_layer} exceeds the base "
                              f"model's {llama.num_layers} layers")
        self._trees = [MegaContextTree.in_memory(mc, self._gister,
                                                 view_capacity_tokens=self.max_tokens,
                                                 key_reader=self._key_reader)
                       for _ in range(self.batch_size)]
        self._gist_dtype = np.dtype(jnp.dtype(mc.gist_dtype))
        self._state = self._put(self._initial_state(), "state")
        self._view = self._put(self._empty_view(), "view")
        self._empty_layout = self._put(self._layouts(np.zeros(self.batch_size, bool)), "wc")
        self._no_streams = np.zeros(self.batch_size, bool)
        L = mc.num_levels
        self._view_synced = np.zeros((self.batch_size, L + 1), np.int64)
        self._unsynced = np.zeros(self.batch_size, np.int64)  # tree tokens not yet in the WC
        self._laid_out = np.zeros(self.batch_size, bool)
        self._num_pending = 0  # host mirror of state.num_pending
        self._num_refocus = 0
        self._ingest_s = 0.0  # tree ingest time since the last refocus (feed side)
        # what `save` writes so that `load` rebuilds this session
        self._nets = {"gist": gist_params, "lens": resolved_lens}
        self._settings = dict(batch_size=self.batch_size, max_tokens=self.max_tokens,
                              collapse_headroom=self._plan.headroom,
                              prefill_chunk=self._plan.prefill_chunk, gist_batch=gist_batch,
                              pad_id=int(pad_id), max_events=int(max_events),
                              focus_policy=focus_policy, focus_seed=self.focus_seed,
                              kv_reuse=kv_reuse)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_checkpoints(cls, base_model, cfg: ExperimentConfig, *,
                         gist_checkpoint: str | os.PathLike | None = None,
                         lens_checkpoint: str | os.PathLike | None = None, **kwargs
                         ) -> "Session":
        """A session with GistNet / LensNet from training workdirs (None: the shipped
        GistNet when it fits `cfg`, else untrained; `untrained=True`: untrained).

        Without `gist_checkpoint`, a LensNet checkpoint's own GistNet is used when it has
        one (a `train_joint` run) or names one that exists (a `train_lens` run trained on a
        GistNet checkpoint), so that LensNet sees the gists it was trained on.
        """
        llama = base_model.config if hasattr(base_model, "config") else base_model[0]
        if cfg.base_config is None:
            cfg = dataclasses.replace(cfg, base_config=llama)
        provenance: dict = {}
        gist = lens_params = None
        if lens_checkpoint is not None:
            lens_params, provenance["lens"] = load_trained_params(lens_checkpoint, cfg, "lens")
        if gist_checkpoint is not None:
            gist, provenance["gist"] = load_trained_params(gist_checkpoint, cfg, "gist")
        elif lens_checkpoint is not None:
            source = provenance["lens"].get("gistnet") or {}
            if provenance["lens"].get("run") == "train_joint":
                gist, provenance["gist"] = load_trained_params(lens_checkpoint, cfg, "gist")
            elif source.get("source") == "checkpoint" and Path(source.get("path", "")).is_dir():
                gist, provenance["gist"] = load_trained_params(source["path"], cfg, "gist")
                provenance["gist"]["chosen_by"] = "the LensNet checkpoint's GistNet"
            elif source.get("source") == "untrained" and "seed" in source:
                # LensNet was trained on the untrained GistNet of that seed: use the same one
                seeded = dataclasses.replace(cfg, train=dataclasses.replace(
                    cfg.train, seed=int(source["seed"])))
                gist = untrained_params(seeded, "gist", (
                    base_model.params if hasattr(base_model, "params") else base_model[1]))
                provenance["gist"] = {"source": "untrained", "seed": int(source["seed"]),
                                      "chosen_by": "the LensNet checkpoint's GistNet"}
        return cls(base_model, gist, lens_params, cfg, provenance=provenance, **kwargs)

    def _put(self, tree, kind: str):
        sh = self._programs.shardings
        return jax.device_put(tree) if sh is None else jax.device_put(tree, sh[kind])

    def _initial_state(self) -> StreamState:
        B, W, K, c = self.batch_size, self.mc.w_max, self.mc.block_size, self.llama
        kv_shape = (c.num_layers, B, W + K, c.num_kv_heads, c.head_dim)
        dt = np.dtype(jnp.dtype(c.dtype))
        return StreamState(
            wc=self._layouts(np.zeros(B, bool)),
            cache=KVCache(k=np.zeros(kv_shape, dt), v=np.zeros(kv_shape, dt),
                          valid=np.zeros((B, W + K), bool)),
            next_token=np.full((B,), self._plan.pad_id, np.int32),
            pending=np.full((B, K), self._plan.pad_id, np.int32),
            num_pending=np.int32(0), done=np.zeros((B,), bool))

    def _empty_view(self) -> TreeView:
        B, D = self.batch_size, self.llama.hidden_size
        return TreeView(
            tokens=np.zeros((B, self._plan.view_rows(0)), np.int32),
            gists=tuple(np.zeros((B, self._plan.view_rows(l), D), self._gist_dtype)
                        for l in range(1, self.mc.num_levels + 1)),
            counts=np.zeros((B, self.mc.num_levels + 1), np.int32),
            keys=None if self._key_reader is None else np.zeros(
                (B, self._plan.view_rows(1), self._key_reader.width), self._key_reader.dtype))

    def _layouts(self, reset: np.ndarray) -> wcm.WorkingContext:
        """Batched host WC: the initial layout of each reset stream's history, else empty."""
        B, W = self.batch_size, self.mc.w_max
        arrays = {k: np.zeros((B, W), np.int32) for k in ("level", "node", "edit_step",
                                                          "edit_dir")}
        valid = np.zeros((B, W), bool)
        num_tokens, step = np.zeros((B,), np.int32), np.zeros((B,), np.int32)
        for b in np.flatnonzero(reset):
            wc = jax.device_get(wcm.initial_layout(self._trees[b].num_tokens, self.mc))
            for k in arrays:
                arrays[k][b] = getattr(wc, k)
            valid[b], num_tokens[b], step[b] = wc.valid, wc.num_tokens, wc.step
        return wcm.WorkingContext(valid=valid, num_tokens=num_tokens, step=step, **arrays)

    # ------------------------------------------------------------------ input

    @property
    def num_tokens(self) -> np.ndarray:
        """[B] history length of each stream (fed and generated tokens)."""
        pending = self._pending_tokens() if self._num_pending else [[]] * self.batch_size
        return np.asarray([t.num_tokens + len(p) for t, p in zip(self._trees, pending)])

    def tree(self, stream: int = 0) -> MegaContextTree:
        return self._trees[stream]

    def _token_lists(self, inputs) -> list[np.ndarray]:
        B, V = self.batch_size, self.llama.vocab_size

        def one(x) -> np.ndarray:
            if isinstance(x, str):
                if self._encode is None:
                    raise InputError("text input needs a tokenizer: build the Session from a "
                                     "BaseModel, or feed token ids")
                x = self._encode(x)
            arr = np.asarray(x)
            if arr.size == 0:
                return np.zeros((0,), np.int64)
            if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
                raise InputError(f"a stream's input must be text or a 1-D sequence of integer "
                                 f"token ids, got shape {arr.shape} dtype {arr.dtype}")
            if arr.min() < 0 or arr.max() >= V:
                bad = int(arr.max()) if arr.max() >= V else int(arr.min())
                raise InputError(f"token id {bad} is outside the vocabulary [0, {V})")
            return arr.astype(np.int64)

        per_stream = (isinstance(inputs, (list, tuple)) and len(inputs) > 0
                      and all(isinstance(x, str) or np.ndim(x) >= 1 for x in inputs))
        if not per_stream and not isinstance(inputs, str) and np.ndim(inputs) == 2:
            inputs, per_stream = list(np.asarray(inputs)), True
        if per_stream:
            if len(inputs) != B:
                raise InputError(f"got inputs for {len(inputs)} streams, this session has {B}")
            return [one(x) for x in inputs]
        if B != 1:
            raise InputError(f"this session has {B} streams: pass one input per stream (a "
                             f"list of {B} texts or token sequences)")
        return [one(inputs)]

    def _pending_tokens(self) -> list[np.ndarray]:
        """Per stream: the decoded tokens in pending slots (not yet in the trees)."""
        p, W = self._num_pending, self.mc.w_max
        tokens = np.asarray(self._state.pending)[:, :p]
        valid = np.asarray(self._state.cache.valid)[:, W:W + p]
        return [tokens[b][valid[b]].astype(np.int64) for b in range(self.batch_size)]

    def _check_room(self, extra: Sequence[int]) -> None:
        for b, (tree, n) in enumerate(zip(self._trees, extra)):
            total = tree.num_tokens + int(n)
            if total > self.max_tokens:
                raise wcm.CapacityError(
                    f"stream {b}: history would reach {total} tokens, more than this "
                    f"session's max_tokens={self.max_tokens} (the fixed capacity of its device "
                    f"tree view); create the Session with a larger max_tokens")
            wcm.check_capacity(total, self.mc)

    def feed(self, inputs) -> None:
        """Append input to the streams: text or token ids (one stream), or a list of B of
        them (an empty entry leaves that stream unchanged). Any length works — far beyond
        w_max too. The trees ingest it now; the WC and cache follow at the next
        `generate`/`sync`. Tokens decoded since the last refocus are kept in the history —
        for every stream, as the pending slots are shared: a feed to some streams also
        refocuses the others if they have pending tokens."""
        ids = self._token_lists(inputs)
        if sum(len(x) for x in ids) == 0:
            raise InputError("feed: empty input (no tokens for any stream)")
        self._ingest(ids)

    def _ingest(self, ids: list[np.ndarray]) -> None:
        """Append the pending decoded tokens, then `ids`, to each stream's tree."""
        t0 = time.perf_counter()
        pending = self._pending_tokens() if self._num_pending else \
            [np.zeros((0,), np.int64)] * self.batch_size
        new = [np.concatenate([p, x]) for p, x in zip(pending, ids)]
        self._check_room([len(x) for x in new])
        for tree, tokens in zip(self._trees, new):
            if len(tokens):
                tree.append(tokens)
        self._unsynced += np.asarray([len(x) for x in new])
        self._num_pending = 0  # now in the trees; the next refocus clears the slots
        self._ingest_s += time.perf_counter() - t0

    def flush(self) -> None:
        """Bring the WC up to date with the whole history, including the tokens decoded
        since the last refocus (one refocus). Unlike `sync`, this changes when later
        refocuses happen, so call it between turns, not between pieces of one generation."""
        if self._num_pending:
            self._ingest([np.zeros((0,), np.int64)] * self.batch_size)
        self.sync()

    def sync(self) -> None:
        """Bring every WC and the cache up to date with the trees (one refocus)."""
        if not self._unsynced.any():
            return
        counts = np.asarray([t.num_tokens for t in self._trees])
        reset = ~self._laid_out & (counts > 0)
        num_new = np.where(reset, 0, self._unsynced)
        layout = self._put(self._layouts(reset), "wc") if reset.any() else self._empty_layout
        self._laid_out |= reset
        self._unsynced[:] = 0
        timings, self._ingest_s = {"ingest_s": self._ingest_s}, 0.0
        event = self._refocus(num_new, reset, layout, revive=(num_new > 0) | reset,
                              trigger="input", timings=timings)
        self._settle((num_new > 0) | reset, event)

    # ------------------------------------------------------------------ refocus

    def _upload_view(self) -> None:
        counts = np.asarray([t.counts for t in self._trees], np.int64)
        new = counts - self._view_synced
        if not new.any():
            return
        B, D, K = self.batch_size, self.llama.hidden_size, self.mc.block_size
        token_rows = np.zeros((B, _bucket(new[:, 0].max(), K)), np.int32)
        gist_rows = [np.zeros((B, _bucket(new[:, l].max(), _MIN_GIST_ROWS), D),
                              self._gist_dtype) for l in range(1, self.mc.num_levels + 1)]
        key_rows = None
        if self._key_reader is not None:
            key_rows = np.zeros((B, gist_rows[0].shape[1], self._key_reader.width),
                                self._key_reader.dtype)
        for b, tree in enumerate(self._trees):
            lo, hi = self._view_synced[b], counts[b]
            token_rows[b, :new[b, 0]] = tree.tokens(lo[0], hi[0])
            for l in range(1, self.mc.num_levels + 1):
                gist_rows[l - 1][b, :new[b, l]] = tree.gists(l, lo[l], hi[l])
            if key_rows is not None:
                key_rows[b, :new[b, 1]] = tree.keys(lo[1], hi[1])
        self._view = self._programs.write_view(
            self._view, token_rows, tuple(gist_rows), self._view_synced.astype(np.int32),
            new.astype(np.int32), counts.astype(np.int32), key_rows)
        self._view_synced = counts

    def _refocus(self, num_new, reset, layout, *, revive, trigger: str, timings: dict,
                 settle=None) -> RefocusEvent:
        t0 = time.perf_counter()
        self._upload_view()
        settle = self._no_streams if settle is None else np.asarray(settle, bool)
        self._state, telemetry = self._programs.refocus(
            self._params, self._focus_params, self._state, self._view,
            np.asarray(num_new, np.int32), np.asarray(reset, bool), layout,
            np.asarray(revive, bool), np.bool_(trigger == "decode"), settle)
        telemetry = jax.device_get(telemetry)  # waits for the refocus
        timings = dict(timings, refocus_s=time.perf_counter() - t0)
        if telemetry["append_overflow"].any():
            b = int(np.argmax(telemetry["append_overflow"]))
            raise wcm.CapacityError(f"stream {b}: the working context could not absorb "
                                    f"{int(num_new[b])} new tokens: "
                                    + wcm.capacity_message(self._trees[b].num_tokens, self.mc))
        event = _event_from(self._num_refocus, trigger, num_new, telemetry, self.mc, timings)
        self._num_refocus += 1
        self.events.append(event)
        if self.on_event is not None:
            self.on_event(event)
        if self.debug_invariants:
            self._check()
        return event

    def _settle(self, streams: np.ndarray, event: RefocusEvent) -> None:
        """After new input: refocus `streams` again without new tokens while the last round
        acted, at most `retrieval.settle_rounds` times (retrieval focus; SPEC §2.6), so a
        block inside an LOD2 gist can reach raw tokens before the answer starts."""
        rounds = self.cfg.retrieval.settle_rounds if self._plan.query_aware else 0
        zeros = np.zeros(self.batch_size, np.int32)
        for _ in range(rounds):
            acted = np.asarray([e + c > 0 for e, c in zip(event.num_expand, event.num_collapse)])
            streams = streams & acted
            if not streams.any():
                return
            event = self._refocus(zeros, self._no_streams, self._empty_layout,
                                  revive=self._no_streams, trigger="settle", timings={},
                                  settle=streams)

    def _refocus_pending(self, timings: dict) -> None:
        """K tokens decoded: ingest them into the trees and refocus."""
        t0 = time.perf_counter()
        new = self._pending_tokens()
        for tree, tokens in zip(self._trees, new):
            if len(tokens):
                tree.append(tokens)
        timings = dict(timings, ingest_s=time.perf_counter() - t0)
        self._num_pending = 0
        self._refocus(np.asarray([len(x) for x in new]), self._no_streams, self._empty_layout,
                      revive=self._no_streams, trigger="decode", timings=timings)

    def check(self, atol: float = 2e-3) -> None:
        """Check every WC invariant against the trees, and that the cache holds exactly the
        WC and the pending tokens: its keys/values equal (to `atol`, relative to their
        scale) a fresh prefill of the materialized WC followed by the pending tokens, and the
        next token is that reference's greedy prediction (raises
        `working_context.InvariantError`). Costs one prefill of every stream's WC. With
        `kv_reuse="approx"` the cache only approximates that prefill by design, so only the
        invariants and the cache's validity are checked."""
        emb, pos, valid = self.materialized()  # syncs
        self._check()
        if self._plan.kv_reuse == "approx":
            return
        W, K, p = self.mc.w_max, self.mc.block_size, self._num_pending
        state = self._state
        ref = base.init_cache(self.llama, self.batch_size, W + K)
        hidden, ref = base.prefill(self._params, self.llama, ref, embeds=emb, positions=pos,
                                   mask=valid, index=0, return_hidden=True)
        newest = np.asarray(state.wc.num_valid) - 1
        last = np.asarray(hidden)[np.arange(self.batch_size), np.maximum(newest, 0)]
        if p:
            live = np.asarray(state.cache.valid)[:, W:W + p]
            first = np.asarray(_pending_base_position(self._plan, state.wc))
            hidden, ref = base.prefill(
                self._params, self.llama, ref, tokens=np.asarray(state.pending)[:, :p],
                positions=first[:, None] + np.arange(p)[None], mask=live, index=W,
                return_hidden=True)
            last = np.where(live[:, -1:], np.asarray(hidden)[:, -1], last)
        slots = np.concatenate([np.asarray(valid), np.asarray(state.cache.valid)[:, W:]], 1)
        for name, got, want in (("keys", state.cache.k, ref.k), ("values", state.cache.v, ref.v)):
            got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
            m = slots[None, :, :, None, None]
            err = np.max(np.abs(np.where(m, got - want, 0.0)))
            scale = max(1.0, float(np.max(np.abs(np.where(m, want, 0.0)))))
            if err > atol * scale:
                raise wcm.InvariantError(f"cached {name} differ from a fresh prefill of the "
                                         f"working context by {err:.3g} (scale {scale:.3g})")
        logits = base.logits_from_hidden(self._params, self.llama, jnp.asarray(last))
        want_next = np.asarray(jnp.argmax(logits, -1))
        has = (newest >= 0) & ~np.asarray(state.done)
        if (np.asarray(state.next_token)[has] != want_next[has]).any():
            raise wcm.InvariantError("next_token is not the greedy prediction of a fresh "
                                     "prefill of the working context")

    def materialized(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(slot embeddings [B, W, D], positions [B, W], validity [B, W]) of every stream's
        working context, from the session's own device view of the trees, after bringing
        the WCs up to date (`sync`): what the cache's first W slots were prefilled from."""
        self.sync()
        return jax.vmap(lambda wc, v: wcm.materialize(wc, v, self._params, self.mc))(
            self._state.wc, self._view)

    def _check(self) -> None:
        wc = jax.device_get(self._state.wc)
        counts = np.asarray([t.counts for t in self._trees])
        wcm.check_invariants(wc, counts, self.mc)
        W, p = self.mc.w_max, self._num_pending
        cache_valid = np.asarray(self._state.cache.valid)
        if not (cache_valid[:, :W] == wc.valid).all():
            raise wcm.InvariantError("cache validity differs from the working context's")
        if cache_valid[:, W + p:].any():
            raise wcm.InvariantError("cache slots past the pending tokens are valid")

    # ------------------------------------------------------------------ persistence

    def save(self, directory: str | os.PathLike) -> Path:
        """Persist the session under `directory` so that `Session.load` continues it
        bit-identically (same next tokens, same WCs): every stream's tree through the
        on-disk store, the whole `StreamState` (WC, KV cache, pending tokens, flags), the
        host-side counters, the config, the settings and the GistNet / LensNet params.
        Telemetry (`events`) is not saved.

        Crash-safe: a save is written into a fresh `save-N` directory, made durable, and
        only then published by atomically replacing the `LATEST` pointer; older saves are
        removed after. A process killed at any point (SIGKILL included) leaves the previous
        save loadable. Returns the published save's directory."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        numbers = [int(p.name[5:]) for p in directory.glob("save-*") if p.name[5:].isdigit()]
        n = max(numbers, default=0) + 1
        tmp = directory / f".incomplete-save-{n}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        for b, tree in enumerate(self._trees):
            # (no model_name: the header holds 32 bytes; session.json names the base)
            dst = MegaContextTree.create(tmp / f"tree-{b}", self.mc, self._gister,
                                         key_reader=self._key_reader)
            try:
                copy_rows(tree, dst)
            finally:
                dst.close()
        arrays = {"state/" + k: v for k, v in _keyed_leaves(self._state)[0].items()}
        for part, params in self._nets.items():
            arrays.update({f"{part}/{k}": v for k, v in flatten_params(params).items()})
        manifest = _write_arrays(tmp / "arrays.npz", arrays)
        meta = {
            "format": _SAVE_FORMAT, "format_version": SAVE_VERSION,
            "config": config_to_json(self.cfg), "settings": self._settings,
            "provenance": self.provenance, "arrays": manifest,
            "host": {"unsynced": self._unsynced.tolist(), "laid_out": self._laid_out.tolist(),
                     "num_pending": int(self._num_pending),
                     "num_refocus": int(self._num_refocus)},
        }
        _write_durably(tmp / "session.json", json.dumps(meta, indent=2).encode())
        _fsync_dir(tmp)
        final = directory / f"save-{n}"
        os.rename(tmp, final)
        _fsync_dir(directory)
        _write_durably(directory / "LATEST.tmp", final.name.encode())
        os.replace(directory / "LATEST.tmp", directory / "LATEST")  # the publication
        _fsync_dir(directory)
        for old in directory.iterdir():  # earlier saves and leftovers of killed ones
            if old.name != final.name and (old.name.startswith("save-")
                                           or old.name.startswith(".incomplete-save-")):
                shutil.rmtree(old, ignore_errors=True)
        return final

    @classmethod
    def load(cls, directory: str | os.PathLike, base_model, *, mesh: Mesh | None = None,
             debug_invariants: bool = False,
             on_event: Callable[[RefocusEvent], None] | None = None) -> "Session":
        """The session `save(directory)` published last, over `base_model` (the same base
        model it ran with: its architecture is checked against the saved config)."""
        directory = Path(directory)
        pointer = directory / "LATEST"
        if not pointer.exists():
            raise CheckpointError(f"{directory} holds no saved session (no LATEST)")
        where = directory / pointer.read_text().strip()
        try:
            meta = json.loads((where / "session.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{where}: unreadable session save: {e}") from e
        if meta.get("format") != _SAVE_FORMAT or meta.get("format_version") != SAVE_VERSION:
            raise CheckpointError(
                f"{where}: not a session save of format {_SAVE_FORMAT!r} version "
                f"{SAVE_VERSION} (found {meta.get('format')!r} version "
                f"{meta.get('format_version')!r})")
        cfg = config_from_json(meta["config"])
        arrays = _read_arrays(where / "arrays.npz", meta["arrays"])
        nets = {part: jax.tree.map(jnp.asarray, unflatten_params(
            {k[len(part) + 1:]: v for k, v in arrays.items() if k.startswith(part + "/")},
            str(where))) for part in ("gist", "lens")}
        session = cls(base_model, nets["gist"], nets["lens"], cfg, mesh=mesh,
                      debug_invariants=debug_invariants, on_event=on_event,
                      provenance=meta.get("provenance"), **meta["settings"])
        for b, tree in enumerate(session._trees):
            src = MegaContextTree.open(where / f"tree-{b}", session.mc, session._gister,
                                       key_reader=session._key_reader)
            try:
                copy_rows(src, tree)
            finally:
                src.close()
        template, treedef = _keyed_leaves(session._state)
        saved = {k[len("state/"):]: v for k, v in arrays.items() if k.startswith("state/")}
        if set(saved) != set(template) or any(
                saved[k].shape != template[k].shape or saved[k].dtype != template[k].dtype
                for k in template):
            raise CheckpointError(f"{where}: the saved state does not fit this session's "
                                  f"state (another version or base model)")
        state = jax.tree_util.tree_unflatten(treedef, [saved[k] for k in template])
        session._state = session._put(state, "state")
        host = meta["host"]
        session._unsynced = np.asarray(host["unsynced"], np.int64)
        session._laid_out = np.asarray(host["laid_out"], bool)
        session._num_pending = int(host["num_pending"])
        session._num_refocus = int(host["num_refocus"])
        session._upload_view()  # the device view of the trees (what the WC materializes from)
        return session

    # ------------------------------------------------------------------ generation

    def stream(self, max_new_tokens: int, *, eos_id: int | None = None
               ) -> Iterator[np.ndarray]:
        """Greedy tokens, yielded block by block ([B, ≤ K] int32): each stream emits its
        next tokens (pad after it emitted `eos_id`); a refocus follows every K tokens. Stops
        after `max_new_tokens` or when every stream is done."""
        n = int(max_new_tokens)
        if n <= 0:
            raise InputError(f"max_new_tokens must be > 0, got {max_new_tokens}")
        self.sync()
        empty = [b for b, t in enumerate(self._trees) if t.num_tokens == 0]
        if empty:
            raise InputError(f"stream(s) {empty} have no history: feed them before generating")
        self._check_room([self._num_pending + n] * self.batch_size)
        # `done` means "emitted EOS in this generation": a new call starts every stream anew
        self._state = self._state.replace(done=jnp.zeros_like(self._state.done))
        return self._stream(n, np.int32(-1 if eos_id is None else eos_id))

    def _stream(self, n: int, eos: np.int32) -> Iterator[np.ndarray]:
        K, produced = self.mc.block_size, 0
        while produced < n:
            steps = min(n - produced, K - self._num_pending)
            t0 = time.perf_counter()
            self._state, out, ran = self._programs.decode(self._params, self._state,
                                                          np.int32(steps), eos)
            ran = int(ran)
            tokens = np.asarray(out)[:, :ran]
            decode_s = time.perf_counter() - t0
            self._num_pending += ran
            produced += ran
            if ran:
                yield tokens
            if self._num_pending == K:
                self._refocus_pending({"decode_s": decode_s, "decoded": K})
            if ran < steps:
                return  # every stream emitted EOS

    def generate(self, max_new_tokens: int, *, eos_id: int | None = None) -> np.ndarray:
        """Greedy generation: tokens [B, n] (n ≤ max_new_tokens; pad after a stream's EOS)."""
        chunks = list(self.stream(max_new_tokens, eos_id=eos_id))
        if not chunks:
            return np.zeros((self.batch_size, 0), np.int32)
        return np.concatenate(chunks, axis=1)

    # ------------------------------------------------------------------ inspection

    def cache_logprobs(self, tokens) -> np.ndarray:
        """Teacher-forced log-probabilities [B, T - 1] of tokens [B, T] (T <= K) continuing
        every stream's history, computed from the session's own KV cache: token i + 1 given
        the context and tokens 0..i (token 0 is conditioned on but not scored). The session
        is unchanged. This measures the cache a session decodes from — under
        `kv_reuse="approx"` its approximation — where `mcjax.eval.harness` scores a fresh
        prefill of the working context."""
        tokens = np.asarray(tokens)
        K, W, B = self.mc.block_size, self.mc.w_max, self.batch_size
        if tokens.ndim != 2 or tokens.shape[0] != B or not 2 <= tokens.shape[1] <= K:
            raise InputError(f"cache_logprobs takes tokens [{B}, T] with 2 <= T <= K = {K}, "
                             f"got shape {tokens.shape}")
        if tokens.min() < 0 or tokens.max() >= self.llama.vocab_size:
            raise InputError("cache_logprobs: token ids outside the vocabulary")
        self.sync()
        if self._num_pending:
            raise InputError(f"cache_logprobs needs a refocused session; {self._num_pending} "
                             f"decoded tokens are pending (generate a multiple of K = {K})")
        first = np.asarray(_pending_base_position(self._plan, self._state.wc))
        T = tokens.shape[1]
        return np.asarray(_cache_logprobs(
            self._params, self._state.cache, jnp.asarray(tokens, jnp.int32),
            jnp.asarray(first[:, None] + np.arange(T)[None], jnp.int32),
            jnp.ones((B, T), bool), jnp.int32(W), config=self.llama))

    @property
    def working_context(self) -> wcm.WorkingContext:
        """Host copy of the batched WC (after bringing it up to date)."""
        self.sync()
        return jax.device_get(self._state.wc)

    def focus_runs(self, stream: int = 0) -> list[tuple[int, int, int, int]]:
        from mcjax.eval.focus_map import focus_runs

        wc = self.working_context
        return focus_runs(jax.tree.map(lambda x: x[stream], wc), self.mc)

    def focus_map(self, stream: int = 0, width: int = 64) -> str:
        from mcjax.eval.focus_map import format_focus_map

        return format_focus_map(self.focus_runs(stream), width)

    def compiled_programs(self) -> dict[str, int]:
        """Compiled variants of each program (1 each after warm-up)."""
        return {name: getattr(self._programs, name)._cache_size()
                for name in ("decode", "refocus", "write_view")}
