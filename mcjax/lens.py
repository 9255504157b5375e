"""LensNet: a Perceiver-IO query decoder that scores every working-context slot (SPEC §2.5).

Encode: a small learned latent array cross-attends to the down-projected WC slots and the
tail gists (keys masked by validity), then a few latent self-attention blocks.
Decode: one output query per slot — built from the slot's content (its materialized
embedding, down-projected) and its features (level, span width, log distance to the decode
cursor in blocks, protected flag) — cross-attends to the latents; a head gives a signed
score in (−1, 1) via tanh (positive = expand, negative = collapse). Illegal directions are
masked to 0 (see `mask_illegal`).

LensNet v2 (`LensConfig.query_tokens`, `retrieval_features`) also sees the question: the
question sits in the newest raw tokens, which no gist summarises yet, so their read-pass
hidden states (`QueryTokens`) join the encoder's inputs, and each slot's retrieval
relevance (`mcjax.retrieval.slot_retrieval_features`) joins its features.

Cost is O(W · (D·d + M·d)) — linear in `w_max`: slots only ever attend to the M latents and
the latents to the slots; no slot-slot attention. Padding slots are zeroed before the
encoder and masked out of its keys, and decoding is per slot, so they cannot influence the
scores of valid slots.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from mcjax.config import LensConfig, MCConfig
from mcjax.working_context import WorkingContext, legal_directions, protected_mask, span_size

__all__ = ["TailGists", "QueryTokens", "LensNet", "tail_gists", "slot_features",
           "mask_illegal", "init_lens", "lens_scores", "NUM_SLOT_FEATURES",
           "NUM_SLOT_RETRIEVAL_FEATURES"]

_NEG = -1e30  # finite "minus infinity" for masked attention logits


@flax.struct.dataclass
class TailGists:
    """LensNet's conditioning set: the newest gists of the history."""

    embeds: jax.Array  # [..., Nt, D]
    level: jax.Array  # [..., Nt] int32
    valid: jax.Array  # [..., Nt] bool


def tail_gists(tree_view, cfg: MCConfig) -> TailGists:
    """The newest `tail_lod1` LOD1 gists and newest `tail_lod2` LOD2 gists (fewer are valid
    while the history is short). Fixed shape [tail_lod1 + tail_lod2, D]; jittable."""
    parts = []
    for lvl, n in ((1, cfg.tail_lod1), (2, cfg.tail_lod2)):
        if n == 0:
            continue
        if lvl > cfg.num_levels:  # a 1-level config has no LOD2: keep the shape, all invalid
            table = tree_view.gists[0]
            count = jnp.int32(0)
        else:
            table = tree_view.gists[lvl - 1]
            count = tree_view.counts[lvl]
        idx = count - n + jnp.arange(n, dtype=jnp.int32)
        rows = table[jnp.clip(idx, 0, table.shape[0] - 1)]
        valid = idx >= 0
        parts.append((jnp.where(valid[:, None], rows, 0), jnp.full((n,), lvl, jnp.int32),
                      valid))
    embeds, level, valid = (jnp.concatenate(x) for x in zip(*parts))
    return TailGists(embeds=embeds, level=level, valid=valid)


@flax.struct.dataclass
class QueryTokens:
    """LensNet v2's view of the question: the newest raw tokens' read-pass hidden states
    (`mcjax.retrieval.tail_read`)."""

    hidden: jax.Array  # [..., Q, D]
    valid: jax.Array  # [..., Q] bool


NUM_SLOT_FEATURES = 4
NUM_SLOT_RETRIEVAL_FEATURES = 2  # `mcjax.retrieval.slot_retrieval_features`


def slot_features(wc: WorkingContext, cfg: MCConfig) -> jax.Array:
    """[..., W, 4] float: span width (log_K, i.e. the level as a real), log distance from the
    slot's end to the decode cursor in blocks, protected-tail flag, validity."""
    size = span_size(wc.level, cfg)
    end = (wc.node + 1) * size
    dist_blocks = (jnp.asarray(wc.num_tokens)[..., None] - end).astype(jnp.float32) / cfg.block_size
    log_span = jnp.log(size.astype(jnp.float32)) / math.log(cfg.block_size)
    prot = protected_mask(wc.level, wc.node, wc.valid, wc.num_tokens, cfg)
    feats = jnp.stack([log_span, jnp.log1p(jnp.maximum(dist_blocks, 0.0)),
                       prot.astype(jnp.float32), wc.valid.astype(jnp.float32)], axis=-1)
    return jnp.where(wc.valid[..., None], feats, 0.0)


