"""Frozen Llama-family decoder in Flax (SPEC §2.1).

The forward pass takes token ids *or* input embeddings, explicit position ids and a
validity mask over the slots of a fixed-size buffer, and optionally a fixed-capacity KV
cache. Attention is causal in *slot order* (slot j is visible to slot i iff j <= i and j
is valid); positions only feed RoPE, so slots may carry any positions (gists use the
centre of their span). Layers are stacked with `nn.scan`, so params have a leading layer
axis and the decoder compiles once regardless of depth.

Public pure functions: `init_params`, `embed_tokens`, `forward`, `init_cache`,
`prefill`, `decode_step`, `logits_from_hidden`, `layer_hidden` (read-pass features). `forward`/`prefill`/`decode_step`
validate their inputs (shapes always; token-id range when the ids are concrete arrays)
and then call jit-compiled cores; inside a user's own `jit` only the static checks run.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from mcjax import sharding
from mcjax.config import LlamaConfig

Params = Any
_NEG = -1e30  # finite "minus infinity": fully masked rows stay finite instead of NaN


class InputError(ValueError):
    """Inputs to the base model have the wrong shape, dtype or values."""


# --------------------------------------------------------------------------- building blocks


def _dtype(config: LlamaConfig):
    return jnp.dtype(config.dtype)


class RMSNorm(nn.Module):
    eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.dtype)
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return scale * xf.astype(x.dtype)  # normalise in fp32, scale in the input dtype (as HF)


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
    """RoPE inverse frequencies [head_dim / 2] (fp32) with the config's scaling, computed
    as transformers' `modeling_rope_utils` does for each kind (trace-time constants)."""
    dim, base = config.head_dim, config.rope_theta
    inv_freq = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    rs = config.rope_scaling
    if rs is None:
        return inv_freq.astype(np.float32)
    if rs.kind == "linear":
        return (inv_freq / rs.factor).astype(np.float32)
    if rs.kind == "llama3":
        old = rs.original_max_position_embeddings
        low_wavelen, high_wavelen = old / rs.low_freq_factor, old / rs.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / rs.factor, inv_freq)
        smooth = (old / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    # yarn: interpolate the low frequencies, extrapolate the high ones, ramp between
    def correction_dim(rotations):
        return (dim * math.log(rs.original_max_position_embeddings / (rotations * 2 * math.pi))
                / (2 * math.log(base)))

    low, high = correction_dim(rs.beta_fast), correction_dim(rs.beta_slow)
    if rs.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: no zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float32) / dim)
    return (1.0 / (rs.factor * pos_freqs) * (1 - extrapolation)
            + 1.0 / pos_freqs * extrapolation).astype(np.float32)


