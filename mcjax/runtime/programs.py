"""The runtime's pure programs (SPEC §2.7): `refocus` and `decode_block` over a `StreamState`,
and `programs(plan, mesh)`, their jitted forms and that of `mcjax.tree.write_view` (new tree
rows; state and view donated, `NamedSharding`s with a mesh) compiled once per `Plan` and
shared by every caller.

Drive them from your own loop (what `Session` does, less the bookkeeping):

    plan = make_plan(llama, cfg, ...); jitted = programs(plan)
    state, view = initial_state(plan), empty_view(plan)
    trees gain tokens -> view = jitted.write_view(view, *view_update(trees, synced))
    state, telemetry = jitted.refocus(base_params, focus_params, state, view, num_new, reset,
                                      initial_layouts(plan, lengths, reset), revive,
                                      from_pending)
    state, tokens, ran = jitted.decode(base_params, state, steps, eos_id)   # <= K - pending
    (K decoded: append them to the trees, upload, refocus with from_pending=True)
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mcjax import focus, sharding
from mcjax import working_context as wcm
from mcjax.base import model as base
from mcjax.base.model import KVCache
from mcjax.config import LlamaConfig
from mcjax.runtime.policies import focus_conditioning, policy_scores
from mcjax.runtime.state import Plan, StreamState, pending_base_position
from mcjax.tree import TreeView, write_view

__all__ = ["decode_block", "refocus", "collapse_ahead", "Programs", "programs"]


def decode_block(plan: Plan, base_params, state: StreamState, num_steps, eos_id,
                 forced=None):
    """Up to `num_steps` (≤ K − num_pending) greedy steps: emit `next_token`, write it at the
    next pending slot, predict the next one. Stops early once every stream is done.
    `forced` [B, K] (teacher forcing): step i emits `forced[:, i]` instead of the prediction
    and goes on from it, so given tokens enter the history exactly as decoded ones do.
    Returns (state, tokens [B, K] emitted (pad beyond the steps run), steps run)."""
    W, K, B = plan.mc.w_max, plan.mc.block_size, plan.batch_size
    first_position = pending_base_position(plan, state.wc)

    def cond(carry):
        s, i, _ = carry  # never past the K pending slots, whatever num_steps says
        return (i < num_steps) & (s.num_pending < K) & ~jnp.all(s.done)

    def body(carry):
        s, i, out = carry
        p = s.num_pending
        live = ~s.done
        token = s.next_token if forced is None else forced[:, i].astype(jnp.int32)
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


def collapse_ahead(plan: Plan, wc, scores, trigger):
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


def _where_streams(mask, new, old):
    """Per stream (leading axis): the `new` pytree where `mask` [B], else `old`."""
    return jax.tree.map(lambda n, o: jnp.where(mask.reshape(mask.shape + (1,) * (n.ndim - 1)),
                                               n, o), new, old)


def refocus(plan: Plan, base_params, focus_params, state: StreamState, view: TreeView,
             num_new, reset, layout, revive, from_pending):
    """One refocus of every stream (module docstring, step 2), in four phases: focus rounds
    (append the new tokens, then the allocator), the new WC's layout (materialized, and
    what changed against the cache), the cache rebuild, the next state.

    num_new [B]: tokens the trees gained since the WC was last updated; reset [B]: the
    stream starts from `layout` (its initial layout; its cache holds nothing yet); revive
    [B]: clear the stream's EOS flag (it got new input); from_pending []: the new tokens are
    the decoded ones in the pending slots (their KV entries can be reused).

    After input (not from_pending) a query-aware plan settles: the allocator runs again,
    up to `plan.settle_rounds` more rounds, for every stream whose last round acted, so a
    block inside an LOD2 gist reaches raw tokens (two expansions) before the answer. The
    rounds edit only the layout — scores depend on the WC, the view and the question's
    read, never on the cache — so the question is read once and the cache re-prefilled
    once, for the settled WC.
    Returns (the new state — the old one where a stream's append overflowed —, telemetry).
    """
    start_wc = _where_streams(reset, layout, state.wc)
    cached_valid = state.wc.valid & ~reset[:, None]  # what cache slots [0, W) hold now
    wc, focused = _focus_rounds(plan, base_params, focus_params, view, start_wc, num_new,
                                reset, from_pending)
    new_layout = _new_layout(plan, base_params, view, state.wc, cached_valid, wc)
    cache, rebuilt = _rebuild_cache(plan, base_params, state, cached_valid, wc, new_layout,
                                    num_new, reset, from_pending)
    new_state = _next_state(plan, base_params, state, wc, cache, rebuilt, revive,
                            focused.append.overflow)
    return new_state, _telemetry(plan, wc, new_layout, focused, rebuilt)


# ----------------------------------------------------------------- refocus: focus rounds


class _Scoring(NamedTuple):
    """What the focus policy scores a WC from, fixed for one refocus."""

    focus_params: object  # `policy_scores`' focus_params (LensNet's, or the random seed)
    base_params: object
    view: TreeView
    cond: object  # [B, ...] `focus_conditioning` (zeros when nothing is scored; or None)


class _Focused(NamedTuple):
    """What the focus rounds did, per stream (the refocus's telemetry)."""

    active: jax.Array  # [B] bool: the stream has new tokens or a fresh layout
    append: wcm.AppendInfo  # the append's budget collapses, overflow, NaN scores
    info: focus.FocusInfo  # the allocator's actions ([B, (R + 1) n_diff] when settling)
    action_level: jax.Array  # levels of the acted slots before their action, like `info`'s
    ahead: jax.Array  # [B] int32 headroom collapses (`collapse_ahead`)
    rounds: jax.Array  # [B] int32 settle rounds run


def _focus_rounds(plan: Plan, base_params, focus_params, view: TreeView, wc, num_new, reset,
                  from_pending) -> tuple[wcm.WorkingContext, _Focused]:
    """Phase 1: from each stream's starting WC `wc` [B, W] (its initial layout where
    `reset`), append its `num_new` tokens (budget collapses by score), then one allocator
    round and, after input, the settle rounds (`_settle`). Only the layout changes; the
    cache is untouched. Returns (the new WC [B, W], what was done)."""
    W, K = plan.mc.w_max, plan.mc.block_size
    # Which streams the allocator serves: those with new tokens (or a fresh layout), so a
    # stream's focus never depends on its batch neighbours (e.g. one that already emitted
    # EOS); under decode_focus="on_collapse" a refocus of decoded
    # tokens serves a stream only when it must make room anyway (its append overflows, or
    # the next block would not fit and collapse_ahead acts), so the refocuses between
    # those only append and re-prefill nothing.
    active = reset | (num_new > 0)
    room_due = wc.num_valid + num_new > W - (K if plan.headroom else 0)
    focus_on = active
    if plan.decode_focus == "on_collapse":
        focus_on = active & (~from_pending | reset | room_due)
    # The scores before the append only choose budget collapses: scored only when some
    # stream's new tokens overflow the budget. Nothing is scored (the question read of
    # query-aware policies included) when no stream needs scores.
    must_collapse = jnp.any(wc.num_valid + num_new > W)
    scoring = _scoring(plan, base_params, focus_params, view,
                       must_collapse | jnp.any(focus_on))
    scores = _scores(plan, scoring, wc, must_collapse, 0)
    wc, append_info = jax.vmap(lambda wc, n, s: wcm.append(wc, n, plan.mc, s))(wc, num_new,
                                                                               scores)
    # collapse_ahead only acts where room is due, and there focus_on holds
    wc, info, action_level, ahead = _focus_round(plan, scoring, wc, focus_on, active)
    rounds = jnp.zeros((plan.batch_size,), jnp.int32)
    if plan.settle_rounds:
        acted = (info.num_expand + info.num_collapse) > 0
        settling = acted & (reset | (num_new > 0)) & ~from_pending
        wc, info, action_level, ahead, rounds = _settle(plan, scoring, wc, settling, info,
                                                        action_level, ahead)
    return wc, _Focused(active=active, append=append_info, info=info,
                        action_level=action_level, ahead=ahead, rounds=rounds)


def _scoring(plan: Plan, base_params, focus_params, view: TreeView, needed) -> _Scoring:
    """The scoring inputs of one refocus: the query-aware conditioning read once from the
    whole history (new tokens too) — only when `needed` [] (some stream is scored)."""
    conditioning = functools.partial(focus_conditioning, plan)
    cond_shape = jax.eval_shape(conditioning, base_params, view)
    cond = jax.lax.cond(needed, conditioning,
                        lambda *_: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype),
                                                cond_shape), base_params, view)
    return _Scoring(focus_params=focus_params, base_params=base_params, view=view, cond=cond)