def mask_illegal(scores: jax.Array, wc: WorkingContext, cfg: MCConfig) -> jax.Array:
    """Zero the illegal direction of each slot by the allocator's own rules
    (`working_context.legal_directions`): a slot that may not expand (LOD0, the protected
    tail) scores ≤ 0, one outside every collapsible sibling group (the top level, the sink,
    the protected tail, misaligned or incomplete groups) scores ≥ 0; padding scores 0.
    Any leading batch axes."""
    if scores.ndim > 1:
        return jax.vmap(lambda s, w: mask_illegal(s, w, cfg))(scores, wc)
    expand, collapse = legal_directions(wc, cfg)
    scores = jnp.where(expand, scores, jnp.minimum(scores, 0.0))
    scores = jnp.where(collapse, scores, jnp.maximum(scores, 0.0))
    return jnp.where(wc.valid, scores, 0.0)


class _Attention(nn.Module):
    """Multi-head cross-attention; keys optionally masked. Shapes [..., Q, d] x [..., S, d]."""

    width: int
    num_heads: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, q_in, kv_in, kv_mask=None):
        h, dh = self.num_heads, self.width // self.num_heads
        dense = functools.partial(nn.DenseGeneral, features=(h, dh), dtype=self.dtype)
        q = dense(name="q")(q_in)
        k = dense(name="k")(kv_in)
        v = dense(name="v")(kv_in)
        logits = jnp.einsum("...qhd,...khd->...hqk", q, k).astype(jnp.float32) / math.sqrt(dh)
        if kv_mask is not None:
            logits = jnp.where(kv_mask[..., None, None, :], logits, _NEG)
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("...hqk,...khd->...qhd", weights, v)
        return nn.DenseGeneral(self.width, axis=(-2, -1), dtype=self.dtype, name="out")(out)


class _MLP(nn.Module):
    width: int
    hidden: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.hidden, dtype=self.dtype, name="up")(x)
        return nn.Dense(self.width, dtype=self.dtype, name="down")(nn.gelu(x))


class LensNet(nn.Module):
    """Perceiver-IO scorer. `__call__(slot_embeds [..., W, D], wc, tail, query=None,
    slot_retrieval=None) -> scores [..., W]`; `query` (QueryTokens) is required when
    `cfg.query_tokens > 0`, `slot_retrieval` [..., W, NUM_SLOT_RETRIEVAL_FEATURES] when
    `cfg.retrieval_features`."""

    cfg: LensConfig
    mc: MCConfig

    @nn.compact
    def __call__(self, slot_embeds: jax.Array, wc: WorkingContext, tail: TailGists,
                 query: QueryTokens | None = None,
                 slot_retrieval: jax.Array | None = None) -> jax.Array:
        c = self.cfg
        d, dt = c.width, jnp.dtype(c.dtype)
        if (c.query_tokens > 0) != (query is not None):
            raise ValueError(f"LensConfig.query_tokens={c.query_tokens}: query tokens must be "
                             f"{'given' if c.query_tokens else 'None'}")
        if c.retrieval_features != (slot_retrieval is not None):
            raise ValueError(f"LensConfig.retrieval_features={c.retrieval_features}: "
                             f"slot_retrieval must be "
                             f"{'given' if c.retrieval_features else 'None'}")
        mlp = lambda name: _MLP(d, c.mlp_ratio * d, dt, name=name)  # noqa: E731
        attn = lambda name: _Attention(d, c.num_heads, dt, name=name)  # noqa: E731
        norm = lambda name: nn.LayerNorm(dtype=dt, name=name)  # noqa: E731

        # slot tokens: down-projected content + level embedding + feature MLP
        valid = wc.valid
        content = nn.Dense(d, dtype=dt, name="slot_proj")(norm("slot_in_norm")(slot_embeds))
        level_emb = nn.Embed(self.mc.num_levels + 1, d, name="level_embed")
        feats = _MLP(d, 32, dt, name="feature_mlp")(slot_features(wc, self.mc))
        slot_tok = content + level_emb(wc.level) + feats
        if slot_retrieval is not None:
            slot_tok = slot_tok + _MLP(d, 32, dt, name="retrieval_mlp")(
                slot_retrieval.astype(dt))
        slot_tok = jnp.where(valid[..., None], slot_tok, 0).astype(dt)

        tail_tok = (nn.Dense(d, dtype=dt, name="tail_proj")(norm("tail_in_norm")(tail.embeds))
                    + nn.Embed(self.mc.num_levels + 2, d, name="tail_level_embed")(tail.level))
        tail_tok = jnp.where(tail.valid[..., None], tail_tok, 0).astype(dt)

        kv_parts, mask_parts = [slot_tok, tail_tok], [valid, tail.valid]
        if query is not None:  # the question: newest raw tokens, newest last
            Q = query.hidden.shape[-2]
            pos = self.param("query_pos", nn.initializers.normal(0.02), (Q, d))
            q_tok = (nn.Dense(d, dtype=dt, name="query_proj")(
                norm("query_in_norm")(query.hidden)) + pos.astype(dt))
            kv_parts.append(jnp.where(query.valid[..., None], q_tok, 0).astype(dt))
            mask_parts.append(query.valid)

        # encode: latents <- [slots ‖ tail ‖ question]
        kv = jnp.concatenate(kv_parts, axis=-2)
        kv_mask = jnp.concatenate(mask_parts, axis=-1)
        latents = self.param("latents", nn.initializers.normal(0.02), (c.num_latents, d))
        latents = jnp.broadcast_to(latents.astype(dt), valid.shape[:-1] + latents.shape)
        kv_n = norm("enc_kv_norm")(kv)
        latents = latents + attn("enc_cross")(norm("enc_q_norm")(latents), kv_n, kv_mask)
        latents = latents + mlp("enc_mlp")(norm("enc_mlp_norm")(latents))
        for i in range(c.num_latent_layers):
            x = norm(f"lat{i}_attn_norm")(latents)
            latents = latents + attn(f"lat{i}_self")(x, x)
            latents = latents + mlp(f"lat{i}_mlp")(norm(f"lat{i}_mlp_norm")(latents))
        latents = norm("latent_out_norm")(latents)

        # decode: one query per slot <- latents
        q = slot_tok
        q = q + attn("dec_cross")(norm("dec_q_norm")(q), latents)
        q = q + _MLP(d, c.query_mlp_ratio * d, dt, name="dec_mlp")(norm("dec_mlp_norm")(q))
        raw = nn.Dense(1, dtype=jnp.float32, name="head")(norm("head_norm")(q))[..., 0]
        return mask_illegal(jnp.tanh(raw.astype(jnp.float32)), wc, self.mc)


