"""Training objectives (SPEC §2.8).

GistNet substitutability. A window of S = P + H tokens is split into a block-aligned
prefix of P tokens and H continuation tokens. The *compressed* working context replaces
all but the newest `keep_raw_blocks` prefix blocks with gists (LOD2 for every complete,
1,024-aligned group of 32 blocks when enabled, LOD1 for the rest), keeps the newest blocks
and the continuation as raw tokens, and is scored on the H continuation tokens. The
*uncompressed* context is the raw window. Both variants (and every baseline) are scored on
the identical targets `tokens[P : P + H]`, each predicted from the slot holding the
previous token (`target[i] = token[i + 1]`), so their NLLs are directly comparable:

    ΔNLL@H = NLL(compressed) − NLL(uncompressed).

The gists flow into the frozen base model as input embeddings; gradients reach GistNet
only (the base params are a separate, undifferentiated pytree).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from mcjax.base import model as base
from mcjax.config import GistConfig, LlamaConfig, MCConfig
from mcjax.gist import GistNet

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
    position_scheme: str = "absolute"

    @classmethod
    def build(cls, mc: MCConfig, prefix_len: int, *, keep_raw_blocks: int = 1,
              use_lod2: bool = True, horizon: int | None = None) -> "GistLayout":
        K = mc.block_size
        if prefix_len % K or prefix_len <= 0:
            raise ValueError(f"prefix_len ({prefix_len}) must be a positive multiple of "
                             f"block_size ({K})")
        blocks = prefix_len // K
        if not 0 <= keep_raw_blocks < blocks:
            raise ValueError(f"keep_raw_blocks={keep_raw_blocks} leaves nothing to compress in "
                             f"a prefix of {blocks} blocks")
        compressible = blocks - keep_raw_blocks
        groups = compressible // K if (use_lod2 and mc.num_levels >= 2) else 0
        return cls(block_size=K, prefix_len=prefix_len, horizon=horizon or mc.horizon,
                   keep_raw_blocks=keep_raw_blocks, lod2_groups=groups,
                   lod1_blocks=compressible - groups * K,
                   position_scheme=mc.position_scheme)

    @property
    def window_len(self) -> int:
        return self.prefix_len + self.horizon

    @property
    def raw_start(self) -> int:
        """First raw token of the compressed context."""
        return self.prefix_len - self.keep_raw_blocks * self.block_size

    @property
    def num_gists(self) -> int:
        return self.lod2_groups + self.lod1_blocks

    @property
    def num_slots(self) -> int:
        # gists + raw prefix tail + continuation inputs (the last token is only a target)
        return self.num_gists + (self.window_len - 1 - self.raw_start)

    @property
    def compression_ratio(self) -> float:
        compressed = self.raw_start
        return compressed / max(self.num_gists, 1)

    def positions(self, truncated: bool = False) -> np.ndarray:
        """Slot positions [num_slots] (or of the truncated context, gists dropped)."""
        K = self.block_size
        raw = np.arange(self.raw_start, self.window_len - 1)
        if truncated:
            return raw if self.position_scheme == "absolute" else np.arange(len(raw))
        if self.position_scheme == "compact":
            return np.arange(self.num_slots)
        lod2 = np.arange(self.lod2_groups) * K * K + K * K // 2
        first1 = self.lod2_groups * K
        lod1 = (first1 + np.arange(self.lod1_blocks)) * K + K // 2
        return np.concatenate([lod2, lod1, raw]).astype(np.int32)


def continuation_targets(tokens: jax.Array, layout: GistLayout) -> jax.Array:
    """The H scored targets tokens[P : P + H] (the same for every variant)."""
    return tokens[:, layout.prefix_len: layout.window_len]


def _nll_and_logprobs(base_params, base_cfg, embeds, positions, targets, horizon):
    """NLL [B, H] of `targets` from the last `horizon` slots, and their log-probs."""
    B = embeds.shape[0]
    pos = jnp.broadcast_to(jnp.asarray(positions, jnp.int32), (B, embeds.shape[1]))
    hidden = base.forward_core(base_params, base_cfg, None, embeds, pos,
                               jnp.ones(pos.shape, bool), return_hidden=True)
    logits = base.logits_from_hidden(base_params, base_cfg, hidden[:, -horizon:])
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return nll, logp


def make_gists(gist_fn: Callable, token_embeds: jax.Array, layout: GistLayout) -> jax.Array:
    """[B, num_gists, D] gists of the compressed prefix: LOD2 groups, then LOD1 blocks.

    `gist_fn(children [N, K, D], level) -> [N, D]`. LOD2 gists are built from LOD1 gists
    (as in the tree), so gradients flow through both levels.
    """
    B, _, D = token_embeds.shape
    K = layout.block_size
    n1_total = layout.lod2_groups * K + layout.lod1_blocks
    blocks = token_embeds[:, : n1_total * K].reshape(B * n1_total, K, D)
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


def substitution_nll(base_params, base_cfg: LlamaConfig, tokens: jax.Array, layout: GistLayout,
                     gist_fn: Callable | None) -> dict[str, jax.Array]:
    """NLL [B, H] of the continuation with the compressed prefix (or truncated if None)."""
    embeds = base.embed_tokens(base_params, tokens[:, : layout.window_len - 1])
    raw = embeds[:, layout.raw_start:]
    targets = continuation_targets(tokens, layout)
    if gist_fn is None:  # truncation: the compressed span is dropped
        return _nll_and_logprobs(base_params, base_cfg, raw, layout.positions(truncated=True),
                                 targets, layout.horizon)
    gists = make_gists(gist_fn, embeds, layout).astype(raw.dtype)
    return _nll_and_logprobs(base_params, base_cfg, jnp.concatenate([gists, raw], axis=1),
                             layout.positions(), targets, layout.horizon)


def full_context_nll(base_params, base_cfg: LlamaConfig, tokens: jax.Array, layout: GistLayout):
    """NLL [B, H] and log-probs of the continuation given the whole raw window."""
    inputs = tokens[:, : layout.window_len - 1]
    embeds = base.embed_tokens(base_params, inputs)
    return _nll_and_logprobs(base_params, base_cfg, embeds, np.arange(inputs.shape[1]),
                             continuation_targets(tokens, layout), layout.horizon)


def gistnet_fn(gist_params, gist_cfg: GistConfig, embed_dim: int) -> Callable:
    module = GistNet(gist_cfg, embed_dim)
    return lambda children, level: module.apply({"params": gist_params}, children, level)


def gist_loss(gist_params, base_params, tokens: jax.Array, *, base_cfg: LlamaConfig,
              gist_cfg: GistConfig, layout: GistLayout, nll_weight: float = 1.0,
              kl_weight: float = 1.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Substitutability loss: nll_weight·NLL + kl_weight·KL(full ‖ compressed) on H tokens."""
    base_params = jax.lax.stop_gradient(base_params)
    full_nll, full_logp = full_context_nll(base_params, base_cfg, tokens, layout)
    full_nll, full_logp = jax.lax.stop_gradient((full_nll, full_logp))
    fn = gistnet_fn(gist_params, gist_cfg, base_cfg.hidden_size)
    nll, logp = substitution_nll(base_params, base_cfg, tokens, layout, fn)
    kl = jnp.sum(jnp.exp(full_logp) * (full_logp - logp), axis=-1)
    loss = nll_weight * nll.mean() + kl_weight * kl.mean()
    return loss, {"loss": loss, "nll": nll.mean(), "nll_full": full_nll.mean(),
                  "delta_nll": (nll - full_nll).mean(), "kl": kl.mean()}
