"""Greedy generation from the base model with a fixed-capacity KV cache.

Gemma-style: a static, hashable `GreedySampler` (config + sizes) is the jit static
argument; decoding is a `lax.while_loop` over a `DecodeState` (a flax.struct), so the
whole loop is one compiled call. `stream` runs that loop a chunk of tokens at a time and
yields each chunk, without recompiling (the stop step is a traced value).
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Iterator

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from mcjax.base import model as base
from mcjax.config import LlamaConfig


@flax.struct.dataclass
class DecodeState:
    cache: base.KVCache
    token: jax.Array  # [B] last generated token, the next step's input
    position: jax.Array  # [B] its position id
    index: jax.Array  # [] its cache slot (shared: shorter prompts leave invalid slots)
    step: jax.Array  # [] tokens generated so far
    output: jax.Array  # [B, max_new_tokens] generated ids (pad after EOS)
    done: jax.Array  # [B] stream has emitted EOS


@dataclasses.dataclass(frozen=True)
class GreedySampler:
    config: LlamaConfig
    max_new_tokens: int
    max_prompt_len: int
    eos_id: int | None = None
    pad_id: int = 0
    # prefill the prompt this many slots at a time (a scan over chunks, each attending to
    # the cache so far): attention scores are [chunk, T] instead of [T, T], so a long
    # prompt's prefill fits in memory; the same numbers as one prefill up to rounding.
    # None: one prefill of the whole prompt.
    prefill_chunk: int | None = None

    def __post_init__(self):
        if self.max_new_tokens <= 0 or self.max_prompt_len <= 0:
            raise ValueError("max_new_tokens and max_prompt_len must be > 0")
        if self.prefill_chunk is not None and (not isinstance(self.prefill_chunk, int)
                                               or self.prefill_chunk <= 0):
            raise ValueError(f"prefill_chunk must be a positive int or None, got "
                             f"{self.prefill_chunk!r}")

    @property
    def padded_prompt_len(self) -> int:
        """Prompt slots: max_prompt_len rounded up to whole prefill chunks."""
        c = self.prefill_chunk or self.max_prompt_len
        return -(-self.max_prompt_len // c) * c

    @property
    def cache_capacity(self) -> int:
        return self.padded_prompt_len + self.max_new_tokens

    # ------------------------------------------------------------------ jitted pieces
    @partial(jax.jit, static_argnums=0)
    def _start(self, params, prompt, lengths) -> DecodeState:
        B, T = prompt.shape
        cache = base.init_cache(self.config, B, self.cache_capacity)
        C = min(self.prefill_chunk or T, T)
        n = T // C  # _prepare padded the prompt to whole chunks

        def chunk_step(cache, i):  # prefill slots [i*C, (i+1)*C) over the cache so far
            slots = i * C + jnp.arange(C)[None, :]
            toks = jax.lax.dynamic_slice_in_dim(prompt, i * C, C, axis=1)
            hidden, cache = base.prefill_core(
                params, self.config, cache, toks, None, jnp.broadcast_to(slots, (B, C)),
                slots < lengths[:, None], i * C, return_hidden=True)
            # each stream's last prompt token, if it lies in this chunk
            row = jnp.clip(lengths - 1 - i * C, 0, C - 1)
            return cache, jnp.take_along_axis(hidden, row[:, None, None], axis=1)[:, 0]

        cache, lasts = jax.lax.scan(chunk_step, cache, jnp.arange(n, dtype=jnp.int32))
        last = jnp.take_along_axis(lasts, ((lengths - 1) // C)[None, :, None], axis=0)[0]
        first = jnp.argmax(base.logits_from_hidden(params, self.config, last), -1)
        first = first.astype(jnp.int32)
        output = jnp.full((B, self.max_new_tokens), self.pad_id, jnp.int32).at[:, 0].set(first)
        return DecodeState(cache=cache, token=first, position=lengths, index=jnp.int32(T),
                           step=jnp.int32(1), output=output, done=self._is_eos(first))

    def _is_eos(self, tok):
        return jnp.zeros(tok.shape, bool) if self.eos_id is None else tok == self.eos_id

    @partial(jax.jit, static_argnums=0, donate_argnums=2)
    def _advance(self, params, state: DecodeState, until) -> DecodeState:
        def cond(s):
            return (s.step < jnp.minimum(until, self.max_new_tokens)) & ~jnp.all(s.done)

        def body(s):
            logits, cache = base.decode_step_unchecked(params, self.config, s.cache, s.token,
                                                       s.position, s.index)
            nxt = jnp.where(s.done, self.pad_id, jnp.argmax(logits, -1)).astype(jnp.int32)
            return DecodeState(cache=cache, token=nxt, position=s.position + 1,
                               index=s.index + 1, step=s.step + 1,
                               output=s.output.at[:, s.step].set(nxt),
                               done=s.done | self._is_eos(nxt))

        return jax.lax.while_loop(cond, body, state)

    # ------------------------------------------------------------------ public API
    def _prepare(self, prompt, lengths):
        prompt = np.asarray(prompt)
        if prompt.ndim == 1:
            prompt = prompt[None]
        if prompt.ndim != 2 or prompt.shape[1] == 0:
            raise base.InputError(f"prompt must be [batch, seq] with seq > 0, got {prompt.shape}")
        if prompt.shape[1] > self.max_prompt_len:
            raise base.InputError(f"prompt of {prompt.shape[1]} tokens exceeds this sampler's "
                                  f"max_prompt_len={self.max_prompt_len}")
        base._check_tokens(self.config, prompt)
        B, T = prompt.shape
        lengths = np.full((B,), T) if lengths is None else np.asarray(lengths)
        if lengths.shape != (B,) or lengths.min() < 1 or lengths.max() > T:
            raise base.InputError(f"lengths must be [batch] in [1, {T}], got {lengths}")
        # Pad to the static prompt length so every prompt shares one compilation.
        padded = np.full((B, self.padded_prompt_len), self.pad_id, np.int32)
        padded[:, :T] = prompt
        return jnp.asarray(padded), jnp.asarray(lengths, jnp.int32)

    def generate(self, params, prompt, lengths=None) -> tuple[np.ndarray, np.ndarray]:
        """Greedy tokens [B, max_new_tokens] (pad after EOS) and the count per stream."""
        state = self._advance(params, self._start(params, *self._prepare(prompt, lengths)),
                              jnp.int32(self.max_new_tokens))
        return np.asarray(state.output), self._counts(state)

    def _counts(self, state) -> np.ndarray:
        out, step = np.asarray(state.output), int(state.step)
        if self.eos_id is None:
            return np.full((out.shape[0],), step)
        is_eos = out[:, :step] == self.eos_id
        return np.where(is_eos.any(1), is_eos.argmax(1) + 1, step)

    def stream(self, params, prompt, chunk: int = 4) -> Iterator[np.ndarray]:
        """Yield the new tokens of a single stream chunk by chunk (stops after EOS)."""
        prompt_arr, lengths = self._prepare(prompt, None)
        if prompt_arr.shape[0] != 1:
            raise base.InputError("stream() takes a single prompt")
        state = self._start(params, prompt_arr, lengths)
        emitted = 0
        while True:
            end = int(state.step)
            new = np.asarray(state.output[0, emitted:end])
            if self.eos_id is not None and (new == self.eos_id).any():
                yield new[: int(np.argmax(new == self.eos_id)) + 1]
                return
            if len(new):
                yield new
            emitted = end
            if end >= self.max_new_tokens:
                return
            state = self._advance(params, state, jnp.int32(end + chunk))