def init_lens(lens_cfg: LensConfig, mc: MCConfig, embed_dim: int, rng: jax.Array,
              hidden_dim: int | None = None):
    """Random LensNet params for slot embeddings of width `embed_dim` (and v2 query
    hidden states of width `hidden_dim`, default `embed_dim`).

    Params depend only on the LensConfig, num_levels and the widths (never on w_max), so
    one jitted init serves every budget."""
    return _init_lens(lens_cfg, mc.num_levels, embed_dim, hidden_dim or embed_dim, rng)


@functools.partial(jax.jit, static_argnames=("lens_cfg", "num_levels", "embed_dim",
                                             "hidden_dim"))
def _init_lens(lens_cfg: LensConfig, num_levels: int, embed_dim: int, hidden_dim: int,
               rng: jax.Array):
    mc = MCConfig(block_size=2, num_levels=num_levels, w_max=4, recent_protect=0,
                  tail_lod1=1, tail_lod2=1)
    W, nt = mc.w_max, mc.num_tail_gists
    z = jnp.zeros((W,), jnp.int32)
    wc = WorkingContext(level=z, node=z, valid=jnp.ones((W,), bool), edit_step=z, edit_dir=z,
                        num_tokens=jnp.int32(W), step=jnp.int32(0))
    tail = TailGists(embeds=jnp.zeros((nt, embed_dim)), level=jnp.ones((nt,), jnp.int32),
                     valid=jnp.ones((nt,), bool))
    # Draw the ~50 param leaves with XLA's RngBitGenerator ("rbg") seeded from `rng`: same
    # distributions, about half the compile time of threefry per leaf.
    if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.wrap_key_data(rng)
    rng = jax.random.wrap_key_data(jax.random.bits(rng, (4,), jnp.uint32), impl="rbg")
    query = (QueryTokens(hidden=jnp.zeros((lens_cfg.query_tokens, hidden_dim)),
                         valid=jnp.ones((lens_cfg.query_tokens,), bool))
             if lens_cfg.query_tokens else None)
    feats = jnp.zeros((W, NUM_SLOT_RETRIEVAL_FEATURES)) if lens_cfg.retrieval_features else None
    return LensNet(lens_cfg, mc).init(rng, jnp.zeros((W, embed_dim)), wc, tail, query,
                                      feats)["params"]


@functools.partial(jax.jit, static_argnames=("lens_cfg", "mc"))
def lens_scores(params, slot_embeds: jax.Array, wc: WorkingContext, tail: TailGists,
                lens_cfg: LensConfig, mc: MCConfig, query: QueryTokens | None = None,
                slot_retrieval: jax.Array | None = None) -> jax.Array:
    """Legality-masked scores [..., W] in (−1, 1) for a materialized WC (v2: with the
    question's `query` tokens and the slots' retrieval features)."""
    return LensNet(lens_cfg, mc).apply({"params": params}, slot_embeds, wc, tail, query,
                                       slot_retrieval)
