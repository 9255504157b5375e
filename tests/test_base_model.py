"""The frozen Llama decoder: parity with transformers' reference, masks, positions, KV cache."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcjax.base import model as base
from mcjax.base import parity

torch = pytest.importorskip("torch")


_hf_logits = parity.torch_logits  # the tiny per-architecture parity: test_architectures.py


@pytest.mark.slow
def test_smollm2_forward_matches_transformers_reference(smollm2):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(
        str(smollm2.path), dtype=torch.float32, attn_implementation="eager").eval()
    text = ("MegaContext keeps a fixed-size working context of raw tokens and learned gists, "
            "so a frozen language model can read a history far longer than its window. ") * 2
    tokens = smollm2.encode(text)[None, :64]
    assert tokens.shape == (1, 64)
    ours = np.asarray(base.forward(smollm2.params, smollm2.config, tokens=tokens))
    ref = _hf_logits(hf, tokens)
    chex.assert_trees_all_close(ours, ref, atol=5e-4, rtol=1e-4)
    np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))


def test_embedding_input_equals_token_input(tiny_llama):
    config, params = tiny_llama
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (3, 11)))
    by_ids = base.forward(params, config, tokens=tokens)
    by_embeds = base.forward(params, config, embeds=base.embed_tokens(params, tokens))
    chex.assert_trees_all_close(by_ids, by_embeds, atol=1e-6)


def test_streams_of_different_lengths_share_a_cache_and_decode_exactly(tiny_llama):
    config, params = tiny_llama
    rng = np.random.default_rng(5)
    a = jnp.asarray(rng.integers(0, config.vocab_size, (1, 10)))
    b = jnp.asarray(rng.integers(0, config.vocab_size, (1, 7)))
    cache = base.init_cache(config, 2, capacity=12)
    # both prompts right-padded to 8 slots; b's slots 5..7 are invalid
    padded = jnp.concatenate([a[:, :8], jnp.pad(b[:, :5], ((0, 0), (0, 3)))], axis=0)
    mask = jnp.asarray([[True] * 8, [True] * 5 + [False] * 3])
    positions = jnp.asarray([list(range(8)), list(range(5)) + [0, 0, 0]])
    _, cache = base.prefill(params, config, cache, tokens=padded, mask=mask, positions=positions)
    for step in range(2):  # both streams write at the shared slot 8 + step
        logits, cache = base.decode_step(
            params, config, cache, jnp.asarray([a[0, 8 + step], b[0, 5 + step]]),
            jnp.asarray([8 + step, 5 + step]), 8 + step)
        chex.assert_trees_all_close(
            logits[0], base.forward(params, config, tokens=a[:, : 9 + step])[0, -1], atol=1e-5)
        chex.assert_trees_all_close(
            logits[1], base.forward(params, config, tokens=b[:, : 6 + step])[0, -1], atol=1e-5)
    with pytest.raises(base.InputError, match="index must be a scalar"):
        base.decode_step(params, config, cache, a[:, 0].repeat(2), jnp.asarray([1, 1]),
                         jnp.asarray([10, 11]))


def test_invalid_slots_do_not_change_valid_outputs(tiny_llama):
    config, params = tiny_llama
    rng = np.random.default_rng(6)
    T = 23
    mask = rng.random((1, T)) < 0.6
    mask[0, 0] = True
    embeds = jnp.asarray(rng.normal(size=(1, T, config.hidden_size)), jnp.float32)
    positions = jnp.asarray(np.cumsum(rng.integers(1, 4, (1, T)), axis=1))
    out = base.forward(params, config, embeds=embeds, positions=positions, mask=mask)
    # Same valid slots with different garbage in the invalid ones ...
    garbage = jnp.where(mask[..., None], embeds, 100.0 * rng.normal(size=embeds.shape))
    out2 = base.forward(params, config, embeds=garbage, positions=positions, mask=mask)
    chex.assert_trees_all_close(out[mask], out2[mask], atol=1e-5)
    # ... equal the forward over the valid slots alone.
    idx = np.flatnonzero(mask[0])
    compact = base.forward(params, config, embeds=embeds[:, idx], positions=positions[:, idx])
    chex.assert_trees_all_close(out[0, idx], compact[0], atol=1e-5)
    assert np.isfinite(np.asarray(out)).all()


def test_shifting_all_positions_leaves_logits_unchanged(tiny_llama):
    config, params = tiny_llama
    tokens = jnp.asarray(np.random.default_rng(7).integers(0, config.vocab_size, (2, 13)))
    positions = jnp.broadcast_to(jnp.arange(13), (2, 13))
    a = base.forward(params, config, tokens=tokens, positions=positions)
    b = base.forward(params, config, tokens=tokens, positions=positions + 517)
    chex.assert_trees_all_close(a, b, atol=2e-4)
    # and the check is not vacuous: scrambling positions does change them
    c = base.forward(params, config, tokens=tokens, positions=positions[:, ::-1])
    assert float(jnp.abs(a - c).max()) > 1e-3


def test_out_of_vocabulary_token_is_a_clear_error(tiny_llama):
    config, params = tiny_llama
    with pytest.raises(base.InputError, match=r"token id 263 is outside the vocabulary"):
        base.forward(params, config, tokens=np.array([[1, 2, config.vocab_size]]))
    with pytest.raises(base.InputError, match="outside the vocabulary"):
        base.forward(params, config, tokens=np.array([[-1, 2]]))
    cache = base.init_cache(config, 1, 4)
    with pytest.raises(base.InputError, match="outside the vocabulary"):
        base.decode_step(params, config, cache, np.array([999]), np.array([0]), np.array([0]))


def test_mismatched_positions_or_mask_shapes_are_clear_errors(tiny_llama):
    config, params = tiny_llama
    tokens = np.zeros((2, 5), np.int32)
    with pytest.raises(base.InputError, match=r"positions shape \(2, 4\) does not match"):
        base.forward(params, config, tokens=tokens, positions=np.zeros((2, 4), np.int32))
    with pytest.raises(base.InputError, match=r"mask shape \(5,\) does not match"):
        base.forward(params, config, tokens=tokens, mask=np.ones((5,), bool))
    with pytest.raises(base.InputError, match="exactly one of tokens= or embeds="):
        base.forward(params, config)
    with pytest.raises(base.InputError, match=r"embeds must be \[batch, seq, 44\]"):
        base.forward(params, config, embeds=np.zeros((2, 5, 7), np.float32))
    with pytest.raises(base.InputError, match="token ids must be integers"):
        base.forward(params, config, tokens=np.zeros((2, 5), np.float32))


def test_cache_overrun_is_a_clear_error(tiny_llama):
    config, params = tiny_llama
    cache = base.init_cache(config, 1, 4)
    with pytest.raises(base.InputError, match="overruns the cache capacity 4"):
        base.prefill(params, config, cache, tokens=np.zeros((1, 3), np.int32), index=2)
    with pytest.raises(base.InputError, match="do not fit a cache of capacity 4"):
        base.prefill(params, config, cache, tokens=np.zeros((1, 5), np.int32))


def test_forward_compiles_once_per_shape(tiny_llama):
    config, params = tiny_llama
    base._forward.clear_cache()
    for seed in range(3):
        tokens = np.random.default_rng(seed).integers(0, config.vocab_size, (1, 7))
        base.forward(params, config, tokens=tokens)
    assert base._forward._cache_size() == 1


def test_blocked_causal_attention_equals_full_attention(tiny_llama, monkeypatch):
    config, params = tiny_llama
    rng = np.random.default_rng(8)
    T = 29  # not a multiple of the block size: the last block is short
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (2, T)))
    positions = jnp.broadcast_to(jnp.arange(T), (2, T))
    mask = jnp.asarray(rng.random((2, T)) < 0.8).at[:, 0].set(True)

    def run(chunk):
        monkeypatch.setattr(base, "ATTENTION_CHUNK", chunk)
        return jax.jit(lambda p: base.forward_core(p, config, tokens, None, positions, mask))(
            params)

    blocked, full = run(4), run(10_000)
    chex.assert_trees_all_close(blocked, full, atol=1e-5)


def test_prefix_attention_skips_later_keys_and_equals_full_attention():
    rng = np.random.default_rng(9)
    B, T, H, KVH, hd, S = 2, 5, 6, 2, 8, 37
    q, k, v = (jnp.asarray(rng.normal(size=s), jnp.float32)
               for s in ((B, T, H, hd), (B, S, KVH, hd), (B, S, KVH, hd)))
    for index in (0, 9, 32):
        valid = jnp.asarray(rng.random((B, S)) < 0.8).at[:, index].set(True)
        bias = base._causal_bias(valid, jnp.broadcast_to(index + jnp.arange(T), (B, T)))
        want = base._attend(q, k, v, bias)
        got = base.attention_prefix(q, k, v, bias, jnp.int32(index + T), block=4)
        chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)
        # keys past the chunk's end are never read: garbage there changes nothing
        junk = k.at[:, index + T + 4:].set(1e6)
        chex.assert_trees_all_close(
            base.attention_prefix(q, junk, v, bias, jnp.int32(index + T), block=4), got)


def test_cached_chunked_prefill_with_prefix_attention_equals_a_full_forward(tiny_llama,
                                                                            monkeypatch):
    config, params = tiny_llama
    monkeypatch.setattr(base, "ATTENTION_CHUNK", 4)  # capacity 30 >= 2 blocks: prefix path
    rng = np.random.default_rng(10)
    T, C = 30, 6
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (2, T)))
    positions = jnp.broadcast_to(jnp.arange(T), (2, T))
    full = base.forward_core(params, config, tokens, None, positions, jnp.ones((2, T), bool))
    cache = base.init_cache(config, 2, T)
    outs = []
    for start in range(0, T, C):
        logits, cache = base.prefill(params, config, cache, tokens=tokens[:, start:start + C],
                                     positions=positions[:, start:start + C], index=start)
        outs.append(logits)
    chex.assert_trees_all_close(jnp.concatenate(outs, 1), full, atol=2e-4, rtol=2e-4)


def test_read_steps_over_a_chunk_cache_equal_the_whole_chunk_read(tiny_llama):
    """`read_step_core` continuing a chunk's KV cache segment by segment gives the read
    pass of the whole chunk (`read_pass_core`: hidden states, pre-RoPE queries and keys),
    for segments of any sizes, and a fresh cache starts the next chunk."""
    config, params = tiny_llama
    chunk, T = 11, 19  # a full chunk and a partial one
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, config.vocab_size, (1, T)))
    layers = dict(hidden_layer=2, qk_layers=(0, 1))
    want = base.read_pass(params, config, tokens, chunk=chunk, **layers)
    step = jax.jit(lambda c, t, i: base.read_step_core(params, config, c, t, i, **layers))
    for cuts in ((0, 3, 4, 11, 16, 19), (0, 11, 19), (0, 1, 2, 11, 12, 19)):
        got = {k: [] for k in want}
        cache = None
        for a, b in zip(cuts[:-1], cuts[1:]):
            if a % chunk == 0:
                cache = base.init_read_cache(config, chunk, **layers)
            out, cache = step(cache, tokens[:, a:b], jnp.int32(a % chunk))
            for k in got:
                got[k].append(out[k])
        chex.assert_trees_all_close({k: jnp.concatenate(v, 1) for k, v in got.items()}, want,
                                    atol=1e-5, rtol=1e-5)
    assert base.read_depth(2, (0, 1)) == 2 and base.read_depth(None, (5,)) == 5


def test_a_read_split_at_its_qk_layers_equals_the_whole_stack(tiny_llama):
    """A read with qk layers runs the stack in ranges (0..q, q..hidden_layer); chunk by
    chunk, its hidden states must equal an independent reference — the plain full forward
    of that chunk — whole and continued step by step over a chunk cache."""
    config, params = tiny_llama
    assert config.num_layers >= 3
    chunk, T = 7, 12
    tokens = jnp.asarray(np.random.default_rng(6).integers(0, config.vocab_size, (1, T)))
    layers = dict(hidden_layer=config.num_layers, qk_layers=(1, config.num_layers - 1))
    got = base.read_pass(params, config, tokens, chunk=chunk, **layers)["hidden"]
    steps = []
    for a, b in ((0, 3), (3, 7), (7, 12)):
        if a % chunk == 0:
            cache = base.init_read_cache(config, chunk, **layers)
        out, cache = base.read_step_core(params, config, cache, tokens[:, a:b],
                                         jnp.int32(a % chunk), **layers)
        steps.append(out["hidden"])
    for start in range(0, T, chunk):
        ref = base.forward(params, config, tokens=tokens[:, start:start + chunk],
                           return_hidden=True)
        chex.assert_trees_all_close(got[:, start:start + chunk], ref, atol=1e-5)
        chex.assert_trees_all_close(jnp.concatenate(steps, 1)[:, start:start + chunk], ref,
                                    atol=1e-5)


def test_layer_hidden_reads_independent_chunks_and_equals_a_truncated_stack(tiny_llama):
    """Read-pass features: each aligned chunk is read on its own (positions from 0), and a
    token's state after `layer` layers equals an independent reference — the full forward
    of a model built from only the first `layer` layers, run on that chunk alone."""
    config, params = tiny_llama
    chunk, T = 7, 17  # two full chunks and a partial one
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, config.vocab_size, (2, T)))
    for layer in (1, config.num_layers):
        got = base.layer_hidden(params, config, tokens, layer=layer, chunk=chunk)
        chex.assert_shape(got, (2, T, config.hidden_size))
        sub_cfg = dataclasses.replace(config, num_layers=layer)
        sub = dict(params, layers=jax.tree.map(lambda x: x[:layer], params["layers"]))
        for start in range(0, T, chunk):
            piece = tokens[:, start:start + chunk]
            ref = base.forward(sub, sub_cfg, tokens=piece, return_hidden=True)
            chex.assert_trees_all_close(got[:, start:start + chunk], ref, atol=1e-5)
        # features of a prefix are the prefix of the features (appending never changes them)
        head = base.layer_hidden(params, config, tokens[:, :10], layer=layer, chunk=chunk)
        chex.assert_trees_all_close(head, got[:, :10], atol=1e-5)
    with pytest.raises(base.InputError, match="layer must lie in"):
        base.layer_hidden(params, config, tokens, layer=config.num_layers + 1, chunk=chunk)
