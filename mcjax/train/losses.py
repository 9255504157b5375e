"""Training objectives (SPEC §2.8).

GistNet substitutability. A window of S = P + H tokens is split into a block-aligned
prefix of P tokens and H continuation tokens. The *compressed* working context is

    [sink ‖ gists ‖ raw tail ‖ continuation]

— the window's first `sink_blocks` blocks stay raw (the frozen model's attention sink
forms at the physically first slot, SPEC §1), the span after them is replaced by gists
(one LOD2 gist per group of 32 blocks when enabled, LOD1 for the rest), and the newest
`keep_raw_blocks` prefix blocks stay raw. The *uncompressed* context is the raw window;
*truncation* drops the gisted span (keeping the same sink). Every variant is scored on the
identical targets, each predicted from the slot holding the previous token
(`target[i] = token[i + 1]`):

    ΔNLL@H = NLL(compressed) − NLL(uncompressed)   on tokens[P : P + H].

Dense supervision (`dense=True`, SPEC §2.8 item 4): the loss also covers every raw-tail
position — a target at raw block m of the tail is predicted with m raw blocks of detail
and gists for the rest, so one forward trains every keep-raw level from 1 to
`keep_raw_blocks`, with ~`keep_raw_blocks`·K + H targets instead of H.

In training the LOD2 group starts right after the sink (blocks 1..32 of the window): the
window is a history of its own and only the runtime's trees are 1,024-aligned.

LOD1 children are the block's token embeddings (`GistConfig.input="embeddings"`) or the
frozen base model's read-pass hidden states after `input_layer` layers (`"hidden"`),
read in independent chunks of `read_chunk` tokens aligned to the window start — exactly
what the runtime's read pass computes for a history that starts at the window.

The gists flow into the frozen base model as input embeddings; gradients reach GistNet
only (the base params are a separate, undifferentiated pytree).

LensNet counterfactual focus (`LensTask`, `counterfactuals`, `lens_objective`,
`lens_loss`): see the section comment further down.
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
from mcjax.config import GistConfig, LensConfig, LlamaConfig, MCConfig, RetrievalConfig
from mcjax.gist import GistNet
from mcjax.tree import TreeView

Params = Any


@dataclasses.dataclass(frozen=True)
class GistLayout:
    """Static slot layout of a compressed window (hashable: a jit static argument)."""

    block_size: int
    prefix_len: int  # P, a multiple of block_size
    horizon: int  # H
    keep_raw_blocks: int  # newest prefix blocks kept as raw tokens
    lod2_groups: int  # LOD2 gists (each 32 blocks)
    lod1_blocks: int  # LOD1 gists after the LOD2 groups
    position_scheme: str = "compact"  # MCConfig's default
    sink_blocks: int = 0  # oldest prefix blocks kept raw (the attention sink)

    @classmethod
    def build(cls, mc: MCConfig, prefix_len: int, *, keep_raw_blocks: int = 1,
              use_lod2: bool = True, horizon: int | None = None,
              sink_blocks: int | None = None) -> "GistLayout":
        K = mc.block_size
        sink = mc.sink_blocks if sink_blocks is None else sink_blocks
        if prefix_len % K or prefix_len <= 0:
            raise ValueError(f"prefix_len ({prefix_len}) must be a positive multiple of "
                             f"block_size ({K})")
        blocks = prefix_len // K
        if not 0 <= keep_raw_blocks < blocks - sink:
            raise ValueError(f"keep_raw_blocks={keep_raw_blocks} with sink_blocks={sink} "
                             f"leaves nothing to compress in a prefix of {blocks} blocks")
        compressible = blocks - sink - keep_raw_blocks
        groups = compressible // K if (use_lod2 and mc.num_levels >= 2) else 0
        return cls(block_size=K, prefix_len=prefix_len, horizon=horizon or mc.horizon,
                   keep_raw_blocks=keep_raw_blocks, lod2_groups=groups,
                   lod1_blocks=compressible - groups * K,
                   position_scheme=mc.position_scheme, sink_blocks=sink)

    @property
    def window_len(self) -> int:
        return self.prefix_len + self.horizon

    @property
    def sink_len(self) -> int:
        """Raw sink tokens at the front of every variant."""
        return self.sink_blocks * self.block_size

    @property
    def raw_start(self) -> int:
        """First raw token of the compressed context after the sink."""
        return self.prefix_len - self.keep_raw_blocks * self.block_size

    @property
    def compressed_tokens(self) -> int:
        return self.raw_start - self.sink_len

    @property
    def num_gists(self) -> int:
        return self.lod2_groups + self.lod1_blocks

    @property
    def num_tail_inputs(self) -> int:
        """Raw tail + continuation input slots (the last token is only a target)."""
        return self.window_len - 1 - self.raw_start

    @property
    def num_slots(self) -> int:
        return self.sink_len + self.num_gists + self.num_tail_inputs

    @property
    def compression_ratio(self) -> float:
        return self.compressed_tokens / max(self.num_gists, 1)

    def scored(self, dense: bool) -> int:
        """Targets scored per window: H, or every raw-tail position with `dense`."""
        return self.num_tail_inputs if dense else self.horizon

    def positions(self, truncated: bool = False) -> np.ndarray:
        """Slot positions [num_slots] (or of the truncated context: sink + raw tail)."""
        K, S = self.block_size, self.sink_len
        sink = np.arange(S)
        raw = np.arange(self.raw_start, self.window_len - 1)
        if truncated:
            return (np.concatenate([sink, raw]) if self.position_scheme == "absolute"
                    else np.arange(S + len(raw))).astype(np.int32)
        if self.position_scheme == "compact":
            return np.arange(self.num_slots, dtype=np.int32)
        lod2 = S + np.arange(self.lod2_groups) * K * K + K * K // 2
        first1 = S + self.lod2_groups * K * K
        lod1 = first1 + np.arange(self.lod1_blocks) * K + K // 2
        return np.concatenate([sink, lod2, lod1, raw]).astype(np.int32)


def continuation_targets(tokens: jax.Array, layout: GistLayout, dense: bool = False
                         ) -> jax.Array:
    """Scored targets: tokens[P : P + H], or tokens[raw_start + 1 : P + H] with `dense`
    (the same for every variant)."""
    first = layout.window_len - layout.scored(dense)
    return tokens[:, first: layout.window_len]


def _nll_and_logprobs(base_params, base_cfg, embeds, positions, targets, num_scored):
    """NLL [B, n] of `targets` from the last `num_scored` slots, and their log-probs."""
    B = embeds.shape[0]
    pos = jnp.broadcast_to(jnp.asarray(positions, jnp.int32), (B, embeds.shape[1]))
    hidden = base.forward_core(base_params, base_cfg, None, embeds, pos,
                               jnp.ones(pos.shape, bool), return_hidden=True)
    logits = base.logits_from_hidden(base_params, base_cfg, hidden[:, -num_scored:])
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return nll, logp


def lod1_children(base_params, base_cfg: LlamaConfig, gist_cfg: GistConfig,
                  tokens: jax.Array) -> jax.Array:
    """LOD1 children [B, T, D] of token ids [B, T] (T from the window start): token
    embeddings, or read-pass hidden states (chunks aligned to the window start)."""
    if gist_cfg.input == "hidden":
        return jax.lax.stop_gradient(base.layer_hidden_core(
            base_params, base_cfg, tokens, gist_cfg.input_layer, gist_cfg.read_chunk))
    return base.embed_tokens(base_params, tokens)


def gist_inputs(variant: str, base_params, base_cfg: LlamaConfig, gist_params,
                gist_cfg: GistConfig, prefix: jax.Array) -> tuple[Callable, jax.Array]:
    """(gist_fn, LOD1 children) with which a context variant gists a window's prefix
    [B, P]: gistnet — GistNet on its configured children; mean_pool — the mean of the
    token embeddings; mean_pool_hidden — the mean of the read-pass hidden states after
    `gist_cfg.input_layer` layers, rescaled to the embeddings' RMS."""
    if variant == "gistnet":
        return (gistnet_fn(gist_params, gist_cfg, base_cfg.hidden_size),
                lod1_children(base_params, base_cfg, gist_cfg, prefix))
    if variant == "mean_pool":
        return mean_pool_gist_fn, base.embed_tokens(base_params, prefix)
    if variant == "mean_pool_hidden":
        rms = jnp.sqrt(jnp.mean(jnp.square(base_params["embed"]["embedding"].astype(
            jnp.float32))))
        return rescaled_mean_pool_fn(rms), lod1_children(
            base_params, base_cfg, dataclasses.replace(gist_cfg, input="hidden"), prefix)
    raise ValueError(f"unknown gist variant {variant!r}; known: gistnet, mean_pool, "
                     f"mean_pool_hidden")


