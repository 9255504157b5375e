"""LensNet's counterfactual focus task (SPEC §2.8.2): what each focus action is worth.

For each window of S = P + H tokens:

1. The prefix [0, P) forms a MegaContext tree (LOD1 gists of every block, LOD2 gists of
   every complete group, made by GistNet from LOD1 gists as the tree does) and a
   *compressed* working context over it: one of a bank of legal layouts (initial layouts
   at several budgets, plus a few random expands/collapses so older spans are sometimes
   fine and newer ones coarse), each leaving room for one more expansion.
2. C candidate actions are drawn from the legal ones: `num_expand` gists to expand and
   `num_collapse` aligned sibling groups to collapse.
3. One batched forward of the frozen base model scores V = C + 1 variants — the WC as is
   and the WC with each single action applied — on the identical H continuation targets
   tokens[P : P + H]. Each variant is packed as [WC slots (W, padding masked) ‖ tokens
   P .. P+H-2]; target 0 is predicted from the WC's last valid slot (token P-1), target i
   from the continuation slot holding token P+i-1. ΔNLL@H differences between variants
   are the counterfactual utilities (the full-context NLL cancels out).
4. The *value of detail* of a candidate, in nats/token, is what its span's detail is
   worth: for an expansion the NLL it saves, for a collapse the NLL it costs. Both should
   map to the same signed score: expand a gist when its value beats the budget's price,
   collapse a group when its value is below it. Per example the price is the mean value
   over the candidates (zero-sum: expansions are paid for by collapses) and the spread is
   normalised: target = tanh((value − mean) / (std + eps)); eps (`UTILITY_EPS`, 0.01
   nats/token) is the resolution below which utility differences give small targets.

Query-aware conditioning (`LensTask.retrieval` set; LensNet v2 needs it): the prefix's
tree also keeps the read-pass retrieval keys of every block, and per window the newest
prefix tokens are read once as the runtime's refocus reads a stream's history
(`retrieval.stream_conditioning`): the question's hidden states, the blocks' relevance
and retrieval scores. LensNet v2 scores the WC with them; the retrieval policy's slot
scores come from the same read (what `focus_quality` compares).

The LensNet loss on these values is `mcjax.train.losses.lens_objective`; the evaluation's
focus quality (`mcjax.eval.baselines.focus_quality`) reads the same values. Every variant
is scored by the one scorer, `mcjax.scoring.score_continuation`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from mcjax import lens as lens_lib
from mcjax import retrieval as retrieval_lib
from mcjax import working_context as wcm
from mcjax.base import model as base
from mcjax.config import (ExperimentConfig, GistConfig, LensConfig, LlamaConfig, MCConfig,
                          RetrievalConfig)
from mcjax.gist import gist_levels
from mcjax.scoring import (gist_inputs, newest_slot, raw_context_nll, score_continuation,
                           token_logprobs, window_prefix_len, working_context_input)
from mcjax.tree import TreeView

# Candidate kinds.
NO_CANDIDATE, EXPAND_CANDIDATE, COLLAPSE_CANDIDATE = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class LensTask:
    """Static shape of the counterfactual lens objective (hashable: a jit static argument)."""

    mc: MCConfig
    prefix_len: int  # P: tokens the working context covers, a multiple of block_size
    horizon: int  # H: continuation tokens scored
    num_expand: int = 2  # expansion candidates per example
    num_collapse: int = 2  # collapse candidates per example
    num_layouts: int = 16  # compressed layouts in the bank
    max_random_edits: int = 3  # random legal edits applied to a bank layout
    layout_seed: int = 0
    # query-aware conditioning (see the section comment): the retrieval read's settings,
    # None for none; `lens` says what LensNet v2 reads of it (question tokens and layer)
    retrieval: RetrievalConfig | None = None
    lens: LensConfig | None = None

    @classmethod
    def build(cls, mc: MCConfig, prefix_len: int, *, horizon: int | None = None,
              candidates: int = 4, num_layouts: int = 16, max_random_edits: int = 3,
              layout_seed: int = 0, retrieval: RetrievalConfig | None = None,
              lens: LensConfig | None = None) -> "LensTask":
        K, H = mc.block_size, horizon or mc.horizon
        if prefix_len <= 0 or prefix_len % K:
            raise ValueError(f"prefix_len ({prefix_len}) must be a positive multiple of "
                             f"block_size ({K})")
        if H < 1:
            raise ValueError(f"horizon must be >= 1, got {H}")
        if candidates < 1 or num_layouts < 1 or max_random_edits < 0:
            raise ValueError(f"need candidates >= 1, num_layouts >= 1, max_random_edits >= 0; "
                             f"got {candidates}, {num_layouts}, {max_random_edits}")
        lo = max(wcm.min_slots(prefix_len, mc), wcm.sink_tokens(mc) + mc.recent_protect + K)
        if lo + K - 1 > mc.w_max:
            raise ValueError(
                f"w_max={mc.w_max} cannot hold a compressed working context of "
                f"{prefix_len} tokens ({lo} slots) plus one expansion ({K - 1} more): "
                f"need w_max >= {lo + K - 1}")
        if lens is not None and lens.conditioned and retrieval is None:
            raise ValueError("LensNet v2 (lens.query_tokens > 0 or lens.retrieval_features) "
                             "needs the task's retrieval read: pass retrieval=")
        num_expand = (candidates + 1) // 2
        return cls(mc=mc, prefix_len=prefix_len, horizon=H, num_expand=num_expand,
                   num_collapse=candidates - num_expand, num_layouts=num_layouts,
                   max_random_edits=max_random_edits, layout_seed=layout_seed,
                   retrieval=retrieval, lens=lens)

    @property
    def num_candidates(self) -> int:
        return self.num_expand + self.num_collapse

    @property
    def num_variants(self) -> int:
        return self.num_candidates + 1

    @property
    def window_len(self) -> int:
        return self.prefix_len + self.horizon


def _collapsible_heads(entries, num_tokens: int, mc: MCConfig) -> list[int]:
    """Entry indices that head a collapsible group: the allocator's rule
    (`working_context.collapse_groups(...).heads`, i.e. `legal_collapse_heads`) on the
    entry list laid out as a WC."""
    wc = wcm.from_entries(entries, num_tokens, mc)
    heads = wcm.legal_collapse_heads(wc.level, wc.node, wc.valid, wc.num_tokens, mc)
    return [int(i) for i in np.flatnonzero(np.asarray(heads))]


@functools.lru_cache(maxsize=16)
def lens_layout_bank(task: LensTask):
    """`num_layouts` legal compressed WCs of the prefix, stacked: a WorkingContext of numpy
    arrays with a leading layout axis. Deterministic in `task` (host, numpy, cached).

    Layout i starts from `initial_layout` at a budget spread between the coarsest legal
    one and w_max − (K − 1), then takes up to `max_random_edits` random legal edits (a
    collapse or an expansion, equally likely) that keep K − 1 slots free, so every layout
    can still take any single counterfactual expansion.
    """
    with jax.ensure_compile_time_eval():  # host constants, even when first asked inside jit
        return _build_layout_bank(task)


def _build_layout_bank(task: LensTask):
    mc, T, K = task.mc, task.prefix_len, task.mc.block_size
    rng = np.random.default_rng([task.layout_seed, 0x1E45])
    room = mc.w_max - (K - 1)
    lo = max(wcm.min_slots(T, mc), wcm.sink_tokens(mc) + mc.recent_protect + K)
    budgets = np.linspace(lo, room, task.num_layouts).round().astype(int)
    layouts = []
    for budget in budgets:
        start = wcm.initial_layout(T, dataclasses.replace(mc, w_max=int(budget)))
        entries = [(lv, nd) for lv, nd, _, _ in wcm.to_entries(start)]
        for _ in range(int(rng.integers(0, task.max_random_edits + 1))):
            expands = ([i for i, (lv, _) in enumerate(entries) if lv >= 1]
                       if len(entries) + K - 1 <= room else [])
            heads = _collapsible_heads(entries, T, mc)
            kinds = [k for k, c in (("expand", expands), ("collapse", heads)) if c]
            if not kinds:
                break
            kind = kinds[int(rng.integers(len(kinds)))]
            if kind == "expand":
                i = expands[int(rng.integers(len(expands)))]
                lv, nd = entries[i]
                entries[i: i + 1] = [(lv - 1, nd * K + r) for r in range(K)]
            else:
                i = heads[int(rng.integers(len(heads)))]
                lv, nd = entries[i]
                entries[i: i + K] = [(lv + 1, nd // K)]
        wc = wcm.from_entries(entries, T, mc)
        wcm.check_invariants(wc, None, mc)
        layouts.append(jax.tree.map(np.asarray, wc))
    return jax.tree.map(lambda *xs: np.stack(xs), *layouts)


def prefix_keys(base_params, base_cfg: LlamaConfig, rc: RetrievalConfig, prefix: jax.Array,
                block_size: int) -> jax.Array:
    """Retrieval keys [B, P/K, width] of every block of token ids [B, P], in the storage
    dtype: what a tree's `retrieval.BlockKeys` keeps for a history that starts at the
    window (chunks of `rc.chunk` aligned to it)."""
    B, P = prefix.shape
    keys = base.read_pass_core(base_params, base_cfg, prefix, chunk=rc.chunk,
                               hidden_layer=None, qk_layers=tuple(rc.layers))["keys"]
    width = retrieval_lib.key_width(rc, base_cfg, block_size)
    return keys.reshape(B, P // block_size, width).astype(retrieval_lib.key_dtype(rc))


def prefix_tree(gist_fn: Callable, children: jax.Array, tokens: jax.Array, task: LensTask,
                keys: jax.Array | None = None):
    """Batched TreeView of each window's prefix: token ids [B, P], LOD1 gists of every block
    (from `children` [B, ≥P, D], the LOD1 children `gist_inputs` gives: embeddings or
    read-pass hidden states) and, level by level, gists of every complete group of K lower
    gists ([B, max(n, 1), D]; a level with no complete group keeps one zero row and count
    0); `keys` [B, P/K, width] (`prefix_keys`) are kept as the view's retrieval keys."""
    mc, P = task.mc, task.prefix_len
    B = tokens.shape[0]
    prefix = tokens[:, :P]
    if children.shape[0] != B or children.shape[1] < P:
        raise ValueError(f"children {children.shape} do not cover the [{B}, {P}] prefix")
    gists = gist_levels(gist_fn, children[:, :P], mc.block_size, mc.num_levels,
                        dtype=jnp.dtype(mc.gist_dtype))
    counts = [P // mc.block_size ** lvl for lvl in range(mc.num_levels + 1)]
    counts = jnp.broadcast_to(jnp.asarray(counts, jnp.int32), (B, mc.num_levels + 1))
    return TreeView(tokens=prefix.astype(jnp.int32), gists=tuple(gists), counts=counts,
                    keys=keys)


@flax.struct.dataclass
class Candidates:
    """C candidate actions on one WC: expansions first, then collapses."""

    kind: jax.Array  # [..., C] int32 EXPAND_CANDIDATE / COLLAPSE_CANDIDATE
    slot: jax.Array  # [..., C] int32 the gist's slot / the group's first slot
    valid: jax.Array  # [..., C] bool: a legal action was drawn and applies


def sample_candidates(wc, rng: jax.Array, task: LensTask) -> Candidates:
    """Draw `num_expand` legal expansions and `num_collapse` legal collapses of one WC,
    uniformly without replacement (Gumbel-style top-k of uniform keys over the legal
    mask); slots beyond what is legal are marked invalid."""
    mc = task.mc
    k_exp, k_col = jax.random.split(rng)
    legal_exp = wcm.legal_expand_mask(wc.level, wc.valid, mc)
    legal_col = wcm.legal_collapse_heads(wc.level, wc.node, wc.valid, wc.num_tokens, mc)

    def draw(key, legal, k):
        if k == 0:
            return jnp.zeros((0,), jnp.int32), jnp.zeros((0,), bool)
        keys = jnp.where(legal, jax.random.uniform(key, legal.shape), -1.0)
        vals, idx = jax.lax.top_k(keys, k)
        return idx.astype(jnp.int32), vals >= 0.0

    e_slot, e_ok = draw(k_exp, legal_exp, task.num_expand)
    c_slot, c_ok = draw(k_col, legal_col, task.num_collapse)
    kind = jnp.concatenate([jnp.full((task.num_expand,), EXPAND_CANDIDATE, jnp.int32),
                            jnp.full((task.num_collapse,), COLLAPSE_CANDIDATE, jnp.int32)])
    return Candidates(kind=kind, slot=jnp.concatenate([e_slot, c_slot]),
                      valid=jnp.concatenate([e_ok, c_ok]))


def candidate_variants(wc, cands: Candidates, task: LensTask):
    """The V = C + 1 variant WCs of one example (variant 0: `wc` unchanged) and, per
    candidate, whether its edit applied (an illegal or over-budget edit leaves the WC as
    is and is marked invalid)."""
    W = task.mc.w_max
    at = (jnp.arange(W)[None, :] == cands.slot[:, None]) & cands.valid[:, None]
    expand_masks = at & (cands.kind == EXPAND_CANDIDATE)[:, None]
    collapse_heads = at & (cands.kind == COLLAPSE_CANDIDATE)[:, None]
    edited, ok = jax.vmap(lambda e, c: wcm.apply_edits(wc, e, c, task.mc))(
        expand_masks, collapse_heads)
    variants = jax.tree.map(lambda a, b: jnp.concatenate([a[None], b]), wc, edited)
    return variants, cands.valid & ok


def _source_tokens(variants, task: LensTask) -> jax.Array:
    """[V, H] the last token held by the slot predicting each target of one example's
    variants: the WC's newest slot for target 0, continuation token P + i − 1 for i."""
    mc, P, H = task.mc, task.prefix_len, task.horizon
    last = newest_slot(variants)[:, None]
    last_level = jnp.take_along_axis(variants.level, last, axis=1)[:, 0]
    last_node = jnp.take_along_axis(variants.node, last, axis=1)[:, 0]
    last_token = (last_node + 1) * wcm.span_size(last_level, mc) - 1
    V = last_token.shape[0]
    return jnp.concatenate(
        [last_token[:, None], jnp.broadcast_to(P + jnp.arange(H - 1, dtype=jnp.int32),
                                               (V, H - 1))], axis=1)


@flax.struct.dataclass
class Counterfactuals:
    """Everything the lens objective needs, per example (leading batch axis B)."""

    wc: Any  # WorkingContext [B, W]: the compressed WC LensNet scores
    slot_embeds: jax.Array  # [B, W, D] its materialized slots
    tail: Any  # TailGists [B, Nt, D]
    candidates: Candidates  # [B, C]
    valid: jax.Array  # [B, C] candidate drawn and applied
    nll: jax.Array  # [B, V, H] per-target NLL of each variant (variant 0: the WC as is)
    targets: jax.Array  # [B, H] tokens[P : P + H], the same for every variant
    source_token: jax.Array  # [B, V, H] last token held by the slot predicting each target
    value: jax.Array  # [B, C] value of detail of each candidate's span (nats/token)
    nll_full: jax.Array | None = None  # [B, H] NLL given the whole raw window, if computed
    # with the task's retrieval read (LensTask.retrieval): the retrieval policy's block
    # scores [B, C1], and what LensNet v2 reads — the question [B, Q, D] (lens.query_tokens
    # > 0) and the slots' retrieval features [B, W, 2] (lens.retrieval_features)
    retrieval_blocks: jax.Array | None = None
    query: Any = None  # lens.QueryTokens
    slot_retrieval: jax.Array | None = None

    def lens_inputs(self) -> tuple:
        """LensNet's arguments after (slot_embeds, wc, tail): (query, slot_retrieval)."""
        return self.query, self.slot_retrieval


def gistnet_counterfactuals(gist_params, gist_cfg: GistConfig, base_params,
                            base_cfg: LlamaConfig, tokens: jax.Array, rng: jax.Array,
                            task: LensTask, *, with_full_context: bool = False
                            ) -> Counterfactuals:
    """`counterfactuals` with GistNet's gists of its configured LOD1 children (the
    `gist_inputs` rule: the same gists the runtime's tree holds)."""
    fn, children = gist_inputs("gistnet", base_params, base_cfg,
                               jax.lax.stop_gradient(gist_params), gist_cfg,
                               tokens[:, : task.prefix_len])
    return counterfactuals(fn, base_params, base_cfg, tokens, rng, task, children=children,
                           with_full_context=with_full_context)


def counterfactuals(gist_fn: Callable, base_params, base_cfg: LlamaConfig, tokens: jax.Array,
                    rng: jax.Array, task: LensTask, *, children: jax.Array,
                    with_full_context: bool = False) -> Counterfactuals:
    """Compressed WCs, candidate actions and their counterfactual NLLs for a batch of windows
    [B, ≥ P + H]: one batched forward over B · (C + 1) variants. `gist_fn` gists the
    prefix's LOD1 `children` [B, P, D] (see `prefix_tree`). Constant w.r.t. every parameter
    (stop_gradient): utilities are targets, not paths for gradients."""
    base_params = jax.lax.stop_gradient(base_params)
    mc, P, H = task.mc, task.prefix_len, task.horizon
    if tokens.shape[1] < task.window_len:
        raise ValueError(f"windows of {tokens.shape[1]} tokens are shorter than prefix "
                         f"{P} + horizon {H}")
    B, V = tokens.shape[0], task.num_variants
    rc, lc = task.retrieval, task.lens or LensConfig()
    block_keys = (None if rc is None else
                  prefix_keys(base_params, base_cfg, rc, tokens[:, :P], mc.block_size))
    views = jax.lax.stop_gradient(prefix_tree(gist_fn, children, tokens, task, block_keys))
    bank = jax.tree.map(jnp.asarray, lens_layout_bank(task))
    keys = jax.random.split(rng, B)

    def per_example(key, view):
        k_layout, k_cand = jax.random.split(key)
        pick = jax.random.randint(k_layout, (), 0, task.num_layouts)
        wc = jax.tree.map(lambda x: x[pick], bank)
        cands = sample_candidates(wc, k_cand, task)
        variants, ok = candidate_variants(wc, cands, task)
        scored = working_context_input(variants, view, base_params, mc, H)
        tail = lens_lib.tail_gists(view, mc)
        slot_embeds = scored[0].embeds[0]
        cond = {}
        if rc is not None:  # one read of the newest tokens, as the runtime's refocus
            read = retrieval_lib.stream_conditioning(
                base_params, base_cfg, rc, mc, view.tokens, view.keys, view.counts,
                hidden_layer=lc.query_layer if lc.query_tokens else None,
                hidden_tokens=lc.query_tokens)
            cond["retrieval_blocks"] = read["blocks"]
            if lc.query_tokens:
                cond["query"] = lens_lib.QueryTokens(
                    hidden=read["hidden"].astype(slot_embeds.dtype), valid=read["hidden_valid"])
            if lc.retrieval_features:
                cond["slot_retrieval"] = retrieval_lib.slot_retrieval_features(
                    wc, read["rel"], read["blocks"], mc)
        return wc, slot_embeds, tail, cands, ok, scored, _source_tokens(variants, task), cond

    wc, slot_embeds, tail, cands, ok, scored, source_token, cond = jax.vmap(per_example)(
        keys, views)
    flat = lambda x: x.reshape((B * V,) + x.shape[2:])  # noqa: E731
    context, newest, positions = jax.tree.map(flat, scored)
    targets = tokens[:, P: P + H]
    flat_targets = jnp.repeat(targets, V, axis=0)
    logp = score_continuation(base_params, base_cfg, flat_targets, positions,
                              context=context, newest=newest)
    nll = -token_logprobs(logp, flat_targets).reshape(B, V, H)
    mean_nll = nll.mean(-1)
    change = mean_nll[:, 1:] - mean_nll[:, :1]  # NLL change of each single action
    value = jnp.where(cands.kind == EXPAND_CANDIDATE, -change, change)
    value = jnp.where(ok, value, 0.0)
    nll_full = (raw_context_nll(base_params, base_cfg, tokens[:, : P + H], H)[0]
                if with_full_context else None)
    return jax.lax.stop_gradient(Counterfactuals(
        wc=wc, slot_embeds=slot_embeds, tail=tail, candidates=cands, valid=ok, nll=nll,
        targets=targets, source_token=source_token, value=value, nll_full=nll_full, **cond))


# The resolution of utilities, nats/token: per-example spreads well below it give
# near-zero targets (no confident action for differences that do not matter); a pure
# std-normalisation would blow float-level differences up to full-size targets.
UTILITY_EPS = 1e-2


def normalized_utility(value: jax.Array, valid: jax.Array, eps: float) -> jax.Array:
    """Per example: tanh((value − mean) / (std + eps)) over the valid candidates [.., C];
    0 where invalid. The mean is the budget's price (zero-sum), std makes it scale-free."""
    n = jnp.maximum(jnp.sum(valid, -1, keepdims=True), 1)
    mean = jnp.sum(jnp.where(valid, value, 0.0), -1, keepdims=True) / n
    var = jnp.sum(jnp.where(valid, (value - mean) ** 2, 0.0), -1, keepdims=True) / n
    return jnp.where(valid, jnp.tanh((value - mean) / (jnp.sqrt(var) + eps)), 0.0)


def candidate_scores(scores: jax.Array, cands: Candidates, block_size: int) -> jax.Array:
    """What the allocator reads for each candidate of one WC: the slot's score for an
    expansion, the mean score of the K siblings for a collapse. scores [W] -> [C]."""
    group = jax.vmap(lambda s: jax.lax.dynamic_slice(scores, (s,), (block_size,)))(cands.slot)
    return jnp.where(cands.kind == EXPAND_CANDIDATE, scores[cands.slot], group.mean(-1))


def lens_task(cfg: ExperimentConfig, candidates: int = 4, *,
              retrieval: bool | None = None) -> LensTask:
    """The counterfactual task of a config: the WC covers the window's prefix
    (seq_len − H tokens), scored on the H continuation tokens. `retrieval` (default: when
    LensNet is v2, which needs it) adds the query-aware read — the question's hidden
    states and the blocks' retrieval scores, as the runtime's refocus computes them."""
    if retrieval is None:
        retrieval = cfg.lens.conditioned
    # LensTask.build refuses a v2 LensNet without the retrieval read
    return LensTask.build(cfg.mc, window_prefix_len(cfg), candidates=candidates,
                          layout_seed=cfg.train.seed,
                          retrieval=cfg.retrieval if retrieval else None, lens=cfg.lens)