def _scores(plan: Plan, scoring: _Scoring, wc, needed, call: int) -> jax.Array:
    """[B, W] float32 policy scores of every stream's WC (`call`: which scoring of the
    refocus this is, 0 before the append), or zeros — nothing run — unless `needed` []."""
    B, W = plan.batch_size, plan.mc.w_max
    streams = jnp.arange(B, dtype=jnp.int32)

    def batched(focus_params, base_params, wc, view):
        def one(focus_params, base_params, wc, view, stream, cond):
            return policy_scores(plan, focus_params, base_params, wc, view, stream, call,
                                  cond)

        return jax.vmap(one, in_axes=(None, None, 0, 0, 0, 0))(
            focus_params, base_params, wc, view, streams, scoring.cond).astype(jnp.float32)

    return jax.lax.cond(needed, batched, lambda *_: jnp.zeros((B, W), jnp.float32),
                        scoring.focus_params, scoring.base_params, wc, scoring.view)


def _focus_round(plan: Plan, scoring: _Scoring, wc, on, trigger):
    """One allocator round for the streams `on` [B] (collapse ahead where `trigger` [B]):
    (wc, their FocusInfo (zeros elsewhere), the acted slots' levels before, collapses
    ahead [B])."""
    mc, W = plan.mc, plan.mc.w_max
    scores = _scores(plan, scoring, wc, jnp.any(on), 1)
    wc, scores, ahead = jax.vmap(functools.partial(collapse_ahead, plan))(wc, scores, trigger)
    new, info = jax.vmap(lambda wc, s: focus.allocate(wc, s, mc))(wc, scores)
    level = jnp.take_along_axis(wc.level, jnp.clip(info.action_slot, 0, W - 1), axis=1)
    return (_where_streams(on, new, wc),
            _where_streams(on, info, jax.tree.map(jnp.zeros_like, info)), level, ahead)