def make_gists(gist_fn: Callable, children: jax.Array, layout: GistLayout) -> jax.Array:
    """[B, num_gists, D] gists of the compressed span: LOD2 groups, then LOD1 blocks.

    `children` [B, ≥raw_start, D] are the window's LOD1 children from its start;
    `gist_fn(children [N, K, D], level) -> [N, D]`. LOD2 gists are built from LOD1 gists
    (as in the tree), so gradients flow through both levels.
    """
    B, _, D = children.shape
    K = layout.block_size
    n1_total = layout.lod2_groups * K + layout.lod1_blocks
    blocks = children[:, layout.sink_len: layout.raw_start].reshape(B * n1_total, K, D)
    lod1 = gist_fn(blocks, 1).reshape(B, n1_total, D)
    parts = []
    if layout.lod2_groups:
        groups = lod1[:, : layout.lod2_groups * K].reshape(B * layout.lod2_groups, K, D)
        parts.append(gist_fn(groups, 2).reshape(B, layout.lod2_groups, D))
    parts.append(lod1[:, layout.lod2_groups * K:])
    return jnp.concatenate(parts, axis=1)


def mean_pool_gist_fn(children: jax.Array, level) -> jax.Array:
    """Baseline 'gist': the mean of the children (token embeddings or lower gists)."""
    del level
    return jnp.mean(children, axis=1)


