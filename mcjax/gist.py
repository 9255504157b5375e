"""GistNet (SPEC §2.2): one aligned block of K child vectors -> one vector in the base
model's input-embedding space, so a gist can stand in for its K children in a working
context.

Architecture (per block, blocks are independent):

    children [K, D]                       D = base model width (token embeddings for LOD1,
      -> RMSNorm -> Dense(D -> width)         stored LOD1 gists for LOD2, ...)
      + level embedding (learned, one row per level 1..max_level)
      (+ a learned CLS token in front, for pooling="cls")
      -> num_layers pre-norm transformer blocks: bidirectional multi-head self-attention
         with RoPE on local positions 0..K-1 (CLS sits at -1), SwiGLU MLP
      -> RMSNorm -> pooling head -> Dense(width -> D)

Pooling heads, each of which depends on every child:
  * mean:  mean of the K final child states;
  * query: a learned query (plus the level embedding) attends over the K final child
           states (softmax weights are strictly positive, so every child contributes);
  * cls:   the final state of the CLS token, which attends *bidirectionally* over the whole
           block in every layer (no causal mask anywhere: a CLS slot that can only see itself
           or a prefix would ignore children — the earlier PyTorch attempt's bug).

With `head="mlp"` the block is mean-pooled right after the input norm and a stack of
residual SwiGLU MLPs maps the mean to the gist (no attention: smaller and faster; the
mean depends on every child). It suits contextual children (`GistConfig.input="hidden"`:
the frozen base model's read-pass hidden states already mix the block's tokens).

Because the children carry RoPE positions, a gist also changes when two children swap.
One set of weights serves every level; the level enters through the level embedding, and
`level` is a traced argument, so one compilation serves all levels of one shape.

Public API:
    GistNet                                         the flax module
    init_gist_params(cfg, embed_dim, rng, *, block_size=32, output_rms=1.0) -> params
    gist_blocks(params, cfg, children[N, K, D], level) -> gists[N, D] float32   (jitted)
    num_params(params) -> int
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mcjax.config import GistConfig

__all__ = ["GistNet", "GistInputError", "embedding_rms", "init_gist_params", "gist_blocks",
           "gist_levels", "num_params"]

Params = Any


class GistInputError(ValueError):
    """Inputs to GistNet have the wrong shape, dtype or level."""


# --------------------------------------------------------------------------- building blocks


class _RMSNorm(nn.Module):
    eps: float = 1e-6

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (scale * xf).astype(x.dtype)


def _rope_tables(positions: np.ndarray, head_dim: int, theta: float):
    """cos/sin [T, head_dim] for integer local positions (compile-time constants)."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    freqs = positions.astype(np.float64)[:, None] * inv_freq[None, :]
    emb = np.concatenate([freqs, freqs], axis=-1)
    return jnp.asarray(np.cos(emb), jnp.float32), jnp.asarray(np.sin(emb), jnp.float32)