def _settle(plan: Plan, scoring: _Scoring, wc, settling, info, action_level, ahead):
    """The settle rounds of `refocus` (its docstring) as one bounded loop over the layout:
    while a stream's last round acted (`settling` [B]), run `_focus_round` for it again
    (score, collapse ahead, allocate), at most `plan.settle_rounds` times. Returns (wc, info
    whose actions are every round's in order ([B, (R + 1) n_diff], round 0 first) and whose
    counts are summed, the actions' levels likewise, headroom collapses summed, rounds run
    [B])."""
    R, n = plan.settle_rounds, plan.mc.n_diff

    def grow(x):  # [B, n] -> [B, (R + 1) n], later rounds as masked rounds leave them
        return jnp.concatenate([x, jnp.zeros((x.shape[0], R * n), x.dtype)], 1)

    def body(carry):
        wc, settling, r, kind, slot, level, n_exp, n_col, nan, ahead, rounds = carry
        wc, got, lvl, more = _focus_round(plan, scoring, wc, settling, settling)
        at = (0, (r + 1) * n)
        kind = jax.lax.dynamic_update_slice(kind, got.action_kind, at)
        slot = jax.lax.dynamic_update_slice(slot, got.action_slot, at)
        level = jax.lax.dynamic_update_slice(level, lvl, at)
        acted = got.num_expand + got.num_collapse > 0
        return (wc, settling & acted, r + 1, kind, slot, level, n_exp + got.num_expand,
                n_col + got.num_collapse, nan | got.nan_scores, ahead + more,
                rounds + settling.astype(jnp.int32))

    carry = (wc, settling, jnp.int32(0), grow(info.action_kind), grow(info.action_slot),
             grow(action_level), info.num_expand, info.num_collapse, info.nan_scores, ahead,
             jnp.zeros_like(ahead))
    out = jax.lax.while_loop(lambda c: (c[2] < R) & jnp.any(c[1]), body, carry)
    wc, _, _, kind, slot, level, n_exp, n_col, nan, ahead, rounds = out
    info = info.replace(action_kind=kind, action_slot=slot, num_expand=n_exp,
                        num_collapse=n_col, nan_scores=nan)
    return wc, info, level, ahead, rounds