def rescaled_mean_pool_fn(target_rms: float) -> Callable:
    """Baseline 'gist' for hidden-state children: their mean, rescaled to RMS
    `target_rms` (the token embeddings' scale; hidden states live at another scale)."""
    def fn(children, level):
        del level
        m = jnp.mean(children.astype(jnp.float32), axis=1)
        return m * (target_rms / jnp.sqrt(jnp.mean(m * m, axis=-1, keepdims=True) + 1e-12))
    return fn


def compressed_embeds(base_params, tokens: jax.Array, layout: GistLayout,
                      gists: jax.Array | None) -> tuple[jax.Array, np.ndarray]:
    """Input embeddings and positions of a window's compressed context: [sink ‖ gists ‖
    raw tail ‖ continuation], or without gists (truncation) when `gists` is None."""
    embeds = base.embed_tokens(base_params, tokens[:, : layout.window_len - 1])
    parts = [embeds[:, : layout.sink_len]]
    if gists is not None:
        parts.append(gists.astype(embeds.dtype))
    parts.append(embeds[:, layout.raw_start:])
    return jnp.concatenate(parts, axis=1), layout.positions(truncated=gists is None)


def substitution_nll(base_params, base_cfg: LlamaConfig, tokens: jax.Array, layout: GistLayout,
                     gist_fn: Callable | None, *, children: jax.Array | None = None,
                     dense: bool = False) -> tuple[jax.Array, jax.Array]:
    """NLL [B, n] (and log-probs) of the scored targets with the compressed prefix, or
    truncated if `gist_fn` is None. `children` default to the token embeddings."""
    gists = None
    if gist_fn is not None:
        if children is None:
            children = base.embed_tokens(base_params, tokens[:, : layout.raw_start])
        gists = make_gists(gist_fn, children, layout)
    return substitution_nll_from_gists(base_params, base_cfg, tokens, layout, gists,
                                       dense=dense)


def substitution_nll_from_gists(base_params, base_cfg: LlamaConfig, tokens: jax.Array,
                                layout: GistLayout, gists: jax.Array | None, *,
                                dense: bool = False) -> tuple[jax.Array, jax.Array]:
    """As `substitution_nll`, with the gist vectors [B, num_gists, D] given directly
    (free vectors for the ceiling, or precomputed gists); None is truncation."""
    embeds, pos = compressed_embeds(base_params, tokens, layout, gists)
    return _nll_and_logprobs(base_params, base_cfg, embeds, pos,
                             continuation_targets(tokens, layout, dense),
                             layout.scored(dense))


