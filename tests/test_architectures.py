"""Every architecture switch of the one decoder (SPEC §2.1) against transformers' own torch
model of that family, on tiny random configs built here (no hub): Llama 3.x / linear / yarn
RoPE scaling, Llama attention and MLP biases, Qwen2 (q/k/v biases), Qwen3 (per-head q/k
RMSNorm, explicit head_dim), Mistral (sliding window). Logits from ids and from embeddings
with explicit positions and a validity mask, prefill + cached decode, and the read pass's
pre-RoPE keys/queries (after biases and q/k norms) against the reference's own modules."""

import dataclasses
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcjax.base import model as base
from mcjax.base import parity
from mcjax.base.loading import ModelLoadError, load_config, load_params
from mcjax.config import TINY_LLAMA, ConfigError, LlamaConfig, tiny_architectures

torch = pytest.importorskip("torch")

ARCHS = tiny_architectures()


_reference = parity.torch_reference
_ref_logits = parity.torch_logits


@pytest.fixture(params=sorted(ARCHS))
def arch(request, tmp_path):
    config = ARCHS[request.param]
    hf = _reference(config, tmp_path)
    loaded = load_config(tmp_path)
    assert loaded == config, "config.json must round-trip every switch"
    return request.param, config, load_params(tmp_path, loaded), hf


def test_logits_from_token_ids_match_transformers(arch):
    name, config, params, hf = arch
    assert hf.config.model_type == config.architecture
    tokens = np.random.default_rng(1).integers(0, config.vocab_size, (2, 23))
    ours = np.asarray(base.forward(params, config, tokens=tokens))
    chex.assert_trees_all_close(ours, _ref_logits(hf, tokens), atol=1e-4, rtol=1e-4)


def test_embeddings_positions_and_mask_match_transformers(arch):
    name, config, params, hf = arch
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, config.vocab_size, (2, 17))
    # positions far past the RoPE-scaling lengths, with gaps (as gists' span centres)
    positions = np.cumsum(rng.integers(1, 60, (2, 17)), axis=1)
    mask = np.ones((2, 17), bool)
    mask[1, [3, 4, 11]] = False  # invalid slots in the middle of a stream
    ours = np.asarray(base.forward(params, config, embeds=base.embed_tokens(params, tokens),
                                   positions=positions, mask=mask))
    ref = _ref_logits(hf, tokens, positions, mask)
    # valid slots only (an invalid slot's own output is meaningless); a sliding window
    # counts slots, masked ones included, in both
    chex.assert_trees_all_close(ours[mask], ref[mask], atol=1e-4, rtol=1e-4)


def test_prefill_then_cached_decode_equals_the_full_forward(arch):
    name, config, params, hf = arch
    B, T, prefix = 2, 19, 6
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, config.vocab_size, (B, T)))
    full = np.asarray(base.forward(params, config, tokens=tokens))
    chex.assert_trees_all_close(full, _ref_logits(hf, tokens), atol=1e-4, rtol=1e-4)
    cache = base.init_cache(config, B, capacity=23)
    logits, cache = base.prefill(params, config, cache, tokens=tokens[:, :prefix])
    chex.assert_trees_all_close(logits, full[:, :prefix], atol=1e-5)
    for t in range(prefix, T):
        step, cache = base.decode_step(params, config, cache, tokens[:, t],
                                       jnp.full((B,), t), t)
        chex.assert_trees_all_close(step, full[:, t], atol=1e-5)
    assert bool(cache.valid[:, :T].all()) and not bool(cache.valid[:, T:].any())


def test_read_pass_queries_and_keys_are_the_references_pre_rope_projections(arch):
    name, config, params, hf = arch
    tokens = np.random.default_rng(5).integers(0, config.vocab_size, (1, 13))
    captured = {}

    def hook(key):
        def fn(module, inputs, output):
            captured[key] = output.detach().numpy()
        return fn

    handles = []
    for i, layer in enumerate(hf.model.layers):
        attn = layer.self_attn
        # after the bias (part of the Linear) and, for Qwen3, the per-head q/k norm
        q_mod = attn.q_norm if config.qk_norm else attn.q_proj
        k_mod = attn.k_norm if config.qk_norm else attn.k_proj
        handles += [q_mod.register_forward_hook(hook(("q", i))),
                    k_mod.register_forward_hook(hook(("k", i)))]
    _ref_logits(hf, tokens)
    for h in handles:
        h.remove()
    layers = tuple(range(config.num_layers))
    out = base.read_pass(params, config, tokens, chunk=13, qk_layers=layers)
    for i in layers:
        ref_q = captured[("q", i)].reshape(1, 13, config.num_heads, config.head_dim)
        ref_k = captured[("k", i)].reshape(1, 13, config.num_kv_heads, config.head_dim)
        chex.assert_trees_all_close(np.asarray(out["queries"][:, :, i]), ref_q, atol=1e-5)
        chex.assert_trees_all_close(np.asarray(out["keys"][:, :, i]), ref_k, atol=1e-5)


def test_rope_inverse_frequencies_match_transformers():
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for name in ("llama3_rope", "linear_rope", "yarn_rope"):
        config = ARCHS[name]
        hf_config = AutoConfig.for_model(**config.to_hf_dict())
        inv_freq, scale = ROPE_INIT_FUNCTIONS[config.rope_scaling.kind](hf_config, "cpu")
        np.testing.assert_allclose(base.rope_inv_freq(config), inv_freq.numpy(), rtol=1e-6)
        assert config.rope_scaling.cos_sin_scale == pytest.approx(scale)
        assert not np.allclose(base.rope_inv_freq(config),
                               base.rope_inv_freq(dataclasses.replace(config, rope_scaling=None)))


