"""GGUF → HF conversion of the shipped SmolLM2: layout, tokenizer, end-to-end generation."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mcjax.base import convert


def test_unpermute_inverts_llama_cpp_permute():
    rng = np.random.default_rng(0)
    n_heads, head_dim, width = 3, 8, 5
    w = rng.normal(size=(n_heads * head_dim, width))
    # llama.cpp's convert_hf_to_gguf permute
    permuted = (w.reshape(n_heads, 2, head_dim // 2, width).swapaxes(1, 2).reshape(w.shape))
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(convert.unpermute_qk(permuted, n_heads), w)


def test_gguf_tensor_names_map_to_hf_names():
    assert convert.hf_tensor_name("blk.7.attn_q.weight") == "model.layers.7.self_attn.q_proj.weight"
    assert convert.hf_tensor_name("blk.0.ffn_norm.weight") == (
        "model.layers.0.post_attention_layernorm.weight")
    assert convert.hf_tensor_name("token_embd.weight") == "model.embed_tokens.weight"
    with pytest.raises(convert.ConversionError, match="unexpected tensor"):
        convert.hf_tensor_name("blk.0.mystery.weight")


@pytest.mark.slow
def test_converted_smollm2_has_the_documented_architecture(smollm2):
    c = smollm2.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.intermediate_size,
            c.vocab_size, c.max_position_embeddings) == (30, 576, 9, 3, 1536, 49152, 8192)
    assert c.tie_word_embeddings and c.rope_theta == 1e5 and c.rms_norm_eps == 1e-5
    assert "lm_head" not in smollm2.params


@pytest.mark.slow
@settings(max_examples=150)
@given(st.text(max_size=200))
def test_tokenizer_round_trips_text_exactly(smollm2, text):
    if set(text.encode("utf-8")) & smollm2.unencodable_bytes:
        with pytest.raises(ValueError, match="cannot represent"):
            smollm2.encode(text)
    else:
        assert smollm2.decode(smollm2.encode(text)) == text


@pytest.mark.slow
def test_tokenizer_refuses_characters_it_would_silently_drop(smollm2):
    # SmolLM2's vocabulary has no token for the byte 0x1D; the raw tokenizer drops it.
    raw = smollm2.tokenizer.encode("a\x1db", add_special_tokens=False)
    assert smollm2.decode(raw) == "ab"
    with pytest.raises(ValueError, match=r"cannot represent .*\\x1d"):
        smollm2.encode("a\x1db")
    assert 0x1D in smollm2.unencodable_bytes and ord("a") not in smollm2.unencodable_bytes


@pytest.mark.slow
def test_tokenizer_round_trips_tricky_text_and_splits_digits(smollm2):
    for text in ["  leading spaces\n\n\ttabs\r\n", "naïve café — 東京 🙂", "x=12345;", "",
                 "<|im_start|>user\nhi<|im_end|>"]:
        assert smollm2.decode(smollm2.encode(text)) == text
    digits = smollm2.encode("12345")
    assert len(digits) == 5  # SmolLM2 pre-tokenizer: every digit is its own token
    assert smollm2.encode("<|im_start|>").tolist() == [1]  # control tokens stay atomic


@pytest.mark.slow
def test_greedy_smollm2_says_paris(smollm2):
    from mcjax.base.generate import GreedySampler

    ids = smollm2.encode("The capital of France is")
    sampler = GreedySampler(smollm2.config, max_new_tokens=4, max_prompt_len=len(ids),
                            eos_id=smollm2.config.eos_token_id)
    out, n = sampler.generate(smollm2.params, ids)
    assert smollm2.decode(out[0, : n[0]]).startswith(" Paris")