def full_context_nll(base_params, base_cfg: LlamaConfig, tokens: jax.Array, layout: GistLayout,
                     dense: bool = False):
    """NLL [B, n] and log-probs of the scored targets given the whole raw window."""
    inputs = tokens[:, : layout.window_len - 1]
    embeds = base.embed_tokens(base_params, inputs)
    return _nll_and_logprobs(base_params, base_cfg, embeds, np.arange(inputs.shape[1]),
                             continuation_targets(tokens, layout, dense),
                             layout.scored(dense))


def gistnet_fn(gist_params, gist_cfg: GistConfig, embed_dim: int) -> Callable:
    module = GistNet(gist_cfg, embed_dim)
    return lambda children, level: module.apply({"params": gist_params}, children, level)


def kl_to_teacher(teacher_logp: jax.Array, student_logp: jax.Array) -> jax.Array:
    """KL(teacher ‖ student) [B, n] per scored position."""
    return jnp.sum(jnp.exp(teacher_logp) * (teacher_logp - student_logp), axis=-1)


def gist_loss(gist_params, base_params, tokens: jax.Array, *, base_cfg: LlamaConfig,
              gist_cfg: GistConfig, layout: GistLayout, nll_weight: float = 1.0,
              kl_weight: float = 1.0, dense: bool = False
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Substitutability loss: nll_weight·NLL + kl_weight·KL(full ‖ compressed), over the
    H continuation targets or (dense) every raw-tail position. Metrics `delta_nll` and
    `kl_h` are always over the H continuation targets, comparable across layouts."""
    base_params = jax.lax.stop_gradient(base_params)
    full_nll, full_logp = full_context_nll(base_params, base_cfg, tokens, layout, dense)
    full_nll, full_logp = jax.lax.stop_gradient((full_nll, full_logp))
    fn, children = gist_inputs("gistnet", base_params, base_cfg, gist_params, gist_cfg,
                               tokens[:, : layout.raw_start])
    nll, logp = substitution_nll(base_params, base_cfg, tokens, layout, fn, children=children,
                                 dense=dense)
    kl = kl_to_teacher(full_logp, logp)
    loss = nll_weight * nll.mean() + kl_weight * kl.mean()
    H = layout.horizon
    return loss, {"loss": loss, "nll": nll[:, -H:].mean(), "nll_full": full_nll[:, -H:].mean(),
                  "delta_nll": (nll - full_nll)[:, -H:].mean(), "kl": kl.mean(),
                  "kl_h": kl[:, -H:].mean()}


# =========================================================================== LensNet
#
# Counterfactual focus (SPEC §2.8.2). For each window of S = P + H tokens:
#
# 1. The prefix [0, P) forms a MegaContext tree (LOD1 gists of every block, LOD2 gists of
#    every complete group, made by GistNet from LOD1 gists as the tree does) and a
#    *compressed* working context over it: one of a bank of legal layouts (initial layouts
#    at several budgets, plus a few random expands/collapses so older spans are sometimes
#    fine and newer ones coarse), each leaving room for one more expansion.
# 2. C candidate actions are drawn from the legal ones: `num_expand` gists to expand and
#    `num_collapse` aligned sibling groups to collapse.
# 3. One batched forward of the frozen base model scores V = C + 1 variants — the WC as is
#    and the WC with each single action applied — on the identical H continuation targets
#    tokens[P : P + H]. Each variant is packed as [WC slots (W, padding masked) ‖ tokens
#    P .. P+H-2]; target 0 is predicted from the WC's last valid slot (token P-1), target i
#    from the continuation slot holding token P+i-1. ΔNLL@H differences between variants
#    are the counterfactual utilities (the full-context NLL cancels out).
# 4. The *value of detail* of a candidate, in nats/token, is what its span's detail is
#    worth: for an expansion the NLL it saves, for a collapse the NLL it costs. Both should
#    map to the same signed score: expand a gist when its value beats the budget's price,
#    collapse a group when its value is below it. Per example the price is the mean value
#    over the candidates (zero-sum: expansions are paid for by collapses) and the spread is
#    normalised: target = tanh((value − mean) / (std + utility_eps)); utility_eps (0.01
#    nats/token) is the resolution below which utility differences give small targets.
#
# Query-aware conditioning (`LensTask.retrieval` set; LensNet v2 needs it): the prefix's
# tree also keeps the read-pass retrieval keys of every block, and per window the newest
# prefix tokens are read once as the runtime's refocus reads a stream's history
# (`retrieval.stream_conditioning`): the question's hidden states, the blocks' relevance
# and retrieval scores. LensNet v2 scores the WC with them; the retrieval policy's slot
# scores come from the same read (what `focus_quality` compares).
#
# Loss on LensNet's scores (gradients reach LensNet only; the utilities are constants):
#   regression · mean (ŝ − target)²   ŝ = the slot's score (expand) or the group's mean
#                                       score (collapse), exactly what the allocator reads
# + ranking    · Bradley–Terry: −log σ(β (ŝ_i − ŝ_j)) over candidate pairs with
#                value_i > value_j, weighted by |target_i − target_j|, mean over pairs
# + budget     · (Σ_legal-expands relu(s) − Σ_legal-groups relu(−mean s))² / n_legal²:
#                expansion pressure is balanced by collapse pressure
# + illegal    · mean over valid slots of the squared illegal part of the *unmasked* score
#                (LOD0 expanding, top level / protected tail collapsing); the output mask
#                hides these, the penalty keeps the raw head honest
# =========================================================================== LensNet

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
    K = mc.block_size
    B = tokens.shape[0]
    prefix = tokens[:, :P]
    if children.shape[0] != B or children.shape[1] < P:
        raise ValueError(f"children {children.shape} do not cover the [{B}, {P}] prefix")
    lower = children[:, :P]
    D = lower.shape[-1]
    gists, counts = [], [P]
    for lvl in range(1, mc.num_levels + 1):
        n = counts[-1] // K
        if n:
            rows = gist_fn(lower[:, : n * K].reshape(B * n, K, D), lvl).reshape(B, n, D)
        else:
            rows = jnp.zeros((B, 1, D), jnp.float32)
        gists.append(rows.astype(jnp.dtype(mc.gist_dtype)))
        counts.append(n)
        lower = rows
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


def _variant_inputs(variants, tree_view, base_params, tokens, task: LensTask):
    """Packed base-model inputs of one example's variants: embeds [V, W+H-1, D], positions,
    mask, the slot predicting each target [V, H] and the last token that slot holds."""
    mc, P, H, W = task.mc, task.prefix_len, task.horizon, task.mc.w_max
    emb, pos, valid = jax.vmap(lambda wc: wcm.materialize(wc, tree_view, base_params, mc))(
        variants)
    V = emb.shape[0]
    n_valid = jnp.sum(valid, axis=-1, dtype=jnp.int32)  # [V]
    cont = base.embed_tokens(base_params, tokens[P: P + H - 1]).astype(emb.dtype)
    cont_pos = (P + jnp.arange(H - 1, dtype=jnp.int32)[None, :] if mc.position_scheme ==
                "absolute" else n_valid[:, None] + jnp.arange(H - 1, dtype=jnp.int32))
    embeds = jnp.concatenate([emb, jnp.broadcast_to(cont, (V,) + cont.shape)], axis=1)
    positions = jnp.concatenate([pos, jnp.broadcast_to(cont_pos, (V, H - 1))], axis=1)
    mask = jnp.concatenate([valid, jnp.ones((V, H - 1), bool)], axis=1)
    last = n_valid - 1
    predict_slot = jnp.concatenate(
        [last[:, None], jnp.broadcast_to(W + jnp.arange(H - 1, dtype=jnp.int32), (V, H - 1))],
        axis=1)
    last_level = jnp.take_along_axis(variants.level, last[:, None], axis=1)[:, 0]
    last_node = jnp.take_along_axis(variants.node, last[:, None], axis=1)[:, 0]
    last_token = (last_node + 1) * wcm.span_size(last_level, mc) - 1
    source_token = jnp.concatenate(
        [last_token[:, None], jnp.broadcast_to(P + jnp.arange(H - 1, dtype=jnp.int32),
                                               (V, H - 1))], axis=1)
    return embeds, positions, mask, predict_slot, source_token


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

    def per_example(key, view, toks):
        k_layout, k_cand = jax.random.split(key)
        pick = jax.random.randint(k_layout, (), 0, task.num_layouts)
        wc = jax.tree.map(lambda x: x[pick], bank)
        cands = sample_candidates(wc, k_cand, task)
        variants, ok = candidate_variants(wc, cands, task)
        inputs = _variant_inputs(variants, view, base_params, toks, task)
        tail = lens_lib.tail_gists(view, mc)
        slot_embeds = inputs[0][0, : mc.w_max]
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
        return wc, slot_embeds, tail, cands, ok, inputs, cond

    wc, slot_embeds, tail, cands, ok, inputs, cond = jax.vmap(per_example)(keys, views, tokens)
    embeds, positions, mask, predict_slot, source_token = inputs
    flat = lambda x: x.reshape((B * V,) + x.shape[2:])  # noqa: E731
    hidden = base.forward_core(base_params, base_cfg, None, flat(embeds), flat(positions),
                               flat(mask), return_hidden=True)
    hidden = jnp.take_along_axis(hidden, flat(predict_slot)[..., None], axis=1)  # [BV, H, D]
    logp = jax.nn.log_softmax(base.logits_from_hidden(base_params, base_cfg, hidden), axis=-1)
    targets = tokens[:, P: P + H]
    flat_targets = jnp.repeat(targets, V, axis=0)
    nll = -jnp.take_along_axis(logp, flat_targets[..., None], axis=-1)[..., 0]
    nll = nll.reshape(B, V, H)
    mean_nll = nll.mean(-1)
    change = mean_nll[:, 1:] - mean_nll[:, :1]  # NLL change of each single action
    value = jnp.where(cands.kind == EXPAND_CANDIDATE, -change, change)
    value = jnp.where(ok, value, 0.0)
    if with_full_context:
        inputs_full = tokens[:, : P + H - 1]
        nll_full = _nll_and_logprobs(base_params, base_cfg, base.embed_tokens(
            base_params, inputs_full), np.arange(P + H - 1), targets, H)[0]
    else:
        nll_full = None
    return jax.lax.stop_gradient(Counterfactuals(
        wc=wc, slot_embeds=slot_embeds, tail=tail, candidates=cands, valid=ok, nll=nll,
        targets=targets, source_token=source_token, value=value, nll_full=nll_full, **cond))


@dataclasses.dataclass(frozen=True)
class LensLossConfig:
    """Weights of the lens objective's terms and its two scales."""

    regression: float = 1.0
    ranking: float = 0.5
    budget: float = 0.1
    illegal: float = 0.1
    bt_scale: float = 4.0  # β of the Bradley–Terry logistic on score differences in (−2, 2)
    # nats/token: the resolution of utilities. Per-example spreads well below it give
    # near-zero targets (no confident action for differences that do not matter); a pure
    # std-normalisation would blow float-level differences up to full-size targets.
    utility_eps: float = 1e-2


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


def lens_scores_and_raw(lens_params, lens_cfg: LensConfig, mc: MCConfig, slot_embeds, wc,
                        tail, query=None, slot_retrieval=None) -> tuple[jax.Array, jax.Array]:
    """LensNet's legality-masked scores and its unmasked tanh scores (the `head` output,
    captured), both [..., W]; v2 also reads `query` and `slot_retrieval`."""
    scores, state = lens_lib.LensNet(lens_cfg, mc).apply(
        {"params": lens_params}, slot_embeds, wc, tail, query, slot_retrieval,
        capture_intermediates=lambda module, method: module.name == "head")
    raw = jnp.tanh(state["intermediates"]["head"]["__call__"][0][..., 0].astype(jnp.float32))
    return scores, raw


def lens_objective(lens_params, cf: Counterfactuals, *, lens_cfg: LensConfig, mc: MCConfig,
                   weights: LensLossConfig = LensLossConfig()
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The lens loss (see the section comment) and its metrics for precomputed
    counterfactuals."""
    K, L = mc.block_size, mc.num_levels
    wc, cands, valid = cf.wc, cf.candidates, cf.valid
    scores, raw = lens_scores_and_raw(lens_params, lens_cfg, mc, cf.slot_embeds, wc, cf.tail,
                                      *cf.lens_inputs())
    pred = jax.vmap(lambda s, c: candidate_scores(s, c, K))(scores, cands)  # [B, C]
    target = normalized_utility(cf.value, valid, weights.utility_eps)
    validf = valid.astype(jnp.float32)
    n_valid = jnp.maximum(validf.sum(), 1.0)
    regression = jnp.sum(validf * (pred - target) ** 2) / n_valid

    # Bradley–Terry over ordered pairs (i better than j) within each example
    pair = valid[:, :, None] & valid[:, None, :] & (cf.value[:, :, None] > cf.value[:, None, :])
    pair_w = jnp.where(pair, jnp.abs(target[:, :, None] - target[:, None, :]), 0.0)
    diff = pred[:, :, None] - pred[:, None, :]
    # mean over ordered pairs (not over their weights): near-ties carry ~no loss at all
    ranking = (jnp.sum(pair_w * jax.nn.softplus(-weights.bt_scale * diff))
               / jnp.maximum(jnp.sum(pair), 1))
    pair_accuracy = jnp.sum(pair & (diff > 0)) / jnp.maximum(jnp.sum(pair), 1)

    # zero-sum budget: expansion pressure balanced by collapse pressure, per example
    legal_exp = wcm.legal_expand_mask(wc.level, wc.valid, mc)
    heads = jax.vmap(lambda w: wcm.legal_collapse_heads(w.level, w.node, w.valid,
                                                        w.num_tokens, mc))(wc)
    group_mean = jax.vmap(lambda s: wcm.group_windows(s, K, 0.0).mean(-1))(scores)
    push = (jnp.sum(jnp.where(legal_exp, jax.nn.relu(scores), 0.0), -1)
            - jnp.sum(jnp.where(heads, jax.nn.relu(-group_mean), 0.0), -1))
    n_legal = jnp.maximum(jnp.sum(legal_exp, -1) + jnp.sum(heads, -1), 1)
    budget = jnp.mean((push / n_legal) ** 2)

    # illegal directions of the unmasked head
    prot = wcm.protected_mask(wc.level, wc.node, wc.valid, wc.num_tokens, mc)
    bad_up = wc.valid & (wc.level == 0)
    bad_down = wc.valid & ((wc.level >= L) | prot)
    illegal = (jnp.sum(jnp.where(bad_up, jax.nn.relu(raw) ** 2, 0.0)
                       + jnp.where(bad_down, jax.nn.relu(-raw) ** 2, 0.0))
               / jnp.maximum(jnp.sum(wc.valid), 1))

    loss = (weights.regression * regression + weights.ranking * ranking
            + weights.budget * budget + weights.illegal * illegal)
    metrics = {"loss": loss, "regression": regression, "ranking": ranking, "budget": budget,
               "illegal": illegal, "pair_accuracy": pair_accuracy,
               "score_target_corr": _masked_corr(pred, target, valid),
               "score_value_corr": _masked_corr(pred, cf.value, valid),
               "candidates_valid": jnp.mean(validf),
               "value_abs": jnp.sum(validf * jnp.abs(cf.value)) / n_valid,
               "nll_wc": cf.nll[:, 0].mean()}
    if cf.nll_full is not None:
        metrics["delta_nll_wc"] = (cf.nll[:, 0] - cf.nll_full).mean()
    return loss, metrics


def _masked_corr(x, y, mask):
    m = mask.astype(jnp.float32)
    n = jnp.maximum(m.sum(), 1.0)
    xc = (x - jnp.sum(m * x) / n) * m
    yc = (y - jnp.sum(m * y) / n) * m
    return jnp.sum(xc * yc) / jnp.sqrt(jnp.sum(xc * xc) * jnp.sum(yc * yc) + 1e-12)


def lens_loss(lens_params, gist_params, base_params, tokens: jax.Array, rng: jax.Array, *,
              base_cfg: LlamaConfig, gist_cfg: GistConfig, lens_cfg: LensConfig,
              task: LensTask, weights: LensLossConfig = LensLossConfig(),
              with_full_context: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Counterfactual focus loss of LensNet for a batch of windows. GistNet and the base
    model are frozen here (their params only produce constants)."""
    cf = gistnet_counterfactuals(gist_params, gist_cfg, base_params, base_cfg, tokens, rng,
                                 task, with_full_context=with_full_context)
    return lens_objective(lens_params, cf, lens_cfg=lens_cfg, mc=task.mc, weights=weights)