def test_sliding_window_hides_slots_older_than_the_window():
    config = ARCHS["mistral_window"]
    params = base.init_params(config, jax.random.key(0))
    tokens = np.random.default_rng(6).integers(0, config.vocab_size, (1, 20))
    full = np.asarray(base.forward(params, config, tokens=tokens))
    # the last token's logits depend only on the last `window` slots' inputs... at layer 1;
    # deeper layers widen the receptive field to num_layers · (window - 1) + 1 slots
    reach = config.num_layers * (config.sliding_window - 1) + 1
    changed = tokens.copy()
    changed[0, : 20 - reach] = (changed[0, : 20 - reach] + 1) % config.vocab_size
    np.testing.assert_allclose(np.asarray(base.forward(params, config, tokens=changed))[0, -1],
                               full[0, -1], atol=1e-6)
    no_window = dataclasses.replace(config, sliding_window=None)
    assert not np.allclose(np.asarray(base.forward(params, no_window, tokens=tokens))[0, -1],
                           full[0, -1], atol=1e-4)


def test_sharded_safetensors_directory_loads_the_same_params_as_one_file(tmp_path):
    from safetensors.numpy import load_file, save_file

    config = ARCHS["qwen2"]
    one = tmp_path / "one"
    _reference(config, one)
    tensors = load_file(one / "model.safetensors")
    names = sorted(tensors)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    for f in ("config.json",):
        (sharded / f).write_text((one / f).read_text())
    weight_map = {}
    for s in range(3):
        shard = f"model-{s + 1:05d}-of-00003.safetensors"
        part = {n: tensors[n].astype(np.float16) if s == 1 else tensors[n]
                for n in names[s::3]}  # one shard in fp16: a mixed-precision checkpoint
        save_file(part, sharded / shard, metadata={"format": "pt"})
        weight_map.update({n: shard for n in part})
    (sharded / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": weight_map}))
    a = load_params(one, config)
    b = load_params(sharded, config)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    chex.assert_trees_all_close(a, b, atol=2e-3)  # the fp16 shard rounds
    # a shard the index names but the directory lacks is a clear error
    (sharded / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="names shards that are not in"):
        load_params(sharded, config)


def test_bf16_checkpoint_loads_into_a_bf16_config(tmp_path):
    config = ARCHS["qwen3"]
    hf = _reference(config, tmp_path)
    hf.to(torch.bfloat16).save_pretrained(tmp_path)
    params = load_params(tmp_path, dataclasses.replace(config, dtype="bfloat16"))
    leaf = params["layers"]["q_norm"]["scale"]
    assert leaf.dtype == jnp.bfloat16
    ref = hf.model.layers[1].self_attn.q_norm.weight.detach().float().numpy()
    np.testing.assert_array_equal(np.asarray(leaf[1], np.float32), ref)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "gemma2"}, r"gemma2.*soft-capping"),
    ({"model_type": "gpt2"}, r"model_type 'gpt2' is not supported"),
    ({"rope_scaling": {"rope_type": "longrope", "factor": 2.0}}, r"'longrope' is not implemented"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                       "original_max_position_embeddings": 8192}}, r"missing field 'low_freq"),
    ({"hidden_act": "gelu"}, r"hidden_act 'gelu'"),
    ({"model_type": "qwen2", "use_sliding_window": True}, r"use_sliding_window"),
])
def test_unsupported_configs_are_errors_naming_the_field(change, message):
    d = {**TINY_LLAMA.to_hf_dict(), **change}
    with pytest.raises(ConfigError, match=message):
        LlamaConfig.from_hf_dict(d)


def test_a_tensor_the_config_does_not_expect_is_a_clear_error(tmp_path):
    _reference(ARCHS["qwen2"], tmp_path)  # has q/k/v biases
    with pytest.raises(ModelLoadError, match=r"unexpected tensor .*_proj.bias"):
        load_params(tmp_path, dataclasses.replace(ARCHS["qwen2"], architecture="llama",
                                                  qkv_bias=False))


@pytest.mark.slow
def test_packaged_reader_matches_transformers_qwen2_on_its_converted_directory():
    """The converted Qwen2.5-Coder-0.5B-Instruct (`make setup MODEL=qwen2.5-coder-0.5b`)
    through our decoder against transformers' torch Qwen2ForCausalLM on the same directory."""
    from mcjax.base import convert
    from mcjax.base.loading import load_base_model

    path = convert.shipped_model_dir("qwen2.5-coder-0.5b")
    if not (path / convert.MANIFEST).is_file():
        pytest.skip("the packaged reader is not set up (make setup MODEL=qwen2.5-coder-0.5b)")
    from transformers import Qwen2ForCausalLM

    reader = load_base_model(path)
    assert reader.config.architecture == "qwen2" and reader.config.qkv_bias
    hf = Qwen2ForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                          attn_implementation="eager").eval()
    text = ("def fibonacci(n):\n    # the n-th Fibonacci number, iteratively\n    a, b = 0, 1\n"
            "    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n"
            "The capital of France is Paris, and the capital of Italy is")
    tokens = reader.encode(text)[None]
    ours = np.asarray(base.forward(reader.params, reader.config, tokens=tokens))
    ref = _ref_logits(hf, tokens)
    err = float(np.abs(ours - ref).max())
    assert err < 2e-3 * float(np.abs(ref).max()), err
    np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))
    assert reader.decode([ours[0, -1].argmax()]).strip() == "Rome"
