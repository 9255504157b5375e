"""Scoring a continuation through a compressed context: the one mechanism under training,
evaluation and the runtime's inspection (SPEC §2.8, §2.9).

`score_continuation` is the one forward that scores continuation tokens after a context:
the context is either slots of input embeddings (`Context`: a materialized working
context, a GistNet window's [sink ‖ gists ‖ raw tokens], or raw tokens) or a KV cache
holding them (the runtime's). Continuation token i + 1 is predicted from the slot holding
continuation token i; continuation token 0 from the context's `newest` slot when given
(else it is only conditioned on). The positions of the continuation follow the WC's one
rule (`working_context.next_position`; `continuation_positions`).

Callers: the GistNet loss and its evaluation variants (`substitution_nll`,
`full_context_nll`, the ceiling), the LensNet counterfactuals (`mcjax.counterfactuals`),
the lm-eval adapter (`mcjax.eval.harness`) and `Session.cache_logprobs`.

GistNet windows (`GistLayout`). A window of S = P + H tokens is split into a block-aligned
prefix of P tokens and H continuation tokens. The *compressed* context is

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
window is a history of its own and only the runtime's trees are 1,024-aligned (so a
window's layout is not a runtime WC's, whose gists are aligned to their level's span).

LOD1 children are the block's token embeddings (`GistConfig.input="embeddings"`) or the
frozen base model's read-pass hidden states after `input_layer` layers (`"hidden"`),
read in independent chunks of `read_chunk` tokens aligned to the window start — exactly
what the runtime's read pass computes for a history that starts at the window.

The frozen base model (`Frozen`, `load_frozen`) is the one handle training and evaluation
share: params, tokenizer (encode / decode) and the corpus separator.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mcjax import working_context as wcm
from mcjax.base import model as base
from mcjax.base.model import KVCache
from mcjax.config import ExperimentConfig, GistConfig, LlamaConfig, MCConfig
from mcjax.gist import GistNet, gist_levels
from mcjax.statistics import mean_stderr

Params = Any

__all__ = ["Frozen", "load_frozen", "byte_encode", "byte_decode", "Context",
           "score_continuation", "token_logprobs", "continuation_positions", "newest_slot",
           "working_context_input", "window_prefix_len", "GistLayout", "continuation_targets", "lod1_children",
           "gist_inputs", "gistnet_fn", "make_gists", "mean_pool_gist_fn",
           "rescaled_mean_pool_fn", "compressed_context", "substitution_nll",
           "substitution_nll_from_gists", "raw_context_nll", "full_context_nll", "kl_to_teacher", "VARIANTS", "variant_nll",
           "evaluate_substitution"]


# --------------------------------------------------------------------------- the frozen base


@dataclasses.dataclass(frozen=True)
class Frozen:
    """The frozen base model as training and evaluation see it."""

    cfg: ExperimentConfig  # with base_config filled in
    params: Any
    encode: Callable[[str], np.ndarray]
    tokenizer_id: str  # names the tokenized-corpus cache, shared by training and evaluation
    separator: int
    decode: Callable[[Any], str] | None = None


def byte_encode(vocab_size: int) -> Callable[[str], np.ndarray]:
    """Tokenizer for random tiny bases: UTF-8 bytes (the tiny vocab holds all 256)."""
    if vocab_size < 256:
        raise ValueError(f"byte tokens need vocab_size >= 256, got {vocab_size}")
    return lambda text: np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)


def byte_decode(ids) -> str:
    """Text of byte tokens (the tiny random bases' tokenizer); ids >= 256 are dropped."""
    return bytes(int(i) for i in np.asarray(ids).ravel() if 0 <= int(i) < 256).decode(
        "utf-8", "replace")


def load_frozen(cfg: ExperimentConfig) -> Frozen:
    """Build (random) or load the frozen base model named by `cfg.base`."""
    from mcjax.base.model import init_params

    if cfg.base == "random":
        params = init_params(cfg.base_config, jax.random.key(cfg.train.seed + 10_007))
        return Frozen(cfg, params, byte_encode(cfg.base_config.vocab_size), "bytes",
                      cfg.base_config.eos_token_id or 0, byte_decode)
    from mcjax.base.loading import load_base_model

    model = load_base_model(cfg.base)
    cfg = dataclasses.replace(cfg, base_config=model.config)
    return Frozen(cfg, model.params, model.encode, cfg.base, model.config.eos_token_id or 0,
                  model.decode)


# --------------------------------------------------------------------------- the one scorer


class Context(NamedTuple):
    """Slots a continuation is scored after: input embeddings [B, W, D], position ids
    [B, W] and validity [B, W] (what `working_context.materialize` returns, batched)."""

    embeds: jax.Array
    positions: jax.Array
    valid: jax.Array


def score_continuation(params, config: LlamaConfig, tokens: jax.Array, positions: jax.Array,
                       mask: jax.Array | None = None, *, context: Context | None = None,
                       newest: jax.Array | None = None, cache: KVCache | None = None,
                       cache_index: jax.Array | None = None) -> jax.Array:
    """Log-probabilities [B, n, V] (float32) of continuation tokens [B, T] after a context.

    Tokens 0..T−2 are fed at `positions` [B, T] (or [B, T − 1]) with `mask` [B, T] (or
    [B, T − 1]; real tokens, default all) after the context: slots `context` (a W-slot
    `Context`, padding masked) or a KV cache `cache` whose first `cache_index` slots hold
    it (not modified: the caller's cache stays as it was); neither is a continuation with
    no context before it.
    Token i + 1 is predicted from the slot holding token i; token 0 from the context's slot
    `newest` [B] when given (then n = T, else n = T − 1: token 0 is only conditioned on).
    The last token is a target only."""
    B, T = tokens.shape
    if mask is None:
        mask = jnp.ones((B, T), bool)
    inputs, in_pos, in_mask = tokens[:, : T - 1], positions[:, : T - 1], mask[:, : T - 1]
    positions = jnp.asarray(in_pos, jnp.int32)
    if cache is not None:
        if context is not None or newest is not None:
            raise ValueError("score a continuation after a cache or after context slots, "
                             "not both")
        hidden, _ = base.prefill_core(params, config, cache, inputs, None, positions,
                                      in_mask, cache_index, return_hidden=True)
        rows = hidden
    else:
        embeds = base.embed_tokens(params, inputs)
        W = 0
        if context is not None:
            W = context.embeds.shape[1]
            embeds = jnp.concatenate([context.embeds, embeds.astype(context.embeds.dtype)], 1)
            positions = jnp.concatenate(
                [jnp.asarray(context.positions, jnp.int32), positions], 1)
            in_mask = jnp.concatenate([context.valid, in_mask], 1)
        hidden = base.forward_core(params, config, None, embeds, positions, in_mask,
                                   return_hidden=True)
        rows = hidden[:, W:]
        if newest is not None:
            first = jnp.take_along_axis(hidden, jnp.asarray(newest, jnp.int32)[:, None, None],
                                        axis=1)
            rows = jnp.concatenate([first, rows], 1)
    logits = base.logits_from_hidden(params, config, rows)
    return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


def token_logprobs(logp: jax.Array, targets: jax.Array) -> jax.Array:
    """log p(target) [...] from log-probabilities [..., V] and target ids [...]."""
    return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def newest_slot(wc) -> jax.Array:
    """[...] the WC's newest valid slot (0 for an empty WC): it predicts what follows."""
    return jnp.maximum(wc.num_valid - 1, 0)


def continuation_positions(wc, mc: MCConfig, length: int) -> jax.Array:
    """[..., length] position ids of `length` tokens right after the WC."""
    return wcm.next_position(wc, mc)[..., None] + jnp.arange(length, dtype=jnp.int32)


def working_context_input(wc, view, base_params, mc: MCConfig, length: int
                          ) -> tuple[Context, jax.Array, jax.Array]:
    """(Context, newest slot, continuation positions [.., length]) of a WC over a tree view
    (one WC, or a batch of WCs over one view)."""
    materialize = lambda w: wcm.materialize(w, view, base_params, mc)  # noqa: E731
    if wc.level.ndim > 1:
        materialize = jax.vmap(materialize)
    return (Context(*materialize(wc)), newest_slot(wc),
            continuation_positions(wc, mc, length))


# --------------------------------------------------------------------------- GistNet windows


def window_prefix_len(cfg: ExperimentConfig) -> int:
    """Tokens of a training window before its H continuation tokens (a multiple of K)."""
    H = cfg.mc.horizon
    prefix = cfg.train.seq_len - H
    if prefix <= 0 or prefix % cfg.mc.block_size:
        raise ValueError(f"train.seq_len ({cfg.train.seq_len}) minus mc.horizon ({H}) must be "
                         f"a positive multiple of block_size ({cfg.mc.block_size})")
    return prefix


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

    def spans(self, truncated: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(first token, tokens covered) [num_slots] of every slot, in order (or of the
        truncated context: sink + raw tail)."""
        K, S = self.block_size, self.sink_len
        raw = np.arange(self.raw_start, self.window_len - 1)
        starts = [np.arange(S)]
        sizes = [np.ones(S, np.int64)]
        if not truncated:
            first1 = S + self.lod2_groups * K * K
            starts += [S + np.arange(self.lod2_groups) * K * K,
                       first1 + np.arange(self.lod1_blocks) * K]
            sizes += [np.full(self.lod2_groups, K * K), np.full(self.lod1_blocks, K)]
        starts.append(raw)
        sizes.append(np.ones(len(raw), np.int64))
        return np.concatenate(starts), np.concatenate(sizes)

    def positions(self, truncated: bool = False) -> np.ndarray:
        """Slot positions [num_slots] (or of the truncated context): the WC's positions
        rule (`working_context.span_positions`) over `spans`."""
        start, size = self.spans(truncated)
        return wcm.span_positions(start, size, self.position_scheme).astype(np.int32)


def continuation_targets(tokens: jax.Array, layout: GistLayout, dense: bool = False
                         ) -> jax.Array:
    """Scored targets: tokens[P : P + H], or tokens[raw_start + 1 : P + H] with `dense`
    (the same for every variant)."""
    first = layout.window_len - layout.scored(dense)
    return tokens[:, first: layout.window_len]


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
    `gist_fn(children [N, K, D], level) -> [N, D]`. The span's gists come level by level
    as a tree's do (`gist.gist_levels`: LOD2 gists from LOD1 gists, so gradients flow
    through both levels); the layout keeps the LOD1 gists after its LOD2 groups.
    """
    K, groups = layout.block_size, layout.lod2_groups
    levels = gist_levels(gist_fn, children[:, layout.sink_len: layout.raw_start], K,
                         2 if groups else 1)
    if not groups:
        return levels[0]
    return jnp.concatenate([levels[1][:, :groups], levels[0][:, groups * K:]], axis=1)


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


def compressed_context(base_params, tokens: jax.Array, layout: GistLayout,
                       gists: jax.Array | None, dense: bool = False
                       ) -> tuple[Context, jax.Array, np.ndarray]:
    """A window's compressed context [sink ‖ gists ‖ raw tail] up to the slot before the
    first scored target — or without gists (truncation) when `gists` is None — and the
    continuation scored after it: (Context, tokens [B, n + 1] from the token before the
    first scored target, the positions [n] of all but the last)."""
    n = layout.scored(dense)
    first = layout.window_len - n  # the first scored target
    embeds = base.embed_tokens(base_params, tokens[:, : first - 1])
    parts = [embeds[:, : layout.sink_len]]
    if gists is not None:
        parts.append(gists.astype(embeds.dtype))
    parts.append(embeds[:, layout.raw_start:])
    slots = jnp.concatenate(parts, axis=1)
    positions = layout.positions(truncated=gists is None)
    W, B = slots.shape[1], slots.shape[0]
    context = Context(slots, jnp.broadcast_to(jnp.asarray(positions[:W]), (B, W)),
                      jnp.ones((B, W), bool))
    return context, tokens[:, first - 1: layout.window_len], positions[W:]


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
    context, cont, positions = compressed_context(base_params, tokens, layout, gists, dense)
    logp = score_continuation(base_params, base_cfg, cont,
                              jnp.broadcast_to(jnp.asarray(positions), (cont.shape[0],
                                                                        len(positions))),
                              context=context)
    return -token_logprobs(logp, cont[:, 1:]), logp


def raw_context_nll(base_params, base_cfg: LlamaConfig, tokens: jax.Array, num_scored: int
                    ) -> tuple[jax.Array, jax.Array]:
    """NLL [B, n] and log-probs of the last `num_scored` of tokens [B, N] given every token
    before them (raw, at their token index)."""
    B, N = tokens.shape
    first = N - num_scored
    embeds = base.embed_tokens(base_params, tokens[:, : first - 1])
    context = Context(embeds, jnp.broadcast_to(jnp.arange(first - 1, dtype=jnp.int32),
                                               (B, first - 1)), jnp.ones((B, first - 1), bool))
    cont = tokens[:, first - 1:]
    logp = score_continuation(base_params, base_cfg, cont, jnp.broadcast_to(
        jnp.arange(first - 1, N, dtype=jnp.int32), cont.shape), context=context)
    return -token_logprobs(logp, cont[:, 1:]), logp


def full_context_nll(base_params, base_cfg: LlamaConfig, tokens: jax.Array, layout: GistLayout,
                     dense: bool = False):
    """NLL [B, n] and log-probs of the scored targets given the whole raw window."""
    return raw_context_nll(base_params, base_cfg, tokens[:, : layout.window_len],
                           layout.scored(dense))


def gistnet_fn(gist_params, gist_cfg: GistConfig, embed_dim: int) -> Callable:
    module = GistNet(gist_cfg, embed_dim)
    return lambda children, level: module.apply({"params": gist_params}, children, level)


def kl_to_teacher(teacher_logp: jax.Array, student_logp: jax.Array) -> jax.Array:
    """KL(teacher ‖ student) [B, n] per scored position."""
    return jnp.sum(jnp.exp(teacher_logp) * (teacher_logp - student_logp), axis=-1)




# --------------------------------------------------------------------------- ΔNLL variants


VARIANTS = ("gistnet", "mean_pool", "mean_pool_hidden", "truncation")


@functools.partial(jax.jit, static_argnames=("base_cfg", "gist_cfg", "layout", "variant"))
def variant_nll(base_params, gist_params, tokens, *, base_cfg, gist_cfg, layout, variant):
    """NLL [B, H] of the continuation under one context variant (same targets for all).

    gistnet: GistNet on its configured children; mean_pool: the mean of the token
    embeddings; mean_pool_hidden: the mean of the read-pass hidden states after
    `gist_cfg.input_layer` layers, rescaled to the embeddings' RMS; truncation: the
    gisted span dropped (the sink stays)."""
    if variant == "full":
        return full_context_nll(base_params, base_cfg, tokens, layout)[0]
    if variant == "truncation":
        fn, children = None, None
    elif variant in VARIANTS:
        fn, children = gist_inputs(variant, base_params, base_cfg, gist_params, gist_cfg,
                                   tokens[:, : layout.raw_start])
    else:
        raise ValueError(f"unknown variant {variant!r}; known: full, {', '.join(VARIANTS)}")
    return substitution_nll(base_params, base_cfg, tokens, layout, fn, children=children)[0]


def evaluate_substitution(gist_params, frozen: Frozen, batches: list[np.ndarray],
                          layouts: dict[str, GistLayout]) -> dict[str, Any]:
    """Held-out ΔNLL@H of GistNet gists vs truncation and mean pooling, per layout, with
    the paired difference of GistNet to truncation (± SE over windows).

    Every variant of a window is scored on the identical continuation targets.
    """
    cfg = frozen.cfg
    out: dict[str, Any] = {}
    for name, layout in layouts.items():
        per = {k: [] for k in ("full", *VARIANTS)}
        for batch in batches:
            tokens = jnp.asarray(batch)
            for variant in per:
                nll = variant_nll(frozen.params, gist_params, tokens, base_cfg=cfg.base_config,
                                  gist_cfg=cfg.gist, layout=layout, variant=variant)
                per[variant].append(np.asarray(nll).mean(axis=1))
        nll = {k: np.concatenate(v) for k, v in per.items()}
        diff = mean_stderr(nll["gistnet"] - nll["truncation"])
        out[name] = {
            "compression_ratio": layout.compression_ratio,
            "compressed_tokens": layout.compressed_tokens,
            "gists": layout.num_gists,
            "windows": int(nll["full"].shape[0]),
            "nll_full": float(nll["full"].mean()),
            **{f"delta_nll_{k}": float((nll[k] - nll["full"]).mean()) for k in VARIANTS},
            "gistnet_minus_truncation": diff["mean"],
            "gistnet_minus_truncation_se": diff["stderr"],
        }
    return out