def _apply_rope(x, cos, sin):
    """Rotate x [N, T, H, hd] by cos/sin [T, hd] (half-split layout, as the base model)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)


def _dense(features: int, name: str, dtype, std: float = 0.02) -> nn.Dense:
    return nn.Dense(features, use_bias=False, dtype=dtype, param_dtype=jnp.float32,
                    kernel_init=nn.initializers.normal(std), name=name)


class _Block(nn.Module):
    """Pre-norm transformer block, bidirectional attention (no mask: every block is full)."""

    cfg: GistConfig

    @nn.compact
    def __call__(self, x, cos, sin):
        c = self.cfg
        dt = jnp.dtype(c.dtype)
        N, T, W = x.shape
        H, hd = c.num_heads, W // c.num_heads
        # Residual-branch outputs start small (GPT-2 style) so the untrained stack is stable.
        out_std = 0.02 / np.sqrt(2 * c.num_layers)
        h = _RMSNorm(name="attn_norm")(x)
        q = _dense(W, "q_proj", dt)(h).reshape(N, T, H, hd)
        k = _dense(W, "k_proj", dt)(h).reshape(N, T, H, hd)
        v = _dense(W, "v_proj", dt)(h).reshape(N, T, H, hd)
        q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        scores = jnp.einsum("nthd,nshd->nhts", q, k,
                            preferred_element_type=jnp.float32) * (hd ** -0.5)
        probs = jax.nn.softmax(scores, axis=-1).astype(dt)
        attn = jnp.einsum("nhts,nshd->nthd", probs, v).reshape(N, T, W)
        x = x + _dense(W, "o_proj", dt, out_std)(attn)
        h = _RMSNorm(name="mlp_norm")(x)
        hidden = c.mlp_ratio * W
        gate = _dense(hidden, "gate_proj", dt)(h)
        up = _dense(hidden, "up_proj", dt)(h)
        return x + _dense(W, "down_proj", dt, out_std)(nn.silu(gate) * up)


# --------------------------------------------------------------------------- GistNet


class GistNet(nn.Module):
    """children [N, K, D], level (int scalar or [N]) -> gists [N, D] (float32).

    `embed_dim` is D, the base model's width (input and output); the block size K is read
    from the input, so the weights do not depend on it.
    """

    cfg: GistConfig
    embed_dim: int

    @nn.compact
    def __call__(self, children: jax.Array, level: jax.Array) -> jax.Array:
        c = self.cfg
        dt = jnp.dtype(c.dtype)
        N, K, D = children.shape
        W = c.width
        level = jnp.broadcast_to(jnp.asarray(level, jnp.int32), (N,))
        # Level l uses row l-1; clip keeps an out-of-range traced level in bounds (concrete
        # levels are validated by `gist_blocks`).
        level_emb = nn.Embed(c.max_level, W, embedding_init=nn.initializers.normal(0.02),
                             name="level_embed")(jnp.clip(level - 1, 0, c.max_level - 1))
        x = _RMSNorm(name="in_norm")(children.astype(dt))
        if c.head == "mlp":  # mean of the children -> residual SwiGLU MLPs
            x = jnp.mean(x.astype(jnp.float32), axis=1).astype(dt)
            x = _dense(W, "in_proj", dt, 1.0 / np.sqrt(D))(x) + level_emb.astype(dt)
            out_std = 0.02 / np.sqrt(2 * c.num_layers)
            for i in range(c.num_layers):
                h = _RMSNorm(name=f"mlp_{i}_norm")(x)
                gate = _dense(c.mlp_ratio * W, f"mlp_{i}_gate", dt)(h)
                up = _dense(c.mlp_ratio * W, f"mlp_{i}_up", dt)(h)
                x = x + _dense(W, f"mlp_{i}_down", dt, out_std)(nn.silu(gate) * up)
            pooled = _RMSNorm(name="out_norm")(x)
            return _dense(D, "out_proj", dt, 1.0 / np.sqrt(W))(pooled).astype(jnp.float32)
        x = _dense(W, "in_proj", dt, 1.0 / np.sqrt(D))(x)
        x = x + level_emb[:, None, :].astype(dt)
        positions = np.arange(K)
        if c.pooling == "cls":
            cls = self.param("cls", nn.initializers.normal(0.02), (W,), jnp.float32)
            cls = jnp.broadcast_to((cls + level_emb)[:, None, :].astype(dt), (N, 1, W))
            x = jnp.concatenate([cls, x], axis=1)
            positions = np.arange(-1, K)  # CLS sits just before the block
        cos, sin = _rope_tables(positions, W // c.num_heads, c.rope_theta)
        for i in range(c.num_layers):
            x = _Block(c, name=f"block_{i}")(x, cos, sin)
        x = _RMSNorm(name="final_norm")(x)
        if c.pooling == "mean":
            pooled = jnp.mean(x.astype(jnp.float32), axis=1).astype(dt)
        elif c.pooling == "cls":
            pooled = x[:, 0]
        else:  # query: learned-query multi-head attention pooling over the K children
            H, hd = c.num_heads, W // c.num_heads
            query = self.param("pool_query", nn.initializers.normal(1.0), (W,), jnp.float32)
            q_in = (query + level_emb).astype(dt)  # [N, W]
            q = _dense(W, "pool_q_proj", dt)(q_in).reshape(N, H, hd)
            k = _dense(W, "pool_k_proj", dt)(x).reshape(N, K, H, hd)
            v = _dense(W, "pool_v_proj", dt)(x).reshape(N, K, H, hd)
            scores = jnp.einsum("nhd,nkhd->nhk", q, k,
                                preferred_element_type=jnp.float32) * (hd ** -0.5)
            probs = jax.nn.softmax(scores, axis=-1).astype(dt)
            pooled = jnp.einsum("nhk,nkhd->nhd", probs, v).reshape(N, W)
            pooled = _dense(W, "pool_o_proj", dt)(pooled)
        pooled = _RMSNorm(name="out_norm")(pooled)
        return _dense(D, "out_proj", dt, 1.0 / np.sqrt(W))(pooled).astype(jnp.float32)


# --------------------------------------------------------------------------- pure functions


def embedding_rms(base_params) -> float:
    """RMS of a Llama base model's token-embedding table: the scale gists should start at
    (pass it as `init_gist_params(..., output_rms=...)`)."""
    table = base_params["embed"]["embedding"]
    return float(jnp.sqrt(jnp.mean(jnp.square(jnp.asarray(table, jnp.float32)))))


def init_gist_params(cfg: GistConfig, embed_dim: int, rng: jax.Array, *,
                     block_size: int = 32, output_rms: float = 1.0) -> Params:
    """Random GistNet parameters for base width `embed_dim`.

    `output_rms` sets the initial scale of the gists (the output norm's gain; the output
    projection preserves RMS in expectation): pass the RMS of the base model's token
    embeddings so that even an untrained GistNet emits vectors of the right magnitude.
    The weights do not depend on `block_size`; it only shapes the dummy input.
    """
    if embed_dim <= 0 or block_size <= 0:
        raise GistInputError(f"embed_dim and block_size must be > 0, got {embed_dim}, "
                             f"{block_size}")
    if not output_rms > 0:
        raise GistInputError(f"output_rms must be > 0, got {output_rms}")
    dummy = jnp.zeros((1, block_size, embed_dim), jnp.float32)
    params = GistNet(cfg, embed_dim).init(rng, dummy, jnp.ones((), jnp.int32))["params"]
    params = dict(params)
    params["out_norm"] = {"scale": jnp.full_like(params["out_norm"]["scale"], output_rms)}
    return params


@functools.partial(jax.jit, static_argnames=("cfg",))
def _gist_blocks(params, cfg, children, level):
    return GistNet(cfg, children.shape[-1]).apply({"params": params}, children, level)


def gist_blocks(params: Params, cfg: GistConfig, children: jax.Array, level) -> jax.Array:
    """Gist N blocks of one level at once: children [N, K, D] -> gists [N, D] float32.

    `level` (1..cfg.max_level, an int or an int array of shape [] or [N]) is a traced
    argument, so the function compiles once per (N, K, D, dtype) and serves every level.
    """
    if not hasattr(children, "shape") or len(children.shape) != 3:
        raise GistInputError(f"children must have shape [N, K, D], got "
                             f"{getattr(children, 'shape', type(children))}")
    N, K, D = children.shape
    if N == 0 or K == 0:
        raise GistInputError(f"children must hold at least one block of at least one child, "
                             f"got shape {children.shape}")
    if not jnp.issubdtype(children.dtype, jnp.floating):
        raise GistInputError(f"children must be floating point, got {children.dtype}")
    d_params = params["out_proj"]["kernel"].shape[-1]
    if D != d_params:
        raise GistInputError(f"children have width {D} but GistNet was built for width "
                             f"{d_params}")
    if not isinstance(level, jax.core.Tracer):
        lv = np.asarray(level)
        if lv.shape not in ((), (N,)) or not np.issubdtype(lv.dtype, np.integer):
            raise GistInputError(f"level must be an int or int array of shape [N]; got "
                                 f"dtype {lv.dtype}, shape {lv.shape}")
        if lv.size and (lv.min() < 1 or lv.max() > cfg.max_level):
            raise GistInputError(f"level must lie in 1..{cfg.max_level}, got "
                                 f"{lv.min()}..{lv.max()}")
    # Device arrays in, always: numpy and jax inputs would otherwise key separate cache entries.
    return _gist_blocks(params, cfg, jnp.asarray(children), jnp.asarray(level, jnp.int32))


def gist_levels(gist_fn: Callable, children: jax.Array, block_size: int, num_levels: int, *,
                dtype=None) -> list[jax.Array]:
    """Gists of every complete group, level by level, of children [B, T, D] (a history's
    LOD1 children from its start): level 1 gists each block of K children, level ℓ each
    group of K level-(ℓ−1) gists; gradients flow through every level. A level with no
    complete group holds one zero row. With `dtype` each level is cast before the next is
    built from it (what a tree stores and reads back). `gist_fn(children [N, K, D], level)
    -> [N, D]`. Traceable: the jittable counterpart of the tree's incremental gisting."""
    B, T, D = children.shape
    K = block_size
    lower, count, levels = children, T, []
    for lvl in range(1, num_levels + 1):
        n = count // K
        if n:
            rows = gist_fn(lower[:, : n * K].reshape(B * n, K, D), lvl).reshape(B, n, D)
        else:
            rows = jnp.zeros((B, 1, D), jnp.float32)
        if dtype is not None:
            rows = rows.astype(dtype)
        levels.append(rows)
        lower, count = rows, n
    return levels


def num_params(params: Params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))