def rope_cos_sin(positions: jax.Array, config: LlamaConfig, *, attention_scaling: bool = True):
    """cos/sin tables [..., head_dim] for (possibly non-integer) positions [...], with the
    config's RoPE scaling. `attention_scaling` multiplies both by yarn's attention factor
    (as transformers does); a pure rotation (re-rotating a cached key by a position delta)
    passes False, since the key already carries the factor."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(config))
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    scale = config.rope_scaling.cos_sin_scale if (
        attention_scaling and config.rope_scaling is not None) else 1.0
    if scale != 1.0:
        return jnp.cos(emb) * scale, jnp.sin(emb) * scale
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate x [B, T, heads, hd] by per-slot angles cos/sin [B, T, hd] (half-split layout)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)


def _dense(features: int, name: str, dtype, bias: bool = False) -> nn.Dense:
    return nn.Dense(features, use_bias=bias, dtype=dtype, param_dtype=dtype, name=name,
                    kernel_init=nn.initializers.normal(0.02))


def project_qkv(c: LlamaConfig, x: jax.Array, *, with_values: bool = True):
    """Pre-RoPE queries [B, T, H, hd], keys and values [B, T, KVH, hd] of the normed input
    x [B, T, D]: projections (with the config's biases), then Qwen3's per-head q/k
    RMSNorm. Called inside a compact module (the decoder layer, `_PreRopeQK`), whose
    params it creates/reads under the HF-like names q_proj, k_proj, v_proj, q_norm,
    k_norm: the one definition of what the read pass's retrieval q/k are."""
    dt = _dtype(c)
    lead = x.shape[:-1]
    q = _dense(c.num_heads * c.head_dim, "q_proj", dt, c.qkv_bias)(x).reshape(
        *lead, c.num_heads, c.head_dim)
    k = _dense(c.num_kv_heads * c.head_dim, "k_proj", dt, c.qkv_bias)(x).reshape(
        *lead, c.num_kv_heads, c.head_dim)
    v = (_dense(c.num_kv_heads * c.head_dim, "v_proj", dt, c.qkv_bias)(x).reshape(
        *lead, c.num_kv_heads, c.head_dim) if with_values else None)
    if c.qk_norm:
        q = RMSNorm(c.rms_norm_eps, dt, name="q_norm")(q)
        k = RMSNorm(c.rms_norm_eps, dt, name="k_norm")(k)
    return q, k, v


class _PreRopeQK(nn.Module):
    """One layer's input norm + q/k projection (a subset of a `DecoderLayer`'s params)."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, h):
        x = RMSNorm(self.config.rms_norm_eps, _dtype(self.config), name="input_norm")(h)
        q, k, _ = project_qkv(self.config, x, with_values=False)
        return q, k


def _causal_bias(key_valid: jax.Array, query_slot: jax.Array,
                 sliding_window: int | None = None) -> jax.Array:
    """Additive mask [B, T, S]: slot i sees valid slots j <= i (and, with a sliding
    window w, only j > i - w, as transformers' sliding_window_overlay)."""
    S = key_valid.shape[-1]
    key_slot = jnp.arange(S)[None, None, :]
    visible = key_valid[:, None, :] & (key_slot <= query_slot[:, :, None])
    if sliding_window is not None:
        visible = visible & (key_slot > query_slot[:, :, None] - sliding_window)
    return jnp.where(visible, 0.0, _NEG).astype(jnp.float32)


def _write_layer_slots(buf: jax.Array, new: jax.Array, layer, index: jax.Array) -> jax.Array:
    """buf[layer, :, index : index + T] = new, with buf [L, B, S, ...].

    One write index for every stream keeps this a plain in-place dynamic-update-slice (a
    per-stream index becomes a scatter that XLA:CPU copies the whole cache for). Streams
    of different lengths stay exact: the slots a shorter stream skips are invalid.
    """
    start = (layer, 0, index) + (0,) * (buf.ndim - 3)
    return jax.lax.dynamic_update_slice(buf, new[None].astype(buf.dtype), start)


ATTENTION_CHUNK = 256  # query rows per block of the causal, cache-free attention


def _attend(q, k, v, bias):
    """q [B, T, H, hd], k/v [B, S, KVH, hd], bias [B, T, S] -> [B, T, H·hd] (GQA)."""
    B, T, H, hd = q.shape
    kvh = k.shape[2]
    qg = q.reshape(B, T, kvh, H // kvh, hd)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k,
                        preferred_element_type=jnp.float32) * (hd ** -0.5)
    probs = jax.nn.softmax(scores + bias[:, None, None], axis=-1).astype(q.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(B, T, H * hd)


def attention(q, k, v, bias, *, causal_prefix: bool):
    """Masked attention. With `causal_prefix` (keys are the queries' own slots, so slot i
    sees only slots <= i) query block b attends only to the first (b+1)·C keys: the
    masked upper triangle is skipped instead of computed and thrown away. Blocks are
    static slices, so this is a fixed, trace-time partition (no data-dependent shapes)."""
    T = q.shape[1]
    if not causal_prefix or T <= ATTENTION_CHUNK:
        return _attend(q, k, v, bias)
    outs = []
    for start in range(0, T, ATTENTION_CHUNK):
        stop = min(start + ATTENTION_CHUNK, T)
        outs.append(_attend(q[:, start:stop], k[:, :stop], v[:, :stop],
                            bias[:, start:stop, :stop]))
    return jnp.concatenate(outs, axis=1)


def attention_prefix(q, k, v, bias, stop, block: int | None = None):
    """`_attend` over keys [0, stop) only, in key blocks of `block` with an online softmax:
    the blocks past `stop` (a traced scalar) are not computed. For a cached prefill chunk
    ending at slot `stop`, whose bias already masks every later key, this equals attending
    to the whole cache (up to rounding) at a fraction of the cost early in the cache."""
    block = block or ATTENTION_CHUNK
    B, T, H, hd = q.shape
    S, kvh = k.shape[1], k.shape[2]
    pad = -(-S // block) * block - S
    if pad:
        k = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0)))
        bias = jnp.pad(bias, ((0, 0), (0, 0), (0, pad)), constant_values=_NEG)
    qg = q.reshape(B, T, kvh, H // kvh, hd)

    def body(i, carry):
        m, l, acc = carry
        kb = jax.lax.dynamic_slice_in_dim(k, i * block, block, axis=1)
        vb = jax.lax.dynamic_slice_in_dim(v, i * block, block, axis=1)
        bb = jax.lax.dynamic_slice_in_dim(bias, i * block, block, axis=2)
        scores = jnp.einsum("btkgd,bskd->bkgts", qg, kb, preferred_element_type=jnp.float32
                            ) * (hd ** -0.5) + bb[:, None, None]
        m_new = jnp.maximum(m, scores.max(-1))
        p = jnp.exp(scores - m_new[..., None])
        corr = jnp.exp(m - m_new)
        acc = acc * corr[..., None] + jnp.einsum("bkgts,bskd->bkgtd", p.astype(q.dtype), vb,
                                                 preferred_element_type=jnp.float32)
        return m_new, l * corr + p.sum(-1), acc

    g = H // kvh
    init = (jnp.full((B, kvh, g, T), -jnp.inf, jnp.float32),
            jnp.zeros((B, kvh, g, T), jnp.float32),
            jnp.zeros((B, kvh, g, T, hd), jnp.float32))
    num_blocks = jnp.clip((stop + block - 1) // block, 1, k.shape[1] // block)
    _, l, acc = jax.lax.fori_loop(0, num_blocks, body, init)
    out = acc / l[..., None]  # [B, kvh, g, T, hd]
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, H * hd).astype(q.dtype)


class DecoderLayer(nn.Module):
    """One pre-norm block. The carry is (hidden, stacked KV cache or None, layer index):
    keeping the whole [layers, ...] cache in the scan carry lets XLA update it in place
    (a scanned-out cache would be rewritten in full on every decode step)."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, carry, cos, sin, bias, index):
        h, cache, layer = carry
        c = self.config
        dt = _dtype(c)
        B, T, _ = h.shape
        x = RMSNorm(c.rms_norm_eps, dt, name="input_norm")(h)
        q, k, v = project_qkv(c, x)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            keys, values = k, v
        else:
            cache = (_write_layer_slots(cache[0], k, layer, index),
                     _write_layer_slots(cache[1], v, layer, index))
            keys = jax.lax.dynamic_index_in_dim(cache[0], layer, 0, keepdims=False)
            values = jax.lax.dynamic_index_in_dim(cache[1], layer, 0, keepdims=False)
        if cache is not None and T > 1 and keys.shape[1] >= 2 * ATTENTION_CHUNK:
            # a cached prefill chunk sees only the slots before its end: skip the rest
            attn = attention_prefix(q, keys.astype(dt), values.astype(dt), bias, index + T)
        else:
            attn = attention(q, keys.astype(dt), values.astype(dt), bias,
                             causal_prefix=cache is None)
        h = h + _dense(c.hidden_size, "o_proj", dt, c.o_bias)(
            attn.reshape(B, T, c.num_heads * c.head_dim))
        x = RMSNorm(c.rms_norm_eps, dt, name="post_attn_norm")(h)
        gate = _dense(c.intermediate_size, "gate_proj", dt, c.mlp_bias)(x)
        up = _dense(c.intermediate_size, "up_proj", dt, c.mlp_bias)(x)
        h = h + _dense(c.hidden_size, "down_proj", dt, c.mlp_bias)(nn.silu(gate) * up)
        return (h, cache, layer + 1), None


class Llama(nn.Module):
    """Decoder stack. `__call__` maps input embeddings to final hidden states."""

    config: LlamaConfig

    def setup(self):
        c = self.config
        dt = _dtype(c)
        self.embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=dt, param_dtype=dt,
                              embedding_init=nn.initializers.normal(0.02))
        self.layers = nn.scan(
            DecoderLayer,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
            length=c.num_layers,
        )(c)
        self.final_norm = RMSNorm(c.rms_norm_eps, dt)
        if not c.tie_word_embeddings:
            self.lm_head = _dense(c.vocab_size, "lm_head", dt)

    def __call__(self, embeds, positions, bias, cache=None, index=None):
        cos, sin = rope_cos_sin(positions, self.config)
        carry = (embeds.astype(_dtype(self.config)), cache, jnp.int32(0))
        (h, kv, _), _ = self.layers(carry, cos, sin, bias, index)
        return self.final_norm(h), kv

    def logits(self, hidden):
        if self.config.tie_word_embeddings:
            return self.embed.attend(hidden).astype(jnp.float32)
        return self.lm_head(hidden).astype(jnp.float32)

    def init_all(self, tokens, positions, bias):
        hidden, _ = self(self.embed(tokens), positions, bias)
        return self.logits(hidden)


# --------------------------------------------------------------------------- KV cache


@flax.struct.dataclass
class KVCache:
    """Fixed-capacity KV cache: k/v [layers, B, S, kv_heads, head_dim]; valid [B, S]."""

    k: jax.Array
    v: jax.Array
    valid: jax.Array

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]


def init_cache(config: LlamaConfig, batch: int, capacity: int, dtype=None) -> KVCache:
    if batch <= 0 or capacity <= 0:
        raise InputError(f"cache needs batch > 0 and capacity > 0, got {batch}, {capacity}")
    shape = (config.num_layers, batch, capacity, config.num_kv_heads, config.head_dim)
    dt = jnp.dtype(dtype or config.dtype)
    return KVCache(k=jnp.zeros(shape, dt), v=jnp.zeros(shape, dt),
                   valid=jnp.zeros((batch, capacity), bool))


# --------------------------------------------------------------------------- validation


def _is_concrete(x) -> bool:
    return x is not None and not isinstance(x, jax.core.Tracer)


def _check_tokens(config: LlamaConfig, tokens) -> None:
    dtype = np.dtype(getattr(tokens, "dtype", np.asarray(tokens).dtype))
    if not np.issubdtype(dtype, np.integer):
        raise InputError(f"token ids must be integers, got dtype {dtype}")
    if _is_concrete(tokens) and np.size(tokens):
        arr = np.asarray(tokens)
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= config.vocab_size:
            bad = hi if hi >= config.vocab_size else lo
            raise InputError(f"token id {bad} is outside the vocabulary [0, {config.vocab_size})")


def _validate(config: LlamaConfig, tokens, embeds, positions, mask, *, name: str):
    """Shape/dtype/range checks shared by forward and prefill; returns (B, T)."""
    if (tokens is None) == (embeds is None):
        raise InputError(f"{name}: pass exactly one of tokens= or embeds=")
    if tokens is not None:
        if np.ndim(tokens) != 2:
            raise InputError(f"{name}: tokens must be [batch, seq], got shape {np.shape(tokens)}")
        _check_tokens(config, tokens)
        B, T = np.shape(tokens)
    else:
        shape = np.shape(embeds)
        if len(shape) != 3 or shape[-1] != config.hidden_size:
            raise InputError(f"{name}: embeds must be [batch, seq, {config.hidden_size}], "
                             f"got shape {shape}")
        if not jnp.issubdtype(getattr(embeds, "dtype", np.float32), jnp.floating):
            raise InputError(f"{name}: embeds must be floating point, got {embeds.dtype}")
        B, T = shape[:2]
    if T == 0 or B == 0:
        raise InputError(f"{name}: empty input of shape {(B, T)}")
    if positions is not None and tuple(np.shape(positions)) != (B, T):
        raise InputError(f"{name}: positions shape {tuple(np.shape(positions))} does not match "
                         f"the input's [batch, seq] = {(B, T)}")
    if mask is not None:
        if tuple(np.shape(mask)) != (B, T):
            raise InputError(f"{name}: mask shape {tuple(np.shape(mask))} does not match the "
                             f"input's [batch, seq] = {(B, T)}")
    return B, T


def _default_positions(positions, B, T):
    if positions is None:
        return jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    return jnp.asarray(positions)


def _default_mask(mask, B, T):
    return jnp.ones((B, T), bool) if mask is None else jnp.asarray(mask).astype(bool)


# --------------------------------------------------------------------------- pure functions


def init_params(config: LlamaConfig, rng: jax.Array) -> Params:
    """Random parameters (tests, benchmarks of cost). Norm scales are 1 as in HF."""
    B, T = 1, 2
    tokens = jnp.zeros((B, T), jnp.int32)
    positions = jnp.zeros((B, T), jnp.int32)
    bias = jnp.zeros((B, T, T), jnp.float32)
    return Llama(config).init(rng, tokens, positions, bias, method=Llama.init_all)["params"]


def embed_tokens(params: Params, ids: jax.Array) -> jax.Array:
    """Token embeddings [..., D] of integer ids [...] (the base model's input space)."""
    return jnp.take(params["embed"]["embedding"], ids, axis=0)


def logits_from_hidden(params: Params, config: LlamaConfig, hidden: jax.Array) -> jax.Array:
    """fp32 logits [..., V] from final (normed) hidden states [..., D]."""
    return Llama(config).apply({"params": params}, hidden, method=Llama.logits)


def forward_core(params, config, tokens, embeds, positions, mask, return_hidden=False):
    """Unvalidated, unjitted forward (see `forward`); for use inside other jitted code."""
    if embeds is None:
        embeds = embed_tokens(params, tokens)
    B, T = embeds.shape[:2]
    bias = _causal_bias(mask, jnp.broadcast_to(jnp.arange(T), (B, T)), config.sliding_window)
    model = Llama(config)
    hidden, _ = model.apply({"params": params}, embeds, positions, bias)
    if return_hidden:
        return hidden
    return model.apply({"params": params}, hidden, method=Llama.logits)


_forward = jax.jit(forward_core, static_argnames=("config", "return_hidden"))


def layer_hidden_core(params, config: LlamaConfig, tokens: jax.Array, layer: int,
                      chunk: int) -> jax.Array:
    """Hidden states [B, T, D] after the first `layer` decoder layers (then the final
    RMSNorm), reading `tokens` [B, T] in independent aligned chunks of `chunk` tokens:
    causal inside a chunk, positions 0..chunk-1 (the read pass, SPEC §2.3a). A trailing
    partial chunk is read as is, so a token's state depends only on its chunk's tokens up
    to itself: features of a prefix equal the prefix of the features. Unjitted."""
    if not 1 <= layer <= config.num_layers:
        raise InputError(f"layer must lie in 1..{config.num_layers}, got {layer}")
    return read_pass_core(params, config, tokens, chunk=chunk, hidden_layer=layer,
                          qk_layers=())["hidden"]


_layer_hidden = jax.jit(layer_hidden_core, static_argnames=("config", "layer", "chunk"))


def _run_layer_range(params, config: LlamaConfig, h, positions, bias, start: int, stop: int,
                     cache=None, index=None):
    """Decoder layers [start, stop) of the stacked `params["layers"]` on residual stream h;
    with `cache` (k, v) [depth, B, S, ...] (depth >= stop), writing and reading its layers
    start..stop-1 at slot `index`. Returns (h, cache).

    Each step indexes one layer of the whole stack, as `Llama`'s own scan does: a static
    slice of the stack (`x[start:stop]`) made XLA:CPU copy it on every call — measured 0.39
    s for 8 tokens through 24 SmolLM2-135M layers against 0.07 s for all 30."""
    cos, sin = rope_cos_sin(positions, config)
    layer = DecoderLayer(config)

    def body(carry, i):
        lp = jax.tree_util.tree_map(
            lambda x: jax.lax.dynamic_index_in_dim(x, i, 0, keepdims=False), params["layers"])
        carry, _ = layer.apply({"params": lp}, carry, cos, sin, bias, index)
        return carry, None

    carry = (h.astype(_dtype(config)), cache, jnp.int32(start))
    (h, cache, _), _ = jax.lax.scan(body, carry, jnp.arange(start, stop, dtype=jnp.int32))
    return h, cache


def _pre_rope_qk(params, config: LlamaConfig, h: jax.Array, layer: int):
    """Layer `layer`'s queries [.., T, H, hd] and keys [.., T, KVH, hd] of residual stream
    h [.., T, D], before RoPE (position-free: comparable across chunks)."""
    lp = jax.tree_util.tree_map(lambda x: x[layer], params["layers"])
    return _PreRopeQK(config).apply({"params": lp}, h)


def read_pass_core(params, config: LlamaConfig, tokens: jax.Array, *, chunk: int,
                   hidden_layer: int | None, qk_layers: tuple[int, ...]) -> dict:
    """The read pass (SPEC §2.3a) over token ids [B, T] in independent aligned chunks of
    `chunk` tokens (as `layer_hidden_core`), one forward for everything later stages use:

    - "hidden" [B, T, D]: the final-normed state after `hidden_layer` layers (GistNet's
      input; equal to `layer_hidden_core(..., layer=hidden_layer)`), or absent;
    - "keys" [B, T, len(qk_layers), KVH, hd] and "queries" [B, T, len(qk_layers), H, hd]:
      pre-RoPE keys and queries of the 0-based layers `qk_layers` (retrieval focus).

    The stack runs only as deep as the deepest layer asked for. Unjitted."""
    B, T = tokens.shape
    qk_layers = tuple(int(x) for x in qk_layers)
    if hidden_layer is not None and not 1 <= hidden_layer <= config.num_layers:
        raise InputError(f"hidden_layer must lie in 1..{config.num_layers}, got {hidden_layer}")
    if any(not 0 <= x < config.num_layers for x in qk_layers) or \
            list(qk_layers) != sorted(set(qk_layers)):
        raise InputError(f"qk_layers must be increasing 0-based layers below "
                         f"{config.num_layers}, got {qk_layers}")
    n = -(-T // chunk)
    ids = jnp.pad(tokens, ((0, 0), (0, n * chunk - T))).reshape(B * n, chunk)
    pos = jnp.broadcast_to(jnp.arange(chunk, dtype=jnp.int32), (B * n, chunk))
    bias = _causal_bias(jnp.ones((B * n, chunk), bool), pos, config.sliding_window)
    h = embed_tokens(params, ids)
    out: dict = {}
    stops = sorted(set(qk_layers) | ({hidden_layer} if hidden_layer is not None else set()))
    done, qs, ks = 0, [], []
    final_norm = RMSNorm(config.rms_norm_eps, _dtype(config))

    def unchunk(x):
        return x.reshape(B, n * chunk, *x.shape[2:])[:, :T]

    for stop in stops:
        if stop > done:
            h, _ = _run_layer_range(params, config, h, pos, bias, done, stop)
            done = stop
        if hidden_layer == stop:
            out["hidden"] = unchunk(final_norm.apply({"params": params["final_norm"]}, h))
        if stop in qk_layers:
            q, k = _pre_rope_qk(params, config, h, stop)
            qs.append(unchunk(q))
            ks.append(unchunk(k))
    if qk_layers:
        out["queries"] = jnp.stack(qs, axis=2)
        out["keys"] = jnp.stack(ks, axis=2)
    return out


_read_pass = jax.jit(read_pass_core,
                     static_argnames=("config", "chunk", "hidden_layer", "qk_layers"))


def read_depth(hidden_layer: int | None, qk_layers: Sequence[int]) -> int:
    """Decoder layers a read needs: through `hidden_layer`, and up to the deepest qk layer
    (its pre-RoPE q/k read the residual stream entering it)."""
    return max([hidden_layer or 0, *qk_layers])


def init_read_cache(config: LlamaConfig, chunk: int, hidden_layer: int | None,
                    qk_layers: Sequence[int], dtype=None) -> KVCache:
    """An empty cache for `read_step_core`: one chunk of `chunk` slots, as deep as the read."""
    depth = read_depth(hidden_layer, qk_layers)
    shape = (max(depth, 1), 1, chunk, config.num_kv_heads, config.head_dim)
    dt = jnp.dtype(dtype or config.dtype)
    return KVCache(k=jnp.zeros(shape, dt), v=jnp.zeros(shape, dt),
                   valid=jnp.zeros((1, chunk), bool))


def read_step_core(params, config: LlamaConfig, cache: KVCache, tokens: jax.Array, index, *,
                   hidden_layer: int | None, qk_layers: tuple[int, ...]) -> tuple[dict, KVCache]:
    """The read pass (`read_pass_core`) continued by T tokens [1, T] at position `index` of
    their chunk, over a cache (`init_read_cache`) holding the chunk's earlier tokens
    (index 0: a new chunk; the caller passes an empty cache). Outputs as `read_pass_core`
    for the T tokens — equal to it up to rounding — at the cost of T tokens instead of the
    chunk: streaming appends read each token once. Unjitted."""
    qk_layers = tuple(int(x) for x in qk_layers)
    B, T = tokens.shape
    index = jnp.asarray(index, jnp.int32)
    positions = jnp.broadcast_to(index + jnp.arange(T, dtype=jnp.int32), (B, T))
    valid = jax.lax.dynamic_update_slice(cache.valid, jnp.ones((B, T), bool), (0, index))
    bias = _causal_bias(valid, positions, config.sliding_window)
    h = embed_tokens(params, tokens)
    stops = sorted(set(qk_layers) | ({hidden_layer} if hidden_layer is not None else set()))
    done, qs, ks = 0, [], []
    kv = (cache.k, cache.v)
    out: dict = {}
    for stop in stops:
        if stop > done:
            h, kv = _run_layer_range(params, config, h, positions, bias, done, stop, kv, index)
            done = stop
        if hidden_layer == stop:
            out["hidden"] = RMSNorm(config.rms_norm_eps, _dtype(config)).apply(
                {"params": params["final_norm"]}, h)
        if stop in qk_layers:
            q, k = _pre_rope_qk(params, config, h, stop)
            qs.append(q)
            ks.append(k)
    if qk_layers:
        out["queries"] = jnp.stack(qs, axis=2)
        out["keys"] = jnp.stack(ks, axis=2)
    return out, KVCache(k=kv[0], v=kv[1], valid=valid)


def read_pass(params: Params, config: LlamaConfig, tokens, *, chunk: int,
              hidden_layer: int | None = None, qk_layers: Sequence[int] = ()) -> dict:
    """Validated, jitted `read_pass_core`."""
    _validate(config, tokens, None, None, None, name="read_pass")
    if chunk < 1:
        raise InputError(f"chunk must be >= 1, got {chunk}")
    return _read_pass(params, config, jnp.asarray(tokens), chunk=int(chunk),
                      hidden_layer=hidden_layer, qk_layers=tuple(qk_layers))


def layer_hidden(params: Params, config: LlamaConfig, tokens, *, layer: int,
                 chunk: int) -> jax.Array:
    """Validated, jitted `layer_hidden_core`: read-pass features of token ids [B, T]."""
    _validate(config, tokens, None, None, None, name="layer_hidden")
    if chunk < 1:
        raise InputError(f"chunk must be >= 1, got {chunk}")
    return _layer_hidden(params, config, jnp.asarray(tokens), layer, chunk)


def forward(params: Params, config: LlamaConfig, *, tokens=None, embeds=None, positions=None,
            mask=None, return_hidden: bool = False) -> jax.Array:
    """Full forward over [B, T] slots → fp32 logits [B, T, V] (or hidden [B, T, D]).

    tokens: int ids [B, T] or embeds: [B, T, D]; positions: [B, T] (default 0..T-1);
    mask: [B, T] bool validity (default all valid). Invalid slots are never attended to;
    their own outputs are finite but meaningless.
    """
    B, T = _validate(config, tokens, embeds, positions, mask, name="forward")
    return _forward(params, config, None if tokens is None else jnp.asarray(tokens),
                    None if embeds is None else jnp.asarray(embeds),
                    _default_positions(positions, B, T), _default_mask(mask, B, T),
                    return_hidden)


def prefill_core(params, config, cache, tokens, embeds, positions, mask, index,
                 return_hidden=False):
    """Unvalidated, unjitted prefill (see `prefill`); index is a scalar int32.

    With return_hidden the first output is the final hidden state [B, T, D], so callers
    that need a few positions' logits skip the [B, T, V] head.
    """
    if embeds is None:
        embeds = embed_tokens(params, tokens)
    B, T = embeds.shape[:2]
    valid = jax.lax.dynamic_update_slice(cache.valid, mask, (0, index))
    query_slot = jnp.broadcast_to(index + jnp.arange(T)[None, :], (B, T))
    bias = _causal_bias(valid, query_slot, config.sliding_window)
    model = Llama(config)
    hidden, (k, v) = model.apply({"params": params}, embeds, positions, bias,
                                 (cache.k, cache.v), index)
    new_cache = KVCache(k=k, v=v, valid=valid)
    if return_hidden:
        return hidden, new_cache
    return model.apply({"params": params}, hidden, method=Llama.logits), new_cache


_prefill = jax.jit(prefill_core, static_argnames=("config", "return_hidden"),
                   donate_argnames=("cache",))


def _check_cache(config: LlamaConfig, cache: KVCache, B: int, T: int, index, name: str):
    if cache.k.shape[0] != config.num_layers or cache.k.shape[3:] != (
            config.num_kv_heads, config.head_dim):
        raise InputError(f"{name}: cache shape {cache.k.shape} does not fit this model")
    if cache.batch_size != B:
        raise InputError(f"{name}: cache batch {cache.batch_size} != input batch {B}")
    if T > cache.capacity:
        raise InputError(f"{name}: {T} slots do not fit a cache of capacity {cache.capacity}")
    if np.ndim(index) != 0:
        raise InputError(f"{name}: index must be a scalar slot (shared by all streams), got "
                         f"shape {np.shape(index)}")
    if _is_concrete(index) and not 0 <= int(index) <= cache.capacity - T:
        raise InputError(f"{name}: writing {T} slots at index {int(index)} overruns the "
                         f"cache capacity {cache.capacity}")


def _index_scalar(index):
    return jnp.asarray(index, jnp.int32)


def prefill(params: Params, config: LlamaConfig, cache: KVCache, *, tokens=None, embeds=None,
            positions=None, mask=None, index=0, return_hidden: bool = False
            ) -> tuple[jax.Array, KVCache]:
    """Write T slots into the cache at slot `index` (a scalar shared by all streams; give
    shorter streams invalid slots via `mask`) and return their logits (or, with
    `return_hidden`, their final hidden states [B, T, D]).

    The slots attend to every valid cache slot before them, so re-prefilling from the first
    changed slot of a working context reuses the unchanged prefix. The cache is donated.
    """
    B, T = _validate(config, tokens, embeds, positions, mask, name="prefill")
    _check_cache(config, cache, B, T, index, "prefill")
    return _prefill(params, config, cache, None if tokens is None else jnp.asarray(tokens),
                    None if embeds is None else jnp.asarray(embeds),
                    _default_positions(positions, B, T), _default_mask(mask, B, T),
                    _index_scalar(index), return_hidden=return_hidden)


def decode_step_unchecked(params, config, cache, token, position, index):
    """One decode step without input validation (for use inside jitted loops)."""
    logits, cache = prefill_core(
        params, config, cache, token[:, None], None, position[:, None],
        jnp.ones((token.shape[0], 1), bool), index)
    return logits[:, 0], cache


_decode_step = jax.jit(decode_step_unchecked, static_argnames=("config",),
                       donate_argnames=("cache",))


def decode_step(params: Params, config: LlamaConfig, cache: KVCache, token, position, index
                ) -> tuple[jax.Array, KVCache]:
    """Append one token per stream at cache slot `index` (scalar): token/position [B] →
    (logits [B, V], cache)."""
    token = jnp.asarray(token)
    if token.ndim != 1:
        raise InputError(f"decode_step: token must be [batch], got shape {token.shape}")
    B = token.shape[0]
    _check_tokens(config, token)
    if np.shape(position) != (B,):
        raise InputError(f"decode_step: position shape {np.shape(position)} != ({B},)")
    _check_cache(config, cache, B, 1, index, "decode_step")
    return _decode_step(params, config, cache, token, jnp.asarray(position),
                        _index_scalar(index))


def make_sharded_forward(config: LlamaConfig, mesh, params: Any, batch_size: int):
    """`forward(params, tokens, positions, mask) -> logits` jitted with explicit shardings
    (params by `sharding.param_shardings`, the batch on `data`)."""
    batch = sharding.batch_sharding(mesh, 2, batch_size)
    in_shardings = (sharding.param_shardings(params, mesh), batch, batch, batch)

    def sharded_forward(params, tokens, positions, mask):
        return forward_core(params, config, tokens, None, positions, mask)

    return jax.jit(sharded_forward, in_shardings=in_shardings,
                   out_shardings=sharding.logits_sharding(mesh, batch_size, config.vocab_size))