# ------------------------------------------------------------------ refocus: the new layout


class _Layout(NamedTuple):
    """The new WC materialized, and where it first differs from what the cache holds."""

    emb: jax.Array  # [B, W, D] slot embeddings
    pos: jax.Array  # [B, W] positions
    valid: jax.Array  # [B, W]
    first_changed: jax.Array  # [B] int32 first slot whose entry differs (W: none)


def _new_layout(plan: Plan, base_params, view: TreeView, old_wc, cached_valid, wc) -> _Layout:
    """Phase 2: the new WC `wc` [B, W] materialized from the view, and its first slot whose
    entry (validity, level, node) differs from the old WC's where the cache holds one
    (`cached_valid` [B, W])."""
    W = plan.mc.w_max
    emb, pos, valid = jax.vmap(lambda wc, v: wcm.materialize(wc, v, base_params, plan.mc))(
        wc, view)
    both = valid & cached_valid
    changed = (valid != cached_valid) | (both & ((wc.level != old_wc.level)
                                                 | (wc.node != old_wc.node)))
    first_changed = jnp.where(jnp.any(changed, -1), jnp.argmax(changed, -1), W).astype(jnp.int32)
    return _Layout(emb=emb, pos=pos, valid=valid, first_changed=first_changed)


# ---------------------------------------------------------------- refocus: the cache rebuild


class _Rebuilt(NamedTuple):
    """What the cache rebuild computed and did, per stream."""

    newest_hidden: jax.Array  # [B, D] hidden state of the newest slot, where recomputed
    got: jax.Array  # [B] bool: the newest slot was recomputed (its next token is new)
    kv_reused: jax.Array  # [B] bool: only the pending tokens were appended (KV copied)
    start: jax.Array  # [B] int32 first slot of the exact re-prefill range (W: none)
    stop: jax.Array  # [B] int32 its end
    slots: jax.Array  # [B] int32 slots recomputed
    approximate: jax.Array  # [B] bool: kv_reuse="approx" moved entries instead


