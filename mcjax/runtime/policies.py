"""Where a refocus's scores come from (SPEC §2.5, §2.6): LensNet, or a baseline policy with
its own inputs — "retrieval" (training-free, query-aware), "recency", "random" — all
legality-masked alike and fed to the same allocator and budget logic."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mcjax import lens, retrieval
from mcjax import working_context as wcm
from mcjax.runtime.state import Plan
from mcjax.tree import TreeView

__all__ = ["focus_conditioning", "lens_stream_scores", "policy_scores", "recency_scores",
           "random_scores"]


def focus_conditioning(plan: Plan, base_params, view: TreeView) -> dict | None:
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


def lens_stream_scores(plan: Plan, lens_params, base_params, wc, view, cond=None):
    """LensNet scores [W] of one stream's WC (materialized from its tree view; v2 also
    from the stream's `focus_conditioning`)."""
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


def policy_scores(plan: Plan, focus_params, base_params, wc, view, stream, call: int,
                   cond=None):
    """Scores [W] of one stream's WC under the plan's focus policy, from the policy's own
    inputs: `focus_params` are LensNet's params ("lens") or the seed ([] uint32,
    "random"; unused by "recency" and "retrieval"). For "random" the key folds in the
    stream, the WC's refocus step and which scoring of the refocus this is, so it is
    deterministic given the seed and differs from refocus to refocus. `cond`: the stream's
    `focus_conditioning` (computed once per refocus) for "retrieval" and LensNet v2."""
    if plan.focus_policy == "retrieval":
        return retrieval.slot_scores(wc, cond["blocks"], plan.mc)
    if plan.focus_policy == "lens":
        return lens_stream_scores(plan, focus_params, base_params, wc, view, cond)
    if plan.focus_policy == "recency":
        return recency_scores(wc, plan.mc)
    key = jax.random.key(focus_params)
    for x in (stream, wc.step, call):
        key = jax.random.fold_in(key, x)
    return random_scores(key, wc, plan.mc)