def _rebuild_cache(plan: Plan, base_params, state: StreamState, cached_valid, wc,
                   layout: _Layout, num_new, reset, from_pending) -> tuple[KVCache, _Rebuilt]:
    """Phase 3: the cache brought from the old WC's entries (`state`, `cached_valid`) to the
    new WC's (`wc`, `layout`), per stream: nothing when it only appended its pending tokens
    (their entries copied, `_copy_pending_kv`), else an exact re-prefill from its first
    change (`_exact_reprefill`) or, under kv_reuse="approx", moved entries plus the chunks
    with new ones (`_approx_reprefill`, where that recomputes less). Returns (the cache,
    `_Rebuilt`)."""
    W, K, B = plan.mc.w_max, plan.mc.block_size, plan.batch_size
    num_valid, first_changed = wc.num_valid, layout.first_changed
    # A stream whose only change is the append of its pending tokens (no collapse, no edit
    # before them) needs no re-prefill: their KV entries, computed over the same context at
    # the same positions, are copied from the pending slots to their WC slots.
    old_valid = state.wc.num_valid
    slots = jnp.arange(W)[None, :]
    appended = (slots >= old_valid[:, None]) & (slots < num_valid[:, None])
    as_tokens = (wc.level == 0) & (wc.node == state.wc.num_tokens[:, None]
                                   + slots - old_valid[:, None])
    append_only = (from_pending & ~reset & (num_new > 0) & (first_changed >= old_valid)
                   & (num_valid == old_valid + num_new)
                   & jnp.all(~appended | as_tokens, axis=1))
    cache = jax.lax.cond(jnp.any(append_only), functools.partial(_copy_pending_kv, plan),
                         lambda c, *_: c, state.cache, append_only, old_valid, num_new)
    # Each stream re-prefills its own range (or, approximately, its own chunks): one
    # stream's early edit recomputes nothing of its batch neighbours'. The loops are per
    # stream under vmap, so they run as long as the busiest stream needs; the others'
    # carries are held.
    needs = (first_changed < W) & ~append_only
    start = jnp.where(needs, (first_changed // K) * K, W).astype(jnp.int32)
    stop = jnp.where(needs, num_valid, 0).astype(jnp.int32)
    exact_slots = jnp.where(start < stop, -(-stop // K) * K - start, 0).astype(jnp.int32)
    full_valid = jnp.concatenate([layout.valid, jnp.zeros((B, K), bool)], 1)
    cache = cache.replace(valid=full_valid)
    rows = (layout.emb, layout.pos, layout.valid, num_valid - 1)
    if plan.kv_reuse == "approx":
        cache, newest_hidden, got, reprefilled, approximate = _approx_reprefill(
            plan, base_params, cache, state.wc, cached_valid, wc, layout, rows, num_new,
            reset, from_pending, needs, start, stop, exact_slots)
    else:
        cache, newest_hidden, got = _exact_reprefill(plan, base_params, cache, start, stop,
                                                     rows)
        reprefilled = exact_slots
        approximate = jnp.zeros((B,), bool)
    return cache, _Rebuilt(newest_hidden=newest_hidden, got=got, kv_reused=append_only,
                           start=start, stop=stop, slots=reprefilled, approximate=approximate)


def _copy_pending_kv(plan: Plan, cache: KVCache, copy, dest, count) -> KVCache:
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


def _per_stream(fn):
    """`fn(cache, a, b, row)` of one stream (cache without its batch axis) vmapped over the
    streams; returns (cache, newest_hidden, got)."""
    return jax.vmap(fn, in_axes=(KVCache(k=1, v=1, valid=0), 0, 0, 0),
                    out_axes=(KVCache(k=1, v=1, valid=0), 0, 0))


def _no_hidden(plan: Plan):
    """(newest_hidden, got) before any chunk held the newest slot."""
    return (jnp.zeros((plan.llama.hidden_size,), jnp.dtype(plan.llama.dtype)),
            jnp.bool_(False))


def _prefill_chunk(plan: Plan, base_params, cache, s, size: int, row, newest_hidden, got):
    """One stream's slots [s, s + size) re-prefilled from its `row` (emb, pos, valid,
    newest slot) (cache without its batch axis), keeping the hidden state of its newest
    slot when that lies there. Returns (cache, newest_hidden, got)."""
    emb_b, pos_b, valid_b, newest_b = row
    chunk = lambda x: jax.lax.dynamic_slice_in_dim(x, s, size, axis=0)[None]  # noqa: E731
    one = KVCache(k=cache.k[:, None], v=cache.v[:, None], valid=cache.valid[None])
    hidden, one = base.prefill_core(base_params, plan.llama, one, None, chunk(emb_b),
                                    chunk(pos_b), chunk(valid_b), s, return_hidden=True)
    cache = KVCache(k=one.k[:, 0], v=one.v[:, 0], valid=one.valid[0])
    inside = (newest_b >= s) & (newest_b < s + size)
    h = hidden[0, jnp.clip(newest_b - s, 0, size - 1)]
    return cache, jnp.where(inside, h, newest_hidden), got | inside


def _exact_reprefill(plan: Plan, base_params, cache: KVCache, start, stop, rows):
    """Every slot of each stream from `start` [B] (its first change, K-aligned) through
    `stop` [B] re-prefilled: K-slot chunks up to a multiple of C = `plan.prefill_chunk`,
    C-slot chunks, then a K-slot tail (big matmuls for bulk, < K wasted slots at either
    end). Returns (cache, newest_hidden [B, D], got [B])."""
    K, C = plan.mc.block_size, plan.prefill_chunk

    def one_stream(cache, start, stop, row):
        carry = (cache, start) + _no_hidden(plan)
        if C > K:
            stop_k = -(-stop // K) * K
            carry = _prefill_chunks(plan, base_params, row, carry, K,
                                    lambda s: (s < stop) & (s % C != 0))
            carry = _prefill_chunks(plan, base_params, row, carry, C,
                                    lambda s: s + C <= stop_k)
        cache, _, newest_hidden, got = _prefill_chunks(plan, base_params, row, carry, K,
                                                       lambda s: s < stop)
        return cache, newest_hidden, got

    return _per_stream(one_stream)(cache, start, stop, rows)


def _prefill_chunks(plan: Plan, base_params, row, carry, size: int, more):
    """`size`-slot chunks of one stream from carry's slot on while `more(slot)`: the loop
    (cache, slot, newest_hidden, got) -> the same after them."""
    def body(carry):
        cache, s, newest_hidden, got = carry
        cache, newest_hidden, got = _prefill_chunk(plan, base_params, cache, s, size, row,
                                                   newest_hidden, got)
        return cache, s + size, newest_hidden, got

    return jax.lax.while_loop(lambda c: more(c[1]), body, carry)


def _approx_reprefill(plan: Plan, base_params, cache: KVCache, old_wc, cached_valid, wc,
                      layout: _Layout, rows, num_new, reset, from_pending, needs, start, stop,
                      exact_slots):
    """kv_reuse="approx": per stream, when it recomputes fewer slots than the exact range
    [`start`, `stop`) (`exact_slots`), keep the cached entries of the new WC's slots —
    moved to their new slot, keys re-rotated (`_kv_sources`, `_moved_kv`) — and recompute
    only the K-slot chunks holding new entries plus the newest chunk; else the exact range.
    Returns (cache, newest_hidden [B, D], got [B], slots recomputed [B], approximate [B])."""
    W, K, B = plan.mc.w_max, plan.mc.block_size, plan.batch_size
    src, delta = _kv_sources(plan, old_wc, cached_valid, wc, layout.pos, layout.valid,
                             from_pending)
    changed_any = (layout.first_changed < W) | (num_new > 0) | reset
    fresh = layout.valid & (src < 0)  # entries not in the cache anywhere: computed
    dirty = jnp.any(fresh.reshape(B, W // K, K), axis=2)  # [B, chunks]
    # the newest chunk of every changed stream, so its next token sees the new context
    newest = wc.num_valid - 1
    dirty = dirty | (changed_any[:, None] & (jnp.arange(W // K)[None, :]
                                             == (jnp.maximum(newest, 0) // K)[:, None]))
    num_dirty = jnp.sum(dirty, axis=1, dtype=jnp.int32)
    # per stream: exact when it recomputes no more (a fresh layout, or only pending
    # tokens appended)
    approximate = (num_dirty * K < exact_slots) & needs
    num_dirty = jnp.where(approximate, num_dirty, 0)
    order = jnp.argsort(~dirty, axis=1, stable=True).astype(jnp.int32)  # dirty first

    def move(cache):
        moved = _moved_kv(plan, cache, src, delta)
        sel = approximate[None, :, None, None, None]
        return cache.replace(k=jnp.where(sel, moved.k, cache.k),
                             v=jnp.where(sel, moved.v, cache.v))

    cache = jax.lax.cond(jnp.any(approximate), move, lambda c: c, cache)

    def one_stream(cache, order, num_dirty, row):
        def body(carry):
            cache, i, newest_hidden, got = carry
            cache, newest_hidden, got = _prefill_chunk(plan, base_params, cache, order[i] * K,
                                                       K, row, newest_hidden, got)
            return cache, i + 1, newest_hidden, got

        cache, _, newest_hidden, got = jax.lax.while_loop(
            lambda c: c[1] < num_dirty, body, (cache, jnp.int32(0)) + _no_hidden(plan))
        return cache, newest_hidden, got

    cache, h_approx, got_approx = _per_stream(one_stream)(cache, order, num_dirty, rows)
    cache, h_exact, got_exact = _exact_reprefill(plan, base_params, cache,
                                                 jnp.where(approximate, W, start),
                                                 jnp.where(approximate, 0, stop), rows)
    newest_hidden = jnp.where(approximate[:, None], h_approx, h_exact)
    got = jnp.where(approximate, got_approx, got_exact)
    reprefilled = jnp.where(approximate, num_dirty * K, exact_slots)
    return cache, newest_hidden, got, reprefilled, approximate


def _kv_sources(plan: Plan, old_wc, cached_valid, new_wc, new_pos, new_valid,
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
    pending_pos = pending_base_position(plan, old_wc)  # [B] position of pending slot 0

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


def _moved_kv(plan: Plan, cache: KVCache, src, delta) -> KVCache:
    """cache slots [0, W) ← their entries' old slots `src` (where >= 0), keys re-rotated by
    `delta` positions (RoPE rotations compose, so a moved key equals one computed at the new
    position from the same input); other slots are left as they are."""
    llama, W = plan.llama, plan.mc.w_max
    idx = jnp.clip(src, 0, cache.k.shape[2] - 1)[None, :, :, None, None]
    keep = (src >= 0)[None, :, :, None, None]
    cos, sin = base.rope_cos_sin(delta, llama, attention_scaling=False)

    def move(buf, rotate: bool):
        moved = jnp.take_along_axis(buf, idx, axis=2)
        if rotate:
            moved = jax.vmap(lambda x: base.apply_rope(x, cos, sin))(moved)
        head = jnp.where(keep, moved.astype(buf.dtype), buf[:, :, :W])
        return jax.lax.dynamic_update_slice_in_dim(buf, head, 0, axis=2)

    return cache.replace(k=move(cache.k, True), v=move(cache.v, False))


# ------------------------------------------------------------------ refocus: the next state


def _next_state(plan: Plan, base_params, state: StreamState, wc, cache: KVCache,
                rebuilt: _Rebuilt, revive, overflow) -> StreamState:
    """Phase 4: the state after the refocus — the new WC and cache, each recomputed
    stream's next token predicted from its newest slot, no pending tokens, EOS cleared where
    `revive` — or the state before it when some stream's append `overflow`ed [B]."""
    logits = base.logits_from_hidden(base_params, plan.llama, rebuilt.newest_hidden)
    next_token = jnp.where(rebuilt.got, jnp.argmax(logits, -1).astype(jnp.int32),
                           state.next_token)
    new_state = StreamState(wc=wc, cache=cache, next_token=next_token, pending=state.pending,
                            num_pending=jnp.int32(0), done=state.done & ~revive)
    # A stream that could not absorb its new tokens: the host raises CapacityError, and the
    # state it keeps (the input was donated) must be the one before this refocus.
    return jax.lax.cond(jnp.any(overflow), lambda: state, lambda: new_state)


def _telemetry(plan: Plan, wc, layout: _Layout, focused: _Focused, rebuilt: _Rebuilt
               ) -> dict:
    """The refocus's telemetry ([B] per stream, what `telemetry.event_from` reads)."""
    mc = plan.mc
    levels = jnp.arange(mc.num_levels + 1)
    in_level = (wc.level[..., None] == levels) & layout.valid[..., None]  # [B, W, L+1]
    span = wcm.span_size(wc.level, mc)
    info, append = focused.info, focused.append
    return dict(
        num_tokens=wc.num_tokens, num_valid=wc.num_valid,
        level_hist=jnp.sum(in_level, axis=1, dtype=jnp.int32),
        level_tokens=jnp.sum(in_level * span[..., None], axis=1, dtype=jnp.int32),
        action_kind=info.action_kind, action_slot=info.action_slot,
        action_level=focused.action_level, settle_rounds=focused.rounds,
        num_expand=info.num_expand, num_collapse=info.num_collapse,
        append_collapses=append.num_collapses, append_overflow=append.overflow,
        headroom_collapses=focused.ahead,
        nan_scores=info.nan_scores | append.nan_scores,
        first_changed=layout.first_changed, reprefill_start=rebuilt.start,
        reprefill_stop=rebuilt.stop, reprefill_slots=rebuilt.slots,
        approximate=rebuilt.approximate, active=focused.active,
        kv_reused=rebuilt.kv_reused)


class Programs(NamedTuple):
    decode: Callable
    refocus: Callable
    write_view: Callable
    shardings: dict | None
    force: Callable  # decode with teacher-forced tokens: decode(..., eos_id, forced [B, K])


def _abstract_base_params(llama: LlamaConfig):
    return jax.eval_shape(lambda k: base.init_params(llama, k), jax.random.key(0))


def _shardings(plan: Plan, mesh: Mesh) -> dict:
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
def programs(plan: Plan, mesh: Mesh | None = None) -> Programs:
    """The jitted programs of a plan (shared by every caller with that plan): `decode(
    base_params, state, num_steps, eos_id)` (and `force(..., eos_id, forced)`, the same
    with teacher-forced tokens), `refocus(base_params, focus_params, state, view,
    num_new, reset, layout, revive, from_pending)` (both donate the state) and
    `write_view(view, *view_update(trees, synced))` (donates the view)."""
    decode = functools.partial(decode_block, plan)
    refocus_ = functools.partial(refocus, plan)
    # A fresh wrapper per plan: jit shares its compilation cache among jits of the same
    # function object, so `compiled_programs()` would count other plans' compilations.
    write_view_ = functools.partial(write_view)
    force = functools.partial(decode_block, plan)  # its own jit (and compile count)
    if mesh is None:
        return Programs(jax.jit(decode, donate_argnums=1), jax.jit(refocus_, donate_argnums=2),
                        jax.jit(write_view_, donate_argnums=0), None,
                        jax.jit(force, donate_argnums=1))
    sh = _shardings(plan, mesh)
    rep, lead = sh["rep"], sh["lead"]
    return Programs(
        decode=jax.jit(decode, donate_argnums=1,
                       in_shardings=(sh["params"], sh["state"], rep, rep),
                       out_shardings=(sh["state"], lead(2), rep)),
        force=jax.jit(force, donate_argnums=1,
                      in_shardings=(sh["params"], sh["state"], rep, rep, lead(2)),
                      out_shardings=(sh["state"], lead(2), rep)),
        refocus=jax.jit(refocus_, donate_argnums=2,
                        in_shardings=(sh["params"], rep, sh["state"], sh["view"], lead(1),
                                      lead(1), sh["wc"], lead(1), rep),
                        out_shardings=(sh["state"], rep)),
        write_view=jax.jit(write_view_, donate_argnums=0,
                           in_shardings=(sh["view"], lead(2), tuple(
                               lead(3) for _ in range(plan.mc.num_levels)), lead(2), lead(2),
                               lead(2), lead(3) if plan.keeps_keys else None),
                           out_shardings=sh["view"]),
        shardings=sh)
